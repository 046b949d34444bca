"""AffectNet (manually annotated part), 8 classes or 7 (contempt dropped).

Expected layout of the manual dir (`config.input.data_dir`):

    training.csv, validation.csv      columns subDirectory_filePath, face_x, face_y,
                                      face_width, face_height, facial_landmarks,
                                      expression, valence, arousal
    Manually_Annotated_Images/<subDirectory_filePath>

Expression 0..7 = Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt; 8..10 (None,
Uncertain, No-Face) are dropped, and so is 7 in the 7-class configs. Train is training.csv, test
validation.csv (the published validation set, 500 per class, is every paper's test set). Faces
are stored as 256x256 JPEG (quality 95) by `config.input.affectnet_align`: 'landmarks' (default)
aligns them from five of the CSV's 68 landmarks as the reference does (docs/design.md, Datasets;
rows without usable landmarks are dropped and counted), 'box' resizes the CSV face box.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os

from absl import logging
import cv2
import numpy as np
import tensorflow_datasets as tfds

from dmue_jax.errors import DatasetError
from dmue_jax.datasets import common

CLASS_NAMES = ('Neutral', 'Happy', 'Sad', 'Surprise', 'Fear', 'Disgust', 'Anger', 'Contempt')
CSV_FILES = {'train': 'training.csv', 'test': 'validation.csv'}
IMAGE_DIR = 'Manually_Annotated_Images'
COLUMNS = ('subDirectory_filePath', 'face_x', 'face_y', 'face_width', 'face_height',
           'expression')
LANDMARKS_COLUMN = 'facial_landmarks'
NUM_LANDMARKS = 68
STORED_SIZE = 256
ALIGN_MODES = ('landmarks', 'box')

# The reference's template (preprocess/template.npy of the authors' code) is the 98-point
# WFLW layout in an 800x800 canvas. Its five points as five_points() takes them from 68
# landmarks: eye centres (the mean of each eye's 8 contour points, 60-67 and 68-75), nose tip
# (54), mouth corners (76, 82); x, y in canvas pixels.
TEMPLATE_FIVE = np.array([[311.5, 365.625], [486.625, 368.0], [395.0, 458.0],
                          [310.0, 524.0], [480.0, 524.0]])
# The reference crops the face box MTCNN finds in the warped canvas, its width and height
# enlarged by 256/224 about its centre. With no detector here, the box is the square on the
# template's 98 points (they span x 202..596, y 313..664): centred on them, as wide as they
# are.
TEMPLATE_FACE_CENTRE = np.array([399.0, 488.5])
TEMPLATE_FACE_SIDE = 394.0
MARGIN = 256 / 224
HOW_TO_GET = ('Request AffectNet from its authors (http://mohammadmahoor.com/affectnet/) and '
              'set config.input.data_dir to the folder that holds training.csv, '
              f'validation.csv and {IMAGE_DIR}/.')


def crop_face(rgb: np.ndarray, box: tuple[int, int, int, int], size: int = STORED_SIZE,
              name: str = '') -> np.ndarray:
  """The face box (x, y, width, height), clipped to the image, resized to size x size."""
  x, y, w, h = box
  height, width = rgb.shape[:2]
  x0, y0 = max(x, 0), max(y, 0)
  x1, y1 = min(x + w, width), min(y + h, height)
  if x1 <= x0 or y1 <= y0:
    raise common.UnreadableImage(f'{name}: face box {box} lies outside the '
                                 f'{width}x{height} image')
  face = rgb[y0:y1, x0:x1]
  shrink = face.shape[0] > size or face.shape[1] > size
  return cv2.resize(face, (size, size),
                    interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _load_face(path: str, box: tuple[int, int, int, int]) -> bytes:
  rgb, _ = common.decode_rgb(common.read_file(path), path)
  return common.encode_jpeg(crop_face(rgb, box, name=path))


def aligned_template(size: int = STORED_SIZE) -> np.ndarray:
  """float64 [5, 2]: where the five points land in the size x size aligned face."""
  side = TEMPLATE_FACE_SIDE * MARGIN
  origin = TEMPLATE_FACE_CENTRE - side / 2
  return (TEMPLATE_FIVE - origin) * (size / side)


def parse_landmarks(text: str) -> np.ndarray:
  """float64 [68, 2] from the CSV's 'x0;y0;x1;y1;...'; ValueError when not 68 finite points."""
  values = [float(v) for v in (text or '').split(';') if v.strip()]
  if len(values) != 2 * NUM_LANDMARKS:
    raise ValueError(f'{len(values)} numbers, expected {2 * NUM_LANDMARKS}')
  points = np.asarray(values, np.float64).reshape(NUM_LANDMARKS, 2)
  if not np.isfinite(points).all():
    raise ValueError('not finite')
  return points


