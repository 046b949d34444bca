"""Your own faces: one folder per class, for each of the splits train, test and (optional)
validation.

Expected layout of the manual dir (`config.input.data_dir`):

    train/<class_name>/*.jpg|*.jpeg|*.png     (extensions in any case)
    test/<class_name>/...
    validation/<class_name>/...               optional: config.input.eval_split='validation'

The class names are the sorted folder names of train/ (at least 2; the label id is the
position in that list); test/ and validation/ may lack a class but may not add one. Hidden
files, other extensions and nested folders are ignored. Images are stored as they are (a
plain RGB JPEG byte for byte, anything else as RGB PNG), at their own size: the pipeline
resizes them. The prepared dataset is keyed by the manual dir's path, its class list and
whether it has validation/ (`config_for`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from dmue_jax.errors import DatasetError
from dmue_jax.datasets import common

SPLITS = ('train', 'test')
OPTIONAL_SPLITS = ('validation',)
HOW_TO_GET = ('Put your images in <data_dir>/train/<class_name>/ and '
              '<data_dir>/test/<class_name>/ (jpg, jpeg or png; at least 2 classes) and set '
              'config.input.data_dir to <data_dir>.')


def class_folders(split_dir: str) -> list[str]:
  """Sorted names of the non-hidden sub-folders of split_dir."""
  return sorted(n for n in os.listdir(split_dir)
                if not n.startswith('.') and os.path.isdir(os.path.join(split_dir, n)))


def present_splits(manual_dir: str) -> tuple[str, ...]:
  """train, test, and validation when manual_dir has that folder."""
  return SPLITS + tuple(s for s in OPTIONAL_SPLITS
                        if os.path.isdir(os.path.join(manual_dir, s)))


def check_manual_dir(manual_dir: str) -> list[str]:
  """Raises DatasetError naming what is missing; returns the class names."""
  common.require_data_dir(manual_dir, 'Image folder dataset', HOW_TO_GET)
  for split in SPLITS:
    common.require_path(os.path.join(manual_dir, split), 'Image folder dataset', HOW_TO_GET)
  train_dir = os.path.join(manual_dir, 'train')
  names = class_folders(train_dir)
  if len(names) < 2:
    raise DatasetError(f'Image folder dataset: {train_dir} has {len(names)} class folder(s) '
                       f'({", ".join(names) or "none"}); at least 2 are needed. {HOW_TO_GET}')
  for name in names:
    if not common.list_images(os.path.join(train_dir, name)):
      raise DatasetError(f'Image folder dataset: {os.path.join(train_dir, name)} holds no '
                         f'.jpg/.jpeg/.png image; every class needs training images.')
  for split in present_splits(manual_dir)[1:]:
    split_dir = os.path.join(manual_dir, split)
    unknown = sorted(set(class_folders(split_dir)) - set(names))
    if unknown:
      raise DatasetError(f'Image folder dataset: {split_dir} has class folder(s) '
                         f'{", ".join(unknown)} that {train_dir} lacks; the classes are the '
                         'folders of train/.')
  return names


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  class_names: tuple[str, ...] = ()
  splits: tuple[str, ...] = SPLITS


def config_for(manual_dir: str, class_names: list[str],
               splits: tuple[str, ...] = SPLITS) -> FolderConfig:
  """A config named after the folder, with a hash of its path, classes and optional splits.

  The prepared dataset is keyed by it: the manual dir's absolute path, its class list and
  whether it has validation/. So two folder datasets can share one cache dir, and adding a class
  or a validation/ folder makes a new one.
  """
  path = os.path.abspath(manual_dir)
  # Without validation/ the key is what it was before that split existed: caches stay valid.
  extra = [f'split:{s}' for s in splits if s not in SPLITS]
  digest = hashlib.sha1('\n'.join([path, *class_names, *extra]).encode()).hexdigest()[:12]
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(path.rstrip(os.sep)).lower()).strip('_')
  return FolderConfig(name=f'{slug or "data"}_{digest}', class_names=tuple(class_names),
                      splits=tuple(splits))


class ExpressionFolder(common.ExpressionBuilder):
  """<data_dir>/<split>/<class>/*.jpg as a dataset."""

  name = 'expression_folder'
  DESCRIPTION = __doc__

  def class_names(self) -> list[str]:
    return list(self.builder_config.class_names)

  def check_manual_dir(self) -> None:
    found = check_manual_dir(self.manual_dir)
    if found != self.class_names():
      raise DatasetError(f'Image folder dataset: the classes of {self.manual_dir}/train '
                         f'changed while preparing ({found}); run again.')

  def split_records(self) -> dict:
    return {split: self._records(split) for split in self.builder_config.splits}

  def _records(self, split: str) -> list[common.Record]:
    names = self.class_names()
    records = []
    for label, name in enumerate(names):
      folder = os.path.join(self.manual_dir, split, name)
      if not os.path.isdir(folder):
        logging.warning('Image folder dataset: %s is missing; the %s split has no %s.',
                        folder, split, name)
        continue
      for path in common.list_images(folder):
        records.append(common.Record(
            name=path, load=functools.partial(common.load_image_file, path), label=label,
            distribution=np.zeros(len(names), np.float32)))
    if not records:
      raise DatasetError(f'Image folder dataset: {os.path.join(self.manual_dir, split)} holds '
                         f'no image in a class folder. {HOW_TO_GET}')
    return records


def make_builder(*, manual_dir: str, cache_dir: str) -> ExpressionFolder:
  """The builder for manual_dir; needs the folder itself, since it names the classes."""
  names = check_manual_dir(manual_dir)
  return ExpressionFolder(manual_dir=manual_dir, data_dir=cache_dir,
                          config=config_for(manual_dir, names, present_splits(manual_dir)))
