"""The tap-gradient convolution, the max-pools and the matmul batch norm compute what XLA's own
ops compute, values and gradients."""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmue_jax.models import fast_grads as conv
from dmue_jax.models import layers
from dmue_jax.models import resnet

NHWC = ('NHWC', 'HWIO', 'NHWC')


def lax_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def tap_conv(x, w, strides, padding):
  return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def random_case(shape_x, shape_w, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape_x), jnp.float32),
          jnp.asarray(rng.normal(size=shape_w), jnp.float32))


def assert_conv_matches_lax(fn, x, w, strides, padding, value_tol=1e-5):
  """fn(x, w, strides, padding), jitted, has lax's shape and value (within value_tol) and
  its input and kernel gradients (within 1e-5) under a random cotangent."""
  want = lax_conv(x, w, strides, padding)
  got = jax.jit(fn, static_argnums=(2, 3))(x, w, strides, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=value_tol, atol=value_tol)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)
  loss = lambda f: (lambda x, w: jnp.sum(f(x, w, strides, padding) * cot))
  want_dx, want_dw = jax.grad(loss(lax_conv), argnums=(0, 1))(x, w)
  got_dx, got_dw = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_dw, want_dw, rtol=1e-5, atol=1e-5)


def spy(monkeypatch, name, record):
  """Replaces conv.<name> by a wrapper that calls record(name, args) first."""
  original = getattr(conv, name)
  monkeypatch.setattr(conv, name, lambda *a, **kw: record(name, a) or original(*a, **kw))


@pytest.mark.parametrize('kernel,stride,padding,size', [
    (3, 1, ((1, 1), (1, 1)), 9),
    (3, 2, ((1, 1), (1, 1)), 9),       # odd size, stride 2: the last row/column is dropped
    (7, 2, ((3, 3), (3, 3)), 16),      # the stem
    (1, 2, ((0, 0), (0, 0)), 8),       # downsample
    (3, 2, ((0, 2), (1, 0)), 10),      # asymmetric padding
])
def test_value_and_gradients_equal_lax(kernel, stride, padding, size):
  x, w = random_case((3, size, size, 4), (kernel, kernel, 4, 5))
  assert_conv_matches_lax(tap_conv, x, w, (stride, stride), padding, value_tol=1e-6)


def test_vmapped_kernels_like_stacked_branches():
  """Branch mode 'vmap' batches both the input and the kernel."""
  rng = np.random.default_rng(2)
  xs = jnp.asarray(rng.normal(size=(2, 3, 6, 6, 4)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(2, 3, 3, 4, 4)), jnp.float32)
  pad = ((1, 1), (1, 1))
  f = lambda conv_fn: jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w, (2, 2), pad))),
                                        argnums=1))
  np.testing.assert_allclose(f(tap_conv)(xs, ws), f(lax_conv)(xs, ws), rtol=1e-5, atol=1e-5)


def test_bfloat16_gradient_has_the_kernel_dtype():
  x, w = random_case((2, 8, 8, 4), (3, 3, 4, 4))
  x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  dw = jax.grad(lambda w: jnp.sum(tap_conv(x, w, (1, 1), ((1, 1), (1, 1))).astype(jnp.float32)))(w)
  ref = jax.grad(lambda w: jnp.sum(lax_conv(x.astype(jnp.float32), w, (1, 1), ((1, 1), (1, 1)))))(
      w.astype(jnp.float32))
  assert dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(dw.astype(jnp.float32), ref, rtol=2e-2, atol=2e-1)


def test_other_convolutions_fall_back_to_lax():
  x, w = random_case((2, 8, 8, 4), (3, 3, 2, 4))
  got = conv.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC,
                                  feature_group_count=2)
  want = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC,
                                      feature_group_count=2)
  np.testing.assert_array_equal(got, want)


def test_kernel_setting_resolves_once_by_backend():
  """config.model.kernels: 'auto' is the CPU set on a CPU backend and XLA's elsewhere; 'xla' and
  'cpu' force one; anything else is an error naming the choices."""
  assert conv.select('auto', 'cpu') is conv.CPU
  for backend in ('gpu', 'tpu'):
    assert conv.select('auto', backend) is layers.XLA
  assert conv.select('xla', 'cpu') is layers.XLA
  assert conv.select('cpu', 'gpu') is conv.CPU
  assert conv.CPU.conv is conv.conv_auto and conv.CPU.batch_norm is conv.batch_norm_matmul
  assert layers.XLA.conv is jax.lax.conv_general_dilated
  with pytest.raises(ValueError, match='auto, xla, cpu'):
    conv.select('fast')


