"""XLA compiler options for this library's jitted computations, and `jit` that applies them.

On CPU, jaxlib 0.10 hands convolutions and matrix products to YNNPACK (XLA's
`xla_cpu_experimental_ynn_fusion_type`, on by default there although its help text says the
default list is empty). On a 2-core AVX-512 x86 CPU (2026-12-03, jax 0.10.2) XLA's own Eigen
kernels were faster on every ResNet-18 shape we train at 112 px, forward and gradients, in
separate processes:

  3x3 conv, batch 70, fwd / input grad / kernel grad (ms), YNNPACK -> Eigen
    layer1 28x28x64:   43 / 50 / 54  ->  25 / 39 / 34
    layer2 14x14x128:  26 / 31 / 45  ->  23 / 24 / 33
    layer3 7x7x256:    28 / 33 / 36  ->  23 / 26 / 28
    layer4 4x4x512:    34 / 38 / 35  ->  29 / 33 / 30
  inference of the exported model, 70 images: 114 -> 150 img/s (interleaved, one process)
  DMUE train step (README benchmark, interleaved in one process): 14.1 img/s with YNNPACK and
    the kernel gradients then used on CPU, 15.0 with Eigen and XLA's own gradients

So on CPU every jit of the library compiles with that option empty (Eigen). A user who sets
it in XLA_FLAGS keeps their choice; on GPU and TPU nothing is added. A jaxlib that does not
know the option (older ones, which have no YNNPACK) gets no options.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

YNN_OPTION = 'xla_cpu_experimental_ynn_fusion_type'


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

  {YNN_OPTION: ''} (Eigen kernels) on CPU, unless XLA_FLAGS names that option or the jaxlib
  does not know it; None elsewhere.
  """
  if (backend or jax.default_backend()) != 'cpu':
    return None
  if YNN_OPTION in os.environ.get('XLA_FLAGS', ''):
    return None
  return {YNN_OPTION: ''} if _option_known(YNN_OPTION, '') else None


def jit(fun: Callable[..., Any], **kwargs) -> Any:
  """`jax.jit(fun, **kwargs)` compiled with `options()`."""
  return jax.jit(fun, compiler_options=options(), **kwargs)


def merged(extra: dict[str, Any] | None) -> dict[str, Any] | None:
  """`options()` plus `extra` (which wins), for ahead-of-time `.compile(compiler_options=)`."""
  combined = {**(options() or {}), **(extra or {})}
  return combined or None
