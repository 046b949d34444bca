"""The ResNet layers: BatchNorm with PyTorch's semantics, stacked or not."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from dmue_jax.models import resnet


class BatchNormTest(absltest.TestCase):

  def test_batchnorm_matches_pytorch_semantics(self):
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(6, 4, 4, 5)), jnp.float32)
    bn = resnet.BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=False)
    y, new = bn.apply(variables, x, train=True, mutable=['batch_stats'])
    xn = np.asarray(x).reshape(-1, 5)
    mean, var = xn.mean(0), xn.var(0)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), (xn - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-4, atol=1e-5)
    unbiased = xn.var(0, ddof=1)
    np.testing.assert_allclose(new['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(new['batch_stats']['var'], 0.9 + 0.1 * unbiased, rtol=1e-5)

  def test_batchnorm_stacked_segments_equal_separate_calls(self):
    # Two segments with different scales, so shared statistics would normalise them wrongly.
    x = np.random.default_rng(1).normal(size=(2, 5, 3, 3, 4)) * np.array([1.0, 3.0])[:, None,
                                                                                    None, None, None]
    x = jnp.asarray(x + np.array([0.0, 2.0])[:, None, None, None, None], jnp.float32)
    bn = resnet.BatchNorm()
    v = bn.init(jax.random.key(0), x[0], train=False)
    y_seg, s_seg = bn.apply(v, x, train=True, stacked=True, mutable=['batch_stats'])
    y1, s1 = bn.apply(v, x[0], train=True, mutable=['batch_stats'])
    y2, s2 = bn.apply({'params': v['params'], **s1}, x[1], train=True, mutable=['batch_stats'])
    np.testing.assert_allclose(y_seg, jnp.stack([y1, y2]), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s_seg, s2, rtol=1e-6)
    # The gradient through the stacked path equals the one through separate calls.
    g = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
    stacked = lambda a: jnp.sum(bn.apply(v, a, train=True, stacked=True,
                                         mutable=['batch_stats'])[0] * g)
    separate = lambda a: sum(jnp.sum(bn.apply(v, a[i], train=True,
                                              mutable=['batch_stats'])[0] * g[i])
                             for i in range(2))
    np.testing.assert_allclose(jax.grad(stacked)(x), jax.grad(separate)(x), rtol=1e-4,
                               atol=1e-5)
