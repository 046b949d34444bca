"""The CPU layer set as a whole: chosen once from config.model.kernels, and the gradient of the
whole DMUE loss through it equal to XLA's own layers'."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmue_jax import kernels
from dmue_jax.kernels import batch_norm
from dmue_jax.kernels import convolution
from dmue_jax.models import layers
import conftest
from kernels_testing import spy


def test_kernel_setting_resolves_once_by_backend():
  """config.model.kernels: 'auto' is the CPU set on a CPU backend and XLA's elsewhere; 'xla' and
  'cpu' force one; anything else is an error naming the choices."""
  assert kernels.select('auto', 'cpu') is kernels.CPU
  for backend in ('gpu', 'tpu'):
    assert kernels.select('auto', backend) is layers.XLA
  assert kernels.select('xla', 'cpu') is layers.XLA
  assert kernels.select('cpu', 'gpu') is kernels.CPU
  assert kernels.CPU.conv is convolution.conv_auto
  assert kernels.CPU.batch_norm is batch_norm.batch_norm_matmul
  assert layers.XLA.conv is jax.lax.conv_general_dilated
  with pytest.raises(ValueError, match='auto, xla, cpu'):
    kernels.select('fast')


@pytest.mark.slow
def test_whole_dmue_loss_gradient_matches_lax(monkeypatch):
  """Every parameter's gradient of the full DMUE loss (trunk, 7 auxiliary and the target
  branches, every loss term) agrees with XLA's own convolution gradients and autodiff BatchNorm:
  through `conv_auto` taking Winograd's and the valid-tap convolutions, and through the tap
  kernel gradients with the matmul BatchNorm."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from dmue_jax import train  # pylint: disable=g-import-not-at-top
  config = default.get_config('tiny')
  config.model.branch_mode = 'loop'
  c, k = 7, 2
  variables = conftest.random_variables(config, seed=0)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(c * k, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(np.repeat(np.arange(c), k))

  convs = {'xla': jax.lax.conv_general_dilated, 'auto': convolution.conv_auto,
           'taps': convolution.conv_general_dilated}
  norms = {'xla': layers.batch_norm, 'matmul': batch_norm.batch_norm_matmul}
  make_model = train.make_model

  def grads(conv_grad, norm, compiler_options=None):
    chosen = dataclasses.replace(kernels.CPU, conv=convs[conv_grad], batch_norm=norms[norm])
    monkeypatch.setattr(train, 'make_model', lambda config: dataclasses.replace(
        make_model(config), kernels=chosen))

    def loss(params):
      return train.loss_terms({'params': params, 'batch_stats': variables['batch_stats']},
                              images, labels, epoch=10, config=config)['total']
    return jax.jit(jax.grad(loss), compiler_options=compiler_options)(variables['params'])

  xla = grads('xla', 'xla')
  shapes = {'conv_valid_taps': [], 'conv_winograd': []}
  for name in shapes:
    spy(monkeypatch, name, lambda name, args: shapes[name].append(args[1].shape))
  valid_taps, winograd = shapes['conv_valid_taps'], shapes['conv_winograd']
  # Winograd gains nothing on the tiny config's small maps; it is forced here onto the
  # stride-1 3x3 convolutions from 32 or 64 input channels (layer2's and layer3's), so that one
  # program holds all three: the 128-channel ones on layer4's 2x2 maps
  # keep the valid taps, the rest XLA's convolution.
  monkeypatch.setattr(convolution, 'winograd_wins',
                      lambda x_shape, w_shape, strides, padding, dtype:
                      tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
                      and 32 <= x_shape[-1] < 128)
  auto = grads('auto', 'xla')
  assert len(valid_taps) >= 8 and (3, 3, 128, 128) in valid_taps, valid_taps
  assert sorted(winograd) == [(3, 3, 32, 32), (3, 3, 64, 64)], winograd
  # The tap kernel gradients on every convolution, with the matmul BatchNorm.
  # Compiled with XLA:CPU's default fusion emitters, as runs compile: the legacy ones the tests
  # compile with (conftest.FAST_COMPILE_FLAGS) get this pairing wrong on the stem (relative
  # error 1; either kernel alone is right, and so are the two programs above).
  taps = grads('taps', 'matmul', compiler_options=conftest.DEFAULT_EMITTERS)
  for variant in (auto, taps):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(variant), jax.tree.leaves(xla)):
      a, b = np.asarray(a), np.asarray(b)
      rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
      assert rel < 1e-4, (jax.tree_util.keystr(path), rel)