# ------------------------------------------------------------------ valid taps
def valid_tap_conv(x, w, strides, padding):
  return conv.conv_valid_taps(x, w, strides, padding)


@pytest.mark.parametrize('kernel,strides,padding,size', [
    ((3, 3), (1, 1), ((1, 1), (1, 1)), (4, 4)),   # layer4 at 112 px: 100 of 144 (output, tap) pairs
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (7, 7)),   # layer4's first conv: odd size, stride 2
    ((1, 1), (2, 2), ((0, 0), (0, 0)), (7, 7)),   # its downsample
    ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),   # a 1x1 map: only the centre tap reads input
    ((3, 3), (1, 1), ((3, 3), (3, 3)), (1, 1)),   # padding > k - 1: outputs reading padding only
    ((3, 3), (2, 2), ((2, 2), (2, 2)), (1, 1)),   # stride 2: the middle tap reads padding only
    ((7, 7), (2, 2), ((3, 3), (3, 3)), (9, 9)),   # the stem on a small map
    ((3, 3), (2, 2), ((0, 2), (1, 0)), (6, 6)),   # asymmetric padding
    ((3, 1), (2, 1), ((1, 1), (0, 2)), (6, 9)),   # unequal strides, non-square kernel and map
])
def test_valid_taps_value_and_gradients_equal_lax(kernel, strides, padding, size):
  x, w = random_case((3, *size, 4), (*kernel, 4, 5), seed=size[0])
  assert_conv_matches_lax(valid_tap_conv, x, w, strides, padding)


def test_valid_taps_accumulate_bfloat16_in_float32():
  """bfloat16 in, bfloat16 out, but the nine tap products are summed in float32 and rounded
  once, as XLA's convolution does: the result is within one bfloat16 rounding of it."""
  x, w = random_case((4, 4, 4, 128), (3, 3, 128, 64), seed=5)
  x, w = x.astype(jnp.bfloat16), (w * 0.05).astype(jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  got = jax.jit(valid_tap_conv, static_argnums=(2, 3))(x, w, (1, 1), pad)
  exact = lax_conv(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), pad)
  assert got.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits: one rounding is at most 2^-8 relative.
  np.testing.assert_allclose(got.astype(jnp.float32), exact, rtol=2.0 ** -8, atol=1e-6)
  dw = jax.grad(lambda w: jnp.sum(valid_tap_conv(x, w, (1, 1), pad).astype(jnp.float32)))(w)
  assert dw.dtype == jnp.bfloat16


def test_valid_taps_bfloat16_input_gradient_sums_taps_in_float32():
  """Each input entry of a 5x5 convolution gets 25 tap gradients; summed in bfloat16 they
  drifted to 0.57 % (relative norm) of the exact gradient, summed in float32 and rounded once
  they stay within 2^-8 (measured 0.29 %; XLA's own bfloat16 convolution: 0.24 %)."""
  x, w = random_case((4, 6, 6, 128), (5, 5, 128, 64), seed=5)
  x, w = x.astype(jnp.bfloat16), (w * 0.03).astype(jnp.bfloat16)
  pad = ((2, 2), (2, 2))
  cot = jnp.asarray(np.random.default_rng(6).normal(size=(4, 6, 6, 64)), jnp.float32)
  grad_x = lambda f, x, w: jax.grad(
      lambda x: jnp.sum(f(x, w, (1, 1), pad).astype(jnp.float32) * cot))(x)
  got = jax.jit(functools.partial(grad_x, valid_tap_conv))(x, w)
  assert got.dtype == jnp.bfloat16
  exact = grad_x(lax_conv, x.astype(jnp.float32), w.astype(jnp.float32))
  error = np.linalg.norm(got.astype(jnp.float32) - exact) / np.linalg.norm(exact)
  assert error < 2.0 ** -8, error


