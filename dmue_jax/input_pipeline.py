"""Training and evaluation batches for DMUE: label noise, class-balanced sampling, augmentation.

A *source* is anything random-access with `len(source)` and `source[i] -> {'image': uint8[H, W, 3],
'label': int, ...}` (the TFDS data sources of `dmue_jax.datasets`, or an in-memory list). The
pipeline knows nothing of models; it turns a source into NumPy batches with static shapes.

Training batches (`TrainBatches`) are grouped by class, `image: float32[C, k, S, S, 3]`, because
the DMUE losses need fixed per-class subsets (the reference's boolean masks as static slices).
Unlike the reference's i.i.d. draws with replacement, every batch holds exactly k samples of each
class, each class walked through a fresh random permutation per pass, so no batch is skipped.
Batch s, and every random choice of its augmentation, is a pure function of (seed, s): a resumed
run sees exactly the batches it would have seen, and N processes each building their own columns
of the k axis together hold exactly the one-process batch. The augmentation is the reference's
(README quirk Q5, `train_transform`); evaluation resizes, centre-crops and normalises. The
sampling against the reference's, in full: docs/design.md, "Batches".
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
import concurrent.futures
import functools
import itertools
import math
import os
import time
from typing import Any

import cv2
import numpy as np

# Reference augmentation constants (README quirk Q5; FaceX-Zoo DMUE `datasets/`).
NOISE_PROB = 0.25
NOISE_STD = math.sqrt(30.0)  # on the uint8 scale
FLIP_PROB = 0.5
ERASE_PROB = 0.5
ERASE_AREA = (0.02, 0.25)
ERASE_ASPECT = (0.3, 3.3)
ERASE_TRIES = 10

# Distinct first words of the seed sequences keep the sampling and augmentation streams apart.
_PERMUTATION_STREAM = 1
_AUGMENT_STREAM = 2

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------- label noise


def apply_label_noise(labels: Sequence[int] | np.ndarray, *, rate: float, num_classes: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric label noise: round(rate * N) samples get a uniformly random *other* class.

  Args:
    labels: int[N] clean labels in [0, num_classes).
    rate: fraction of samples to corrupt, in [0, 1).
    num_classes: C >= 2.
    seed: which samples flip, and to what, is a pure function of the seed.

  Returns:
    (noisy_labels int64[N], flipped bool[N]); noisy_labels[i] != labels[i] exactly where flipped.
  """
  labels = np.asarray(labels, dtype=np.int64)
  _check_labels(labels, num_classes)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'label-noise rate={rate} must be in [0, 1).')
  n = labels.shape[0]
  num_flip = int(round(rate * n))
  rng = np.random.default_rng(seed)
  chosen = rng.choice(n, size=num_flip, replace=False)
  # An offset in 1..C-1 modulo C is uniform over the C-1 other classes and never the original.
  offsets = rng.integers(1, num_classes, size=num_flip)
  noisy = labels.copy()
  noisy[chosen] = (labels[chosen] + offsets) % num_classes
  flipped = np.zeros(n, dtype=bool)
  flipped[chosen] = True
  return noisy, flipped


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
  if labels.ndim != 1:
    raise ValueError(f'labels must be one-dimensional, got shape {labels.shape}.')
  if num_classes < 2:
    raise ValueError(f'num_classes={num_classes} must be at least 2.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels must lie in [0, {num_classes}), found {labels.min()}..'
                     f'{labels.max()}.')


# ---------------------------------------------------------------------------------- augmentation


