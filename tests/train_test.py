"""The model, the train step and the optimiser on tiny synthetic batches."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import conftest
from configs import default
from configs import rafdb
from dmue_jax import checkpoints
from dmue_jax import config_lib
from dmue_jax import parallel
from dmue_jax import train

from model_testing import SIZE, grouped_batch, tiny_config


class TrainStepTest(chex.TestCase):

  @parameterized.parameters('cpu', 'xla')
  @pytest.mark.slow
  def test_train_step_traces_once_and_loss_falls(self, kernels):
    chex.clear_trace_counter()  # the same `step` code is traced once per parameter
    config = tiny_config(7, kernels=kernels)
    config.optim.backbone_lr = ((100, 1e-3),)
    config.optim.head_lr = ((100, 3e-3),)
    # One step per epoch and a tiny ramp_a: every term at (nearly) full weight from step 1.
    config.dmue.ramp_a = 0.01
    state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=1,
                                     variables=conftest.random_variables(config, seed=0))
    batch = grouped_batch(7, 2)
    flat_images = batch['image'].reshape((14, SIZE, SIZE, 3))
    flat_labels = np.asarray(batch['label']).reshape(-1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch, rng):
      return train.train_step(state, batch, rng, config=config, steps_per_epoch=1)

    terms = jax.jit(lambda variables: train.loss_terms(variables, flat_images, flat_labels,
                                                       epoch=20, config=config))
    before = terms(state.variables)
    first_params = state.params
    for _ in range(20):
      state, metrics = step(state, batch, jax.random.key(1))
      self.assertTrue(np.isfinite(float(metrics['train_loss'])))
    after = terms(state.variables)
    self.assertLess(float(after['total']), 0.7 * float(before['total']))
    self.assertLess(float(after['ce']), float(before['ce']))
    self.assertEqual(int(state.step), 20)
    # Q2: the PUE MLP and the neck never change; the heads and trunk do.
    chex.assert_trees_all_equal(state.params['pue'], first_params['pue'])
    chex.assert_trees_all_equal(state.params['neck'], first_params['neck'])
    self.assertFalse(np.allclose(state.params['head']['kernel'], first_params['head']['kernel']))

  @pytest.mark.slow
  def test_bfloat16_step_is_close_to_float32_with_finite_gradients(self):
    """Mixed precision (what dtype 'auto' gives on GPU and TPU): bfloat16 convolutions with
    float32 parameters, BatchNorm statistics and losses. On the tiny config the loss is within
    2 % of float32's and every gradient is finite; the state keeps float32."""
    batch = grouped_batch(7, 2)
    results = {}
    for dtype in ('float32', 'bfloat16'):
      config = tiny_config(7, dtype=dtype, kernels='xla')
      config.dmue.ramp_a = 0.5
      variables = conftest.random_variables(config, seed=0)
      model = train.make_model(config)
      self.assertEqual(model.dtype, jnp.dtype(dtype))

      def loss(params, variables=variables, model=model, config=config):
        terms, extra = train.dmue_terms(model, config.dmue, params, variables['batch_stats'],
                                        batch['image'], 1, jax.random.key(2))
        return terms['total'], extra['new_stats']

      (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
          variables['params'])
      self.assertTrue(all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)))
      self.assertTrue(all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads)))
      self.assertTrue(all(a.dtype == jnp.float32 for a in jax.tree.leaves(stats)))
      results[dtype] = float(value)
    self.assertLess(abs(results['bfloat16'] - results['float32']),
                    0.02 * abs(results['float32']), results)

  def test_ablation_switches_take_their_term_out_of_the_total(self):
    """dmue.aux_weight and ramps (the compare command's ablations) in the total."""
    config = tiny_config(7)
    d = config.dmue
    d.ramp_a = 4.0
    terms = {'ce': 1.5, 'soft': 2.0, 'sp': 0.01, 'aux': 1.2}
    total, up, down = train.total_loss(terms, d, 1)
    self.assertLess(float(up), 0.5)  # epoch 1 of ramp_a 4: the ramp matters here
    self.assertAlmostEqual(float(total), float(up) * (1.5 + d.w * 2.0 + d.gamma * 0.01)
                           + float(down) * 1.2, places=5)
    d.ramps = False
    self.assertAlmostEqual(float(train.total_loss(terms, d, 1)[0]),
                           1.5 + d.w * 2.0 + d.gamma * 0.01 + 1.2, places=5)
    d.update({'w': 0.0, 'gamma': 0.0, 'aux_weight': 0.0})
    self.assertAlmostEqual(float(train.total_loss(terms, d, 1)[0]), 1.5, places=6)
    # A term switched off is left out, even when it is not finite.
    broken = {**terms, 'soft': float('nan'), 'sp': float('inf'), 'aux': float('nan')}
    self.assertAlmostEqual(float(train.total_loss(broken, d, 1)[0]), 1.5, places=6)
    d.aux_weight = -1.0
    with self.assertRaisesRegex(config_lib.ConfigError, 'aux_weight'):
      config_lib.validate(config)

  @pytest.mark.slow
  def test_without_score_scaling_the_target_loss_is_plain_cross_entropy(self):
    batch = grouped_batch(7, 2)
    config = tiny_config(7, kernels='xla')
    config.dmue.score_scaling = False
    variables = conftest.random_variables(config, seed=0)
    terms, extra = jax.device_get(jax.jit(lambda p: train.dmue_terms(
        train.make_model(config), config.dmue, p, variables['batch_stats'], batch['image'], 1,
        jax.random.key(2)))(variables['params']))
    logits = extra['target_logits'].reshape(14, 7)
    labels = np.repeat(np.arange(7), 2)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    scaled = optax.softmax_cross_entropy_with_integer_labels(
        logits * extra['score'].reshape(14, 1), labels).mean()
    np.testing.assert_allclose(terms['ce'], plain, rtol=1e-5)
    self.assertGreater(abs(float(scaled) - float(plain)), 1e-4)  # the score would have scaled

  def test_auto_dtype_and_kernels_resolve_by_backend(self):
    self.assertEqual(config_lib.resolve_dtype('auto', 'cpu'), 'float32')
    self.assertEqual(config_lib.resolve_dtype('auto', 'gpu'), 'bfloat16')
    self.assertEqual(config_lib.resolve_dtype('auto', 'tpu'), 'bfloat16')
    self.assertEqual(config_lib.resolve_dtype('float32', 'tpu'), 'float32')
    config = tiny_config(7)
    self.assertEqual((config.model.dtype, config.model.kernels), ('auto', 'auto'))
    config.model.kernels = 'fast'
    with self.assertRaisesRegex(config_lib.ConfigError, 'config.model.kernels'):
      config_lib.validate(config)

  @pytest.mark.slow
  def test_paper_variant_learns_pue_and_neck_scale(self):
    config = tiny_config(7)
    config.dmue.freeze_pue = False
    config.dmue.freeze_neck = False
    config.dmue.sp_on_aux_logits = False
    config.dmue.ramp_a = 1.0
    state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=5,
                                     variables=conftest.random_variables(config, seed=0))
    first = state.params
    state, metrics = jax.jit(functools.partial(train.train_step, config=config,
                                               steps_per_epoch=5))(
        state, grouped_batch(7, 2), jax.random.key(1))
    self.assertTrue(np.isfinite(float(metrics['train_loss'])))
    self.assertFalse(np.allclose(state.params['pue']['fc1']['kernel'],
                                 first['pue']['fc1']['kernel']))
    self.assertFalse(np.allclose(state.params['neck']['bn']['scale'],
                                 first['neck']['bn']['scale']))
    np.testing.assert_array_equal(state.params['neck']['bn']['bias'], first['neck']['bn']['bias'])

  @pytest.mark.slow
  def test_pue_lr_is_the_learned_mlps_own_rate(self):
    config = tiny_config(7)
    config.dmue.freeze_pue = False
    config.optim.head_lr = ((100, 1e-3),)
    params = conftest.random_variables(config, seed=0)['params']
    grads = jax.tree.map(jnp.ones_like, params)

    def first_step(pue_lr):
      config.optim.pue_lr = pue_lr
      tx = train.make_optimizer(config, steps_per_epoch=5)
      updates, _ = tx.update(grads, tx.init(params), params)
      # Adam's first step moves every entry with a non-zero gradient by about lr.
      return {name: float(jnp.max(jnp.abs(updates[name]['fc1']['kernel'] if name == 'pue'
                                          else updates[name]['kernel'])))
              for name in ('pue', 'head')}

    self.assertAlmostEqual(first_step(())['pue'], 1e-3, delta=1e-5)  # () = the heads' rate
    moved = first_step(((2, 3e-2), (100, 1e-2)))
    self.assertAlmostEqual(moved['pue'], 3e-2, delta=3e-4)
    self.assertAlmostEqual(moved['head'], 1e-3, delta=1e-5)
    config.dmue.freeze_pue = True
    self.assertEqual(first_step(((100, 1e-2),))['pue'], 0.0)

  @pytest.mark.slow
  def test_loss_terms_invariant_to_batch_order(self):
    config = tiny_config(8)
    variables = conftest.random_variables(config, seed=0)
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(8), 2))
    images = rng.normal(size=(16, SIZE, SIZE, 3)).astype(np.float32)
    a = train.loss_terms(variables, images, labels, epoch=3, config=config)
    perm = rng.permutation(16)
    b = train.loss_terms(variables, images[perm], labels[perm], epoch=3, config=config)
    self.assertEqual(set(a), {'total', 'ce', 'soft', 'sp', 'aux'})
    chex.assert_trees_all_close(a, b, rtol=1e-5)

  def test_loss_terms_rejects_unbalanced_batch(self):
    config = tiny_config(7)
    variables = conftest.random_variables(config, seed=0)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6])
    with self.assertRaisesRegex(ValueError, 'exactly k'):
      train.loss_terms(variables, np.zeros((15, SIZE, SIZE, 3), np.float32), labels, epoch=0,
                       config=config)

  def test_adam_matches_pytorch_adam_with_weight_decay(self):
    # One parameter, three steps, by the PyTorch Adam formulas with L2 added to the gradient.
    config = tiny_config(7)
    tx = train._torch_adam(lambda _: 0.1, config.optim)  # pylint: disable=protected-access
    p = jnp.asarray([1.0, -2.0])
    state = tx.init(p)
    m = v = np.zeros(2)
    ref = np.asarray(p)
    for t in range(1, 4):
      g = np.asarray([0.5, 0.25]) * t
      updates, state = tx.update(jnp.asarray(g), state, p)
      p = optax.apply_updates(p, updates)
      g2 = g + 1e-4 * ref
      m = 0.9 * m + 0.1 * g2
      v = 0.999 * v + 0.001 * g2 ** 2
      ref = ref - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(p), ref, rtol=1e-5)

  def test_learning_rates_follow_reference_epochs(self):
    config = tiny_config(7)
    fn = train.piecewise_by_epoch(config.optim.backbone_lr, steps_per_epoch=10)
    head = train.piecewise_by_epoch(config.optim.head_lr, steps_per_epoch=10)
    for epoch, lr_b, lr_h in [(0, 1e-4, 1e-3), (5, 1e-4, 5e-4), (6, 5e-5, 5e-4),
                              (13, 1e-5, 1e-4), (14, 1e-5, 1e-5), (23, 5e-5, 5e-5),
                              (30, 1e-5, 1e-5)]:
      self.assertAlmostEqual(float(fn(epoch * 10 + 3)), lr_b, places=9)
      self.assertAlmostEqual(float(head(epoch * 10 + 3)), lr_h, places=9)


