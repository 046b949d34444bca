"""The reference's data protocol: AffectNet faces aligned from their CSV landmarks, the FERPlus
and folder evaluation splits."""

import logging
import os

import cv2
import numpy as np
import pytest

import datasets_test
from configs import ferplus
from configs import folder
from dmue_jax import config_lib
from dmue_jax import datasets
from dmue_jax.datasets import affectnet

BLOB_SIGMA = 2.5  # of each landmark's blob in the aligned 256 x 256 face, in pixels


def similarity(scale, degrees, shift):
  """[2, 3] rotation by `degrees`, uniform `scale`, then `shift`."""
  c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
  return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def apply(m, points):
  return points @ m[:, :2].T + m[:, 2]


def landmarks_68(five, rng):
  """68 points whose five_points() are `five`: each eye a ring around its centre."""
  points = rng.uniform(five.min(0), five.max(0), (68, 2))
  ring = 6.0 * np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3)], 1)
  points[36:42] = five[0] + ring
  points[42:48] = five[1] + ring
  points[30], points[48], points[54] = five[2], five[3], five[4]
  return points


def landmark_text(points):
  return ';'.join(f'{v:.4f}' for v in points.reshape(-1))


def blob_image(shape, centres, sigma):
  """uint8 RGB, black with a white Gaussian blob at each (x, y) centre."""
  ys, xs = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
  image = np.zeros(shape[:2])
  for x, y in centres:
    image = np.maximum(image, np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)))
  return np.repeat(np.round(255 * image).astype(np.uint8)[..., None], 3, axis=-1)