def five_points(landmarks: np.ndarray) -> np.ndarray:
  """[5, 2] of the 68-point layout: eye centres (36-41, 42-47), nose tip, mouth corners.

  ValueError when the eyes coincide: no similarity can be fitted to such points.
  """
  five = np.stack([landmarks[36:42].mean(0), landmarks[42:48].mean(0), landmarks[30],
                   landmarks[48], landmarks[54]])
  if np.hypot(*(five[1] - five[0])) < 1.0:
    raise ValueError('the eye centres are less than a pixel apart')
  return five


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """float64 [2, 3]: the least-squares rotation + uniform scale + shift taking src to dst.

  In complex numbers the map is z -> a z + b, and least squares has a closed form; this is
  the Umeyama solution the reference's skimage SimilarityTransform computes, without
  reflections.
  """
  zs, zd = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
  cs, cd = zs - zs.mean(), zd - zd.mean()
  a = np.vdot(cs, cd) / np.vdot(cs, cs).real
  b = zd.mean() - a * zs.mean()
  return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def align_face(rgb: np.ndarray, five: np.ndarray, size: int = STORED_SIZE) -> np.ndarray:
  """The face whose five points are `five` (x, y in rgb), warped onto the template, size^2."""
  m = similarity_transform(five, aligned_template(size))
  scale = float(np.hypot(m[0, 0], m[1, 0]))
  height, width = rgb.shape[:2]
  if scale < 1.0:
    # Shrink by averaging first: a bicubic warp that skips pixels would alias.
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    fx, fy = new_w / width, new_h / height
    rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    # Pixel centres: x in the original is (x' + 0.5) / fx - 0.5 in the shrunk image.
    to_original = np.array([[1 / fx, 0, 0.5 / fx - 0.5], [0, 1 / fy, 0.5 / fy - 0.5],
                            [0, 0, 1]])
    m = m @ to_original
  return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_CUBIC,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _load_aligned(path: str, five: np.ndarray) -> bytes:
  rgb, _ = common.decode_rgb(common.read_file(path), path)
  return common.encode_jpeg(align_face(rgb, five))


def parse_row(row: dict) -> tuple[str, tuple[int, int, int, int], int]:
  """(relative path, face box, expression) of one CSV row; ValueError when malformed."""
  box = tuple(int(float(row[k])) for k in ('face_x', 'face_y', 'face_width', 'face_height'))
  return row['subDirectory_filePath'], box, int(row['expression'])


@dataclasses.dataclass(eq=False)
class AffectNetConfig(tfds.core.BuilderConfig):
  num_classes: int = 8  # 7 drops Contempt
  align: str = 'landmarks'  # or 'box'


def config_name(*, num_classes: int, align: str) -> str:
  """'8class_aligned', '7class_aligned', or for box crops '8class', '7class'.

  The box crops keep the names they had before alignment existed: their caches stay valid.
  """
  return f'{num_classes}class' + ('' if align == 'box' else '_aligned')


class AffectNet(common.ExpressionBuilder):
  """AffectNet faces, aligned (default) or cropped to their boxes; 8 or 7 classes."""

  name = 'affectnet'
  BUILDER_CONFIGS = [
      AffectNetConfig(name=config_name(num_classes=n, align=align), num_classes=n, align=align,
                      description=f'{n} expressions, faces by {align}.')
      for align in ALIGN_MODES for n in (8, 7)
  ]
  DESCRIPTION = __doc__

  def class_names(self) -> list[str]:
    return list(CLASS_NAMES[:self.builder_config.num_classes])

  def check_manual_dir(self) -> None:
    common.require_data_dir(self.manual_dir, 'AffectNet', HOW_TO_GET)
    for part in (*CSV_FILES.values(), IMAGE_DIR):
      common.require_path(os.path.join(self.manual_dir, part), 'AffectNet', HOW_TO_GET)
    needed = COLUMNS + ((LANDMARKS_COLUMN,) if self.builder_config.align == 'landmarks' else ())
    for csv_name in CSV_FILES.values():
      path = os.path.join(self.manual_dir, csv_name)
      with open(path, newline='') as f:
        header = next(csv.reader(f), [])
      missing = [c for c in needed if c not in header]
      if missing:
        raise DatasetError(f'AffectNet: {path} lacks the column(s) {", ".join(missing)}; '
                           f'its header is {header}. {HOW_TO_GET}')

  def split_records(self) -> dict:
    return {split: self._records(os.path.join(self.manual_dir, csv_name))
            for split, csv_name in CSV_FILES.items()}

  def _records(self, csv_path: str):
    """The kept rows of one CSV, lazily: training.csv has 290k rows."""
    num_classes = self.builder_config.num_classes
    aligned = self.builder_config.align == 'landmarks'
    dropped = no_landmarks = 0
    with open(csv_path, newline='') as f:
      for row_no, row in enumerate(csv.DictReader(f), 2):
        try:
          rel_path, box, expression = parse_row(row)
        except (ValueError, TypeError, KeyError):
          # A broken row is treated like an unreadable image: skipped, named, counted.
          yield common.broken_record(f'{csv_path} row {row_no}', 'malformed CSV row',
                                     num_classes)
          continue
        if not 0 <= expression < num_classes:
          dropped += 1  # None / Uncertain / No-Face (and Contempt for 7 classes).
          continue
        path = os.path.join(self.manual_dir, IMAGE_DIR, rel_path)
        if aligned:
          try:
            five = five_points(parse_landmarks(row.get(LANDMARKS_COLUMN)))
          except ValueError:
            no_landmarks += 1  # Cannot be aligned, as the reference's missed detections.
            continue
          load = functools.partial(_load_aligned, path, five)
        else:
          load = functools.partial(_load_face, path, box)
        yield common.Record(name=path, load=load, label=expression,
                            distribution=np.zeros(num_classes, np.float32))
    logging.info('AffectNet: %s: %d rows dropped for their expression code (kept codes '
                 '0..%d).', os.path.basename(csv_path), dropped, num_classes - 1)
    if no_landmarks:
      logging.warning('AffectNet: %s: %d rows dropped without usable facial landmarks '
                      '(missing, not %d points, or not finite), so their faces cannot be '
                      "aligned; config.input.affectnet_align='box' keeps them as box crops.",
                      os.path.basename(csv_path), no_landmarks, NUM_LANDMARKS)
