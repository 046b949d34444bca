"""SynthFER: the embedded dataset of rendered cartoon faces with ambiguous labels.

Nothing to download: it is generated in seconds, deterministically from
`config.input.synthfer_seed`, with `synthfer_num_train` / `synthfer_num_test` samples
(default 2800 / 700). It exists so that the whole method can be run and checked without a
licensed dataset, and it has what DMUE is about: some faces are genuinely ambiguous, and
their annotated label is a draw from a known true label distribution. 7 classes in RAF-DB
order (Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral); 30 % of the faces blend
two expressions. 'distribution' is the true label distribution (the mixing weights),
'true_label' its argmax; the train 'label' is drawn from 'distribution', the test 'label' is
the true label. Symmetric label noise is not applied here: the input pipeline does that.
Images 112x112x3 uint8, stored as JPEG (quality 95). The generator is `facegen.py`; more on
the faces in docs/design.md, "Datasets". The cache is <cache_dir>/synthfer/
train<N>_test<M>_seed<S>/<VERSION>; VERSION must be bumped whenever the generator changes.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from dmue_jax.datasets import common
from dmue_jax.datasets import facegen

CLASS_NAMES = facegen.CLASS_NAMES


@dataclasses.dataclass(eq=False)
class SynthFerConfig(tfds.core.BuilderConfig):
  num_train: int = 2800
  num_test: int = 700
  seed: int = 0


def make_config(*, num_train: int, num_test: int, seed: int) -> SynthFerConfig:
  # The name keys the cache: a different size or seed is a different dataset.
  return SynthFerConfig(name=f'train{num_train}_test{num_test}_seed{seed}',
                        num_train=num_train, num_test=num_test, seed=seed)


class SynthFer(common.ExpressionBuilder):
  """SynthFER, generated into the cache dir; no manual dir."""

  name = 'synthfer'
  # Bump whenever facegen's output changes: the cache is keyed by it. (1.0.0 were
  # development builds whose train split held test samples; never reuse them.)
  VERSION = tfds.core.Version('1.1.0')
  CLASS_NAMES = CLASS_NAMES
  HAS_DISTRIBUTION = True
  DESCRIPTION = __doc__
  # Below this many images, starting worker processes costs more than it saves.
  MIN_IMAGES_PER_WORKER = 200

  def extra_features(self) -> dict:
    return {'true_label': tfds.features.ClassLabel(names=CLASS_NAMES)}

  def check_manual_dir(self) -> None:
    pass  # Generated: nothing can be missing.

  def split_records(self) -> dict:
    cfg = self.builder_config
    sizes = {'train': cfg.num_train, 'test': cfg.num_test}
    return {split: self._records(split, n) for split, n in sizes.items()}

  def _records(self, split: str, num: int):
    # A generator function, not a generator expression in the dict above, which would see
    # only the last value of `split`.
    for index in range(num):
      yield self._record(split, index)

  def load_images(self, split: str, records):
    records = list(records)
    workers = min(common.num_cpus(), len(records) // self.MIN_IMAGES_PER_WORKER, 8)
    if workers < 2:
      return ((r, r.load()) for r in records)  # the renderer never fails
    return zip(records, facegen.render_jpegs(self.builder_config.seed, split, len(records),
                                             workers))

  def _record(self, split: str, index: int) -> common.Record:
    seed = self.builder_config.seed
    labels = facegen.sample_labels(seed, split, index)
    return common.Record(name=f'synthfer/{split}/{index}',
                         load=functools.partial(facegen.render_jpeg, seed, split, index),
                         label=labels.label,
                         distribution=np.asarray(labels.distribution, np.float32),
                         extra={'true_label': labels.true_label})
