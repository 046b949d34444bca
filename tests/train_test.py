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

from configs import default
from configs import rafdb
from dmue_jax import checkpoints
from dmue_jax import config_lib
from dmue_jax import train
from dmue_jax.models import dmue as dmue_model
from dmue_jax.models import resnet

SIZE = 32


def tiny_config(num_classes=7, **model):
  config = rafdb.get_config()
  config.model.num_classes = num_classes
  config.model.backbone = 'resnet18_narrow'
  config.input.image_size = SIZE
  for k, v in model.items():
    config.model[k] = v
  return config


def grouped_batch(num_classes, k, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num_classes, k, SIZE, SIZE, 3)).astype(np.float32)
  labels = np.repeat(np.arange(num_classes), k).reshape(num_classes, k).astype(np.int32)
  return {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}


class ModelTest(parameterized.TestCase):

  @parameterized.parameters(7, 8)
  def test_training_output_shapes(self, c):
    config = tiny_config(c)
    model = train.make_model(config)
    variables = model.init(jax.random.key(0), SIZE)
    k, d = 2, model.feature_dim
    out, stats = model.apply_train(variables, grouped_batch(c, k)['image'])
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
  def test_loop_and_vmap_branches_agree(self, kernels):
    """Outputs, statistics and the gradient of the stacked branch parameters, with the CPU
    kernels and with XLA's (what a GPU or TPU runs)."""
    batch = grouped_batch(7, 2)
    results = {}
    for mode in ('loop', 'vmap'):
      config = tiny_config(7, branch_mode=mode, kernels=kernels)
      variables = train.init_variables(config, jax.random.key(1))
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

  def test_inference_model_equals_target_path_in_eval_mode(self):
    config = tiny_config(7)
    model = train.make_model(config)
    variables = model.init(jax.random.key(2), SIZE)
    # Give the running statistics non-trivial values with one training pass.
    _, stats = model.apply_train(variables, grouped_batch(7, 2)['image'])
    variables = {'params': variables['params'], 'batch_stats': stats}
    images = grouped_batch(7, 2, seed=3)['image'].reshape(14, SIZE, SIZE, 3)
    got = train.predict_logits(variables, images, config)
    # The target path by hand: trunk, branch C, pool, neck, head, all in eval mode.
    p, s = variables['params'], variables['batch_stats']
    h = model.trunk.apply({'params': p['trunk'], 'batch_stats': s['trunk']}, images,
                          train=False)
    last = lambda t: jax.tree.map(lambda a: a[-1], t)
    h = model.stage.apply({'params': last(p['branches']), 'batch_stats': last(s['branches'])},
                          h, train=False)
    z = dmue_model.Neck().apply({'params': p['neck'], 'batch_stats': s['neck']},
                                resnet.pool(h), train=False)
    want = z @ p['head']['kernel']
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    chex.assert_shape(got, (14, 7))

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


class TrainStepTest(chex.TestCase):

  @parameterized.parameters('cpu', 'xla')
  def test_train_step_traces_once_and_loss_falls(self, kernels):
    chex.clear_trace_counter()  # the same `step` code is traced once per parameter
    config = tiny_config(7, kernels=kernels)
    config.optim.backbone_lr = ((100, 1e-3),)
    config.optim.head_lr = ((100, 3e-3),)
    # One step per epoch and a tiny ramp_a: every term at (nearly) full weight from step 1.
    config.dmue.ramp_a = 0.01
    state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=1)
    batch = grouped_batch(7, 2)
    flat_images = batch['image'].reshape((14, SIZE, SIZE, 3))
    flat_labels = np.asarray(batch['label']).reshape(-1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch, rng):
      return train.train_step(state, batch, rng, config=config, steps_per_epoch=1)

    before = train.loss_terms(state.variables, flat_images, flat_labels, epoch=20,
                              config=config)
    first_params = state.params
    for _ in range(20):
      state, metrics = step(state, batch, jax.random.key(1))
      self.assertTrue(np.isfinite(float(metrics['train_loss'])))
    after = train.loss_terms(state.variables, flat_images, flat_labels, epoch=20, config=config)
    self.assertLess(float(after['total']), 0.7 * float(before['total']))
    self.assertLess(float(after['ce']), float(before['ce']))
    self.assertEqual(int(state.step), 20)
    # Q2: the PUE MLP and the neck never change; the heads and trunk do.
    chex.assert_trees_all_equal(state.params['pue'], first_params['pue'])
    chex.assert_trees_all_equal(state.params['neck'], first_params['neck'])
    self.assertFalse(np.allclose(state.params['head']['kernel'], first_params['head']['kernel']))

  def test_bfloat16_step_is_close_to_float32_with_finite_gradients(self):
    """Mixed precision (what dtype 'auto' gives on GPU and TPU): bfloat16 convolutions with
    float32 parameters, BatchNorm statistics and losses. On the tiny config the loss is within
    2 % of float32's and every gradient is finite; the state keeps float32."""
    batch = grouped_batch(7, 2)
    results = {}
    for dtype in ('float32', 'bfloat16'):
      config = tiny_config(7, dtype=dtype, kernels='xla')
      config.dmue.ramp_a = 0.5
      variables = train.init_variables(config, jax.random.key(0))
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
    d.aux_weight = -1.0
    with self.assertRaisesRegex(config_lib.ConfigError, 'aux_weight'):
      config_lib.validate(config)

  def test_without_score_scaling_the_target_loss_is_plain_cross_entropy(self):
    batch = grouped_batch(7, 2)
    config = tiny_config(7, kernels='xla')
    config.dmue.score_scaling = False
    variables = train.init_variables(config, jax.random.key(0))
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

  def test_paper_variant_learns_pue_and_neck_scale(self):
    config = tiny_config(7)
    config.dmue.freeze_pue = False
    config.dmue.freeze_neck = False
    config.dmue.sp_on_aux_logits = False
    config.dmue.ramp_a = 1.0
    state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=5)
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

  def test_pue_lr_is_the_learned_mlps_own_rate(self):
    config = tiny_config(7)
    config.dmue.freeze_pue = False
    config.optim.head_lr = ((100, 1e-3),)
    params = train.init_variables(config, jax.random.key(0))['params']
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

  def test_loss_terms_invariant_to_batch_order(self):
    config = tiny_config(8)
    variables = train.init_variables(config, jax.random.key(0))
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
    variables = train.init_variables(config, jax.random.key(0))
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
