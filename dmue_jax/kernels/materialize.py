"""Activations written once on XLA:CPU (`identity_cond`, the CPU set's `materialize`).

A convolution's kernel gradient reads its input transposed, and XLA:CPU fuses that transpose
with the elementwise ops that produced the input (BatchNorm, residual add, ReLU), recomputing
them in transposed order instead of reading the map the forward pass wrote. XLA:CPU drops
`lax.optimization_barrier` before fusing but cannot fuse through a conditional, so in training
`resnet.Block` passes each ReLU output through `Kernels.materialize`, here an identity
`lax.cond`, and the transposes become plain copies. GPU and TPU keep `layers.identity` (a
conditional costs a device-to-host copy of its predicate on GPU). The measurements:
docs/performance.md, "kernels/materialize.py".
"""

from __future__ import annotations

import jax
from jax import lax


def identity_cond(x: jax.Array, anchor: jax.Array) -> jax.Array:
  """x through a `lax.cond` whose branches both return it, on a predicate XLA cannot fold.

  anchor: any scalar the program holds at run time, e.g. one parameter entry. A parameter is
  replicated across devices, so the predicate needs no collective, where reading x itself (a
  batch-sharded map) made XLA broadcast its first entry to every device for every conditional.
  """
  # False only for a NaN anchor. x * 1 is x exactly (IEEE), but XLA keeps a conditional only
  # while its branches differ: two `lambda a: a` branches are merged and the fusion comes back.
  return lax.cond(anchor == anchor, lambda a: a, lambda a: a * 1.0, x)
