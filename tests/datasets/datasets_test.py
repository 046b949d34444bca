"""Tests of dmue_jax.datasets: each builder on a small fake tree in its real layout."""

import csv
import logging
import os

import cv2
import numpy as np
import pytest

from dmue_jax import config_lib
from dmue_jax import datasets
from dmue_jax.datasets import facegen
from dmue_jax.datasets import ferplus
from dmue_jax.datasets import rafdb


def input_config(**overrides):
  cfg = config_lib.base_config().input
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def write_image(path, value, size=(12, 10), ext=None):
  """A flat image whose pixel value tells which file it came from."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.full((size[1], size[0], 3), value, np.uint8)
  ok, buf = cv2.imencode(ext or os.path.splitext(path)[1], image)
  assert ok
  with open(path, 'wb') as f:
    f.write(buf.tobytes())


def write_truncated_jpeg(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
  data = cv2.imencode('.jpg', noise)[1].tobytes()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def write_garbage(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(b'this is not an image')


def grey_value(example):
  """The flat value of an image written by write_image (JPEG may shift it slightly)."""
  return int(np.round(example['image'].mean()))


# ---------------------------------------------------------------------------- RAF-DB

RAF_ENTRIES = [('train_00001.jpg', 5), ('train_00002.jpg', 1), ('test_0001.jpg', 7),
               ('train_00003.jpg', 7), ('test_0002.jpg', 4), ('train_00004.jpg', 2)]


def make_rafdb(root, entries=RAF_ENTRIES):
  os.makedirs(os.path.join(root, 'EmoLabel'), exist_ok=True)
  with open(os.path.join(root, rafdb.LABEL_FILE), 'w') as f:
    f.writelines(f'{name} {label}\n' for name, label in entries)
  for i, (name, _) in enumerate(entries):
    stem = os.path.splitext(name)[0]
    write_image(os.path.join(root, 'Image', 'aligned', f'{stem}_aligned.jpg'), 20 + 30 * i)
  return str(root)


def test_rafdb_splits_labels_and_order(tmp_path):
  data_dir = make_rafdb(tmp_path / 'raf')
  splits = datasets.load(input_config(dataset='rafdb', data_dir=data_dir))
  assert splits.class_names == ['Surprise', 'Fear', 'Disgust', 'Happiness', 'Sadness',
                                'Anger', 'Neutral']
  assert (len(splits.train), len(splits.test)) == (4, 2)
  # File labels 1..7 -> 0..6, in the order of the label file.
  assert [splits.train[i]['label'] for i in range(4)] == [4, 0, 6, 1]
  assert [splits.test[i]['label'] for i in range(2)] == [6, 3]
  # Each image is the one of its line: the written values were 20 + 30 * line.
  assert [grey_value(splits.train[i]) for i in range(4)] == pytest.approx(
      [20, 50, 110, 170], abs=2)
  example = splits.train[2]
  assert example['image'].dtype == np.uint8 and example['image'].shape == (10, 12, 3)
  assert [splits.train[i]['index'] for i in range(4)] == [0, 1, 2, 3]
  assert not splits.has_distribution
  np.testing.assert_array_equal(example['distribution'], np.zeros(7, np.float32))
  labels = datasets.train_labels(splits)
  assert labels.dtype == np.int64
  np.testing.assert_array_equal(labels, [4, 0, 6, 1])
  assert splits.num_skipped == 0
  assert os.path.isdir(os.path.join(data_dir, 'tfds', 'rafdb'))  # the default cache dir


@pytest.mark.parametrize('name', ['distribution.txt', 'list_distribute_basic.txt'])
def test_rafdb_distribution_file(tmp_path, name):
  data_dir = make_rafdb(tmp_path / 'raf')
  with open(os.path.join(data_dir, 'EmoLabel', name), 'w') as f:
    f.write('train_00001.jpg 1 0 0 0 3 0 0\n')          # counts: normalised
    f.write('train_00002_aligned.jpg 0.5 0.5 0 0 0 0 0\n')
  splits = datasets.load(input_config(dataset='rafdb', data_dir=data_dir))
  assert splits.has_distribution
  np.testing.assert_allclose(splits.train[0]['distribution'], [0.25, 0, 0, 0, 0.75, 0, 0])
  np.testing.assert_allclose(splits.train[1]['distribution'], [0.5, 0.5, 0, 0, 0, 0, 0])
  # Not in the file: the one-hot of its label (Neutral).
  np.testing.assert_allclose(splits.train[2]['distribution'], np.eye(7)[6])


def test_rafdb_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
  data_dir = make_rafdb(tmp_path / 'raf')
  aligned = os.path.join(data_dir, 'Image', 'aligned')
  write_garbage(os.path.join(aligned, 'train_00002_aligned.jpg'))
  write_truncated_jpeg(os.path.join(aligned, 'test_0002_aligned.jpg'))
  os.remove(os.path.join(aligned, 'train_00004_aligned.jpg'))
  with caplog.at_level(logging.WARNING):
    splits = datasets.load(input_config(dataset='rafdb', data_dir=data_dir))
  assert splits.num_skipped == 3
  bad = [os.path.join(aligned, n) for n in ('train_00002_aligned.jpg', 'train_00004_aligned.jpg',
                                            'test_0002_aligned.jpg')]
  assert sorted(splits.skipped_files) == sorted(bad)
  warnings = '\n'.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  for path in bad:
    assert path in warnings
  # The others are kept, indexed without gaps.
  assert (len(splits.train), len(splits.test)) == (2, 1)
  assert [splits.train[i]['label'] for i in range(2)] == [4, 6]
  assert [splits.train[i]['index'] for i in range(2)] == [0, 1]
  np.testing.assert_array_equal(datasets.train_labels(splits), [4, 6])


def test_split_without_a_readable_image_is_an_error(tmp_path):
  data_dir = make_rafdb(tmp_path / 'raf')
  for name in ('test_0001_aligned.jpg', 'test_0002_aligned.jpg'):
    write_garbage(os.path.join(data_dir, 'Image', 'aligned', name))
  with pytest.raises(datasets.DatasetError, match="no readable image in the 'test' split"):
    datasets.load(input_config(dataset='rafdb', data_dir=data_dir))


def test_rafdb_second_load_reads_the_cache(tmp_path, monkeypatch):
  data_dir = make_rafdb(tmp_path / 'raf')
  cache_dir = str(tmp_path / 'cache')
  cfg = input_config(dataset='rafdb', data_dir=data_dir, cache_dir=cache_dir)
  first = datasets.load(cfg)

  def rebuild(self):
    raise AssertionError('the dataset was prepared again')

  monkeypatch.setattr(rafdb.RafDb, 'split_records', rebuild)
  second = datasets.load(cfg)
  assert len(second.train) == len(first.train)
  np.testing.assert_array_equal(second.train[1]['image'], first.train[1]['image'])
  assert os.path.isdir(os.path.join(cache_dir, 'rafdb'))
  assert not os.path.exists(os.path.join(data_dir, 'tfds'))


def test_rafdb_missing_dir_names_the_path(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(datasets.DatasetError) as err:
    datasets.load(input_config(dataset='rafdb', data_dir=missing))
  message = str(err.value)
  assert missing in message and 'whdeng.cn' in message and 'data_dir' in message


def test_rafdb_incomplete_dir_names_the_missing_file(tmp_path):
  data_dir = make_rafdb(tmp_path / 'raf')
  label_file = os.path.join(data_dir, rafdb.LABEL_FILE)
  os.remove(label_file)
  with pytest.raises(datasets.DatasetError, match='list_patition_label.txt') as err:
    datasets.load(input_config(dataset='rafdb', data_dir=data_dir))
  assert f'{label_file} does not exist' in str(err.value)


def test_empty_data_dir_is_a_clear_error():
  with pytest.raises(datasets.DatasetError, match='config.input.data_dir'):
    datasets.load(input_config(dataset='affectnet', data_dir=''))


# ---------------------------------------------------------------------------- AffectNet

AFFECT_HEADER = ['subDirectory_filePath', 'face_x', 'face_y', 'face_width', 'face_height',
                 'facial_landmarks', 'expression', 'valence', 'arousal']


def write_affectnet(root, train_rows, test_rows):
  """AffectNet's two CSVs and images. Rows are (relative path, BGR image, box, landmark text,
  expression)."""
  for csv_name, rows in (('training.csv', train_rows), ('validation.csv', test_rows)):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, csv_name), 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(AFFECT_HEADER)
      for rel_path, image, (x, y, w, h), landmarks, expression in rows:
        writer.writerow([rel_path, x, y, w, h, landmarks, expression, 0.1, -0.2])
        path = os.path.join(root, 'Manually_Annotated_Images', rel_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, image)
  return str(root)


def make_affectnet(root, train_rows, test_rows):
  """Rows are (relative path, box, expression); each image is grey with a white face box."""
  def full(rows):
    out = []
    for rel_path, (x, y, w, h), expression in rows:
      image = np.full((40, 50, 3), 60, np.uint8)
      image[max(y, 0):y + h, max(x, 0):x + w] = 255
      out.append((rel_path, image, (x, y, w, h), '1.0;2.0;3.0', expression))
    return out
  return write_affectnet(root, full(train_rows), full(test_rows))


def test_affectnet_classes_crops_and_dropped_codes(tmp_path):
  train_rows = [(f'1/{i}.png', (5, 4, 20, 24), code)
                for i, code in enumerate([0, 1, 7, 8, 9, 10, 6])]
  train_rows.append(('2/edge.png', (-6, 30, 20, 20), 3))  # runs off the image: clipped
  test_rows = [(f'3/{c}.png', (10, 10, 16, 16), c) for c in range(8)]
  data_dir = make_affectnet(tmp_path / 'affectnet', train_rows, test_rows)
  cache_dir = str(tmp_path / 'cache')

  splits = datasets.load(input_config(dataset='affectnet', data_dir=data_dir,
                                      cache_dir=cache_dir, affectnet_align='box'))
  assert len(splits.class_names) == 8 and splits.class_names[7] == 'Contempt'
  np.testing.assert_array_equal(datasets.train_labels(splits), [0, 1, 7, 6, 3])
  assert len(splits.test) == 8
  face = splits.train[0]['image']
  assert face.shape == (256, 256, 3)
  assert face.mean() > 240  # the crop is the white face box, not the grey image
  assert splits.train[4]['image'].mean() > 240  # the clipped box too
  assert not splits.has_distribution

  splits7 = datasets.load(input_config(dataset='affectnet7', data_dir=data_dir,
                                       cache_dir=cache_dir, affectnet_align='box'))
  assert len(splits7.class_names) == 7 and 'Contempt' not in splits7.class_names
  np.testing.assert_array_equal(datasets.train_labels(splits7), [0, 1, 6, 3])
  assert [splits7.test[i]['label'] for i in range(len(splits7.test))] == list(range(7))


def test_affectnet_box_outside_the_image_is_skipped(tmp_path, caplog):
  rows = [('1/a.png', (5, 4, 20, 24), 1), ('1/b.png', (500, 400, 20, 20), 2)]
  data_dir = make_affectnet(tmp_path / 'affectnet', rows, rows[:1])
  with caplog.at_level(logging.WARNING):
    splits = datasets.load(input_config(dataset='affectnet', data_dir=data_dir,
                                        affectnet_align='box'))
  assert splits.num_skipped == 1 and len(splits.train) == 1
  assert 'b.png' in caplog.text


def test_affectnet_missing_images_dir(tmp_path):
  data_dir = make_affectnet(tmp_path / 'affectnet', [('1/a.png', (0, 0, 5, 5), 1)], [])
  images = os.path.join(data_dir, 'Manually_Annotated_Images')
  os.rename(images, images + '_elsewhere')
  with pytest.raises(datasets.DatasetError, match='mohammadmahoor.com') as err:
    datasets.load(input_config(dataset='affectnet', data_dir=data_dir))
  assert images in str(err.value)


# ---------------------------------------------------------------------------- FERPlus

#      neu hap sur sad ang dis fea con unk NF
@pytest.mark.parametrize('votes, label, dist', [
    ([10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, [1, 0, 0, 0, 0, 0, 0, 0]),
    # 4 of 10 is no majority, but the four single votes are outliers: 4 of 6 is.
    ([4, 1, 1, 1, 1, 0, 0, 0, 0, 2], 0, [1, 0, 0, 0, 0, 0, 0, 0]),
    # The lone NF vote is dropped before normalising over the 8 classes.
    ([6, 0, 3, 0, 0, 0, 0, 0, 0, 1], 0, [2 / 3, 0, 1 / 3, 0, 0, 0, 0, 0]),
    ([0, 2, 0, 0, 0, 0, 0, 7, 1, 0], 7, [0, 2 / 9, 0, 0, 0, 0, 0, 7 / 9]),
    ([5, 5, 0, 0, 0, 0, 0, 0, 0, 0], None, None),   # a tie: exactly half is not more
    ([3, 3, 2, 0, 0, 0, 0, 0, 0, 0], None, None),   # no class above half
    ([2, 0, 0, 0, 0, 0, 0, 0, 6, 0], None, None),   # unknown wins
    ([0, 2, 0, 0, 0, 0, 0, 0, 0, 8], None, None),   # not a face wins
    ([4, 0, 0, 0, 0, 0, 0, 0, 0, 4], None, None),   # half emotion, half NF
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], None, None),   # only single votes
])
def test_ferplus_majority(votes, label, dist):
  got_label, got_dist = ferplus.majority(votes)
  assert got_label == label
  if dist is None:
    assert not got_dist.any()
  else:
    np.testing.assert_allclose(got_dist, dist, rtol=1e-6)


def make_ferplus(root, rows):
  """Rows are (Usage, grey value, votes); a votes of None writes a malformed votes cell."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'fer2013.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['emotion', 'pixels', 'Usage'])
    for usage, value, _ in rows:
      pixels = ' '.join([str(value)] * (48 * 48)) if value is not None else '1 2 3'
      writer.writerow([0, pixels, usage])
  with open(os.path.join(root, 'fer2013new.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['Usage', 'Image name', 'neutral', 'happiness', 'surprise', 'sadness',
                     'anger', 'disgust', 'fear', 'contempt', 'unknown', 'NF'])
    for i, (usage, _, votes) in enumerate(rows):
      writer.writerow([usage, f'fer{i:07d}.png', *votes])
  return str(root)