def _as_rgb(image: np.ndarray) -> np.ndarray:
  """uint8[H, W] / [H, W, 1] / [H, W, 3] -> uint8[H, W, 3] (grey FERPlus faces become RGB)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'images must be uint8, got {image.dtype}.')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3):
    raise ValueError(f'images must be [H, W, 3], got shape {image.shape}.')
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  return image


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8[H, W, 3] -> uint8[size, size, 3], bicubic like the reference's stored images.

  The aspect ratio is not kept, as in the reference (`cv2.resize(img, (256, 256))`).
  """
  image = _as_rgb(image)
  if image.shape[:2] == (size, size):
    return image  # torchvision's Resize to the same size is a no-op too
  return cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8[H, W, 3] -> float32[H, W, 3] in [-1, 1]: ToTensor + Normalize(mean=std=0.5)."""
  out = np.multiply(image, np.float32(1.0 / 127.5), dtype=np.float32)
  out -= np.float32(1.0)
  return out


def add_gaussian_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """uint8[H, W, 3] -> uint8[H, W, 3] plus N(0, 30) noise, clipped, truncated as the reference."""
  noisy = rng.standard_normal(image.shape, dtype=np.float32)
  noisy *= np.float32(NOISE_STD)
  noisy += image
  np.clip(noisy, 0.0, 255.0, out=noisy)
  # astype truncates towards zero like the reference's `.astype(np.uint8)` (a -0.5 mean bias).
  return noisy.astype(np.uint8)


def erase_box(rng: np.random.Generator, height: int,
              width: int) -> tuple[int, int, int, int] | None:
  """torchvision's RandomErasing.get_params: a (top, left, h, w) box, or None after 10 misses.

  Area uniform in ERASE_AREA of the image, aspect h/w log-uniform in ERASE_ASPECT.
  """
  log_lo, log_hi = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
  for _ in range(ERASE_TRIES):
    area = height * width * rng.uniform(*ERASE_AREA)
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if h < height and w < width:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return None


def train_transform(image: np.ndarray, rng: np.random.Generator, *, image_size: int,
                    resize_size: int) -> np.ndarray:
  """The reference training augmentation (README quirk Q5), matching the reference's data path.

  The reference stores images already resized to 256x256 with `cv2.INTER_CUBIC`
  (`preprocess/make_lmdb.py`); its dataset adds Gaussian noise to that stored image with p=0.25
  (`datasets/bases.py`: noise N(0, 30) in variance, clipped to [0, 255], cast to uint8, i.e.
  truncated); torchvision then applies RandomCrop 224, horizontal flip p=0.5, ToTensor +
  Normalize(0.5, 0.5) and `RandomErasing(scale=(0.02, 0.25))` (p=0.5, aspect ratio log-uniform
  in (0.3, 3.3), value 0, 10 tries). Here resize_size and image_size stand for 256 and 224. The
  noise therefore lands on the *resized* image, not on the source image (README quirk Q5 words
  it as "before everything"): on RAF-DB's 100x100 faces noise added before an upsampling to 256
  would be smoothed away. Evaluation (`eval_transform`): resize, centre crop, normalise.

  Args:
    image: uint8[H, W, 3], any H, W.
    rng: the source of every random choice (the pipeline derives it from seed, step, position).
    image_size: S, the crop size.
    resize_size: R >= S, the square size before cropping.

  Returns:
    float32[S, S, 3] in [-1, 1].
  """
  crop, box = train_crop(image, rng, image_size=image_size, resize_size=resize_size)
  out = normalize(crop)
  if box is not None:
    t, l, h, w = box
    out[t:t + h, l:l + w] = 0.0  # value 0 after normalisation, i.e. mid-grey
  return out


NO_BOX = (0, 0, 0, 0)


def train_crop(image: np.ndarray, rng: np.random.Generator, *, image_size: int,
               resize_size: int) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
  """`train_transform` before normalising: (uint8[S, S, 3], the erased box (top, left, h, w)
  or None). The box is erased to 0 after normalising (mid-grey, not a uint8 value), so a
  uint8 batch carries it beside the image and the device erases it (`normalize_images`)."""
  image = resize(image, resize_size)
  add_noise = rng.uniform() < NOISE_PROB
  top = int(rng.integers(0, resize_size - image_size + 1))
  left = int(rng.integers(0, resize_size - image_size + 1))
  crop = image[top:top + image_size, left:left + image_size]
  if add_noise:
    # The reference adds i.i.d. per-pixel noise to the whole resized image before cropping and
    # flipping; those only select and reorder pixels, so noising the crop alone has the same
    # distribution at a fraction of the cost.
    crop = add_gaussian_noise(crop, rng)
  if rng.uniform() < FLIP_PROB:
    crop = crop[:, ::-1]
  box = erase_box(rng, image_size, image_size) if rng.uniform() < ERASE_PROB else None
  return crop, box


def normalize_images(images, erase=None):
  """On the device: uint8 images [..., S, S, 3] -> float32 in [-1, 1], as `normalize`, with
  each image's `erase` box [..., 4] (top, left, h, w; h = 0 for none) set to 0. Float images
  are taken as already normalised and returned as they are."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top (the pipeline itself is NumPy)
  if images.dtype != jnp.uint8:
    return images
  out = images.astype(jnp.float32) * jnp.float32(1.0 / 127.5) - jnp.float32(1.0)
  if erase is None:
    return out
  size_h, size_w = images.shape[-3], images.shape[-2]
  t, l, h, w = (erase[..., i, None, None] for i in range(4))
  rows = jnp.arange(size_h)[:, None]
  cols = jnp.arange(size_w)[None, :]
  inside = (rows >= t) & (rows < t + h) & (cols >= l) & (cols < l + w)
  return jnp.where(inside[..., None], 0.0, out)


