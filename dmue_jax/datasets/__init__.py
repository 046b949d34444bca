"""The datasets DMUE trains on, as random-access splits of decoded examples.

    splits = datasets.load(config.input)
    example = splits.train[0]   # {'image': uint8 [H, W, 3], 'label': int,
                                #  'distribution': float32 [C], 'index': int}
    splits.test                 # the split config.input.eval_split names
    labels = datasets.train_labels(splits)   # int64 [N], without decoding any image

`config.input.dataset` picks 'synthfer' (generated here), 'rafdb', 'affectnet', 'affectnet7',
'ferplus' or 'folder'; each module says where its files come from and how they are laid out.
Every dataset has a train and a test split; FERPlus and a folder with validation/ also have a
validation split (`config.input.eval_split='validation'`). The first load turns the files in
`config.input.data_dir` into TFDS array_record files under `config.input.cache_dir` (empty =
<data_dir>/tfds; SynthFER: a per-user cache) and later loads only open them, so delete
<cache_dir>/<dataset> to prepare again after changing the data. More: docs/design.md, "Datasets".
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from typing import Any, Sequence

from absl import logging
import numpy as np

import tensorflow_datasets as tfds

from dmue_jax.datasets import affectnet
from dmue_jax.datasets import ferplus
from dmue_jax.datasets import folder
from dmue_jax.datasets import rafdb
from dmue_jax.datasets import synthfer
from dmue_jax.errors import DatasetError


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """One split: `len(src)`, `src[i]` -> example dict, and every label without decoding.

  Attributes:
    data: the TFDS array_record data source (decodes the image on access).
    labels: int64 [len(data)], labels[i] == data[i]['label'].
  """
  data: Sequence[dict[str, Any]]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.data[i]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    # Grain reads a batch of records at once through this when it exists.
    return list(self.data.__getitems__(indices))


@dataclasses.dataclass
class Splits:
  """The loaded dataset.

  Attributes:
    train: the training split.
    test: the split evaluated, the one `config.input.eval_split` names (`eval_split`): the
      test split unless 'validation' was asked for.
    class_names: names of the label ids 0..C-1.
    has_distribution: whether 'distribution' holds real label distributions (FERPlus votes,
      SynthFER mixing weights, RAF-DB's crowd file when present); else it is all zeros.
    num_skipped: images skipped at preparation because they could not be read.
    skipped_files: their names.
    extra: the other splits by name: 'validation' where the dataset has one, or 'test' when
      `test` holds the validation split.
    eval_split: the name of the split in `test`.
  """
  train: Source
  test: Source
  class_names: list[str]
  has_distribution: bool
  num_skipped: int
  skipped_files: list[str] = dataclasses.field(default_factory=list)
  extra: dict[str, Source] = dataclasses.field(default_factory=dict)
  eval_split: str = 'test'


def default_synthfer_cache_dir() -> str:
  """Per-user cache for SynthFER, which has no data dir of its own."""
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'dmue_jax', 'tfds')


def make_builder(input_config):
  """The TFDS builder for `input_config.dataset`, storing its files in the cache dir."""
  name = input_config.dataset
  if name == 'synthfer':
    return synthfer.SynthFer(
        config=synthfer.make_config(num_train=input_config.synthfer_num_train,
                                    num_test=input_config.synthfer_num_test,
                                    seed=input_config.synthfer_seed),
        data_dir=input_config.cache_dir or default_synthfer_cache_dir())
  data_dir = input_config.data_dir
  if not data_dir and not input_config.cache_dir:
    raise DatasetError(f'config.input.dataset={name!r} needs config.input.data_dir: the '
                       'folder holding the downloaded dataset (see dmue_jax/datasets/'
                       f'{name.rstrip("7")}.py for where to get it and its layout).')
  cache_dir = input_config.cache_dir or os.path.join(data_dir, 'tfds')
  if name == 'rafdb':
    return rafdb.RafDb(manual_dir=data_dir, data_dir=cache_dir)
  if name in ('affectnet', 'affectnet7'):
    return affectnet.AffectNet(manual_dir=data_dir, data_dir=cache_dir,
                               config=affectnet.config_name(
                                   num_classes=7 if name == 'affectnet7' else 8,
                                   align=input_config.get('affectnet_align', 'landmarks')))
  if name == 'ferplus':
    return ferplus.FerPlus(manual_dir=data_dir, data_dir=cache_dir)
  if name == 'folder':
    return folder.make_builder(manual_dir=data_dir, cache_dir=cache_dir)
  raise DatasetError(f'config.input.dataset={name!r} is unknown; choose synthfer, rafdb, '
                     'affectnet, affectnet7, ferplus or folder.')


def _prepare(builder) -> None:
  builder.check_manual_dir()
  logging.warning('Preparing %s into %s, once: later runs reuse it.', builder.name,
                  builder.data_path)
  # Nothing is downloaded: TFDS's download-oriented progress bars would only say so.
  tfds.disable_progress_bar()
  # TFDS prints "Downloading and preparing dataset..." for every builder; ours download
  # nothing, so that goes to the log instead of the console.
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
  if printed.getvalue().strip():
    logging.info('TFDS: %s', printed.getvalue().strip())


def load(input_config) -> Splits:
  """Loads `input_config.dataset`, preparing it first when its cache is missing.

  Args:
    input_config: `config.input` of `dmue_jax.config_lib.base_config()`.

  Returns:
    The train and evaluation splits and what is known about them.

  Raises:
    DatasetError: the data dir is missing or incomplete (the message says what to get and
      where to put it), or the dataset lacks the split `eval_split` names.
  """
  builder = make_builder(input_config)
  if not builder.is_prepared():
    _prepare(builder)
  meta = builder.info.metadata
  sources = {}
  for split, data in builder.as_data_source().items():
    labels = np.asarray(meta['labels'][split], np.int64)
    if len(labels) != len(data):
      raise DatasetError(f'{builder.data_path} is inconsistent ({split}: {len(data)} examples, '
                         f'{len(labels)} labels); delete that folder to rebuild it.')
    sources[split] = Source(data=data, labels=labels)
  skipped = [name for split in sorted(meta['skipped']) for name in meta['skipped'][split]]
  eval_split = input_config.get('eval_split', 'test')
  if eval_split not in sources:
    raise DatasetError(f'config.input.eval_split={eval_split!r}: {input_config.dataset} in '
                       f'{builder.data_path} has no such split (it has '
                       f'{", ".join(sorted(sources))}).{_HOW_TO_ADD.get(input_config.dataset, "")}')
  splits = Splits(
      train=sources.pop('train'), test=sources.pop(eval_split),
      class_names=list(builder.info.features['label'].names),
      has_distribution=bool(meta['has_distribution']),
      num_skipped=len(skipped), skipped_files=skipped, extra=sources, eval_split=eval_split)
  logging.info('Dataset %s from %s: %d train / %d %s examples, %d classes, %d unreadable '
               'images skipped.', input_config.dataset, builder.data_path, len(splits.train),
               len(splits.test), eval_split, len(splits.class_names), splits.num_skipped)
  return splits


_HOW_TO_ADD = {'folder': ' Add <data_dir>/validation/<class_name>/ folders to give it one.'}


def train_labels(splits: Splits) -> np.ndarray:
  """int64 [N]: the label of every training example, in index order, no image decoded."""
  return splits.train.labels.copy()
