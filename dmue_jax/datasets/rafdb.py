"""RAF-DB basic (7 classes) from the folder its authors distribute.

Expected layout of the manual dir (`config.input.data_dir`):

    EmoLabel/list_patition_label.txt     lines "train_00001.jpg 5"; labels 1..7
    Image/aligned/train_00001_aligned.jpg   100x100 aligned faces
    EmoLabel/*distribut*                 optional: lines "<name> p1 ... p7"

Labels 1..7 (Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral) become 0..6 in
that order. The split is the file-name prefix (train_ / test_): 12,271 / 3,068 images.
When a crowd distribution file is found, each image's 7 values (normalised to sum 1) are its
'distribution'; an image missing from that file gets the one-hot of its label (with a
warning). Without the file 'distribution' is all zeros and `has_distribution` is False.
"""

from __future__ import annotations

import functools
import os

from absl import logging
import numpy as np

from dmue_jax.errors import DatasetError
from dmue_jax.datasets import common

CLASS_NAMES = ('Surprise', 'Fear', 'Disgust', 'Happiness', 'Sadness', 'Anger', 'Neutral')
LABEL_FILE = os.path.join('EmoLabel', 'list_patition_label.txt')
IMAGE_DIR = os.path.join('Image', 'aligned')
HOW_TO_GET = ('Request RAF-DB from its authors (http://www.whdeng.cn/RAF/model1.html), unpack '
              'the "basic" part and set config.input.data_dir to the folder that holds '
              f'{LABEL_FILE} and {IMAGE_DIR}/.')


def _stem(name: str) -> str:
  """'train_00001.jpg' and 'train_00001_aligned.jpg' -> 'train_00001'."""
  stem = os.path.splitext(os.path.basename(name))[0]
  return stem[:-len('_aligned')] if stem.endswith('_aligned') else stem


def parse_label_file(path: str) -> list[tuple[str, int]]:
  """[(file name, label 0..6)] in file order; raises DatasetError on a malformed line."""
  entries = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 7:
        raise DatasetError(f'RAF-DB: {path} line {line_no} is {line.strip()!r}; expected '
                           '"<file name> <label 1..7>".')
      entries.append((parts[0], int(parts[1]) - 1))
  return entries


def find_distribution_file(data_dir: str) -> str | None:
  folder = os.path.join(data_dir, 'EmoLabel')
  found = sorted(n for n in os.listdir(folder) if 'distribut' in n.lower())
  if len(found) > 1:
    logging.warning('RAF-DB: several distribution files in %s, using %s', folder, found[0])
  return os.path.join(folder, found[0]) if found else None


def parse_distribution_file(path: str) -> dict[str, np.ndarray]:
  """{stem: float32 [7] summing to 1}; raises DatasetError on a malformed line."""
  dists = {}
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      try:
        values = np.array([float(v) for v in parts[1:]], np.float32)
      except ValueError:
        values = np.zeros(0)
      if len(values) != len(CLASS_NAMES) or values.min() < 0 or values.sum() <= 0:
        raise DatasetError(f'RAF-DB: {path} line {line_no} is {line.strip()!r}; expected '
                           '"<file name> p1 ... p7" with 7 non-negative numbers.')
      dists[_stem(parts[0])] = values / values.sum()
  return dists


class RafDb(common.ExpressionBuilder):
  """RAF-DB basic, aligned 100x100 faces."""

  name = 'rafdb'
  CLASS_NAMES = CLASS_NAMES
  DESCRIPTION = __doc__

  def check_manual_dir(self) -> None:
    common.require_data_dir(self.manual_dir, 'RAF-DB', HOW_TO_GET)
    for part in (LABEL_FILE, IMAGE_DIR):
      common.require_path(os.path.join(self.manual_dir, part), 'RAF-DB', HOW_TO_GET)

  def has_distribution(self) -> bool:
    return find_distribution_file(self.manual_dir) is not None

  def split_records(self) -> dict:
    entries = parse_label_file(os.path.join(self.manual_dir, LABEL_FILE))
    dist_file = find_distribution_file(self.manual_dir)
    dists = parse_distribution_file(dist_file) if dist_file else None
    by_split = {'train': [], 'test': []}
    ignored = 0
    for name, label in entries:
      split = name.split('_', 1)[0]
      if split not in by_split:
        ignored += 1
        continue
      by_split[split].append(self._record(name, label, dists))
    if ignored:
      logging.warning('RAF-DB: ignored %d lines of %s whose name starts with neither train_ '
                      'nor test_.', ignored, LABEL_FILE)
    if dists is not None:
      missing = sum(_stem(n) not in dists for n, _ in entries)
      if missing:
        logging.warning('RAF-DB: %d images have no line in %s; their distribution is the '
                        'one-hot of their label.', missing, dist_file)
    for split, records in by_split.items():
      if not records:
        raise DatasetError(f'RAF-DB: {os.path.join(self.manual_dir, LABEL_FILE)} lists no '
                           f'{split}_ image; the file is incomplete. {HOW_TO_GET}')
    return by_split

  def _record(self, name: str, label: int, dists) -> common.Record:
    path = os.path.join(self.manual_dir, IMAGE_DIR, f'{_stem(name)}_aligned.jpg')
    if dists is None:
      dist = np.zeros(len(CLASS_NAMES), np.float32)
    else:
      dist = dists.get(_stem(name), np.eye(len(CLASS_NAMES), dtype=np.float32)[label])
    return common.Record(name=path, load=functools.partial(common.load_image_file, path),
                         label=label, distribution=dist)
