"""The matmul batch norm computes what the autodiff batch norm (layers.batch_norm) computes,
outputs and gradients, alone and in a ResNet block under vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmue_jax.kernels import batch_norm
from dmue_jax.models import layers
from dmue_jax.models import resnet


def _bn_case(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
  cot = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in (shape, shape[-1:], shape[-1:])]
  return x, scale, bias, cot


@pytest.mark.parametrize('shape', [(6, 5, 7, 4), (9, 3), (2, 1, 1, 8)])
def test_column_sum_matches_float64(shape):
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  want = x.reshape(-1, shape[-1]).astype(np.float64).sum(0)
  np.testing.assert_allclose(batch_norm.column_sum(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(6, 5, 7, 4), (12, 16), (3, 2, 2, 8)])
def test_matmul_batch_norm_matches_autodiff(shape):
  """Outputs and the custom gradient, with cotangents on y, the mean and the variance (the
  running statistics are built from the last two)."""
  x, scale, bias, (g_y, g_mean, g_var) = _bn_case(shape)

  def loss(fn, x, scale, bias):
    y, mean, var = fn(x, scale, bias, 1e-5)
    return jnp.vdot(y, g_y) + jnp.vdot(mean, g_mean) + jnp.vdot(var, g_var)

  for got, want in zip(batch_norm.batch_norm_matmul(x, scale, bias, 1e-5),
                       layers.batch_norm(x, scale, bias, 1e-5)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = jax.grad(functools.partial(loss, batch_norm.batch_norm_matmul), (0, 1, 2))(x, scale, bias)
  want = jax.grad(functools.partial(loss, layers.batch_norm), (0, 1, 2))(x, scale, bias)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_matmul_batch_norm_in_a_resnet_block_under_vmap():
  """The BatchNorm module through both implementations: the training output, the running
  statistics and the parameter gradients agree, also for stacked branches under jax.vmap (as
  models/dmue.py applies them)."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 8, 8, 8)), jnp.float32)
  block = resnet.Block(8, 'basic')
  keys = jax.random.split(jax.random.key(0), 3)
  variables = jax.vmap(lambda k: block.init(k, x, train=False))(keys)

  results = {}
  for mode, norm in (('xla', layers.batch_norm), ('matmul', batch_norm.batch_norm_matmul)):
    b = block.clone(kernels=layers.Kernels(mode, batch_norm=norm))

    def loss(params, stats, b=b):
      y, new = b.apply({'params': params, 'batch_stats': stats}, x, train=True,
                       mutable=['batch_stats'])
      return jnp.sum(jnp.tanh(y)), new['batch_stats']

    one = jax.value_and_grad(loss, has_aux=True)
    first = jax.tree.map(lambda a: a[0], variables)
    results[mode] = (one(first['params'], first['batch_stats']),
                     jax.vmap(one)(variables['params'], variables['batch_stats']))
  for a, b in zip(jax.tree.leaves(results['matmul']), jax.tree.leaves(results['xla'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