def test_valid_taps_skip_the_padding():
  """On a 4x4 map a 3x3 convolution multiplies 100 (output, tap) pairs, not 144: the dots
  of the lowered program hold 100/144 of the convolution's multiply-adds."""
  x, w = random_case((2, 4, 4, 8), (3, 3, 8, 16))
  pad = ((1, 1), (1, 1))
  hlo = jax.jit(valid_tap_conv, static_argnums=(2, 3)).lower(x, w, (1, 1), pad).as_text()
  assert 'convolution' not in hlo
  rows = sorted(int(m) for m in re.findall(r'dot_general[^\n]*-> tensor<(\d+)x16xf32>', hlo))
  # Per sample: the centre tap reads 16 outputs, the four edge taps 12, the four corners 9.
  assert rows == sorted([2 * 16] + [2 * 12] * 4 + [2 * 9] * 4)


@pytest.mark.parametrize('x_shape,w_shape,stride,pad,wins', [
    ((70, 112, 112, 3), (7, 7, 3, 64), 2, 3, False),     # stem
    ((70, 28, 28, 64), (3, 3, 64, 64), 1, 1, False),     # layer1
    ((70, 28, 28, 64), (3, 3, 64, 128), 2, 1, False),    # layer2's first: even, left to XLA
    ((70, 28, 28, 64), (1, 1, 64, 128), 2, 0, True),     # its downsample
    ((70, 14, 14, 128), (3, 3, 128, 128), 1, 1, False),
    ((70, 14, 14, 128), (3, 3, 128, 256), 2, 1, False),  # XLA's since YNNPACK products
    ((70, 7, 7, 256), (3, 3, 256, 256), 1, 1, False),    # 82 % of pairs read input
    ((60, 7, 7, 256), (3, 3, 256, 512), 2, 1, True),
    ((60, 4, 4, 512), (3, 3, 512, 512), 1, 1, True),     # 69 %
])
def test_valid_taps_rule_on_resnet18_at_112px(x_shape, w_shape, stride, pad, wins):
  assert conv.valid_taps_win(x_shape, w_shape, (stride, stride), ((pad, pad), (pad, pad))) is wins


def test_conv_auto_routes_by_shape_and_falls_back(monkeypatch):
  calls = []
  spy(monkeypatch, 'conv_valid_taps', lambda name, args: calls.append(args[1].shape))
  pad = ((1, 1), (1, 1))
  small, w = random_case((2, 4, 4, 8), (3, 3, 8, 8))
  large, _ = random_case((2, 16, 16, 8), (3, 3, 8, 8))
  for x in (small, large):
    np.testing.assert_allclose(conv.conv_auto(x, w, (1, 1), pad, dimension_numbers=NHWC),
                               lax_conv(x, w, (1, 1), pad), rtol=1e-5, atol=1e-5)
  assert calls == [(3, 3, 8, 8)]  # the 4x4 map only
  got = conv.conv_auto(small, w, (1, 1), 'SAME', dimension_numbers=NHWC)  # string padding: lax
  np.testing.assert_array_equal(got, jax.lax.conv_general_dilated(
      small, w, (1, 1), 'SAME', dimension_numbers=NHWC))
  assert len(calls) == 1
  # An empty output (a 3x3 kernel on a 2x2 map, no padding) is lax's, not a division by zero.
  tiny, _ = random_case((2, 2, 2, 8), (3, 3, 8, 8))
  assert not conv.valid_taps_win(tiny.shape, w.shape, (1, 1), ((0, 0), (0, 0)))
  got = conv.conv_auto(tiny, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=NHWC)
  assert got.shape == (2, 0, 0, 8) and len(calls) == 1


def test_valid_taps_under_vmap_like_stacked_branches():
  """Branch mode 'vmap' batches both the input and the kernel: the tap matmuls become batched
  matmuls, not XLA:CPU's slow grouped convolutions."""
  rng = np.random.default_rng(2)
  xs = jnp.asarray(rng.normal(size=(2, 3, 4, 4, 8)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(2, 3, 3, 8, 8)), jnp.float32)
  pad = ((1, 1), (1, 1))
  f = lambda conv_fn: jax.vmap(jax.grad(
      lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w, (1, 1), pad, dimension_numbers=NHWC))),
      argnums=(0, 1)))
  got = jax.jit(f(conv.conv_auto))(xs, ws)
  want = f(jax.lax.conv_general_dilated)(xs, ws)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert 'convolution' not in jax.jit(f(conv.conv_auto)).lower(xs, ws).as_text()


