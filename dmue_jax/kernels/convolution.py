"""Convolutions for XLA:CPU that compute what `lax.conv_general_dilated` computes.

Each agrees with XLA's NHWC/HWIO convolution to float32 rounding, value and gradients, but
avoids a path that XLA:CPU runs slowly:

* `conv_auto` (the CPU set's convolution) picks per shape: `conv_winograd` (F(2x2, 3x3): 16
  products per 2x2 output tile instead of 36) for float32 stride-1 3x3 convolutions from
  WINOGRAD_MIN_CHANNELS input channels, `conv_valid_taps` (one matmul per kernel tap over only
  the outputs whose input is real, so small maps skip their zero padding) where
  `valid_taps_win`, else XLA's convolution.
* The tap kernel gradients (`conv_general_dilated`, `conv_strided_taps`) and
  `conv_auto_without_winograd` stay for comparison.
The strided-window helpers here also serve `pooling`. The measurements behind each choice:
docs/performance.md, "kernels/convolution.py".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Up to this many patch columns (k*k*Ci) one matmul on gathered patches beats k*k tap matmuls.
_PATCH_MAX_COLUMNS = 256
# Stride-1 3x3 float32 convolutions with at least this many input channels take Winograd's
# F(2x2, 3x3) on CPU (module docstring).
WINOGRAD_MIN_CHANNELS = 128


def _lax_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def _strided_window(x: jax.Array, r0: int, c0: int, rows: int, cols: int,
                    strides: Sequence[int]) -> jax.Array:
  """x[:, r0 + sh*a, c0 + sw*b, :] for a < rows, b < cols: [N, rows, cols, C]."""
  sh, sw = strides
  return x[:, r0:r0 + sh * (rows - 1) + 1:sh, c0:c0 + sw * (cols - 1) + 1:sw, :]


def _tap_views(xp: jax.Array, kh: int, kw: int, strides: Sequence[int], ho: int,
               wo: int) -> list[jax.Array]:
  """The kh*kw [N, Ho, Wo, C] views of the padded input xp that a kernel's taps read, in
  row-major tap order: view t = (i, j) holds xp[n, sh*h+i, sw*w+j, :]."""
  return [_strided_window(xp, i, j, ho, wo, strides) for i in range(kh) for j in range(kw)]


def kernel_grad_taps(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                     strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
  """dL/dW of an NHWC/HWIO convolution from its input and output gradient.

  Args:
    x: input [N, H, W, Ci].
    g: output gradient [N, Ho, Wo, Co].
    kernel_shape: (kh, kw, Ci, Co).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).
  Returns:
    [kh, kw, Ci, Co] in the kernel's dtype, accumulated in float32.
  """
  kh, kw, ci, co = kernel_shape
  (pt, pb), (pl, pr) = padding
  _, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  g2 = g.reshape(-1, co)
  # windows[t]: the [N, Ho, Wo, Ci] input entries that kernel tap t = (i, j) multiplies.
  windows = _tap_views(xp, kh, kw, strides, ho, wo)
  dot = lambda a, b: jnp.dot(a.T, b, preferred_element_type=jnp.float32)
  if kh * kw * ci <= _PATCH_MAX_COLUMNS:
    patches = jnp.concatenate(windows, axis=-1).reshape(-1, kh * kw * ci)
    return dot(patches, g2).reshape(kh, kw, ci, co)
  return jnp.stack([dot(w.reshape(-1, ci), g2) for w in windows]).reshape(kh, kw, ci, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_taps(x, w, strides, padding, precision):
  return _lax_conv(x, w, strides, padding, precision)


def _conv_taps_fwd(x, w, strides, padding, precision):
  return _lax_conv(x, w, strides, padding, precision), (x, w)


def _conv_taps_bwd(strides, padding, precision, residuals, g):
  x, w = residuals
  # The input gradient stays XLA's transposed convolution (fast enough; unused for the stem).
  _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, w, strides, padding, precision), x)
  (dx,) = input_vjp(g)
  dw = kernel_grad_taps(x, g, w.shape, strides, padding).astype(w.dtype)
  return dx, dw


_conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if dimension_numbers is None or ndim != 4:
    return False
  if isinstance(dimension_numbers, tuple) and all(isinstance(d, str) for d in dimension_numbers):
    return tuple(dimension_numbers) == _NHWC
  expected = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  return tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, expected))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the per-tap kernel gradient where it applies."""
  if not _plain_nhwc(lhs, dimension_numbers, padding, lhs_dilation, rhs_dilation,
                     feature_group_count, batch_group_count, preferred_element_type):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, preferred_element_type)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv_taps(lhs, rhs, tuple(int(s) for s in window_strides), padding, precision)