def blob_centre(image, near, radius=8):
  """Intensity-weighted centre (x, y) of the blob within `radius` of `near`."""
  grey = image.astype(np.float64).mean(-1)
  x0, y0 = (int(round(v)) for v in near)
  window = grey[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
  window = np.clip(window - 0.1 * window.max(), 0, None)
  ys, xs = np.mgrid[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
  return np.array([(xs * window).sum(), (ys * window).sum()]) / window.sum()


def write_affectnet(root, train_rows, test_rows):
  """Rows are (relative path, RGB image, box, landmark text, expression)."""
  bgr = lambda rows: [(p, np.ascontiguousarray(im[..., ::-1]), *rest) for p, im, *rest in rows]
  return datasets_test.write_affectnet(root, bgr(train_rows), bgr(test_rows))


def aligned_case(scale, degrees, shift, shape, seed=0):
  """An image whose five landmarks are the template moved by a known similarity.

  `scale` maps the template's 800 x 800 canvas to the image; the blobs are drawn so that they
  are BLOB_SIGMA wide once aligned.
  """
  five = apply(similarity(scale, degrees, shift), affectnet.TEMPLATE_FIVE)
  to_aligned = (affectnet.aligned_template()[1, 0] - affectnet.aligned_template()[0, 0]) / (
      affectnet.TEMPLATE_FIVE[1, 0] - affectnet.TEMPLATE_FIVE[0, 0])
  sigma = BLOB_SIGMA * scale / to_aligned
  image = blob_image(shape, five, sigma)
  return image, five, landmarks_68(five, np.random.default_rng(seed))


def test_similarity_transform_recovers_a_known_map():
  m = similarity(0.37, -23.0, (12.5, -4.0))
  src = np.random.default_rng(0).uniform(0, 500, (5, 2))
  np.testing.assert_allclose(affectnet.similarity_transform(src, apply(m, src)), m, atol=1e-9)


def test_five_points_from_68_landmarks():
  rng = np.random.default_rng(1)
  five = rng.uniform(0, 200, (5, 2))
  np.testing.assert_allclose(affectnet.five_points(landmarks_68(five, rng)), five)


@pytest.mark.parametrize('scale, degrees, shift, shape', [
    (0.4, 17.0, (-30.0, -60.0), (260, 240, 3)),     # enlarged about 1.4x when aligned
    (2.0, -25.0, (-650.0, 70.0), (1100, 900, 3)),  # shrunk about 3.5x: area-averaged first
])
def test_alignment_puts_the_five_points_on_the_template(scale, degrees, shift, shape):
  image, five, _ = aligned_case(scale, degrees, shift, shape)
  face = affectnet.align_face(image, five)
  assert face.shape == (256, 256, 3) and face.dtype == np.uint8
  for got, want in zip(five, affectnet.aligned_template()):
    del got
    np.testing.assert_allclose(blob_centre(face, want), want, atol=1.0)


def test_aligned_dataset_faces_have_the_landmarks_on_the_template(tmp_path):
  image, _, landmarks = aligned_case(0.5, 10.0, (-40.0, -90.0), (320, 300, 3))
  row = ('1/face.png', image, (0, 0, 10, 10), landmark_text(landmarks), 3)
  data_dir = write_affectnet(tmp_path / 'affectnet', [row], [row])
  splits = datasets.load(datasets_test.input_config(dataset='affectnet', data_dir=data_dir))
  face = splits.train[0]['image']
  assert face.shape == (256, 256, 3) and splits.train[0]['label'] == 3
  for want in affectnet.aligned_template():
    np.testing.assert_allclose(blob_centre(face, want), want, atol=1.0)  # after JPEG too


def test_rows_without_usable_landmarks_are_dropped_and_counted(tmp_path, caplog):
  image, _, landmarks = aligned_case(0.5, 0.0, (-40.0, -90.0), (320, 300, 3))
  good = landmark_text(landmarks)
  with_nan = good.split(';')
  with_nan[7] = 'nan'
  bad = ['', '1.0;2.0;3.0', ';'.join(with_nan), ';'.join(['5.0'] * 136)]  # last: eyes coincide
  train = [('1/good0.png', image, (0, 0, 10, 10), good, 0)]
  train += [(f'1/bad{i}.png', image, (0, 0, 10, 10), text, 1) for i, text in enumerate(bad)]
  train.append(('1/good1.png', image, (0, 0, 10, 10), good, 2))
  train.append(('1/none.png', image, (0, 0, 10, 10), '', 9))  # dropped for its code first
  test = [('2/good.png', image, (0, 0, 10, 10), good, 4),
          ('2/bad.png', image, (0, 0, 10, 10), 'x;y', 5)]
  data_dir = write_affectnet(tmp_path / 'affectnet', train, test)
  with caplog.at_level(logging.INFO):
    splits = datasets.load(datasets_test.input_config(dataset='affectnet', data_dir=data_dir))
  np.testing.assert_array_equal(datasets.train_labels(splits), [0, 2])
  assert len(splits.test) == 1 and splits.num_skipped == 0
  assert 'training.csv: 4 rows dropped without usable facial landmarks' in caplog.text
  assert 'validation.csv: 1 rows dropped without usable facial landmarks' in caplog.text

  # The box crops keep every row.
  boxes = datasets.load(datasets_test.input_config(dataset='affectnet', data_dir=data_dir,
                                     affectnet_align='box'))
  np.testing.assert_array_equal(datasets.train_labels(boxes), [0, 1, 1, 1, 1, 2])


def test_box_switch_reproduces_the_box_crop(tmp_path):
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
  image = cv2.GaussianBlur(image, (0, 0), 3)  # JPEG-friendly, yet every crop differs
  _, _, landmarks = aligned_case(0.2, 0.0, (0.0, -40.0), (90, 120, 3))
  box = (15, 10, 50, 60)
  row = ('1/a.png', image, box, landmark_text(landmarks), 6)
  data_dir = write_affectnet(tmp_path / 'affectnet', [row], [row])
  cache_dir = str(tmp_path / 'cache')
  boxes = datasets.load(datasets_test.input_config(dataset='affectnet', data_dir=data_dir,
                                     cache_dir=cache_dir, affectnet_align='box'))
  aligned = datasets.load(datasets_test.input_config(dataset='affectnet', data_dir=data_dir,
                                       cache_dir=cache_dir))
  want = affectnet.crop_face(image, box)
  got = boxes.train[0]['image'].astype(np.int64)
  assert np.abs(got - want).mean() < 1.0  # only the JPEG round trip differs
  assert np.abs(aligned.train[0]['image'].astype(np.int64) - want).mean() > 10
  # The two kinds of face are prepared side by side, each under its own name.
  for name in ('8class', '8class_aligned'):
    assert os.path.isdir(os.path.join(cache_dir, 'affectnet', name))


def test_align_switch_is_validated():
  config = config_lib.base_config()
  config.model.init_from = 'scratch'
  config.input.affectnet_align = 'crop'
  with pytest.raises(config_lib.ConfigError, match='affectnet_align'):
    config_lib.validate(config)


# ------------------------------------------------------------------ eval split


def write_ferplus(root):
  """One kept image per split; the grey value says which: 10 train, 40 public, 60 private."""
  return datasets_test.make_ferplus(root, [
      ('Training', 10, [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
      ('Training', 20, [0, 9, 0, 0, 0, 0, 0, 0, 1, 0]),
      ('PublicTest', 40, [0, 0, 8, 2, 0, 0, 0, 0, 0, 0]),
      ('PrivateTest', 60, [0, 0, 0, 0, 0, 0, 0, 9, 1, 0])])


def ferplus_input(data_dir, cache_dir, eval_split):
  config = ferplus.get_config()
  config.input.data_dir, config.input.cache_dir = data_dir, cache_dir
  config.input.eval_split = eval_split
  return config.input


def test_ferplus_tests_on_private_test_and_validates_on_public_test(tmp_path):
  data_dir, cache_dir = write_ferplus(tmp_path / 'fer'), str(tmp_path / 'cache')
  test = datasets.load(ferplus_input(data_dir, cache_dir, 'test'))
  assert test.eval_split == 'test' and len(test.test) == 1
  assert test.test[0]['label'] == 7 and int(test.test[0]['image'].mean()) == 60
  assert int(test.extra['validation'][0]['image'].mean()) == 40
  validation = datasets.load(ferplus_input(data_dir, cache_dir, 'validation'))
  assert validation.eval_split == 'validation'
  assert validation.test[0]['label'] == 2 and int(validation.test[0]['image'].mean()) == 40
  assert int(validation.extra['test'][0]['image'].mean()) == 60
  np.testing.assert_array_equal(datasets.train_labels(validation), [0, 1])


def write_folder(root, splits):
  for split in splits:
    for value, name in ((10, 'happy'), (20, 'sad')):
      path = os.path.join(root, split, name, f'{split}.png')
      os.makedirs(os.path.dirname(path), exist_ok=True)
      value += {'train': 0, 'test': 100, 'validation': 200}[split]
      cv2.imwrite(path, np.full((8, 8, 3), value, np.uint8))
  return str(root)


def test_folder_validation_split(tmp_path):
  cache_dir = str(tmp_path / 'cache')
  plain = write_folder(tmp_path / 'plain', ('train', 'test'))
  config = folder.get_config().input
  config.data_dir, config.cache_dir, config.eval_split = plain, cache_dir, 'validation'
  with pytest.raises(datasets.DatasetError, match='validation/<class_name>'):
    datasets.load(config)
  config.data_dir = write_folder(tmp_path / 'full', ('train', 'test', 'validation'))
  splits = datasets.load(config)
  assert [int(splits.test[i]['image'].mean()) for i in range(2)] == [210, 220]
  assert [int(splits.extra['test'][i]['image'].mean()) for i in range(2)] == [110, 120]