def test_config_saved_before_a_field_existed_gets_its_default():
  """Runs saved before optim.pue_lr existed still evaluate, export and analyse."""
  config = rafdb.get_config()
  config.optim.head_lr = ((3, 2e-3),)
  saved = json.loads(config.to_json())
  del saved['optim']['pue_lr']
  del saved['input']['affectnet_align']
  restored = checkpoints.config_from_meta({'config': json.dumps(saved)})
  assert restored.optim.pue_lr == config_lib.base_config().optim.pue_lr
  np.testing.assert_allclose(restored.optim.head_lr, [[3, 2e-3]])  # saved values are kept
  config_lib.validate(restored, for_training=False)  # as evaluate/analyze validate a run
  train.make_optimizer(restored, steps_per_epoch=5)
  # A run from before landmark alignment was trained on AffectNet's box crops.
  assert restored.input.affectnet_align == 'box'
  assert checkpoints.config_from_meta({'config': config.to_json()}).input.affectnet_align == (
      config.input.affectnet_align)


def test_paper_variant_learns_the_pue_mlp_and_the_neck():
  reference, paper = default.get_config('tiny'), default.get_config('tiny,paper')
  assert (reference.dmue.freeze_pue, reference.dmue.freeze_neck) == (True, True)
  assert (paper.dmue.freeze_pue, paper.dmue.freeze_neck) == (False, False)
  # The variants compose: everything else is the tiny run's.
  assert paper.num_epochs == reference.num_epochs == 2
  for dataset_config in (rafdb.get_config('runlocal,paper'), rafdb.get_config('paper')):
    assert not dataset_config.dmue.freeze_pue
  assert rafdb.get_config('runlocal,paper').input.batch_per_class == 2
  with pytest.raises(config_lib.ConfigError, match="'tiny'"):
    rafdb.get_config('tiny')


def test_runs_with_the_same_network_terms_and_optimiser_share_their_compiled_steps():
  """A comparison's noise rates and a resumed run reuse one traced and compiled step."""
  config = default.get_config('tiny')
  mesh = parallel.make_mesh()
  p_train, p_eval = train.make_jitted_steps(config, mesh, 3)
  other_data = default.get_config('tiny')
  other_data.input.label_noise, other_data.seed, other_data.num_epochs = 0.3, 5, 9
  assert train.make_jitted_steps(other_data, mesh, 3) == (p_train, p_eval)
  assert train.state_shape(other_data, 3) is train.state_shape(config, 3)
  other_terms = default.get_config('tiny')
  other_terms.dmue.gamma = 0.0
  assert train.make_jitted_steps(other_terms, mesh, 3)[0] is not p_train
  assert train.make_jitted_steps(config, mesh, 4)[0] is not p_train
  assert train.make_jitted_steps(config, mesh, 3, frozen_bn=True)[0] is not p_train