def conv_strided_taps(lhs, rhs, window_strides, padding, *args, **kwargs):
  """`conv_general_dilated` (tap kernel gradient) for strided convolutions; lax's at stride 1.

  Where each wins on the CPU is measured in the module docstring.
  """
  if all(int(s) == 1 for s in window_strides):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)
  return conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)


def _tap_output_ranges(size: int, out_size: int, k: int, stride: int,
                       pad_low: int) -> list[tuple[int, int] | None]:
  """For each kernel tap t along one axis, the output range [o0, o1) whose input index
  stride*o - pad_low + t lies inside [0, size), or None where no output reads real input.

  Outputs outside the range read only padding through that tap, and contribute zero.
  """
  ranges = []
  for t in range(k):
    inside = [o for o in range(out_size) if 0 <= stride * o - pad_low + t < size]
    ranges.append((inside[0], inside[-1] + 1) if inside else None)
  return ranges


def _output_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - k) // stride + 1


def conv_valid_taps(x: jax.Array, w: jax.Array, strides: Sequence[int],
                    padding: Sequence[tuple[int, int]], precision=None) -> jax.Array:
  """An NHWC/HWIO convolution as one matmul per kernel tap over the input it really reads.

  y[n, h, w] = sum over taps (i, j) of x[n, sh*h+i-pt, sw*w+j-pl] @ W[i, j], where a tap's
  matmul covers only the outputs whose input entry lies inside x, not in the zero padding
  (`_tap_output_ranges`). On a 4x4 map with a 3x3 kernel and padding 1, 100 of the 144
  (output, tap) pairs read real input, so this does 31 % fewer FLOPs than a convolution that
  multiplies the padding; a strided convolution reads only the rows and columns it keeps. The
  gradients are autodiff's: per tap, two matmuls and a slice's transpose (a pad). Tap products
  are summed in float32 (or wider) and rounded once, in the forward pass and in the input
  gradient, as a convolution accumulates.

  Args:
    x: [N, H, W, Ci].
    w: [kh, kw, Ci, Co]. Mixed dtypes promote as in `jnp.dot`.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).
    precision: passed to every tap's `jnp.dot`.
  Returns:
    [N, Ho, Wo, Co] in the promoted dtype, as `lax.conv_general_dilated` with the same
    arguments.
  """
  n, h, wd, ci = x.shape
  kh, kw, _, co = w.shape
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  ho, wo = _output_size(h, kh, sh, (pt, pb)), _output_size(wd, kw, sw, (pl, pr))
  rows = _tap_output_ranges(h, ho, kh, sh, pt)
  cols = _tap_output_ranges(wd, wo, kw, sw, pl)
  dtype = jnp.result_type(x, w)
  # Partial sums in float32 at least, rounded once at the end, as a convolution accumulates
  # (bfloat16 partials rounded per tap drifted by 1 % of the output's range).
  accumulate = jnp.promote_types(dtype, jnp.float32)
  y = jnp.zeros((n, ho, wo, co), accumulate)
  # Each tap's slice of x gets its own gradient, which autodiff pads back and sums over the
  # taps in the slice's dtype. Slicing a float32 copy (cast down per tap) makes that sum
  # float32, rounded once at x; in float32 both casts are no-ops.
  source = x.astype(accumulate)
  for i, j in ((i, j) for i in range(kh) for j in range(kw)):
    if rows[i] is None or cols[j] is None:
      continue  # this tap reads padding only
    (a0, a1), (b0, b1) = rows[i], cols[j]
    r0, c0 = sh * a0 - pt + i, sw * b0 - pl + j
    view = _strided_window(source, r0, c0, a1 - a0, b1 - b0, strides)
    part = jnp.dot(view.astype(x.dtype).reshape(-1, ci), w[i, j], precision=precision,
                   preferred_element_type=accumulate)
    part = part.reshape(n, a1 - a0, b1 - b0, co)
    y = y + jnp.pad(part, ((0, 0), (a0, ho - a1), (b0, wo - b1), (0, 0)))
  return y.astype(dtype)


