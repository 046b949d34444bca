"""XLA compiler options for this library's jitted computations, and `jit` that applies them.

On CPU, jaxlib 0.10 hands convolutions and matrix products to YNNPACK
(`xla_cpu_experimental_ynn_fusion_type`). XLA's own Eigen kernels run this project's ResNet
convolutions faster, forward and gradients, while YNNPACK's matrix products are faster than
Eigen's (the valid-tap and Winograd convolutions of `convolution` and the BatchNorm sums of
`batch_norm` are matrix products). So every jit of the library compiles on CPU with
LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT: YNNPACK for matrix products alone, Eigen for convolutions,
XLA's own code for everything else (YNNPACK's elementwise fusions were slower). A user who sets
the option in XLA_FLAGS keeps their choice; on GPU and TPU nothing is added. A jaxlib that does
not know the value gets the option empty (all Eigen), and one that does not know the option
(older ones, without YNNPACK) gets no options. The measurements: docs/performance.md,
"kernels/compiler.py".
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

YNN_OPTION = 'xla_cpu_experimental_ynn_fusion_type'
# YNNPACK for matrix products only; convolutions stay on Eigen (module docstring).
YNN_DOTS = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'


@functools.cache
def _option_known(name: str, value: Any) -> bool:
  """Whether this jaxlib's CPU compiler accepts `name=value` (compiles a one-op function)."""
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options={name: value})
  except Exception:  # pylint: disable=broad-except  (an unknown option is any XLA error)
    return False
  return True


def options(backend: str | None = None) -> dict[str, Any] | None:
  """The compiler options every jit of the library uses on `backend` (default: JAX's).

  {YNN_OPTION: YNN_DOTS} (YNNPACK matrix products, Eigen convolutions) on CPU, {YNN_OPTION: ''}
  (Eigen for both) where the jaxlib does not know that value, nothing where XLA_FLAGS names the
  option or the jaxlib does not know it; None on other backends.
  """
  if (backend or jax.default_backend()) != 'cpu':
    return None
  if YNN_OPTION in os.environ.get('XLA_FLAGS', ''):
    return None
  for value in (YNN_DOTS, ''):
    if _option_known(YNN_OPTION, value):
      return {YNN_OPTION: value}
  return None


def jit(fun: Callable[..., Any], **kwargs) -> Any:
  """`jax.jit(fun, **kwargs)` compiled with `options()`."""
  return jax.jit(fun, compiler_options=options(), **kwargs)


def merged(extra: dict[str, Any] | None) -> dict[str, Any] | None:
  """`options()` plus `extra` (which wins), for ahead-of-time `.compile(compiler_options=)`."""
  combined = {**(options() or {}), **(extra or {})}
  return combined or None