def eval_transform(image: np.ndarray, *, image_size: int, resize_size: int) -> np.ndarray:
  """uint8[H, W, 3] -> float32[S, S, 3]: resize to R, centre crop S, normalise. Deterministic."""
  return normalize(eval_crop(image, image_size=image_size, resize_size=resize_size))


def eval_crop(image: np.ndarray, *, image_size: int, resize_size: int) -> np.ndarray:
  """`eval_transform` before normalising: uint8[S, S, 3]."""
  image = resize(image, resize_size)
  # torchvision CenterCrop rounds the offset.
  offset = int(round((resize_size - image_size) / 2.0))
  return image[offset:offset + image_size, offset:offset + image_size]


def normalize_images_np(images: np.ndarray, erase: np.ndarray) -> np.ndarray:
  """`normalize_images` on the host, in NumPy: uint8 [..., S, S, 3] and boxes [..., 4]."""
  out = normalize(images)
  flat_out = out.reshape((-1,) + out.shape[-3:])
  for i, (t, l, h, w) in enumerate(erase.reshape(-1, 4)):
    flat_out[i, t:t + h, l:l + w] = 0.0
  return out


# ------------------------------------------------------------------------------------- sampling


def class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """int[N] labels -> C arrays of the dataset positions of each class (ascending, int64).

  Raises:
    ValueError: naming the first class without any sample; balanced batches cannot hold it.
  """
  labels = np.asarray(labels, dtype=np.int64)
  _check_labels(labels, num_classes)
  members = [np.flatnonzero(labels == c).astype(np.int64) for c in range(num_classes)]
  for c, m in enumerate(members):
    if m.size == 0:
      raise ValueError(f'class {c} has no training sample; every class needs at least one for '
                       'class-balanced batches (check num_classes and the labels).')
  return members


@functools.lru_cache(maxsize=1024)
def _pass_permutation(seed: int, cls: int, pass_index: int, size: int) -> np.ndarray:
  """The order in which pass `pass_index` walks class `cls`: a permutation of range(size)."""
  rng = np.random.default_rng([_PERMUTATION_STREAM, seed, cls, pass_index])
  perm = rng.permutation(size)
  perm.flags.writeable = False  # shared through the cache
  return perm


