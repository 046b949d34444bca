"""Batch norm for XLA:CPU with every sum as a matrix product (`batch_norm_matmul`).

XLA:CPU reduces a 4-D map over three axes several times slower than it streams the same data
through a matrix-vector product, and the autodiff of batch norm adds two such reductions to the
backward pass. `column_sum` sums over every axis but the last as ones[N] @ x.reshape(N, -1) and
a short sum of the rows left (two short sums, which also round less than one long one);
`batch_norm_matmul` is `layers.batch_norm` (same arguments and outputs, `axis_name` included)
with the statistics and, in a custom gradient, the two backward sums computed that way. The
measurements: docs/performance.md, "kernels/batch_norm.py".
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from dmue_jax.models import layers


def column_sum(x: jax.Array) -> jax.Array:
  """Sum over every axis but the last: [N, ..., C] -> [C].

  As ones[N] @ x.reshape(N, -1), then a sum over the [R, C] rows that leaves (module
  docstring: faster on XLA:CPU than one reduction over three axes, and rounds less).
  """
  n, c = x.shape[0], x.shape[-1]
  rows = jnp.dot(jnp.ones((n,), x.dtype), x.reshape(n, -1), precision=lax.Precision.HIGHEST)
  return jnp.sum(rows.reshape(-1, c), axis=0)


def _global_sum(value: jax.Array, axis_name: str | None) -> jax.Array:
  return value if axis_name is None else lax.psum(value, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_matmul(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                      axis_name: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`layers.batch_norm` with every sum, forward and backward, as a `column_sum`."""
  mean, var = layers.batch_norm_statistics(x, column_sum, axis_name)
  return layers.normalize(x, mean, var, scale, bias, epsilon), mean, var


def _batch_norm_matmul_fwd(x, scale, bias, epsilon, axis_name):
  mean, var = layers.batch_norm_statistics(x, column_sum, axis_name)
  y = layers.normalize(x, mean, var, scale, bias, epsilon)
  return (y, mean, var), (x, scale, mean, lax.rsqrt(var + epsilon))


def _batch_norm_matmul_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, scale, mean, inv = residuals
  g, g_mean, g_var = cotangents
  count = x.size // x.shape[-1]
  if axis_name is not None:
    count *= lax.axis_size(axis_name)
  centred = x - mean
  sum_g = column_sum(g)
  sum_g_centred = column_sum(g * centred)
  # y = centred * inv * scale + bias. Through the batch statistics, with xhat = centred * inv:
  # dx = scale * inv * (g - mean(g) - xhat * mean(g * xhat)), plus the direct paths of the
  # mean and variance outputs (d mean / dx = 1/count, d var / dx = 2 * centred / count). The
  # means are over the global batch; scale's and bias's gradients are this device's share
  # (shard_map's transpose of a replicated parameter adds the shares).
  k = scale * inv
  constant = (g_mean - k * _global_sum(sum_g, axis_name)) / count
  slope = (2 * g_var - k * inv * inv * _global_sum(sum_g_centred, axis_name)) / count
  dx = k * g + constant + slope * centred
  return dx, sum_g_centred * inv, sum_g


batch_norm_matmul.defvjp(_batch_norm_matmul_fwd, _batch_norm_matmul_bwd)