FER_ROWS = [
    ('Training', 10, [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ('Training', 20, [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),   # NF: dropped
    ('Training', 30, [0, 6, 0, 0, 0, 0, 0, 0, 4, 0]),
    ('PublicTest', 40, [0, 0, 8, 2, 0, 0, 0, 0, 0, 0]),
    ('PublicTest', 50, [5, 5, 0, 0, 0, 0, 0, 0, 0, 0]),  # tie: dropped
    ('PrivateTest', 60, [0, 0, 0, 0, 0, 0, 0, 9, 1, 0]),
    ('Training', None, [0, 0, 0, 7, 0, 0, 0, 0, 0, 0]),  # 3 pixels: unreadable
]


def test_ferplus_builder(tmp_path, caplog):
  data_dir = make_ferplus(tmp_path / 'fer', FER_ROWS)
  with caplog.at_level(logging.WARNING):
    splits = datasets.load(input_config(dataset='ferplus', data_dir=data_dir))
  assert splits.class_names[:2] == ['Neutral', 'Happiness'] and len(splits.class_names) == 8
  assert splits.has_distribution
  np.testing.assert_array_equal(datasets.train_labels(splits), [0, 1])
  assert [grey_value(splits.train[i]) for i in range(2)] == [10, 30]
  image = splits.train[1]['image']
  assert image.shape == (48, 48, 3) and (image == 30).all()  # lossless, grey in 3 channels
  np.testing.assert_allclose(splits.train[1]['distribution'], [0, 1, 0, 0, 0, 0, 0, 0])
  # The FER+ convention: PrivateTest is the test split, PublicTest the validation split.
  assert splits.eval_split == 'test'
  assert len(splits.test) == 1 and splits.test[0]['label'] == 7
  validation = splits.extra['validation']
  assert len(validation) == 1 and validation[0]['label'] == 2
  np.testing.assert_allclose(validation[0]['distribution'], [0, 0, 0.8, 0.2, 0, 0, 0, 0])
  assert splits.num_skipped == 1 and 'fer2013.csv row 8' in caplog.text


def test_ferplus_files_must_match_row_for_row(tmp_path):
  data_dir = make_ferplus(tmp_path / 'fer', FER_ROWS)
  with open(os.path.join(data_dir, 'fer2013new.csv'), 'a') as f:
    f.write('Training,fer9.png,10,0,0,0,0,0,0,0,0,0\n')
  with pytest.raises(datasets.DatasetError, match='row for row'):
    datasets.load(input_config(dataset='ferplus', data_dir=data_dir))


def test_ferplus_missing_votes_file(tmp_path):
  data_dir = make_ferplus(tmp_path / 'fer', FER_ROWS)
  os.remove(os.path.join(data_dir, 'fer2013new.csv'))
  with pytest.raises(datasets.DatasetError, match='microsoft/FERPlus') as err:
    datasets.load(input_config(dataset='ferplus', data_dir=data_dir))
  assert os.path.join(data_dir, 'fer2013new.csv') in str(err.value)


# ---------------------------------------------------------------------------- folder


def test_folder_classes_extensions_and_ignored_files(tmp_path):
  root = tmp_path / 'faces'
  write_image(str(root / 'train' / 'sad' / 'a.jpg'), 10)
  write_image(str(root / 'train' / 'sad' / 'b.JPEG'), 20, ext='.jpg')
  write_image(str(root / 'train' / 'happy' / 'c.PNG'), 30, ext='.png')
  write_image(str(root / 'train' / 'angry' / 'd.png'), 40)
  write_image(str(root / 'train' / 'angry' / '.hidden.png'), 50)
  (root / 'train' / 'angry' / 'notes.txt').write_text('not an image')
  os.makedirs(root / 'test' / 'happy')
  cv2.imwrite(str(root / 'test' / 'happy' / 'e.png'), np.full((9, 7), 70, np.uint8))  # grey
  write_image(str(root / 'test' / 'sad' / 'f.jpeg'), 80)

  splits = datasets.load(input_config(dataset='folder', data_dir=str(root)))
  assert splits.class_names == ['angry', 'happy', 'sad']
  np.testing.assert_array_equal(datasets.train_labels(splits), [0, 1, 2, 2])
  assert [grey_value(splits.train[i]) for i in range(4)] == pytest.approx([40, 30, 10, 20],
                                                                          abs=2)
  assert [splits.test[i]['label'] for i in range(2)] == [1, 2]
  assert splits.test[0]['image'].shape == (9, 7, 3)
  assert not splits.has_distribution and splits.train[0]['distribution'].shape == (3,)


def test_folder_needs_two_classes(tmp_path):
  root = tmp_path / 'faces'
  write_image(str(root / 'train' / 'only' / 'a.jpg'), 10)
  write_image(str(root / 'test' / 'only' / 'b.jpg'), 10)
  with pytest.raises(datasets.DatasetError, match='at least 2'):
    datasets.load(input_config(dataset='folder', data_dir=str(root)))


def test_folder_test_class_must_exist_in_train(tmp_path):
  root = tmp_path / 'faces'
  for name in ('a', 'b'):
    write_image(str(root / 'train' / name / 'x.jpg'), 10)
  write_image(str(root / 'test' / 'c' / 'y.jpg'), 10)
  with pytest.raises(datasets.DatasetError, match='lacks'):
    datasets.load(input_config(dataset='folder', data_dir=str(root)))


def test_folder_missing_test_split(tmp_path):
  root = tmp_path / 'faces'
  for name in ('a', 'b'):
    write_image(str(root / 'train' / name / 'x.jpg'), 10)
  with pytest.raises(datasets.DatasetError) as err:
    datasets.load(input_config(dataset='folder', data_dir=str(root)))
  assert f'{root / "test"} does not exist' in str(err.value)


def test_folder_corrupt_file_is_skipped(tmp_path, caplog):
  root = tmp_path / 'faces'
  for name in ('a', 'b'):
    write_image(str(root / 'train' / name / 'x.jpg'), 10)
    write_image(str(root / 'test' / name / 'x.jpg'), 10)
  bad = str(root / 'train' / 'b' / 'broken.png')
  write_garbage(bad)
  with caplog.at_level(logging.WARNING):
    splits = datasets.load(input_config(dataset='folder', data_dir=str(root)))
  assert splits.num_skipped == 1 and splits.skipped_files == [bad]
  assert bad in caplog.text
  np.testing.assert_array_equal(datasets.train_labels(splits), [0, 1])


# ---------------------------------------------------------------------------- SynthFER


def load_synthfer(cache_dir, num_train=24, num_test=8, seed=0):
  return datasets.load(input_config(dataset='synthfer', cache_dir=str(cache_dir),
                                    synthfer_num_train=num_train, synthfer_num_test=num_test,
                                    synthfer_seed=seed))


def test_synthfer_features(tmp_path):
  splits = load_synthfer(tmp_path)
  assert splits.class_names == list(rafdb.CLASS_NAMES)
  assert splits.has_distribution and splits.num_skipped == 0
  assert (len(splits.train), len(splits.test)) == (24, 8)
  for i in range(len(splits.train)):
    example = splits.train[i]
    assert example['image'].shape == (112, 112, 3) and example['image'].dtype == np.uint8
    assert example['index'] == i
    dist = example['distribution']
    assert dist.dtype == np.float32 and dist.sum() == pytest.approx(1.0)
    assert example['true_label'] == np.argmax(dist)
    assert dist[example['label']] > 0  # the annotation is a draw from the distribution
  for i in range(len(splits.test)):
    assert splits.test[i]['label'] == splits.test[i]['true_label']
  # Each split holds its own samples, as the generator defines them.
  for split, source in (('train', splits.train), ('test', splits.test)):
    expected = [facegen.sample_labels(0, split, i) for i in range(len(source))]
    np.testing.assert_array_equal(source.labels, [s.label for s in expected])
    assert [source[i]['true_label'] for i in range(len(source))] == [
        s.true_label for s in expected]
  assert not np.array_equal(splits.train[0]['image'], splits.test[0]['image'])
  np.testing.assert_array_equal(datasets.train_labels(splits),
                                [splits.train[i]['label'] for i in range(24)])


def test_synthfer_is_deterministic(tmp_path):
  a = load_synthfer(tmp_path / 'a', num_train=12)
  b = load_synthfer(tmp_path / 'b', num_train=20)  # sample i does not depend on the size
  c = load_synthfer(tmp_path / 'c', num_train=12, seed=1)
  for i in range(12):
    np.testing.assert_array_equal(a.train[i]['image'], b.train[i]['image'])
    np.testing.assert_array_equal(a.train[i]['distribution'], b.train[i]['distribution'])
  np.testing.assert_array_equal(a.train.labels, b.train.labels[:12])
  assert not np.array_equal(a.train[0]['image'], c.train[0]['image'])
  assert not np.array_equal(a.train.labels, c.train.labels)


def test_synthfer_default_cache_is_per_user(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  datasets.load(input_config(dataset='synthfer', synthfer_num_train=7, synthfer_num_test=7))
  assert os.path.isdir(tmp_path / 'dmue_jax' / 'tfds' / 'synthfer' / 'train7_test7_seed0')


def test_synthfer_label_statistics():
  n = 4000
  train = [facegen.sample_labels(0, 'train', i) for i in range(n)]
  blended = np.array([s.blended for s in train])
  differs = np.array([s.label != s.true_label for s in train])
  secondary = np.array([np.sort(s.distribution)[-2] for s in train])
  assert blended.mean() == pytest.approx(facegen.BLEND_PROB, abs=0.03)
  assert not differs[~blended].any()  # pure faces keep their label
  # A blended face gets its second class with probability w ~ U(0.2, 0.5): 0.35 on average.
  assert differs[blended].mean() == pytest.approx(0.35, abs=0.04)
  assert secondary[blended].min() >= 0.2 and secondary[blended].max() <= 0.5
  counts = np.bincount([s.true_label for s in train], minlength=7)
  assert counts.min() > 0.8 * n / 7
  test = [facegen.sample_labels(0, 'test', i) for i in range(300)]
  assert all(s.label == s.true_label for s in test)


def test_synthfer_worker_processes_render_the_same_images():
  expected = [facegen.render_jpeg(3, 'test', i) for i in range(5)]
  assert list(facegen.render_jpegs(3, 'test', 5, workers=2)) == expected


def test_synthfer_expressions_change_the_face():
  """The same person (look and finish) with two expressions: the face differs."""
  rng = np.random.default_rng(0)
  look = facegen._sample_look(rng)  # pylint: disable=protected-access
  faces = [facegen._draw_face(facegen.PROTOTYPES[c], look)  # pylint: disable=protected-access
           for c in range(facegen.NUM_CLASSES)]
  for c in range(facegen.NUM_CLASSES - 1):
    diff = np.abs(faces[c].astype(int) - faces[facegen.NEUTRAL].astype(int)).max(axis=-1)
    assert (diff > 40).sum() > 100, facegen.CLASS_NAMES[c]


def test_unknown_dataset():
  with pytest.raises(datasets.DatasetError, match='unknown'):
    datasets.load(input_config(dataset='mnist', data_dir='/tmp'))
