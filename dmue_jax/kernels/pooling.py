"""Max-pools for XLA:CPU whose gradients are first-maximum masks, not select-and-scatter.

`max_pool_2x2` (the reference stem's: 2x2, stride 2, no padding) and `max_pool_3x3` (the
standard stem's: 3x3, stride 2, padding 1) equal `flax.linen.max_pool` in value and gradient:
each window's gradient goes to its first maximal entry in row-major order, as PyTorch's
max_pool2d and XLA's select-and-scatter choose among ties. The masks are dense elementwise ops,
which XLA:CPU runs several times faster than its select-and-scatter; the 3x3 pool's overlapping
windows add their masked taps back by interleaving even and odd positions (with the strided-window
helpers of `convolution`). The measurements: docs/performance.md, "kernels/pooling.py".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from dmue_jax.kernels.convolution import _interleave_even_odd, _pad_axis, _tap_views


def _first_maximum(views: Sequence[jax.Array], y: jax.Array) -> list[jax.Array]:
  """Where each view (a window tap, in row-major tap order) is its window's first maximum.

  views: arrays shaped like y, the pooled maxima. Returns one bool mask per view; every
  window's gradient goes to exactly one tap, the first that equals the maximum, as PyTorch's
  max_pool2d and XLA's select-and-scatter choose among ties.
  """
  taken = jnp.zeros(y.shape, bool)
  hits = []
  for view in views:
    hit = (view == y) & ~taken
    taken = taken | hit
    hits.append(hit)
  return hits


def _pool_windows(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, H//2, 2, W//2, 2, C] (an odd last row/column is dropped, floor mode)."""
  n, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, no padding: [N, H, W, C] -> [N, H//2, W//2, C]."""
  return jnp.max(_pool_windows(x), axis=(2, 4))


def _max_pool_fwd(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_bwd(residuals, g):
  x, y = residuals
  windows = _pool_windows(x)
  taps = ((0, 0), (0, 1), (1, 0), (1, 1))
  masks = dict(zip(taps, _first_maximum([windows[:, :, a, :, b, :] for a, b in taps], y)))
  rows = [jnp.stack([masks[a, 0], masks[a, 1]], axis=3) for a in (0, 1)]   # [N, h, w, 2, C]
  mask = jnp.stack(rows, axis=2)                                            # [N, h, 2, w, 2, C]
  grad = jnp.where(mask, g[:, :, None, :, None, :], 0).astype(x.dtype)
  n, h, _, w, _, c = grad.shape
  grad = grad.reshape(n, 2 * h, 2 * w, c)
  return (jnp.pad(grad, ((0, 0), (0, x.shape[1] - 2 * h), (0, x.shape[2] - 2 * w), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def _pad_3x3(x: jax.Array) -> tuple[jax.Array, int, int]:
  """x padded with -inf: 1 before, and after up to 2*Ho+1 rows / 2*Wo+1 columns."""
  _, h, w, _ = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 2 * ho - h), (1, 2 * wo - w), (0, 0)),
               constant_values=-jnp.inf)
  return xp, ho, wo


@jax.custom_vjp
def max_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 max-pool, stride 2, padding 1 (PyTorch's and flax's): [N, H, W, C] ->
  [N, (H-1)//2+1, (W-1)//2+1, C]."""
  # XLA's own reduce-window for the value (faster than the nine views on large maps).
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                           ((0, 0), (1, 1), (1, 1), (0, 0)))


def _max_pool_3x3_fwd(x):
  y = max_pool_3x3(x)
  return y, (x, y)


def _interleave_taps(taps: Sequence[jax.Array], axis: int) -> jax.Array:
  """Gradients of taps 0, 1, 2 (each Ho long on `axis`) -> their sum at the 2*Ho+1 padded
  positions they read: even position 2o gets tap 0 of window o and tap 2 of window o-1, odd
  position 2o+1 gets tap 1 of window o."""
  t0, t1, t2 = taps
  n = t0.shape[axis]
  even = _pad_axis(t0, axis, 0, 1) + _pad_axis(t2, axis, 1, 0)   # n + 1 positions
  odd = _pad_axis(t1, axis, 0, 1)                                # n + 1, the last one unused
  return lax.slice_in_dim(_interleave_even_odd(even, odd, axis), 0, 2 * n + 1, axis=axis)


def _max_pool_3x3_bwd(residuals, g):
  x, y = residuals
  _, h, w, _ = x.shape
  xp, ho, wo = _pad_3x3(x)
  hits = _first_maximum(_tap_views(xp, 3, 3, (2, 2), ho, wo), y)
  parts = [jnp.where(hit, g, 0).astype(jnp.float32) for hit in hits]
  rows = [_interleave_taps(parts[j::3], axis=1) for j in range(3)]   # per column tap j
  grad = _interleave_taps(rows, axis=2)                              # [N, 2Ho+1, 2Wo+1, C]
  return (grad[:, 1:1 + h, 1:1 + w].astype(x.dtype),)


max_pool_3x3.defvjp(_max_pool_3x3_fwd, _max_pool_3x3_bwd)
