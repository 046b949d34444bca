"""Tests for dmue_jax.predict and the loading half of dmue_jax.inference.

The photo is scikit-image's bundled astronaut (Eileen Collins, 512x512), a real photograph with
one frontal face; OpenCV's cascade puts it at (177, 66, 95, 95). The model is the random
`:tiny` run of conftest.py, so the tests check the plumbing and the output, not the labels.
"""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import skimage.data

import conftest
from configs import default
from dmue_jax import checkpoints
from dmue_jax import inference
from dmue_jax import predict
from dmue_jax.errors import UserError

ASTRONAUT_BOX = (177, 66, 95, 95)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def loaded(tiny_run):
  return inference.load(workdir=tiny_run.workdir)


@pytest.fixture(scope='module')
def classifier(loaded):
  return inference.Classifier(loaded)


@pytest.fixture(scope='module')
def detector():
  return predict.FaceDetector()


@pytest.fixture(scope='module')
def astronaut_png(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('images') / 'astronaut.png')
  cv2.imwrite(path, cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
  return path


def run_module(*args):
  """Runs `python -m <args>` from the repository root; returns the CompletedProcess."""
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)


# ------------------------------------------------------------------------------- detection
def test_detects_the_astronaut_face(detector):
  boxes = detector(skimage.data.astronaut())
  assert boxes.shape == (1, 4)
  np.testing.assert_allclose(boxes[0], ASTRONAUT_BOX, atol=4)


def test_huge_image_is_detected_on_a_smaller_copy_and_mapped_back(detector):
  # 2048 x 4096 px, the astronaut scaled 4x at x = 1000: detection runs on a 512 x 1024 copy,
  # where the astronaut has its original size.
  image = np.full((2048, 4096, 3), 128, np.uint8)
  image[:, 1000:3048] = cv2.resize(skimage.data.astronaut(), (2048, 2048),
                                   interpolation=cv2.INTER_CUBIC)
  boxes = detector(image)
  assert boxes.shape == (1, 4)
  expected = 4 * np.asarray(ASTRONAUT_BOX) + [1000, 0, 0, 0]
  np.testing.assert_allclose(boxes[0], expected, atol=4 * 4)


def test_photo_without_a_face_gives_zero_faces(classifier, detector):
  ramp = np.linspace(0, 255, 320, dtype=np.float32)
  image = np.stack([np.add.outer(ramp[:240] / 2, ramp / 2)] * 3, axis=-1).astype(np.uint8)
  assert predict.classify_image(image, classifier, detector) == []


def test_crop_adds_the_margin_and_stays_inside_the_image():
  image = np.zeros((100, 200, 3), np.uint8)
  assert predict.crop(image, (50, 40, 20, 20), 0.25).shape == (30, 30, 3)
  assert predict.crop(image, (0, 90, 20, 10), 0.5).shape == (15, 30, 3)  # clipped


# ------------------------------------------------------------------------------ classifying
def test_classify_image_reports_one_face_with_probabilities(classifier, detector):
  faces = predict.classify_image(skimage.data.astronaut(), classifier, detector)
  assert len(faces) == 1
  face = faces[0]
  assert set(face) == {'box', 'probabilities', 'label'}
  np.testing.assert_allclose(face['box'], ASTRONAUT_BOX, atol=4)
  assert list(face['probabilities']) == list(conftest.SYNTHFER_CLASSES)
  assert sum(face['probabilities'].values()) == pytest.approx(1.0, abs=1e-5)
  assert face['label'] == max(face['probabilities'], key=face['probabilities'].get)


def test_no_detect_classifies_the_whole_image(classifier):
  image = skimage.data.astronaut()
  faces = predict.classify_image(image, classifier, None)
  assert len(faces) == 1
  assert faces[0]['box'] == [0, 0, 512, 512]
  expected = classifier.probabilities([image])[0]
  np.testing.assert_allclose(list(faces[0]['probabilities'].values()), expected, atol=1e-6)