def _valid_pairs(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
  """The number of (output, tap) pairs along one axis that read real input."""
  out_size = _output_size(size, k, stride, pad)
  ranges = _tap_output_ranges(size, out_size, k, stride, pad[0])
  return sum(r[1] - r[0] for r in ranges if r)


def _valid_fraction(size: int, k: int, stride: int, pad: tuple[int, int]) -> float:
  """The fraction of (output, tap) pairs along one axis that read real input."""
  return _valid_pairs(size, k, stride, pad) / (_output_size(size, k, stride, pad) * k)


def valid_taps_win(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                   padding: Sequence[tuple[int, int]]) -> bool:
  """Whether `conv_valid_taps` beat XLA:CPU's convolution on this shape (module docstring):
  strided convolutions with a 1x1 kernel or at least 256 input channels, and those where at most
  75 % of the (output, tap) pairs read real input (3x3 on a 4x4 map: 69 %; on 7x7: 82 %)."""
  _, h, wd, ci = x_shape
  kh, kw = w_shape[:2]
  if min(_output_size(h, kh, strides[0], padding[0]),
         _output_size(wd, kw, strides[1], padding[1])) <= 0:
    return False  # an empty output: lax's convolution handles (or rejects) it
  if any(s > 1 for s in strides) and (kh * kw == 1 or ci >= 256):
    return True
  fraction = (_valid_fraction(h, kh, strides[0], padding[0])
              * _valid_fraction(wd, kw, strides[1], padding[1]))
  return fraction <= 0.75


# ------------------------------------------------------------- Winograd F(2x2, 3x3)
# A stride-1 3x3 convolution computed on 4x4 input tiles that overlap by 2 (Lavin & Gray,
# "Fast Algorithms for Convolutional Neural Networks", 2016): each tile's 2x2 outputs are
# A^T [(G w G^T) * (B^T d B)] A, 16 products per (tile, Ci, Co) where direct convolution needs 36.
# The 16 elementwise products over channels are 16 matmuls. The transforms' entries are 0, +-1
# and +-1/2, so they scale nothing inexactly, but their sums round: in float32 the result's error
# against the exact convolution is about 1e-6 relative, 0.6 to 3 times XLA's own convolution's
# on the ResNet shapes (tests hold layer4's within 1.5x). Each transform is linear and gets its
# transpose as a custom gradient, one pass over its data, where autodiff of the slices and stacks
# would pad and add per term. Being custom_vjp, they support reverse-mode differentiation only
# (so does `batch_norm.batch_norm_matmul`, the CPU BatchNorm); `conv_auto_without_winograd`
# avoids them.


def _winograd_tiles(size: int, pads: tuple[int, int]) -> tuple[int, int]:
  """(output size, number of 2-wide output tiles) of a stride-1 3-tap axis."""
  out = size + pads[0] + pads[1] - 2
  return out, -(-out // 2)


def _tile_rows(x: jax.Array, tiles: int, axis: int) -> list[jax.Array]:
  """B^T along `axis` of a padded map 2*tiles+2 long: 4 arrays, `tiles` long on `axis`.

  Tile t covers padded positions 2t..2t+3 = (d0, d1, d2, d3), and B^T maps them to
  (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
  """
  d = [lax.slice_in_dim(x, a, a + 2 * tiles - 1, 2, axis) for a in range(4)]
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _pad_axis(a: jax.Array, axis: int, low: int, high: int) -> jax.Array:
  """a with `low` zeros before and `high` after along `axis`."""
  return jnp.pad(a, [(low, high) if d == axis else (0, 0) for d in range(a.ndim)])


def _interleave_even_odd(even: jax.Array, odd: jax.Array, axis: int) -> jax.Array:
  """Two arrays n long on `axis` -> one 2n long whose even positions are `even`'s, odd `odd`'s.

  Used wherever a stride-2 window's gradients go back to the positions they read (the 3x3/2
  max-pool, Winograd's overlapping tiles).
  """
  both = jnp.stack([even, odd], axis=axis + 1)
  shape = list(even.shape)
  shape[axis] *= 2
  return both.reshape(shape)


def _tile_rows_transpose(v: Sequence[jax.Array], axis: int) -> jax.Array:
  """The transpose of `_tile_rows`: 4 arrays `tiles` long on `axis` -> 2*tiles+2 positions.

  Tile t's (v0, v1, v2, v3) go back to its positions 2t..2t+3 as (v0, v1 - v2 + v3,
  v1 + v2 - v0, -v3) (B applied); even position 2t sums offset 0 of tile t and offset 2 of
  tile t-1, odd position 2t+1 offsets 1 of tile t and 3 of tile t-1.
  """
  v0, v1, v2, v3 = v
  offsets = (v0, v1 - v2 + v3, v1 + v2 - v0, -v3)
  even = _pad_axis(offsets[0], axis, 0, 1) + _pad_axis(offsets[2], axis, 1, 0)
  odd = _pad_axis(offsets[1], axis, 0, 1) + _pad_axis(offsets[3], axis, 1, 0)
  return _interleave_even_odd(even, odd, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def winograd_input(x: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """B^T d B for every 4x4 input tile: [N, H, W, C] -> [4, 4, N, Th, Tw, C].

  The input is padded by `padding` and then with zeros up to 2*T+2 rows and columns.
  """
  _, h, wd, _ = x.shape
  (pt, pb), (pl, pr) = padding
  _, th = _winograd_tiles(h, (pt, pb))
  _, tw = _winograd_tiles(wd, (pl, pr))
  xp = jnp.pad(x, ((0, 0), (pt, 2 * th + 2 - h - pt), (pl, 2 * tw + 2 - wd - pl), (0, 0)))
  return jnp.stack([jnp.stack(_tile_rows(r, tw, 2)) for r in _tile_rows(xp, th, 1)])


def _winograd_input_fwd(x, padding):
  return winograd_input(x, padding), x.shape


def _winograd_input_bwd(padding, shape, dv):
  _, h, wd, _ = shape
  (pt, _), (pl, _) = padding
  rows = [_tile_rows_transpose(list(dv[a]), 2) for a in range(4)]   # 4 x [N, Th, Wp, C]
  dxp = _tile_rows_transpose(rows, 1)                                 # [N, Hp, Wp, C]
  return (dxp[:, pt:pt + h, pl:pl + wd, :],)


winograd_input.defvjp(_winograd_input_fwd, _winograd_input_bwd)


def _g_rows(w: jax.Array) -> jax.Array:
  """G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]] along axis 0: 3 -> 4."""
  return jnp.stack([w[0], 0.5 * (w[0] + w[1] + w[2]), 0.5 * (w[0] - w[1] + w[2]), w[2]])


def _g_rows_transpose(u: jax.Array) -> jax.Array:
  """G^T along axis 0: 4 -> 3."""
  return jnp.stack([u[0] + 0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]), 0.5 * (u[1] + u[2]) + u[3]])


def _both_axes(f: Callable[[jax.Array], jax.Array], a: jax.Array) -> jax.Array:
  """f along axis 0, then along axis 1."""
  return jnp.swapaxes(f(jnp.swapaxes(f(a), 0, 1)), 0, 1)


@jax.custom_vjp
def winograd_kernel(w: jax.Array) -> jax.Array:
  """G w G^T: [3, 3, Ci, Co] -> [4, 4, Ci, Co]."""
  return _both_axes(_g_rows, w)


def _winograd_kernel_fwd(w):
  return winograd_kernel(w), None


def _winograd_kernel_bwd(_, du):
  return (_both_axes(_g_rows_transpose, du),)


winograd_kernel.defvjp(_winograd_kernel_fwd, _winograd_kernel_bwd)


def _a_rows(m: jax.Array) -> jax.Array:
  """A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] along axis 0: 4 -> 2."""
  return jnp.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])


