"""The layer functions a network is built with, as one swappable set (`Kernels`).

The networks in `resnet` and `dmue` take a `Kernels` field and never choose an implementation
themselves, the way flax's ImageNet ResNet takes its `conv` as a field. `XLA` is plain JAX,
differentiated by JAX: what runs on GPU and TPU, and what the tests run to check the
accelerator's graph on a CPU. `dmue_jax.kernels.CPU` swaps in kernels with custom gradients
for XLA:CPU. Which one a run uses is `config.model.kernels` ('auto' resolves by backend once,
in `dmue_jax.kernels.select`).

Every batch norm here can take an `axis_name`: inside `shard_map`, where each device holds a
slice of the batch, its statistics are then reduced over that mesh axis, so they are the global
batch's exactly as on one device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
              bias: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias, as one multiply-add per entry.

  x: [N, ..., C]; the rest [C]. The one formula of training (batch statistics) and inference
  (running statistics), so that both round alike.
  """
  mul = scale * lax.rsqrt(var + epsilon)
  return x * mul + (bias - mean * mul)


def axis_mean(value: jax.Array, axis_name: str | None) -> jax.Array:
  """The mean of a per-device statistic over the devices of `axis_name` (None: itself)."""
  return value if axis_name is None else lax.pmean(value, axis_name)


def batch_norm_statistics(x, total, axis_name):
  """(mean, biased variance) over every axis but the last, of the global batch.

  total: sums over every axis but the last ([N, ..., C] -> [C]). Each device's share has the
  same size, so the global mean is the mean of the per-device means. Two passes, as PyTorch's:
  no E[x^2] - E[x]^2 cancellation.
  """
  count = x.size // x.shape[-1]
  mean = axis_mean(total(x) / count, axis_name)
  var = axis_mean(total(jnp.square(x - mean)) / count, axis_name)
  return mean, var


def _sum_all_but_last(a: jax.Array) -> jax.Array:
  return jnp.sum(a, axis=tuple(range(a.ndim - 1)))


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
               axis_name: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch norm over every axis but the last, differentiated by JAX.

  x: [N, ..., C] float32; scale, bias: [C]. Returns (y like x, batch mean [C], biased batch
  variance [C]), the statistics over the whole batch across `axis_name`'s devices.
  """
  mean, var = batch_norm_statistics(x, _sum_all_but_last, axis_name)
  return normalize(x, mean, var, scale, bias, epsilon), mean, var


def identity(x: jax.Array, anchor: jax.Array) -> jax.Array:
  """Writes an activation (`Kernels.materialize`): XLA fuses as it likes."""
  del anchor
  return x


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, no padding (floor mode)."""
  return nn.max_pool(x, (2, 2), (2, 2))


def max_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 max-pool, stride 2, padding 1 (PyTorch's ResNet stem)."""
  return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The implementations of a network's layers.

  conv: lax.conv_general_dilated's signature (handed to flax.linen.Conv).
  batch_norm: (x, scale, bias, epsilon, axis_name) -> (y, mean, biased variance).
  materialize: (activation, anchor scalar) -> activation, where a ReLU output is written.
  max_pool_2x2, max_pool_3x3: the reference and the standard stem's pools.
  """
  name: str
  conv: Callable[..., jax.Array] = lax.conv_general_dilated
  batch_norm: Callable[..., tuple] = batch_norm
  materialize: Callable[[jax.Array, jax.Array], jax.Array] = identity
  max_pool_2x2: Callable[[jax.Array], jax.Array] = max_pool_2x2
  max_pool_3x3: Callable[[jax.Array], jax.Array] = max_pool_3x3


XLA = Kernels('xla')
