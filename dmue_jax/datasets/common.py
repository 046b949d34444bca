"""What every expression dataset builder shares: features, image checks, the skip log.

Each builder turns a dataset laid out as its authors ship it (the "manual dir") into a TFDS
dataset in array_record files, read back without TensorFlow through `as_data_source()`. The
builders here only list `Record`s (a name, a label, a distribution and a way to load the
image); `ExpressionBuilder` does the rest the same way for all of them:

* examples are written in listing order (shuffling is off) with `index` = position in the
  split, so `source[i]['index'] == i` and the order is the same on every machine;
* an image that cannot be read or decoded is skipped with a warning naming it, and counted;
* the per-split labels, skipped names and `has_distribution` go to the dataset's
  metadata.json, so a later load knows them without decoding a single image.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import os
from typing import Callable, Iterable, Iterator, Sequence

from absl import logging
import cv2
import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError
import tensorflow_datasets as tfds

from dmue_jax.errors import DatasetError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# Loading images is I/O and C code (libjpeg, OpenCV) that frees the GIL, so threads help;
# chunks bound how many decoded images wait in memory at once.
_MAX_LOAD_THREADS = 8
_LOAD_CHUNK = 256


class UnreadableImage(Exception):
  """An image file that is missing, truncated or not an image; the build skips it."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One example before its image is loaded.

  Attributes:
    name: what a warning calls it (a path, or 'file.csv row N').
    load: returns the encoded image (PNG or JPEG bytes, RGB); raises UnreadableImage.
    label: class id in 0..C-1.
    distribution: float32 [C] label distribution (zeros when the dataset has none).
    extra: further features, e.g. SynthFER's 'true_label'.
  """
  name: str
  load: Callable[[], bytes]
  label: int
  distribution: np.ndarray
  extra: dict = dataclasses.field(default_factory=dict)


def _raise_unreadable(message: str) -> bytes:
  raise UnreadableImage(message)


def broken_record(name: str, reason: str, num_classes: int) -> Record:
  """A record whose image cannot be had (e.g. a malformed CSV row): skipped and counted."""
  return Record(name=name, load=functools.partial(_raise_unreadable, f'{name}: {reason}'),
                label=0, distribution=np.zeros(num_classes, np.float32))


def encode_png(rgb: np.ndarray, compression: int = 3) -> bytes:
  """PNG bytes of an RGB uint8 image (OpenCV wants BGR)."""
  ok, buf = cv2.imencode('.png', np.ascontiguousarray(rgb[..., ::-1]),
                         [cv2.IMWRITE_PNG_COMPRESSION, compression])
  assert ok
  return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
  """JPEG bytes of an RGB uint8 image."""
  ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(rgb[..., ::-1]),
                         [cv2.IMWRITE_JPEG_QUALITY, quality])
  assert ok
  return buf.tobytes()


def decode_rgb(data: bytes, name: str) -> tuple[np.ndarray, str]:
  """Decodes fully to RGB uint8; returns (pixels, PIL format name).

  PIL rather than OpenCV because OpenCV silently returns a half-grey picture for a truncated
  JPEG, and a corrupt file must be caught here, not in the middle of training.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt, mode = im.format, im.mode
      im.load()
      rgb = np.asarray(im.convert('RGB'))
  except UnidentifiedImageError as e:
    raise UnreadableImage(f'{name}: not an image in a known format') from e
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UnreadableImage(f'{name}: {e}') from e
  return rgb, f'{fmt}/{mode}'


