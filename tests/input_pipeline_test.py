"""Tests for dmue_jax.input_pipeline: label noise, balanced batches, augmentation, eval batches."""

import numpy as np
import pytest

from dmue_jax import input_pipeline as ip

S, R = 32, 40  # small crop / resize sizes keep the tests fast


class FakeSource:
  """An in-memory source with the datasets API; image i is a distinct random uint8 image."""

  def __init__(self, labels, num_classes, size=24, seed=0):
    self.labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    self.images = rng.integers(0, 256, (len(self.labels), size, size, 3), dtype=np.uint8)
    self.num_classes = num_classes

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    dist = np.full(self.num_classes, 1.0 / self.num_classes, dtype=np.float32)
    return {'image': self.images[i], 'label': int(self.labels[i]), 'distribution': dist,
            'index': int(i)}


# Imbalanced on purpose: class 3 has fewer samples than k, class 1 a single one.
CLASS_SIZES = (12, 1, 7, 3)
LABELS = np.repeat(np.arange(len(CLASS_SIZES)), CLASS_SIZES)
C = len(CLASS_SIZES)


def make_batches(k=4, seed=0, augment=True, **kwargs):
  # Shuffled label order so that dataset positions and classes are not trivially aligned.
  labels = np.random.default_rng(1).permutation(LABELS)
  source = FakeSource(labels, C)
  return ip.TrainBatches(source, labels, num_classes=C, batch_per_class=k, image_size=S,
                         resize_size=R, augment=augment, seed=seed, **kwargs), labels


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------------------------ label noise


def test_label_noise_flips_exactly_round_rate_n_to_other_classes():
  labels = np.random.default_rng(0).integers(0, 7, 1001)
  noisy, flipped = ip.apply_label_noise(labels, rate=0.3, num_classes=7, seed=5)
  assert noisy.dtype == np.int64 and flipped.dtype == bool
  assert flipped.sum() == round(0.3 * 1001)
  assert np.all(noisy[flipped] != labels[flipped])
  np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
  assert noisy.min() >= 0 and noisy.max() < 7
  # Symmetric: the new class is uniform over the 6 others, so each offset has ~1/6 of the flips.
  offsets = (noisy[flipped] - labels[flipped]) % 7
  counts = np.bincount(offsets, minlength=7)[1:]
  assert counts.min() > 0.5 * flipped.sum() / 6


def test_label_noise_is_a_function_of_the_seed():
  labels = np.arange(200) % 5
  a = ip.apply_label_noise(labels, rate=0.2, num_classes=5, seed=3)
  b = ip.apply_label_noise(labels, rate=0.2, num_classes=5, seed=3)
  c = ip.apply_label_noise(labels, rate=0.2, num_classes=5, seed=4)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[1], c[1])
  noisy, flipped = ip.apply_label_noise(labels, rate=0.0, num_classes=5, seed=3)
  assert not flipped.any()
  np.testing.assert_array_equal(noisy, labels)


# ------------------------------------------------------------------------------- train batches


