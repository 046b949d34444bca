"""Train state, optimiser, the jitted DMUE train step, evaluation and the training loop.

The step works on class-grouped batches: images [C, k, H, W, 3], labels [C, k] (row c = class
c). See `dmue_jax.models.dmue` for why. The public helpers `loss_terms` and `predict_logits`
accept ordinary [B, ...] batches in any order and group them first.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dmue_jax import losses
from dmue_jax.models import dmue as dmue_model

Variables = dict[str, Any]


# ------------------------------------------------------------------ model and optimiser
def make_model(config: ml_collections.ConfigDict) -> dmue_model.DMUEModel:
  return dmue_model.DMUEModel.from_config(config.model)


def uses_dmue(config) -> bool:
  return bool(config.dmue.enabled)


def init_variables(config, rng: jax.Array) -> Variables:
  """Random training variables (the inference layout for the plain-CE baseline)."""
  model = make_model(config)
  if uses_dmue(config):
    return model.init(rng, config.input.image_size)
  return dmue_model.InferenceModel(model).init(rng, config.input.image_size)


def piecewise_by_epoch(schedule, steps_per_epoch: int):
  """optax schedule: lr = the first (end_epoch, lr) with epoch < end_epoch; the last lr after.

  epoch = step // steps_per_epoch, matching the reference, which sets the rates per epoch.
  """
  ends = jnp.asarray([e for e, _ in schedule], jnp.int32)
  rates = jnp.asarray([lr for _, lr in schedule], jnp.float32)

  def fn(count):
    epoch = count // steps_per_epoch
    index = jnp.minimum(jnp.sum(epoch >= ends), len(schedule) - 1)
    return rates[index]

  return fn


def _torch_adam(lr_schedule, optim):
  """PyTorch Adam: weight decay added to the gradient (not AdamW), then Adam, then -lr."""
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay),
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
      optax.scale_by_learning_rate(lr_schedule),
  )


def param_groups(params, config) -> Any:
  """Labels each parameter 'backbone', 'head' or 'frozen' (SPEC 6 and Q2).

  The reference optimises only `base` (trunk + every layer4) and `classifiers`; the PUE MLP and
  the neck never change. The paper's variant (freeze_pue / freeze_neck False) learns them with
  the heads' rate; the neck's bias stays fixed as in the reference's BNNeck.
  """
  d = config.dmue

  def label(path, _):
    top = path[0].key
    if top in ('trunk', 'branches', 'branch'):
      return 'backbone'
    if top in ('aux_heads', 'head'):
      return 'head'
    if top == 'pue':
      return 'frozen' if d.freeze_pue else 'head'
    if top == 'neck':
      leaf = path[-1].key
      return 'head' if (not d.freeze_neck and leaf == 'scale') else 'frozen'
    raise ValueError(f'unknown parameter group {top}')

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  o = config.optim
  return optax.multi_transform(
      {
          'backbone': _torch_adam(piecewise_by_epoch(o.backbone_lr, steps_per_epoch), o),
          'head': _torch_adam(piecewise_by_epoch(o.head_lr, steps_per_epoch), o),
          'frozen': optax.set_to_zero(),
      },
      functools.partial(param_groups, config=config))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> Variables:
    return {'params': self.params, 'batch_stats': self.batch_stats}


def create_train_state(config, rng: jax.Array, steps_per_epoch: int,
                       variables: Variables | None = None) -> TrainState:
  if variables is None:
    variables = init_variables(config, rng)
  tx = make_optimizer(config, steps_per_epoch)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables['batch_stats'],
                    opt_state=tx.init(variables['params']))


# ------------------------------------------------------------------ the DMUE objective
def dmue_terms(model: dmue_model.DMUEModel, dmue_cfg, params, batch_stats, images, epoch,
               dropout_rng):
  """Loss terms on a grouped batch.

  images: [C, k, H, W, 3]; epoch: scalar (int or traced).
  Returns (terms {total, ce, soft, sp, aux}, aux {score [C,k], latent [C,k,C], new_stats,
  target_logits [C,k,C]}).
  """
  c, k = images.shape[:2]
  out, new_stats = model.apply_train(
      {'params': params, 'batch_stats': batch_stats}, images, dropout_rng=dropout_rng,
      neck_stats_all_passes=dmue_cfg.neck_stats_all_passes,
      gram_features=not dmue_cfg.sp_on_aux_logits)
  m = losses.class_similarity_means(z=out['z'])
  score = model.apply_pue(params, losses.pue_input(m=m, k=k)).reshape(c, k, 1)
  latent = losses.latent_distribution(latent_logits=out['latent_logits'], T=dmue_cfg.T)
  gram_src = out['aux_logits'] if dmue_cfg.sp_on_aux_logits else out['aux_feats']
  terms = {
      'ce': losses.scaled_ce(target_logits=out['target_logits'], score=score),
      'soft': losses.soft_loss(target_logits=out['target_logits'], latent=latent),
      'sp': losses.sp_loss(aux=gram_src, target_feats=out['target_feats']),
      'aux': losses.aux_loss(aux_logits=out['aux_logits']),
  }
  up = losses.ramp_up(epoch, dmue_cfg.ramp_a)
  down = losses.ramp_down(epoch, dmue_cfg.ramp_a)
  terms['total'] = (up * terms['ce'] + up * (dmue_cfg.w * terms['soft'] +
                                             dmue_cfg.gamma * terms['sp'])
                    + down * terms['aux'])
  extra = {'score': score[..., 0], 'latent': latent, 'new_stats': new_stats,
           'target_logits': out['target_logits'], 'ramp_up': up, 'ramp_down': down}
  return terms, extra


def baseline_terms(model: dmue_model.DMUEModel, params, batch_stats, images, dropout_rng):
  """Plain cross-entropy on the inference model (config.dmue.enabled = False)."""
  c, k = images.shape[:2]
  flat = images.reshape((c * k,) + images.shape[2:])
  logits, _, new_stats = dmue_model.InferenceModel(model).apply(
      {'params': params, 'batch_stats': batch_stats}, flat, train=True, dropout_rng=dropout_rng)
  labels = jnp.repeat(jnp.arange(c), k)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  zero = jnp.zeros((), jnp.float32)
  terms = {'total': ce, 'ce': ce, 'soft': zero, 'sp': zero, 'aux': zero}
  extra = {'score': jnp.ones((c, k), jnp.float32), 'new_stats': new_stats,
           'target_logits': logits.reshape(c, k, c), 'ramp_up': jnp.ones(()),
           'ramp_down': jnp.zeros(())}
  return terms, extra


def group_by_class(images, labels, num_classes: int):
  """[B, ...] images and labels with every class exactly k times -> [C, k, ...] grouped.

  Stable: within a class, samples keep their batch order. Returns (grouped, order) where
  order [B] are the batch positions in grouped (flat) order.
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=num_classes)
  if len(counts) != num_classes or np.any(counts != counts[0]) or counts[0] < 2:
    raise ValueError(f'every class must appear exactly k >= 2 times; counts {counts.tolist()}')
  order = np.argsort(labels, kind='stable')
  k = int(counts[0])
  images = jnp.asarray(images)[order]
  return images.reshape((num_classes, k) + images.shape[1:]), order


