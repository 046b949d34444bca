"""FERPlus: the FER2013 images with the FER+ annotators' votes, majority protocol, 8 classes.

Expected layout of the manual dir (`config.input.data_dir`):

    fer2013.csv       columns emotion, pixels (48x48 grey, space-separated), Usage
    fer2013new.csv    same row order; columns Usage, Image name, then 10 vote counts:
                      neutral, happiness, surprise, sadness, anger, disgust, fear, contempt,
                      unknown, NF

Majority protocol (as in the FER+ authors' code): a class with a single vote gets 0 (an outlier);
an image is kept only when its top class has more than half of the remaining votes and is one of
the 8 emotions (not unknown / NF). Its 'distribution' is the remaining votes over the 8 emotions,
normalised: a real crowd label distribution. Splits follow the FER+ convention: Training -> train,
PublicTest -> validation, PrivateTest -> test (`config.input.eval_split='validation'` evaluates on
PublicTest). Images are stored as 48x48x3 PNG (the grey value in all three channels).
"""

from __future__ import annotations

import csv
import functools
import os
from typing import Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from dmue_jax.errors import DatasetError
from dmue_jax.datasets import common

CLASS_NAMES = ('Neutral', 'Happiness', 'Surprise', 'Sadness', 'Anger', 'Disgust', 'Fear',
               'Contempt')
NUM_VOTE_COLUMNS = 10  # the 8 classes, unknown, NF
PIXELS_FILE = 'fer2013.csv'
VOTES_FILE = 'fer2013new.csv'
SPLITS = {'Training': 'train', 'PublicTest': 'validation', 'PrivateTest': 'test'}
SIZE = 48
HOW_TO_GET = ('Get fer2013.csv from the Kaggle "Challenges in Representation Learning: Facial '
              'Expression Recognition Challenge" and fer2013new.csv from '
              'https://github.com/microsoft/FERPlus, and set config.input.data_dir to the '
              'folder that holds both files.')


def majority(votes: Sequence[float]) -> tuple[int | None, np.ndarray]:
  """The majority-protocol label of one image and its vote distribution.

  Args:
    votes: the 10 vote counts (8 classes, unknown, NF).

  Returns:
    (label in 0..7, or None when the image is dropped; float32 [8] distribution, all zeros
    when dropped).
  """
  v = np.asarray(votes, np.float64).copy()
  v[v <= 1] = 0.0  # a lone vote is an outlier
  dropped = None, np.zeros(len(CLASS_NAMES), np.float32)
  top = int(np.argmax(v))
  # A class with more than half of the votes is unique, so argmax ties do not matter.
  if v[top] <= 0.5 * v.sum() or top >= len(CLASS_NAMES):
    return dropped
  emotions = v[:len(CLASS_NAMES)]
  return top, (emotions / emotions.sum()).astype(np.float32)


def _load_pixels(text: str, name: str) -> bytes:
  try:
    grey = np.array(text.split(), np.int64)
  except ValueError as e:
    raise common.UnreadableImage(f'{name}: pixels are not integers ({e})') from e
  if grey.size != SIZE * SIZE or grey.min() < 0 or grey.max() > 255:
    raise common.UnreadableImage(f'{name}: expected {SIZE * SIZE} values in 0..255, got '
                                 f'{grey.size}')
  grey = grey.astype(np.uint8).reshape(SIZE, SIZE)
  return common.encode_png(np.repeat(grey[..., None], 3, axis=-1))


def _read_rows(path: str) -> list[list[str]]:
  with open(path, newline='') as f:
    return list(csv.reader(f))


class FerPlus(common.ExpressionBuilder):
  """FERPlus, majority protocol."""

  name = 'ferplus'
  # 1.1.0: test is PrivateTest (1.0.0 tested on PublicTest); the cache is keyed by it.
  VERSION = tfds.core.Version('1.1.0')
  CLASS_NAMES = CLASS_NAMES
  HAS_DISTRIBUTION = True
  DESCRIPTION = __doc__

  def check_manual_dir(self) -> None:
    common.require_data_dir(self.manual_dir, 'FERPlus', HOW_TO_GET)
    for part in (PIXELS_FILE, VOTES_FILE):
      common.require_path(os.path.join(self.manual_dir, part), 'FERPlus', HOW_TO_GET)

  def _rows(self) -> tuple[list[list[str]], list[list[str]]]:
    """The data rows of both files, checked to match."""
    pixels_path = os.path.join(self.manual_dir, PIXELS_FILE)
    votes_path = os.path.join(self.manual_dir, VOTES_FILE)
    pixels, votes = _read_rows(pixels_path), _read_rows(votes_path)
    header = pixels[0] if pixels else []
    if not {'pixels', 'Usage'} <= set(header):
      raise DatasetError(f'FERPlus: {pixels_path} has the header {header}; expected the '
                         f'columns emotion, pixels, Usage. {HOW_TO_GET}')
    if not votes or len(votes[0]) < 2 + NUM_VOTE_COLUMNS:
      raise DatasetError(f'FERPlus: {votes_path} should have the columns Usage, Image name '
                         f'and 10 vote counts. {HOW_TO_GET}')
    if len(pixels) != len(votes):
      raise DatasetError(f'FERPlus: {pixels_path} has {len(pixels) - 1} rows but {votes_path} '
                         f'has {len(votes) - 1}; the two files must be row for row the same '
                         f'images. {HOW_TO_GET}')
    return pixels, votes

  def split_records(self) -> dict:
    pixels, votes = self._rows()
    column = {name: i for i, name in enumerate(pixels[0])}
    by_split = {split: [] for split in SPLITS.values()}
    dropped = {split: 0 for split in SPLITS.values()}
    for row_no, (pixel_row, vote_row) in enumerate(zip(pixels[1:], votes[1:]), 2):
      name = f'{PIXELS_FILE} row {row_no}'
      usage = pixel_row[column['Usage']].strip() if len(pixel_row) == len(column) else ''
      split = SPLITS.get(usage)
      if split is None:
        logging.warning('FERPlus: %s has no known Usage; skipped.', name)
        continue
      try:
        counts = [float(x or 0) for x in vote_row[2:2 + NUM_VOTE_COLUMNS]]
        if len(counts) != NUM_VOTE_COLUMNS:
          raise ValueError('too few columns')
        label, dist = majority(counts)
      except ValueError:
        by_split[split].append(common.broken_record(
            f'{VOTES_FILE} row {row_no}', 'malformed vote counts', len(CLASS_NAMES)))
        continue
      if label is None:
        dropped[split] += 1
        continue
      by_split[split].append(common.Record(
          name=name, load=functools.partial(_load_pixels, pixel_row[column['pixels']], name),
          label=label, distribution=dist))
    logging.info('FERPlus: images without a clear majority (dropped by the protocol): %s',
                 dropped)
    for split in ('train', 'test'):
      if not by_split[split]:
        raise DatasetError(f'FERPlus: no image of the {split} split has a clear majority in '
                           f'{self.manual_dir}; are the CSV files complete? {HOW_TO_GET}')
    if not by_split['validation']:
      del by_split['validation']
    return by_split