def test_every_batch_holds_k_per_class_with_rows_as_labels():
  batches, labels = make_batches(k=4)
  for step in range(5):
    b = batches.batch(step)
    assert b['image'].shape == (C, 4, S, S, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['index'].dtype == np.int64
    np.testing.assert_array_equal(b['label'], np.repeat(np.arange(C)[:, None], 4, axis=1))
    # Every sample in row c really is of class c.
    np.testing.assert_array_equal(labels[b['index']], b['label'])


def test_batches_are_a_pure_function_of_seed_and_step():
  batches, _ = make_batches(seed=7)
  again, _ = make_batches(seed=7)
  assert_batches_equal(batches.batch(3), again.batch(3))
  assert_batches_equal(batches.batch(3), batches.batch(3))
  assert not np.array_equal(batches.batch(3)['image'], batches.batch(4)['image'])
  # Class 1 has a single sample, so row 1 always holds it: its augmentation must still vary
  # with the step and with the column.
  row = [batches.batch(s)['image'][1] for s in (3, 4)]
  assert len({x.tobytes() for x in [*row[0], *row[1]]}) == 8
  other_seed, _ = make_batches(seed=8)
  assert not np.array_equal(batches.batch(3)['index'], other_seed.batch(3)['index'])


def test_each_class_pass_covers_every_sample_once_and_reshuffles():
  batches, labels = make_batches(k=4)
  steps = 12  # 48 slots: 4 passes of class 0, 48 of class 1, 6+ of class 2, 16 of class 3
  stream = np.concatenate([batches.indices(s) for s in range(steps)], axis=1)
  for c, n in enumerate(CLASS_SIZES):
    members = np.flatnonzero(labels == c)
    passes = stream[c, :(stream.shape[1] // n) * n].reshape(-1, n)
    for p in passes:
      np.testing.assert_array_equal(np.sort(p), members)
    if n >= 7:  # a fresh order per pass (identical orders of 7+ items would be a bug)
      assert not np.array_equal(passes[0], passes[1])


def test_iterate_resumes_with_the_same_batches():
  batches, _ = make_batches()
  it = batches.iterate(3, num_threads=2, prefetch=3)
  for step in (3, 4, 5, 6):
    assert_batches_equal(next(it), batches.batch(step))
  it.close()
  assert [b['index'][0, 0] for b in batches.iterate(2, num_steps=3)] == [
      batches.indices(s)[0, 0] for s in (2, 3, 4)]


def test_process_shares_concatenate_to_the_global_batch():
  full, _ = make_batches(k=6)
  shares = [make_batches(k=6, process_index=p, process_count=3)[0] for p in range(3)]
  for step in (0, 5):
    whole = full.batch(step)
    parts = [s.batch(step) for s in shares]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1), whole[key],
                                    err_msg=key)
  with pytest.raises(ValueError, match='divisible'):
    make_batches(k=4, process_index=0, process_count=3)


def test_class_without_samples_is_an_error_naming_it():
  labels = np.array([0, 0, 2, 2, 1, 0])
  with pytest.raises(ValueError, match='class 3'):
    ip.TrainBatches(FakeSource(labels, 4), labels, num_classes=4, batch_per_class=2,
                    image_size=S, resize_size=R)


def test_no_augment_gives_the_eval_transform():
  batches, _ = make_batches(augment=False)
  b = batches.batch(0)
  i = b['index'][2, 1]
  expected = ip.eval_transform(batches.source[int(i)]['image'], image_size=S, resize_size=R)
  np.testing.assert_array_equal(b['image'][2, 1], expected)


# -------------------------------------------------------------------------------- augmentation


def augment_many(image, n, seed=0):
  return np.stack([ip.train_transform(image, np.random.default_rng([seed, i]), image_size=S,
                                      resize_size=R) for i in range(n)])


def test_train_transform_keeps_shape_and_range():
  image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
  out = augment_many(image, 50)
  assert out.shape == (50, S, S, 3) and out.dtype == np.float32
  assert out.min() >= -1.0 and out.max() <= 1.0
  # The rng really varies the result (a few of the 9x9 crops x 2 flips may coincide).
  assert len({o.tobytes() for o in out}) > 40


def test_train_transform_probabilities_match_the_reference():
  n = 600
  # Constant white: the crop is invisible, noise shows as values < 1, erasing as exact zeros.
  out = augment_many(np.full((R, R, 3), 255, np.uint8), n).reshape(n, -1)
  erased = np.mean(out == 0.0, axis=1)
  noised = np.any((out < 1.0) & (out != 0.0), axis=1)
  # The reference's probabilities, written out so that a changed constant fails here.
  assert abs(np.mean(erased > 0) - 0.5) < 0.07
  assert abs(np.mean(noised) - 0.25) < 0.06
  areas = erased[erased > 0]
  assert areas.min() > 0.015 and areas.max() < 0.27  # ERASE_AREA (0.02, 0.25), up to rounding
  # A left-to-right ramp: flipped crops decrease along the width.
  ramp = np.broadcast_to(np.linspace(0, 255, R).astype(np.uint8)[None, :, None], (R, R, 3))
  out = augment_many(np.ascontiguousarray(ramp), 300, seed=1)
  flipped = out[:, S // 2, 0, 0] > out[:, S // 2, -1, 0]
  assert abs(np.mean(flipped) - 0.5) < 0.1


def test_gaussian_noise_has_the_reference_std_and_truncation():
  grey = np.full((200, 200, 3), 100, np.uint8)
  noisy = ip.add_gaussian_noise(grey, np.random.default_rng(0)).astype(np.float64)
  assert abs(noisy.std() - np.sqrt(30.0)) < 0.2
  # astype(uint8) truncates, so the mean drops by about half a grey level.
  assert -0.7 < noisy.mean() - 100 < -0.3


def test_eval_transform_is_a_deterministic_centre_crop():
  image = np.random.default_rng(0).integers(0, 256, (R, R, 3), dtype=np.uint8)
  out = ip.eval_transform(image, image_size=S, resize_size=R)
  off = (R - S) // 2
  np.testing.assert_allclose(out, image[off:off + S, off:off + S] / 127.5 - 1, atol=1e-6)
  other = np.random.default_rng(1).integers(0, 256, (60, 45, 3), dtype=np.uint8)
  a = ip.eval_transform(other, image_size=S, resize_size=R)
  np.testing.assert_array_equal(a, ip.eval_transform(other, image_size=S, resize_size=R))
  assert a.shape == (S, S, 3) and a.min() >= -1 and a.max() <= 1


# -------------------------------------------------------------------------------- eval batches


def test_eval_batches_pad_the_last_batch_with_mask():
  labels = np.arange(10) % 3
  source = FakeSource(labels, 3)
  batches = list(ip.eval_batches(source, batch_size=4, image_size=S, resize_size=R))
  assert len(batches) == 3
  for b in batches:
    assert b['image'].shape == (4, S, S, 3) and b['mask'].shape == (4,)
  np.testing.assert_array_equal(batches[-1]['mask'], [True, True, False, False])
  np.testing.assert_array_equal(batches[-1]['image'][2:], 0.0)
  np.testing.assert_array_equal(batches[-1]['index'][2:], -1)
  index = np.concatenate([b['index'][b['mask']] for b in batches])
  np.testing.assert_array_equal(index, np.arange(10))
  label = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(label, labels)
  np.testing.assert_array_equal(
      batches[1]['image'][3], ip.eval_transform(source.images[7], image_size=S, resize_size=R))


def test_eval_batches_split_between_processes():
  source = FakeSource(np.arange(11) % 3, 3)
  whole = list(ip.eval_batches(source, batch_size=4, image_size=S, resize_size=R))
  shares = [list(ip.eval_batches(source, batch_size=4, image_size=S, resize_size=R,
                                 process_index=p, process_count=2)) for p in range(2)]
  assert len(shares[0]) == len(shares[1]) == len(whole) == 3
  for b, (p0, p1) in enumerate(zip(*shares)):
    assert p0['image'].shape == (2, S, S, 3)
    for key in whole[b]:
      np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), whole[b][key])


def test_measure_throughput_counts_images():
  labels = LABELS
  rate = ip.measure_throughput(FakeSource(labels, C), labels, num_classes=C, batch_per_class=2,
                               image_size=S, resize_size=R, augment=True, steps=3)
  assert np.isfinite(rate) and rate > 0