def loss_terms(variables: Variables, images, labels, *, epoch, config, rng=None):
  """The DMUE loss terms of one batch (BatchNorm in training mode).

  Args:
    variables: training variables {'params', 'batch_stats'}.
    images: float32 [B, H, W, 3], normalised; labels: int [B], each class exactly k >= 2 times.
    epoch: the epoch index from 0 (ramps).
    config: the run config.
    rng: dropout key; None = no dropout.
  Returns: {'total', 'ce', 'soft', 'sp', 'aux'} scalars.
  """
  model = make_model(config)
  grouped, _ = group_by_class(images, labels, config.model.num_classes)
  if uses_dmue(config):
    terms, _ = dmue_terms(model, config.dmue, variables['params'], variables['batch_stats'],
                          grouped, epoch, rng)
  else:
    terms, _ = baseline_terms(model, variables['params'], variables['batch_stats'], grouped,
                              rng)
  return terms


# ------------------------------------------------------------------ steps
def train_step(state: TrainState, batch, rng, *, config, steps_per_epoch: int):
  """One optimiser step on a grouped batch {'image': [C,k,H,W,3], 'label': [C,k]}.

  Returns (new state, metrics). Randomness: fold_in(rng, step).
  """
  model = make_model(config)
  epoch = state.step // steps_per_epoch
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    if uses_dmue(config):
      terms, extra = dmue_terms(model, config.dmue, params, state.batch_stats, batch['image'],
                                epoch, dropout_rng)
    else:
      terms, extra = baseline_terms(model, params, state.batch_stats, batch['image'],
                                    dropout_rng)
    return terms['total'], (terms, extra)

  grads, (terms, extra) = jax.grad(loss_fn, has_aux=True)(state.params)
  tx = make_optimizer(config, steps_per_epoch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=extra['new_stats'], opt_state=opt_state)
  c, k = batch['image'].shape[:2]
  preds = jnp.argmax(extra['target_logits'], axis=-1)
  metrics = {
      'train_loss': terms['total'],
      **{f'loss_{n}': v for n, v in terms.items() if n != 'total'},
      'mean_score': jnp.mean(extra['score']),
      'train_accuracy': jnp.mean(preds == jnp.arange(c)[:, None]),
      'lr_backbone': piecewise_by_epoch(config.optim.backbone_lr, steps_per_epoch)(state.step),
      'lr_head': piecewise_by_epoch(config.optim.head_lr, steps_per_epoch)(state.step),
      'ramp_up': extra['ramp_up'],
      'ramp_down': extra['ramp_down'],
  }
  return new_state, metrics


def eval_logits(variables: Variables, images, *, config):
  """Inference-path logits [N, C] (running statistics, no dropout)."""
  model = make_model(config)
  inf = dmue_model.inference_variables(variables)
  logits, _, _ = dmue_model.InferenceModel(model).apply(inf, images, train=False)
  return logits


def predict_logits(variables: Variables, images, config):
  """[B, C] logits of the inference model (trunk + target branch + neck + target head)."""
  return jax.jit(functools.partial(eval_logits, config=config))(variables, jnp.asarray(images))