def test_probabilities_are_batch_independent(classifier):
  """Padding to a power of two must not change a face's result."""
  rng = np.random.default_rng(0)
  crops = [rng.integers(0, 256, (40 + i, 50, 3), np.uint8) for i in range(3)]
  together = classifier.probabilities(crops)
  alone = np.concatenate([classifier.probabilities([c]) for c in crops])
  assert together.shape == (3, 7)
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(together.sum(axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------- reading
def test_read_image_gives_rgb_for_grey_and_alpha_images(tmp_path):
  grey = str(tmp_path / 'grey.png')
  cv2.imwrite(grey, np.full((8, 9), 7, np.uint8))
  rgba = str(tmp_path / 'rgba.png')
  cv2.imwrite(rgba, np.full((8, 9, 4), 9, np.uint8))
  for path in (grey, rgba):
    image = predict.read_image(path)
    assert image.shape == (8, 9, 3) and image.dtype == np.uint8


@pytest.mark.parametrize('kind', ['missing', 'folder', 'empty', 'text'])
def test_unreadable_input_is_a_one_line_error(tmp_path, kind):
  path = tmp_path / f'{kind}.jpg'
  if kind == 'folder':
    path.mkdir()
  elif kind == 'empty':
    path.write_bytes(b'')
  elif kind == 'text':
    path.write_text('this is not an image\n')
  with pytest.raises(predict.ImageReadError) as e:
    predict.read_image(str(path))
  assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_predict_files_reports_bad_files_and_goes_on(classifier, detector, astronaut_png,
                                                    tmp_path):
  bad = tmp_path / 'notes.txt'
  bad.write_text('hello')
  results = predict.predict_files([str(bad), astronaut_png], classifier, detector)
  assert set(results[0]) == {'image', 'error'}
  assert len(results[1]['faces']) == 1


# ------------------------------------------------------------------------------- annotation
def test_annotation_paths(tmp_path):
  out = str(tmp_path / 'out')
  assert predict.annotation_paths(['a/face.jpg'], out + '.png') == [out + '.png']
  assert predict.annotation_paths(['a/face.jpg'], out) == [os.path.join(out, 'face_annotated.jpg')]
  assert predict.annotation_paths(['a/x.jpg', 'b/x.jpg', 'c/y'], out) == [
      os.path.join(out, 'x_annotated.jpg'), os.path.join(out, 'x_annotated_2.jpg'),
      os.path.join(out, 'y_annotated.png')]
  existing_file = tmp_path / 'file.png'
  existing_file.write_bytes(b'x')
  with pytest.raises(UserError):
    predict.annotation_paths(['a.jpg', 'b.jpg'], str(existing_file))


def test_annotate_draws_inside_a_copy(classifier, detector):
  image = skimage.data.astronaut()
  faces = predict.classify_image(image, classifier, detector)
  drawn = predict.annotate(image, faces)
  assert drawn.shape == image.shape and not np.array_equal(drawn, image)
  np.testing.assert_array_equal(image, skimage.data.astronaut())  # the input is untouched
  x, y, w, h = faces[0]['box']
  assert (drawn[y + h // 2, x] == (0, 255, 0)).all()  # the box's left edge


# ---------------------------------------------------------------------------------- loading
def test_loads_the_step_that_best_step_names(tiny_run, loaded):
  mgr = checkpoints.manager(tiny_run.workdir, read_only=True)
  assert loaded.step == checkpoints.best_step(mgr)
  mgr.close()
  assert loaded.class_names == conftest.SYNTHFER_CLASSES
  assert loaded.config.input.image_size == 32
  assert set(loaded.variables['params']) == {'trunk', 'branch', 'neck', 'head'}


def test_workdir_loads_the_most_accurate_checkpoint(tiny_run, loaded):
  assert loaded.step == tiny_run.best_step


def test_checkpoint_step_folder_and_step_number(tiny_run):
  folder = os.path.join(tiny_run.workdir, 'checkpoints', '2')
  assert inference.load(checkpoint=folder).step == 2
  # A step number is a step folder of --workdir.
  with pytest.raises(UserError, match=os.path.join('checkpoints', '99') + ' does not exist'):
    inference.load(workdir=tiny_run.workdir, checkpoint='99')


def test_missing_workdir_or_checkpoint_is_a_clear_error(tmp_path):
  cases = {
      str(tmp_path / 'nowhere'): 'does not exist',
      str(tmp_path): 'no checkpoints',
  }
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  cases[str(tmp_path / 'empty')] = 'no complete checkpoint'
  for workdir, words in cases.items():
    with pytest.raises(UserError, match=words):
      inference.load(workdir=workdir)
  with pytest.raises(UserError, match='neither an export'):
    inference.load(checkpoint=str(tmp_path / 'empty' / 'checkpoints'))


@pytest.mark.slow
def test_checkpoint_from_another_number_of_classes_is_a_clear_error(tmp_path):
  # Class names that do not match the model's outputs.
  run = conftest.make_run(str(tmp_path / 'names'), steps=(1,), accuracies=(0.5,),
                          class_names=('a', 'b', 'c', 'd', 'e'))
  with pytest.raises(UserError, match='number of classes'):
    inference.load(workdir=run.workdir)
  # Weights of 5 classes under a 7-class config.
  five = default.get_config('tiny')
  five.model.num_classes = 5
  run = conftest.make_run(str(tmp_path / 'weights'), steps=(1,), accuracies=(0.5,),
                          config=five, meta_config=default.get_config('tiny'))
  with pytest.raises(UserError, match='number of classes'):
    inference.load(workdir=run.workdir)


# -------------------------------------------------------------------------------- command
def test_command_json_with_a_bad_file_and_annotations(tiny_run, astronaut_png, tmp_path):
  bad = tmp_path / 'notes.jpg'
  bad.write_text('not an image')
  out = tmp_path / 'annotated'
  proc = run_module('dmue_jax.predict', '--workdir', tiny_run.workdir, '--json',
                    '--save-annotated', str(out), astronaut_png, str(bad),
                    str(tmp_path / 'missing.png'))
  assert 'Traceback' not in proc.stderr, proc.stderr
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 3 and 'notes.jpg' in errors[0] and 'missing.png' in errors[1]
  results = json.loads(proc.stdout)
  assert [r['image'] for r in results] == [astronaut_png, str(bad), str(tmp_path / 'missing.png')]
  (face,) = results[0]['faces']
  assert set(face) == {'box', 'probabilities', 'label'}
  np.testing.assert_allclose(face['box'], ASTRONAUT_BOX, atol=4)
  assert list(face['probabilities']) == list(conftest.SYNTHFER_CLASSES)
  assert sum(face['probabilities'].values()) == pytest.approx(1.0, abs=1e-5)
  assert 'error' in results[1] and 'error' in results[2]
  assert predict.read_image(str(out / 'astronaut_annotated.png')).shape == (512, 512, 3)


def test_command_bad_workdir_is_one_line(tmp_path, astronaut_png):
  proc = run_module('dmue_jax.predict', '--workdir', str(tmp_path / 'nowhere'), astronaut_png)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith('error: workdir ')
