"""The identity conditional is the identity, and a training block keeps its conditionals
(forward and backward) without adding a collective when the batch is sharded."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest

from dmue_jax.kernels import materialize
from dmue_jax.models import layers
from dmue_jax.models import resnet


def test_identity_cond_is_the_identity_in_value_and_gradient():
  """x * 1 is x exactly, so both branches return x: NaN and -0 included, and the gradient is
  passed through unchanged."""
  x = jnp.asarray([[np.nan, -0.0, 1.5], [2.0, -3.0, 1e-30]], jnp.float32)
  cond = jax.jit(materialize.identity_cond)
  for anchor in (0.5, np.nan):                           # a NaN anchor takes the other branch
    got = cond(x, jnp.float32(anchor))
    np.testing.assert_array_equal(got, x)
    assert np.array_equal(np.signbit(got), np.signbit(x))
    cot = jnp.arange(6.0).reshape(2, 3)
    _, vjp = jax.vjp(lambda a, anchor=anchor: cond(a, jnp.float32(anchor)), x)
    np.testing.assert_array_equal(vjp(cot)[0], cot)


def _block_train_grads(block, variables, x):
  def loss(params):
    y, new = block.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.tanh(y)), new['batch_stats']
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize('kind', ['basic', 'bottleneck'])
def test_materialized_block_matches_and_keeps_its_conditionals(kind):
  """A training block on CPU writes its ReLU outputs through conditionals (2 for 'basic', 3 for
  'bottleneck'): XLA keeps them, which is what stops it fusing the activations into the
  kernel-gradient transposes. Loss, gradients and statistics equal the block without them."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 8, 16)), jnp.float32)
  block = resnet.Block(4 if kind == 'bottleneck' else 16, kind, stride=2, downsample=True)
  variables = block.init(jax.random.key(1), x, train=False)
  results, conditionals = {}, {}
  for mode, write in (('cond', materialize.identity_cond), ('off', layers.identity)):
    step = _block_train_grads(block.clone(kernels=layers.Kernels(mode, materialize=write)),
                              variables, x)
    hlo = step.lower(variables['params']).compile().as_text()
    conditionals[mode] = hlo.count(' conditional(')
    results[mode] = step(variables['params'])
  # Forward and backward each keep one conditional per ReLU output.
  assert conditionals == {'cond': 2 * (2 if kind == 'basic' else 3), 'off': 0}
  # The same float32 sums, fused differently around the conditionals: equal to rounding (a few
  # 1e-6 on gradients of order 1).
  for a, b in zip(jax.tree.leaves(results['cond']), jax.tree.leaves(results['off'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


_SHARDED_BLOCK = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from dmue_jax.kernels import materialize
from dmue_jax.models import layers, resnet
write = materialize.identity_cond if sys.argv[1] == 'cond' else layers.identity
mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
data = np.random.default_rng(6).normal(size=(4, 8, 8, 16)).astype(np.float32)
x = jax.device_put(data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
block = resnet.Block(16, 'basic', kernels=layers.Kernels('test', materialize=write))
variables = block.init(jax.random.key(2), data, train=False)
def loss(params, x):
  y, _ = block.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
  return jnp.sum(jnp.tanh(y))
hlo = jax.jit(jax.grad(loss)).lower(variables['params'], x).compile().as_text()
print(json.dumps([hlo.count(' conditional('), hlo.count('all-reduce(')]))
"""


@pytest.mark.slow
def test_materialized_block_adds_no_collective_when_sharded():
  """The predicate reads a (replicated) parameter, not the batch-sharded activations: with the
  batch split over two CPU devices the block's gradient has as many all-reduces as without the
  conditionals (BatchNorm's own). Reading the first activation cost one more per conditional."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  counts = {}
  for mode in ('cond', 'off'):
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu',
               XLA_FLAGS=conftest.xla_flags(2))
    proc = subprocess.run([sys.executable, '-c', _SHARDED_BLOCK, mode], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
  assert counts['cond'][0] > 0 and counts['off'][0] == 0
  assert counts['cond'][1] == counts['off'][1] > 0
