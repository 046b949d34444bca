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

So on CPU every jit of the library keeps convolutions on Eigen. Matrix products are another
matter (2026-12-05, same machine): YNNPACK's were faster than Eigen's on every shape of the
valid-tap convolutions (fast_grads) and the BatchNorm column sums, most for the input
gradient's product with a transposed kernel. Median ms, Eigen -> YNNPACK:

  [540, 512] @ [512, 512]: forward 1.83 -> 1.66, input grad 2.27 -> 1.48, kernel grad 2.23 -> 2.05
  [960, 512] @ [512, 512]: forward 2.84 -> 2.52, input grad 2.99 -> 2.50, kernel grad 3.61 -> 3.58
  ones[70] @ [70, 50176] (a BatchNorm sum): 0.24 -> 0.16
  DMUE train step, 112 px, 7 x 10 (interleaved, one process, medians of 5 and 7 steps):
    3.437 -> 3.160 s and 3.253 -> 3.164 s; bench pair: 21.3 -> 23.0 img/s, plain step
    47.4 -> 52.8 img/s, inference 167 -> 169 img/s
  the default config (64 px, k = 8), two pairs: DMUE step 638 / 624 -> 609 / 631 img/s,
    inference 3819 / 3806 -> 3526 / 3534 img/s (its small products gain nothing)

So the option is LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT: YNNPACK for matrix products alone (not
fused with their neighbours; LIBRARY_FUSION_TYPE_DOT measured the same), Eigen for
convolutions, XLA's own code for everything else (YNNPACK's elementwise fusions made the step
1.4x slower). A user who sets the option in XLA_FLAGS keeps their choice; on GPU and TPU
nothing is added. A jaxlib that does not know the value gets the option empty (all Eigen), and
one that does not know the option (older ones, which have no YNNPACK) gets no options.
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