def _a_rows_transpose(y: jax.Array) -> jax.Array:
  """A along axis 0: 2 -> 4."""
  return jnp.stack([y[0], y[0] + y[1], y[0] - y[1], -y[1]])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def winograd_output(m: jax.Array, out_size: tuple[int, int]) -> jax.Array:
  """A^T m A per tile, tiles laid out: [4, 4, N, Th, Tw, Co] -> [N, Ho, Wo, Co]."""
  z = _both_axes(_a_rows, m)                                 # [2, 2, N, Th, Tw, Co]
  _, _, n, th, tw, co = z.shape
  y = z.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, co)
  return y[:, :out_size[0], :out_size[1], :]


def _winograd_output_fwd(m, out_size):
  return winograd_output(m, out_size), m.shape


def _winograd_output_bwd(out_size, shape, dy):
  _, _, n, th, tw, co = shape
  dy = jnp.pad(dy, ((0, 0), (0, 2 * th - out_size[0]), (0, 2 * tw - out_size[1]), (0, 0)))
  dz = dy.reshape(n, th, 2, tw, 2, co).transpose(2, 4, 0, 1, 3, 5)   # [2, 2, N, Th, Tw, Co]
  return (_both_axes(_a_rows_transpose, dz),)


winograd_output.defvjp(_winograd_output_fwd, _winograd_output_bwd)


