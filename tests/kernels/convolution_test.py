"""The tap-gradient, valid-tap and Winograd convolutions and `conv_auto`'s choice among them
compute what XLA's own convolution computes, values and gradients."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmue_jax.kernels import convolution as conv
from dmue_jax.models import layers
from dmue_jax.models import resnet
from kernels_testing import spy

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