# ------------------------------------------------------------------ Winograd F(2x2, 3x3)
def winograd_conv(x, w, strides, padding):
  del strides  # stride 1 only
  return conv.conv_winograd(x, w, padding)


def exact_conv(x, w, padding):
  """The convolution in float64 with numpy, as the reference both float32 ones round."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  (pt, pb), (pl, pr) = padding
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = xp.shape[1] - 2, xp.shape[2] - 2
  return sum(xp[:, i:i + ho, j:j + wo] @ w[i, j] for i in range(3) for j in range(3))


@pytest.mark.parametrize('padding,size', [
    (((1, 1), (1, 1)), (4, 4)),      # layer4 at 112 px: 2x2 tiles
    (((1, 1), (1, 1)), (7, 7)),      # layer3: an odd map, the last tile half cropped
    (((1, 1), (1, 1)), (1, 1)),      # one tile reading mostly padding
    (((0, 2), (1, 0)), (5, 6)),      # asymmetric padding, non-square map
    (((3, 3), (0, 0)), (3, 3)),      # padding wider than the kernel reaches
    (((0, 0), (0, 0)), (6, 6)),      # no padding
])
def test_winograd_value_and_gradients_equal_lax(padding, size):
  x, w = random_case((3, *size, 6), (3, 3, 6, 5), seed=size[1])
  assert_conv_matches_lax(winograd_conv, x, w, (1, 1), padding)


def test_winograd_rounds_no_worse_than_xla():
  """On layer4's shape, Winograd's float32 error against the exact (float64) convolution is
  within 1.5x XLA's own float32 convolution's (the transforms' entries are exact in binary)."""
  x, w = random_case((6, 4, 4, 512), (3, 3, 512, 512), seed=3)
  w = w * 0.05
  pad = ((1, 1), (1, 1))
  exact = exact_conv(x, w, pad)
  error = lambda y: np.abs(np.asarray(y, np.float64) - exact).max() / np.abs(exact).max()
  ours = error(jax.jit(winograd_conv, static_argnums=(2, 3))(x, w, (1, 1), pad))
  xla = error(lax_conv(x, w, (1, 1), pad))
  assert ours < 1.5 * xla, (ours, xla)


def test_winograd_multiplies_16_products_per_tile():
  """A 4x4 map is 2x2 tiles; each tile's 16 transformed products are one batched matmul of
  [16, N*4, Ci] @ [16, Ci, Co]: 16*4 = 64 multiply-adds per (sample, Ci, Co), where direct
  convolution needs 144 (100 without the padding)."""
  x, w = random_case((2, 4, 4, 8), (3, 3, 8, 16))
  hlo = jax.jit(winograd_conv, static_argnums=(2, 3)).lower(x, w, (1, 1), ((1, 1),) * 2).as_text()
  assert 'convolution' not in hlo
  dots = re.findall(r'dot_general[^\n]*-> tensor<([0-9x]+)xf32>', hlo)
  assert dots == ['16x8x16'], dots


@pytest.mark.parametrize('x_shape,w_shape,stride,dtype,wins', [
    ((70, 28, 28, 64), (3, 3, 64, 64), 1, jnp.float32, False),       # layer1: XLA's
    ((70, 14, 14, 128), (3, 3, 128, 128), 1, jnp.float32, True),     # layer2
    ((70, 7, 7, 256), (3, 3, 256, 256), 1, jnp.float32, True),       # layer3
    ((60, 4, 4, 512), (3, 3, 512, 512), 1, jnp.float32, True),       # layer4
    ((60, 4, 4, 512), (3, 3, 512, 512), 1, jnp.bfloat16, False),     # bfloat16: valid taps
    ((60, 7, 7, 256), (3, 3, 256, 512), 2, jnp.float32, False),      # strided
    ((70, 14, 14, 128), (1, 1, 128, 256), 1, jnp.float32, False),    # 1x1
    ((56, 2, 2, 128), (3, 3, 128, 128), 1, jnp.float32, False),      # 2x2: 16 vs 16 products
    ((56, 1, 1, 512), (3, 3, 512, 512), 1, jnp.float32, False),      # 1x1 map: 16 vs 1
])
def test_winograd_rule_on_resnet18_at_112px(x_shape, w_shape, stride, dtype, wins):
  pads = ((1, 1), (1, 1))
  assert conv.winograd_wins(x_shape, w_shape, (stride, stride), pads, dtype) is wins


def test_conv_auto_takes_winograd_before_valid_taps(monkeypatch):
  """A float32 stride-1 3x3 convolution with 128 input channels on a 4x4 map is Winograd's,
  the same in bfloat16 takes the valid taps, and the result matches lax's either way; under
  vmap (branch mode 'vmap') too."""
  calls = []
  for name in ('conv_valid_taps', 'conv_winograd'):
    spy(monkeypatch, name, lambda name, args: calls.append(name))
  pad = ((1, 1), (1, 1))
  x, w = random_case((2, 4, 4, 128), (3, 3, 128, 8))
  w = w * 0.05
  got = conv.conv_auto(x, w, (1, 1), pad, dimension_numbers=NHWC)
  np.testing.assert_allclose(got, lax_conv(x, w, (1, 1), pad), rtol=1e-5, atol=1e-5)
  assert calls == ['conv_winograd']
  xh, wh = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  half = conv.conv_auto(xh, wh, (1, 1), pad, dimension_numbers=NHWC)
  assert half.dtype == jnp.bfloat16 and calls == ['conv_winograd', 'conv_valid_taps']
  exact = lax_conv(xh.astype(jnp.float32), wh.astype(jnp.float32), (1, 1), pad)
  np.testing.assert_allclose(half.astype(jnp.float32), exact, rtol=2.0 ** -8, atol=1e-2)
  conv.conv_auto_without_winograd(x, w, (1, 1), pad, dimension_numbers=NHWC)
  assert calls == ['conv_winograd', 'conv_valid_taps', 'conv_valid_taps']
  del calls[:]
  xs = jnp.stack([x, x[::-1]])
  ws = jnp.stack([w, -w])
  f = lambda conv_fn: jax.vmap(jax.grad(
      lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w, (1, 1), pad, dimension_numbers=NHWC))),
      argnums=(0, 1)))
  for a, b in zip(jax.jit(f(conv.conv_auto))(xs, ws), f(jax.lax.conv_general_dilated)(xs, ws)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert calls == ['conv_winograd']


def test_winograd_transforms_mixed_operands_in_their_common_dtype():
  """A float32 input with a bfloat16 kernel is a float32 convolution of the kernel's values:
  the kernel is widened before its transform, whose sums would otherwise round in bfloat16
  (2.9e-3 relative error measured that way, against 3e-7)."""
  x, w = random_case((2, 4, 4, 128), (3, 3, 128, 8), seed=4)
  w = (w * 0.05).astype(jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  got = jax.jit(winograd_conv, static_argnums=(2, 3))(x, w, (1, 1), pad)
  assert got.dtype == jnp.float32
  want = lax_conv(x, w.astype(jnp.float32), (1, 1), pad)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flax_conv_in_a_resnet_block_matches_lax(monkeypatch):
  """Through flax's nn.Conv (its own dimension numbers and padding form) in a real block."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 8)), jnp.float32)
  block = resnet.Block(16, 'basic', stride=2, downsample=True)
  variables = block.init(jax.random.key(0), x, train=False)

  def grads(conv_fn):
    b = block.clone(kernels=layers.Kernels('test', conv=conv_fn))

    def loss(params):
      y, _ = b.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(jnp.tanh(y))
    return jax.grad(loss)(variables['params'])

  calls = []
  spy(monkeypatch, 'kernel_grad_taps', lambda name, args: calls.append(args[2]))
  taps = grads(conv.conv_general_dilated)
  assert sorted(calls) == sorted([(3, 3, 8, 16), (3, 3, 16, 16), (1, 1, 8, 16)])
  # Only the strided convolutions (the 3x3/2 and the 1x1/2 downsample).
  strided = grads(conv.conv_strided_taps)
  assert sorted(calls[3:]) == sorted([(3, 3, 8, 16), (1, 1, 8, 16)])
  xla = grads(jax.lax.conv_general_dilated)
  assert len(calls) == 5
  for a, b, c in zip(jax.tree.leaves(taps), jax.tree.leaves(strided), jax.tree.leaves(xla)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('size', [8, 7])
def test_max_pool_matches_flax_with_ties(size):
  """Value and gradient equal nn.max_pool's (select-and-scatter: first maximum takes it all),
  including windows with tied maxima (after a ReLU) and an odd size (floor mode)."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  x = jnp.maximum(x, 0.3)  # many windows tie at 0.3
  x = x.at[0, 0, 0, 0].set(2.0).at[0, 1, 1, 0].set(2.0)   # a tie across the window's diagonal
  ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))
  cot = jnp.asarray(rng.normal(size=ref(x).shape), jnp.float32)
  np.testing.assert_array_equal(conv.max_pool_2x2(x), ref(x))
  got = jax.jit(jax.grad(lambda x: jnp.sum(conv.max_pool_2x2(x) * cot)))(x)
  want = jax.grad(lambda x: jnp.sum(ref(x) * cot))(x)
  np.testing.assert_array_equal(got, want)
  assert float(got[0, 1, 1, 0]) == 0.0 and float(got[0, 0, 0, 0]) == float(cot[0, 0, 0, 0])


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 9, 3), (1, 2, 2, 1), (1, 1, 3, 2)])
def test_max_pool_3x3_matches_flax_with_ties(shape):
  """The standard stem's 3x3/2 pool (padding 1): value equal to nn.max_pool's, gradient equal
  to select-and-scatter's (first maximum of each window in row-major order) up to the order in
  which overlapping windows' gradients are summed; even and odd sizes."""
  rng = np.random.default_rng(5)
  x = jnp.maximum(jnp.asarray(rng.normal(size=shape), jnp.float32), 0.3)  # many ties at 0.3
  ref = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(conv.max_pool_3x3(x), ref(x))
  cot = jnp.asarray(rng.normal(size=ref(x).shape), jnp.float32)
  got = jax.jit(jax.grad(lambda x: jnp.sum(conv.max_pool_3x3(x) * cot)))(x)
  want = jax.grad(lambda x: jnp.sum(ref(x) * cot))(x)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_max_pool_3x3_gives_a_tied_window_to_its_first_maximum():
  # One 4x4 map of zeros but for two tied maxima in window (0, 0): rows 0..1, columns 0..1
  # (padding makes it a 3x3 window at -1..1). Only the first in row-major order, (0, 1), gets
  # the window's gradient; (1, 0) gets none from that window, but it is also in window (1, 0)
  # (rows 1..3), where it is the first maximum.
  x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 1, 0].set(1.0).at[0, 1, 0, 0].set(1.0)
  cot = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
  got = jax.grad(lambda x: jnp.sum(conv.max_pool_3x3(x) * cot))(x)
  want = jax.grad(lambda x: jnp.sum(
      nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1))) * cot))(x)
  np.testing.assert_array_equal(got, want)
  assert float(got[0, 0, 1, 0]) == 1.0 + 2.0  # first maximum of windows (0, 0) and (0, 1)
  assert float(got[0, 1, 0, 0]) == 3.0        # first maximum of window (1, 0) only