def class_stream(members: np.ndarray, *, seed: int, cls: int, start: int,
                 count: int) -> np.ndarray:
  """Slots start..start+count-1 of class `cls`'s endless stream of dataset positions.

  Slot t is sample perm_p[t mod n] of the class, p = t // n, with a fresh permutation per pass p:
  every sample appears once per pass, and the stream is a pure function of (seed, cls, t).

  Args:
    members: int64[n] dataset positions of the class, n >= 1.

  Returns:
    int64[count] dataset positions.
  """
  n = members.shape[0]
  slots = np.arange(start, start + count, dtype=np.int64)
  out = np.empty(count, dtype=np.int64)
  for p in np.unique(slots // n):
    in_pass = slots // n == p
    perm = _pass_permutation(seed, cls, int(p), n)
    out[in_pass] = members[perm[slots[in_pass] % n]]
  return out


def _augment_rng(seed: int, step: int, row: int, column: int) -> np.random.Generator:
  """The generator of one training sample, keyed by its *global* batch position."""
  return np.random.default_rng([_AUGMENT_STREAM, seed, step, row, column])


def _local_share(total: int, process_index: int, process_count: int, what: str) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must lie in [0, process_count='
                     f'{process_count}).')
  if total % process_count:
    raise ValueError(f'{what}={total} must be divisible by the number of processes '
                     f'({process_count}) so that each holds an equal share of the global batch.')
  return total // process_count


class TrainBatches:
  """Class-balanced training batches; `batch(step)` is a pure function of (seed, step).

  The global batch at step s holds, in row c, the k stream slots s*k .. s*k+k-1 of class c (see
  `class_stream`). Process p builds only columns p*k_local .. (p+1)*k_local-1 of it.
  """

  def __init__(self, source: Any, labels: np.ndarray, *, num_classes: int, batch_per_class: int,
               image_size: int, resize_size: int, augment: bool = True, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    """See the module docstring.

    Args:
      source: random access, `source[i]['image']` uint8[H, W, 3].
      labels: int[N] training labels, N = len(source) (the noisy ones when label noise is on;
        the labels stored in the source are not read).
      num_classes: C.
      batch_per_class: k, samples of each class in the global batch.
      image_size, resize_size: S and R of the transforms.
      augment: the reference augmentation, else only the eval transform.
      seed: of the sampling and the augmentation.
      process_index, process_count: this process's share of the k axis.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape[0] != len(source):
      raise ValueError(f'{labels.shape[0]} labels for a source of {len(source)} samples.')
    if batch_per_class < 1:
      raise ValueError(f'batch_per_class={batch_per_class} must be positive.')
    if not 0 < image_size <= resize_size:
      raise ValueError(f'image_size={image_size} must be in (0, resize_size={resize_size}].')
    self.source = source
    self.members = class_members(labels, num_classes)
    self.num_classes = num_classes
    self.batch_per_class = batch_per_class
    self.local_per_class = _local_share(batch_per_class, process_index, process_count,
                                        'batch_per_class')
    self.image_size = image_size
    self.resize_size = resize_size
    self.augment = augment
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count

  @property
  def class_sizes(self) -> list[int]:
    return [int(m.size) for m in self.members]

  def _first_column(self) -> int:
    return self.process_index * self.local_per_class

  def indices(self, step: int) -> np.ndarray:
    """int64[C, k_local]: the dataset positions of this process's share of batch `step`."""
    if step < 0:
      raise ValueError(f'step={step} must be non-negative.')
    start = step * self.batch_per_class + self._first_column()
    return np.stack([
        class_stream(m, seed=self.seed, cls=c, start=start, count=self.local_per_class)
        for c, m in enumerate(self.members)])

  def batch(self, step: int) -> Batch:
    """{'image': float32[C, k_local, S, S, 3], 'label': int32[C, k_local] (row c = c),
    'index': int64[C, k_local]} for step `step`."""
    raw = self.raw_batch(step)
    raw['image'] = np.asarray(normalize_images_np(raw.pop('image'), raw.pop('erase')))
    return raw

  def raw_batch(self, step: int) -> Batch:
    """`batch(step)` before normalising, a quarter of the bytes to send to the devices:
    {'image': uint8[C, k_local, S, S, 3], 'erase': int32[C, k_local, 4] (the boxes to erase
    after normalising, see `train_crop`), 'label', 'index'}. `normalize_images` finishes it."""
    index = self.indices(step)
    c_dim, k_dim, s = self.num_classes, self.local_per_class, self.image_size
    image = np.empty((c_dim, k_dim, s, s, 3), dtype=np.uint8)
    erase = np.zeros((c_dim, k_dim, 4), dtype=np.int32)
    first = self._first_column()
    for c in range(c_dim):
      for j in range(k_dim):
        raw = self.source[int(index[c, j])]['image']
        if self.augment:
          rng = _augment_rng(self.seed, step, c, first + j)
          image[c, j], box = train_crop(raw, rng, image_size=s, resize_size=self.resize_size)
          erase[c, j] = box or NO_BOX
        else:
          image[c, j] = eval_crop(raw, image_size=s, resize_size=self.resize_size)
    label = np.broadcast_to(np.arange(c_dim, dtype=np.int32)[:, None], (c_dim, k_dim)).copy()
    return {'image': image, 'erase': erase, 'label': label, 'index': index}

  def iterate(self, start_step: int = 0, *, num_steps: int | None = None,
              num_threads: int | None = None, prefetch: int | None = None,
              raw: bool = False) -> Iterator[Batch]:
    """Yields batch(start_step), batch(start_step + 1), ... (num_steps of them, or forever);
    `raw_batch`es with raw=True.

    Batches are built ahead on `num_threads` threads (default: the usable cores); OpenCV and
    NumPy release the GIL in the heavy parts, so throughput scales with cores.
    """
    stop = None if num_steps is None else start_step + num_steps
    steps = itertools.count(start_step) if stop is None else range(start_step, stop)
    return prefetch_map(self.raw_batch if raw else self.batch, steps, num_threads=num_threads,
                        prefetch=prefetch)


# ------------------------------------------------------------------------------------ threading


def default_num_threads() -> int:
  """The cores this process may use (respects CPU affinity, e.g. under taskset or a cgroup)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


def prefetch_map(fn: Callable[[Any], Any], keys: Iterable[Any], *, num_threads: int | None = None,
                 prefetch: int | None = None) -> Iterator[Any]:
  """Yields fn(key) for each key in order, computing up to `prefetch` results ahead on threads.

  Closing the iterator (or dropping it) cancels the work not yet started.
  """
  num_threads = num_threads or default_num_threads()
  prefetch = prefetch or 2 * num_threads
  keys = iter(keys)
  pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix='input_pipeline')
  pending = collections.deque(pool.submit(fn, key) for key in itertools.islice(keys, prefetch))
  try:
    while pending:
      result = pending.popleft().result()
      pending.extend(pool.submit(fn, key) for key in itertools.islice(keys, 1))
      yield result
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------ evaluation


def eval_batches(source: Any, *, batch_size: int, image_size: int, resize_size: int,
                 process_index: int = 0, process_count: int = 1,
                 num_threads: int | None = None) -> Iterator[Batch]:
  """One pass over `source` in order, as padded batches with static shapes.

  Global batch b covers positions b*batch_size .. (b+1)*batch_size-1; process p gets the
  contiguous slice p*b_local .. (p+1)*b_local-1 of it, b_local = batch_size // process_count.
  Every process yields the same number of batches, ceil(N / batch_size), so a jitted step over
  the global batch runs the same number of times everywhere. Padding rows have mask False,
  a zero image, label 0 and index -1.

  Yields:
    {'image': float32[b_local, S, S, 3], 'label': int32[b_local], 'index': int64[b_local],
     'mask': bool[b_local]}.
  """
  local = _local_share(batch_size, process_index, process_count, 'batch_size')
  n = len(source)
  num_batches = -(-n // batch_size)

  def make(b: int) -> Batch:
    index = b * batch_size + process_index * local + np.arange(local, dtype=np.int64)
    mask = index < n
    index = np.where(mask, index, -1)
    image = np.zeros((local, image_size, image_size, 3), dtype=np.float32)
    label = np.zeros(local, dtype=np.int32)
    for i in np.flatnonzero(mask):
      example = source[int(index[i])]
      image[i] = eval_transform(example['image'], image_size=image_size, resize_size=resize_size)
      label[i] = example['label']
    return {'image': image, 'label': label, 'index': index, 'mask': mask}

  return prefetch_map(make, range(num_batches), num_threads=num_threads)


# ------------------------------------------------------------------------------------ benchmark


def measure_throughput(source: Any, labels: np.ndarray, *, num_classes: int,
                       batch_per_class: int, image_size: int, resize_size: int, augment: bool,
                       steps: int, num_threads: int | None = None) -> float:
  """Images per second that the training pipeline alone delivers over `steps` batches.

  The clock includes the thread start-up and the first batch, so short runs err on the low side.
  """
  batches = TrainBatches(source, labels, num_classes=num_classes,
                         batch_per_class=batch_per_class, image_size=image_size,
                         resize_size=resize_size, augment=augment, seed=0)
  start = time.perf_counter()
  images = sum(b['image'].shape[0] * b['image'].shape[1]
               for b in batches.iterate(0, num_steps=steps, num_threads=num_threads))
  return images / (time.perf_counter() - start)
