"""AffectNet (manually annotated part), 8 classes or 7 (contempt dropped).

Expected layout of the manual dir (`config.input.data_dir`):

    training.csv, validation.csv      columns subDirectory_filePath, face_x, face_y,
                                      face_width, face_height, facial_landmarks,
                                      expression, valence, arousal
    Manually_Annotated_Images/<subDirectory_filePath>

Expression 0..7 = Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt; 8..10
(None, Uncertain, No-Face) are dropped, and so is 7 in the '7class' config. Each face is
cropped by its box (clipped to the image) and stored resized to 256x256 (JPEG, quality 95),
the size the reference resizes to. Splits: train from training.csv, test from validation.csv
(the published validation set, 500 per class, is the test set of every paper).
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

from dmue_jax.datasets import DatasetError
from dmue_jax.datasets import common

CLASS_NAMES = ('Neutral', 'Happy', 'Sad', 'Surprise', 'Fear', 'Disgust', 'Anger', 'Contempt')
CSV_FILES = {'train': 'training.csv', 'test': 'validation.csv'}
IMAGE_DIR = 'Manually_Annotated_Images'
COLUMNS = ('subDirectory_filePath', 'face_x', 'face_y', 'face_width', 'face_height',
           'expression')
STORED_SIZE = 256
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


def parse_row(row: dict) -> tuple[str, tuple[int, int, int, int], int]:
  """(relative path, face box, expression) of one CSV row; ValueError when malformed."""
  box = tuple(int(float(row[k])) for k in ('face_x', 'face_y', 'face_width', 'face_height'))
  return row['subDirectory_filePath'], box, int(row['expression'])


@dataclasses.dataclass(eq=False)
class AffectNetConfig(tfds.core.BuilderConfig):
  num_classes: int = 8  # 7 drops Contempt


class AffectNet(common.ExpressionBuilder):
  """AffectNet faces cropped to their boxes; '8class' (default) or '7class'."""

  name = 'affectnet'
  BUILDER_CONFIGS = [
      AffectNetConfig(name='8class', num_classes=8, description='All 8 expressions.'),
      AffectNetConfig(name='7class', num_classes=7, description='Contempt dropped.'),
  ]
  DESCRIPTION = __doc__

  def class_names(self) -> list[str]:
    return list(CLASS_NAMES[:self.builder_config.num_classes])

  def check_manual_dir(self) -> None:
    common.require_data_dir(self.manual_dir, 'AffectNet', HOW_TO_GET)
    for part in (*CSV_FILES.values(), IMAGE_DIR):
      common.require_path(os.path.join(self.manual_dir, part), 'AffectNet', HOW_TO_GET)
    for csv_name in CSV_FILES.values():
      path = os.path.join(self.manual_dir, csv_name)
      with open(path, newline='') as f:
        header = next(csv.reader(f), [])
      missing = [c for c in COLUMNS if c not in header]
      if missing:
        raise DatasetError(f'AffectNet: {path} lacks the column(s) {", ".join(missing)}; '
                           f'its header is {header}. {HOW_TO_GET}')

  def split_records(self) -> dict:
    return {split: self._records(os.path.join(self.manual_dir, csv_name))
            for split, csv_name in CSV_FILES.items()}

  def _records(self, csv_path: str):
    """The kept rows of one CSV, lazily: training.csv has 290k rows."""
    num_classes = self.builder_config.num_classes
    dropped = 0
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
        yield common.Record(name=path, load=functools.partial(_load_face, path, box),
                            label=expression, distribution=np.zeros(num_classes, np.float32))
    logging.info('AffectNet: %s: %d rows dropped for their expression code (kept codes '
                 '0..%d).', os.path.basename(csv_path), dropped, num_classes - 1)