def test_whole_dmue_loss_gradient_matches_lax(monkeypatch):
  """Every parameter's gradient of the full DMUE loss (trunk, 7 auxiliary and the target
  branches, every loss term) agrees with XLA's own convolution gradients and autodiff BatchNorm,
  with the tap kernel gradients, with the valid-tap convolutions (the tiny config's small maps
  take them almost everywhere), with Winograd's convolutions and with the matmul BatchNorm."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from dmue_jax import train  # pylint: disable=g-import-not-at-top
  config = default.get_config('tiny')
  config.model.branch_mode = 'loop'
  c, k = 7, 2
  variables = train.init_variables(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(c * k, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(np.repeat(np.arange(c), k))

  convs = {'xla': jax.lax.conv_general_dilated, 'auto': conv.conv_auto,
           'taps': conv.conv_general_dilated}
  norms = {'xla': layers.batch_norm, 'matmul': conv.batch_norm_matmul}
  make_model = train.make_model

  def grads(conv_grad, batch_norm):
    kernels = dataclasses.replace(conv.CPU, conv=convs[conv_grad], batch_norm=norms[batch_norm])
    monkeypatch.setattr(train, 'make_model', lambda config: dataclasses.replace(
        make_model(config), kernels=kernels))

    def loss(params):
      return train.loss_terms({'params': params, 'batch_stats': variables['batch_stats']},
                              images, labels, epoch=10, config=config)['total']
    return jax.jit(jax.grad(loss))(variables['params'])

  xla = grads('xla', 'xla')
  shapes = {'conv_valid_taps': [], 'conv_winograd': []}
  for name in shapes:
    spy(monkeypatch, name, lambda name, args: shapes[name].append(args[1].shape))
  valid_taps, winograd = shapes['conv_valid_taps'], shapes['conv_winograd']
  auto = grads('auto', 'xla')
  # The tiny config's layer4 (128 channels on a 2x2 map) takes the valid taps in every
  # branch. Winograd, which gains nothing on such small maps, is forced here onto every
  # stride-1 3x3 convolution from 32 input channels: layer2's 4x4 map (2x2 overlapping tiles),
  # layer3's 2x2 and the branches' 1x1 maps.
  assert len(valid_taps) >= 8 and (3, 3, 128, 128) in valid_taps, valid_taps
  assert not winograd
  monkeypatch.setattr(conv, 'winograd_wins', lambda x_shape, w_shape, strides, padding, dtype:
                      tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
                      and x_shape[-1] >= 32)
  winograd_auto = grads('auto', 'xla')
  assert len(winograd) >= 8 * 3 and (3, 3, 128, 128) in winograd, winograd
  assert (3, 3, 32, 32) in winograd, winograd
  for variant in (grads('taps', 'xla'), auto, winograd_auto, grads('xla', 'matmul')):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(variant), jax.tree.leaves(xla)):
      a, b = np.asarray(a), np.asarray(b)
      rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
      assert rel < 1e-4, (jax.tree_util.keystr(path), rel)


# ------------------------------------------------------------------ batch norm
def _bn_case(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
  cot = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in (shape, shape[-1:], shape[-1:])]
  return x, scale, bias, cot


@pytest.mark.parametrize('shape', [(6, 5, 7, 4), (9, 3), (2, 1, 1, 8)])
def test_column_sum_matches_float64(shape):
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  want = x.reshape(-1, shape[-1]).astype(np.float64).sum(0)
  np.testing.assert_allclose(conv.column_sum(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(6, 5, 7, 4), (12, 16), (3, 2, 2, 8)])
def test_matmul_batch_norm_matches_autodiff(shape):
  """Outputs and the custom gradient, with cotangents on y, the mean and the variance (the
  running statistics are built from the last two)."""
  x, scale, bias, (g_y, g_mean, g_var) = _bn_case(shape)

  def loss(fn, x, scale, bias):
    y, mean, var = fn(x, scale, bias, 1e-5)
    return jnp.vdot(y, g_y) + jnp.vdot(mean, g_mean) + jnp.vdot(var, g_var)

  for got, want in zip(conv.batch_norm_matmul(x, scale, bias, 1e-5),
                       layers.batch_norm(x, scale, bias, 1e-5)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = jax.grad(functools.partial(loss, conv.batch_norm_matmul), (0, 1, 2))(x, scale, bias)
  want = jax.grad(functools.partial(loss, layers.batch_norm), (0, 1, 2))(x, scale, bias)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_matmul_batch_norm_in_a_resnet_block_under_vmap():
  """The BatchNorm module through both implementations: the training output, the running
  statistics and the parameter gradients agree, also for stacked branches under jax.vmap (as
  models/dmue.py applies them)."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 8, 8, 8)), jnp.float32)
  block = resnet.Block(8, 'basic')
  keys = jax.random.split(jax.random.key(0), 3)
  variables = jax.vmap(lambda k: block.init(k, x, train=False))(keys)

  results = {}
  for mode, norm in (('xla', layers.batch_norm), ('matmul', conv.batch_norm_matmul)):
    b = block.clone(kernels=layers.Kernels(mode, batch_norm=norm))

    def loss(params, stats, b=b):
      y, new = b.apply({'params': params, 'batch_stats': stats}, x, train=True,
                       mutable=['batch_stats'])
      return jnp.sum(jnp.tanh(y)), new['batch_stats']

    one = jax.value_and_grad(loss, has_aux=True)
    first = jax.tree.map(lambda a: a[0], variables)
    results[mode] = (one(first['params'], first['batch_stats']),
                     jax.vmap(one)(variables['params'], variables['batch_stats']))
  for a, b in zip(jax.tree.leaves(results['matmul']), jax.tree.leaves(results['xla'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_identity_cond_is_the_identity_in_value_and_gradient():
  """x * 1 is x exactly, so both branches return x: NaN and -0 included, and the gradient is
  passed through unchanged."""
  x = jnp.asarray([[np.nan, -0.0, 1.5], [2.0, -3.0, 1e-30]], jnp.float32)
  cond = jax.jit(conv.identity_cond)
  for anchor in (0.5, np.nan):                           # a NaN anchor takes the other branch
    got = cond(x, jnp.float32(anchor))
    np.testing.assert_array_equal(got, x)
    assert np.array_equal(np.signbit(got), np.signbit(x))
    cot = jnp.arange(6.0).reshape(2, 3)
    _, vjp = jax.vjp(lambda a, anchor=anchor: cond(a, jnp.float32(anchor)), x)
    np.testing.assert_array_equal(vjp(cot)[0], cot)


def _block_train_grads(block, variables, x):
  def loss(params):
    y, new = block.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.tanh(y)), new['batch_stats']
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize('kind', ['basic', 'bottleneck'])
def test_materialized_block_matches_and_keeps_its_conditionals(kind):
  """A training block on CPU writes its ReLU outputs through conditionals (2 for 'basic', 3 for
  'bottleneck'): XLA keeps them, which is what stops it fusing the activations into the
  kernel-gradient transposes. Loss, gradients and statistics equal the block without them."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 8, 16)), jnp.float32)
  block = resnet.Block(4 if kind == 'bottleneck' else 16, kind, stride=2, downsample=True)
  variables = block.init(jax.random.key(1), x, train=False)
  results, conditionals = {}, {}
  for mode, materialize in (('cond', conv.identity_cond), ('off', layers.identity)):
    step = _block_train_grads(block.clone(kernels=layers.Kernels(mode, materialize=materialize)),
                              variables, x)
    hlo = step.lower(variables['params']).compile().as_text()
    conditionals[mode] = hlo.count(' conditional(')
    results[mode] = step(variables['params'])
  # Forward and backward each keep one conditional per ReLU output.
  assert conditionals == {'cond': 2 * (2 if kind == 'basic' else 3), 'off': 0}
  for a, b in zip(jax.tree.leaves(results['cond']), jax.tree.leaves(results['off'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


_SHARDED_BLOCK = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from dmue_jax.models import fast_grads, layers, resnet
materialize = fast_grads.identity_cond if sys.argv[1] == 'cond' else layers.identity
mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
data = np.random.default_rng(6).normal(size=(4, 8, 8, 16)).astype(np.float32)
x = jax.device_put(data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
block = resnet.Block(16, 'basic', kernels=layers.Kernels('test', materialize=materialize))
variables = block.init(jax.random.key(2), data, train=False)
def loss(params, x):
  y, _ = block.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
  return jnp.sum(jnp.tanh(y))
hlo = jax.jit(jax.grad(loss)).lower(variables['params'], x).compile().as_text()
print(json.dumps([hlo.count(' conditional('), hlo.count('all-reduce(')]))
"""


def test_materialized_block_adds_no_collective_when_sharded():
  """The predicate reads a (replicated) parameter, not the batch-sharded activations: with the
  batch split over two CPU devices the block's gradient has as many all-reduces as without the
  conditionals (BatchNorm's own). Reading the first activation cost one more per conditional."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  counts = {}
  for mode in ('cond', 'off'):
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=2')
    proc = subprocess.run([sys.executable, '-c', _SHARDED_BLOCK, mode], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
  assert counts['cond'][0] > 0 and counts['off'][0] == 0
  assert counts['cond'][1] == counts['off'][1] > 0
