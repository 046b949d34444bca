"""The CPU layer set (`CPU`), and the choice of a network's layer set from the config.

`config.model.kernels='auto'` picks `CPU` on a CPU backend; GPU and TPU run XLA's own layers
(`layers.XLA`). `select` makes that choice once (for `dmue.DMUEModel.from_config`); the networks
only receive the chosen `layers.Kernels`. Each CPU kernel computes what XLA computes, to float32
rounding (tested down to the gradient of the whole DMUE loss), but avoids a path that XLA:CPU
runs slowly, one module per kind:

* `convolution`: Winograd and valid-tap convolutions, chosen per shape (`conv_auto`).
* `pooling`: max-pool gradients as first-maximum masks.
* `batch_norm`: batch statistics and backward sums as matrix products.
* `materialize`: activations written once, not recomputed before each kernel gradient.
* `compiler`: the XLA:CPU compiler options that every jit of the library uses.
The measurements: docs/performance.md, one section per module.
"""

from __future__ import annotations

import jax

from dmue_jax.kernels import batch_norm
from dmue_jax.kernels import convolution
from dmue_jax.kernels import materialize
from dmue_jax.kernels import pooling
from dmue_jax.models import layers

CPU = layers.Kernels('cpu', conv=convolution.conv_auto, batch_norm=batch_norm.batch_norm_matmul,
                     materialize=materialize.identity_cond, max_pool_2x2=pooling.max_pool_2x2,
                     max_pool_3x3=pooling.max_pool_3x3)
KERNEL_SETTINGS = ('auto', 'xla', 'cpu')


def resolve(setting: str, backend: str | None = None) -> str:
  """config.model.kernels -> 'xla' or 'cpu': 'auto' is 'cpu' on a CPU backend, else 'xla'."""
  if setting not in KERNEL_SETTINGS:
    raise ValueError(f"kernels must be one of {', '.join(KERNEL_SETTINGS)}, not {setting!r}")
  if setting == 'auto':
    return 'cpu' if (backend or jax.default_backend()) == 'cpu' else 'xla'
  return setting


def select(setting: str, backend: str | None = None) -> layers.Kernels:
  """The kernel set of a config.model.kernels setting (see `resolve`)."""
  return CPU if resolve(setting, backend) == 'cpu' else layers.XLA
