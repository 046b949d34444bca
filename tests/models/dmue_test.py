"""The DMUE training model: output shapes, loop and vmap branches, the inference path."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import conftest
from dmue_jax import train
from dmue_jax.models import dmue as dmue_model
from dmue_jax.models import resnet
from model_testing import SIZE, grouped_batch, tiny_config


class ModelTest(parameterized.TestCase):

  @parameterized.parameters(7, 8)
  @pytest.mark.slow
  def test_training_output_shapes(self, c):
    config = tiny_config(c)
    model = train.make_model(config)
    # Shapes only (what this test checks): an eager init and forward take seconds.
    variables = jax.eval_shape(lambda key: model.init(key, SIZE), jax.random.key(0))
    k, d = 2, model.feature_dim
    out, stats = jax.eval_shape(model.apply_train, variables, grouped_batch(c, k)['image'])
    chex.assert_shape(out['aux_logits'], (c, (c - 1) * k, c - 1))
    chex.assert_shape(out['latent_logits'], (c, k, c - 1))
    chex.assert_shape(out['target_logits'], (c, k, c))
    chex.assert_shape(out['target_feats'], (c, k, d))
    chex.assert_shape(out['z'], (c, k, d))
    chex.assert_trees_all_equal_shapes(stats, variables['batch_stats'])
    chex.assert_shape(variables['params']['aux_heads']['kernel'], (c, d, c - 1))
    chex.assert_shape(variables['params']['head']['kernel'], (d, c))
    leaves = jax.tree.leaves(variables['params']['branches'])
    self.assertTrue(all(x.shape[0] == c + 1 for x in leaves))

  @parameterized.parameters('cpu', 'xla')
  @pytest.mark.slow
  def test_loop_and_vmap_branches_agree(self, kernels):
    """Outputs, statistics and the gradient of the stacked branch parameters, with the CPU
    kernels and with XLA's (what a GPU or TPU runs)."""
    batch = grouped_batch(7, 2)
    results = {}
    for mode in ('loop', 'vmap'):
      config = tiny_config(7, branch_mode=mode, kernels=kernels)
      variables = conftest.random_variables(config, seed=1)
      model = train.make_model(config)

      def loss(branches, variables=variables, model=model):
        params = {**variables['params'], 'branches': branches}
        out, stats = model.apply_train({**variables, 'params': params}, batch['image'])
        value = jnp.sum(jnp.sin(out['aux_logits'])) + jnp.sum(jnp.sin(out['target_logits']))
        return value, (out, stats)

      grad, aux = jax.jit(jax.grad(loss, has_aux=True))(variables['params']['branches'])
      results[mode] = (aux, grad)
    # Compiled whole, the two orders of the same float32 sums differ most in the neck's running
    # variance (2.2e-4 relative, as before loop mode took its branches from `unstack`).
    chex.assert_trees_all_close(results['loop'], results['vmap'], rtol=1e-3, atol=2e-5)

  def test_unstack_splits_a_tree_and_stacks_its_gradient(self):
    tree = {'w': jnp.arange(24.0).reshape(3, 2, 4), 'b': jnp.arange(6.0).reshape(3, 2)}
    parts = dmue_model.unstack(tree)
    self.assertLen(parts, 3)
    for b, part in enumerate(parts):
      chex.assert_trees_all_equal(part, jax.tree.map(lambda a, b=b: a[b], tree))
    weights = jnp.asarray([1.0, -2.0, 3.0])
    loss = lambda t: sum(w * jnp.sum(jnp.square(p['w'])) + jnp.sum(p['b'])
                         for w, p in zip(weights, dmue_model.unstack(t)))
    grad = jax.grad(loss)(tree)
    chex.assert_trees_all_equal(grad['w'], 2 * weights[:, None, None] * tree['w'])
    chex.assert_trees_all_equal(grad['b'], jnp.ones((3, 2)))
    # Its gradient is one concatenation, not a pad per copy.
    hlo = jax.jit(jax.grad(loss)).lower(tree).as_text()
    self.assertNotIn('pad', hlo)

  @pytest.mark.slow
  def test_inference_model_equals_target_path_in_eval_mode(self):
    config = tiny_config(7)
    model = train.make_model(config)
    # Random running statistics too (not an init's zeros and ones): a wrong branch or
    # statistic shows.
    variables = conftest.random_variables(config, seed=2)
    images = grouped_batch(7, 2, seed=3)['image'].reshape(14, SIZE, SIZE, 3)
    got = train.predict_logits(variables, images, config)

    @jax.jit
    def by_hand(p, s):
      """The target path: trunk, branch C, pool, neck, head, all in eval mode."""
      h = model.trunk.apply({'params': p['trunk'], 'batch_stats': s['trunk']}, images,
                            train=False)
      last = lambda t: jax.tree.map(lambda a: a[-1], t)
      h = model.stage.apply({'params': last(p['branches']), 'batch_stats': last(s['branches'])},
                            h, train=False)
      z = dmue_model.Neck().apply({'params': p['neck'], 'batch_stats': s['neck']},
                                  resnet.pool(h), train=False)
      return z @ p['head']['kernel']

    want = by_hand(variables['params'], variables['batch_stats'])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    chex.assert_shape(got, (14, 7))