def read_file(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise UnreadableImage(f'{path}: {e}') from e


def load_image_file(path: str) -> bytes:
  """Bytes to store for an image file, checked to decode.

  A plain RGB JPEG is kept byte for byte (no second lossy compression, and fast); anything
  else (grey, CMYK, palette, 16-bit PNG) is converted to RGB and stored as PNG.
  """
  data = read_file(path)
  rgb, kind = decode_rgb(data, path)
  if kind == 'JPEG/RGB':
    return data
  return encode_png(rgb)


def list_images(folder: str) -> list[str]:
  """Sorted image files (case-insensitive extensions) directly inside `folder`."""
  names = [n for n in os.listdir(folder)
           if not n.startswith('.') and n.lower().endswith(IMAGE_EXTENSIONS)]
  return [os.path.join(folder, n) for n in sorted(names)]


def require_path(path: str, what: str, how: str) -> None:
  """Raises one DatasetError naming `path` when it does not exist.

  Args:
    path: the file or folder that must exist.
    what: the dataset's name, e.g. 'RAF-DB'.
    how: where to download it and how to lay it out.
  """
  if not os.path.exists(path):
    raise DatasetError(f'{what} not found: {path} does not exist. {how}')


def require_data_dir(data_dir: str, what: str, how: str) -> None:
  if not data_dir:
    raise DatasetError(f'{what}: config.input.data_dir is empty; set it to the folder that '
                       f'holds the dataset. {how}')
  require_path(data_dir, what, how)


def _try_load(record: Record) -> bytes | UnreadableImage:
  try:
    return record.load()
  except UnreadableImage as e:
    return e


def num_cpus() -> int:
  """CPUs this process may run on."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def load_in_threads(records: Iterable[Record]) -> Iterator[tuple[Record, bytes | Exception]]:
  """Yields (record, image bytes or the UnreadableImage) in listing order."""
  records = iter(records)
  with concurrent.futures.ThreadPoolExecutor(min(_MAX_LOAD_THREADS, num_cpus())) as pool:
    while True:
      chunk = [r for _, r in zip(range(_LOAD_CHUNK), records)]
      if not chunk:
        return
      yield from zip(chunk, pool.map(_try_load, chunk))


class ExpressionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the dataset builders: a manual dir in, indexed examples out.

  Subclasses set CLASS_NAMES (or override `class_names`), DESCRIPTION, and implement
  `check_manual_dir()` and `split_records()`. Registration with the global TFDS registry is
  skipped: the builders are made by `dmue_jax.datasets.load`, never looked up by name, and
  so cannot clash with a TFDS dataset of the same name.
  """

  VERSION = tfds.core.Version('1.0.0')
  # No checksums file to look up: nothing is downloaded. (TFDS's search for one also needs
  # the importlib_resources backport, which is not a dependency here.)
  code_path = None
  CLASS_NAMES: Sequence[str] = ()
  HAS_DISTRIBUTION = False
  DESCRIPTION = ''

  def __init__(self, *, manual_dir: str = '', **kwargs):
    self._manual_dir = manual_dir
    # array_record: the format that is written and randomly read without TensorFlow.
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)
    # TFDS re-creates a pickled builder from _original_state; keep the manual dir in it.
    self._original_state['manual_dir'] = manual_dir

  @property
  def manual_dir(self) -> str:
    return self._manual_dir

  def class_names(self) -> list[str]:
    return list(self.CLASS_NAMES)

  def has_distribution(self) -> bool:
    """Whether 'distribution' holds real label distributions (else it is all zeros)."""
    return self.HAS_DISTRIBUTION

  def extra_features(self) -> dict:
    """Features beyond image/label/distribution/index (SynthFER adds 'true_label')."""
    return {}

  def check_manual_dir(self) -> None:
    """Raises DatasetError naming the first missing file or folder."""
    raise NotImplementedError

  def split_records(self) -> dict[str, Iterable[Record]]:
    """Split name -> the records of that split, in a stable order."""
    raise NotImplementedError

  def load_images(self, split: str, records: Iterable[Record]
                  ) -> Iterator[tuple[Record, bytes | Exception]]:
    """(record, image bytes or UnreadableImage) in order; threads overlap I/O and decoding."""
    del split
    return load_in_threads(records)

  def _info(self) -> tfds.core.DatasetInfo:
    names = self.class_names()
    features = {
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(names=names),
        'distribution': tfds.features.Tensor(shape=(len(names),), dtype=np.float32),
        'index': tfds.features.Scalar(dtype=np.int64),
        **self.extra_features(),
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        # The order is the listing order so that `index` is the position in the split.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the data is in the manual dir.
    self.check_manual_dir()
    for key in ('labels', 'skipped'):
      self.info.metadata.setdefault(key, {})
    self.info.metadata['has_distribution'] = self.has_distribution()
    return {split: self._generate_examples(split, records)
            for split, records in self.split_records().items()}

  def _generate_examples(self, split: str, records: Iterable[Record]):
    labels, skipped = [], []
    for record, image in self.load_images(split, records):
      if isinstance(image, Exception):
        logging.warning('%s: skipping unreadable image %s', self.name, image)
        skipped.append(record.name)
        continue
      index = len(labels)
      yield index, {'image': image, 'label': record.label,
                    'distribution': np.asarray(record.distribution, np.float32),
                    'index': index, **record.extra}
      labels.append(int(record.label))
    if not labels:
      raise DatasetError(f'{self.name}: no readable image in the {split!r} split of '
                         f'{self.manual_dir}; {len(skipped)} could not be read.')
    self.info.metadata['labels'][split] = labels
    self.info.metadata['skipped'][split] = skipped
    counts = collections.Counter(labels)
    logging.info('%s/%s: %d examples (per class %s), %d unreadable images skipped.',
                 self.name, split, len(labels),
                 [counts.get(c, 0) for c in range(len(self.class_names()))], len(skipped))