def conv_winograd(x: jax.Array, w: jax.Array, padding: Sequence[tuple[int, int]],
                  precision=None) -> jax.Array:
  """A stride-1 3x3 NHWC/HWIO convolution by Winograd's F(2x2, 3x3) (see above).

  Args:
    x: [N, H, W, Ci].
    w: [3, 3, Ci, Co].
    padding: ((top, bottom), (left, right)), non-negative.
    precision: passed to the 16 tile-element matmuls.
  Returns:
    [N, Ho, Wo, Co] in the operands' common dtype, as `lax.conv_general_dilated(x, w, (1, 1),
    padding)`.
  """
  n, h, wd, ci = x.shape
  co = w.shape[-1]
  # Mixed operands are transformed in their common dtype, as lax would compute (a bfloat16
  # kernel transformed on its own would round its transform's sums in bfloat16).
  dtype = jnp.result_type(x, w)
  x, w = x.astype(dtype), w.astype(dtype)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  ho, th = _winograd_tiles(h, pads[0])
  wo, tw = _winograd_tiles(wd, pads[1])
  v = winograd_input(x, pads).reshape(16, n * th * tw, ci)
  u = winograd_kernel(w).reshape(16, ci, co)
  m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
  return winograd_output(m.reshape(4, 4, n, th, tw, co), (ho, wo))


def winograd_wins(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                  padding: Sequence[tuple[int, int]], dtype) -> bool:
  """Whether `conv_winograd` is the CPU choice for this convolution (module docstring):
  float32, stride 1, a 3x3 kernel, non-negative padding, a non-empty output, at least
  WINOGRAD_MIN_CHANNELS input channels, and at most 3/4 of the products that the valid taps
  multiply (16 per tile against the (output, tap) pairs that read real input: 64 against 100
  on a 4x4 map, 256 against 361 on 7x7, but 16 against 16 on a 2x2 map, where the tiles only
  add transforms; 3x3 and 5x5 maps, whose last tile is half cropped, never qualify)."""
  _, h, wd, ci = x_shape
  if tuple(w_shape[:2]) != (3, 3) or tuple(strides) != (1, 1):
    return False
  if jnp.dtype(dtype) != jnp.float32 or any(p < 0 for pair in padding for p in pair):
    return False
  (ho, th), (wo, tw) = _winograd_tiles(h, padding[0]), _winograd_tiles(wd, padding[1])
  if min(ho, wo) <= 0 or ci < WINOGRAD_MIN_CHANNELS:
    return False
  direct = _valid_pairs(h, 3, 1, padding[0]) * _valid_pairs(wd, 3, 1, padding[1])
  return 16 * th * tw <= 0.75 * direct


def _plain_nhwc(lhs, dimension_numbers, padding, lhs_dilation, rhs_dilation,
                feature_group_count, batch_group_count, preferred_element_type) -> bool:
  """Whether a `lax.conv_general_dilated` call is an ordinary NHWC/HWIO convolution with
  explicit padding (no dilation, no groups), the kind the rewrites here handle."""
  return (_is_nhwc(dimension_numbers, lhs.ndim) and feature_group_count == 1
          and batch_group_count == 1 and preferred_element_type is None
          and not isinstance(padding, str)
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1))))


def conv_auto(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None, *, winograd=True):
  """`lax.conv_general_dilated`, or `conv_winograd` where `winograd_wins` (and `winograd`),
  or else `conv_valid_taps` where `valid_taps_win`."""
  if _plain_nhwc(lhs, dimension_numbers, padding, lhs_dilation, rhs_dilation,
                 feature_group_count, batch_group_count, preferred_element_type):
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if winograd and winograd_wins(lhs.shape, rhs.shape, strides, pads, jnp.result_type(lhs, rhs)):
      return conv_winograd(lhs, rhs, pads, precision)
    if valid_taps_win(lhs.shape, rhs.shape, strides, pads):
      return conv_valid_taps(lhs, rhs, strides, pads, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  batch_group_count, precision, preferred_element_type)


def conv_auto_without_winograd(*args, **kwargs):
  """`conv_auto` as it was before Winograd (for comparison)."""
  return conv_auto(*args, winograd=False, **kwargs)
