"""Train state, optimiser, the jitted DMUE train step, evaluation and the training loop.

The step works on class-grouped batches: images [C, k, H, W, 3], labels [C, k] (row c = class
c). See `dmue_jax.models.dmue` for why. The public helpers `loss_terms` and `predict_logits`
accept ordinary [B, ...] batches in any order and group them first.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from dmue_jax import backbones
from dmue_jax import checkpoints
from dmue_jax import cli
from dmue_jax import config_lib
from dmue_jax import convert_torch
from dmue_jax import datasets
from dmue_jax import input_pipeline
from dmue_jax import kernels
from dmue_jax import losses
from dmue_jax import metrics as metrics_lib
from dmue_jax import parallel
from dmue_jax.errors import UserError
from dmue_jax.kernels import compiler
from dmue_jax.models import dmue as dmue_model

Variables = dict[str, Any]


# ------------------------------------------------------------------ model and optimiser
def make_model(config: ml_collections.ConfigDict) -> dmue_model.DMUEModel:
  return dmue_model.DMUEModel.from_config(config.model)


def uses_dmue(config) -> bool:
  return bool(config.dmue.enabled)


def init_variables(config, rng: jax.Array) -> Variables:
  """Random training variables (the inference layout for the plain-CE baseline).

  Jitted: run eagerly, Flax's init executes every layer op by op (tens of seconds on a CPU);
  compiled once per process for each network (`make_jitted_steps`' cache).
  """
  init = _cached(('init', _program_key(config, 0)),
                 lambda: jax.jit(functools.partial(_init_variables, copy.deepcopy(config))))
  return init(rng)


def _init_variables(config, rng: jax.Array) -> Variables:
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
  """Labels each parameter 'backbone', 'head' or 'frozen' (README quirk Q2).

  The reference optimises only `base` (trunk + every layer4) and `classifiers`; the PUE MLP and
  the neck never change. The paper's variant (freeze_pue / freeze_neck False) learns the neck's
  scale with the heads' rate (its bias stays fixed as in the reference's BNNeck) and the MLP
  with config.optim.pue_lr ('pue').
  """
  d = config.dmue

  def label(path, _):
    top = path[0].key
    if top in ('trunk', 'branches', 'branch'):
      return 'backbone'
    if top in ('aux_heads', 'head'):
      return 'head'
    if top == 'pue':
      return 'frozen' if d.freeze_pue else 'pue'
    if top == 'neck':
      leaf = path[-1].key
      return 'head' if (not d.freeze_neck and leaf == 'scale') else 'frozen'
    raise ValueError(f'unknown parameter group {top}')

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  o = config.optim
  transforms = {
      'backbone': _torch_adam(piecewise_by_epoch(o.backbone_lr, steps_per_epoch), o),
      'head': _torch_adam(piecewise_by_epoch(o.head_lr, steps_per_epoch), o),
      'frozen': optax.set_to_zero(),
  }
  if not config.dmue.freeze_pue:
    # Only then: a frozen run's optimiser state keeps the reference's two groups.
    transforms['pue'] = _torch_adam(piecewise_by_epoch(o.pue_lr or o.head_lr, steps_per_epoch),
                                    o)
  return optax.multi_transform(transforms, functools.partial(param_groups, config=config))


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
def dmue_forward(model: dmue_model.DMUEModel, dmue_cfg, variables, images, dropout_rng,
                 frozen_bn: bool = False):
  """The training-mode forward of a grouped batch, with the config's DMUE switches.

  images: [C, k, H, W, 3]. Returns (outputs of `DMUEModel.apply_train`, new batch_stats).
  """
  return model.apply_train(variables, images, dropout_rng=dropout_rng,
                           neck_stats_all_passes=dmue_cfg.neck_stats_all_passes,
                           gram_features=not dmue_cfg.sp_on_aux_logits, frozen_bn=frozen_bn)


def total_loss(terms: dict, dmue_cfg, epoch):
  """(total, ramp_up, ramp_down): up(e) (ce + w soft + gamma sp) + down(e) aux_weight aux, with
  both ramps held at 1 when dmue_cfg.ramps is off (an ablation)."""
  if dmue_cfg.ramps:
    up = losses.ramp_up(epoch, dmue_cfg.ramp_a)
    down = losses.ramp_down(epoch, dmue_cfg.ramp_a)
  else:
    up = down = jnp.ones((), jnp.float32)
  # A weight of 0 leaves its term out (rather than multiplying it by 0): an ablated term may be
  # non-finite once nothing trains what it reads (the auxiliary logits' Gram without aux loss).
  weighted = lambda weight, term: weight * term if weight else 0.0
  total = (up * terms['ce']
           + up * (weighted(dmue_cfg.w, terms['soft']) + weighted(dmue_cfg.gamma, terms['sp']))
           + down * weighted(dmue_cfg.aux_weight, terms['aux']))
  return total, up, down


def dmue_terms(model: dmue_model.DMUEModel, dmue_cfg, params, batch_stats, images, epoch,
               dropout_rng, frozen_bn: bool = False):
  """Loss terms on a grouped batch.

  images: [C, k, H, W, 3]; epoch: scalar (int or traced).
  Returns (terms {total, ce, soft, sp, aux}, aux {score [C,k], latent [C,k,C], new_stats,
  target_logits [C,k,C], label_similarity [C,k]: the PUE input's scaled mean similarity to the
  annotated class, m[i, y_i]}).
  """
  out, new_stats = dmue_forward(model, dmue_cfg, {'params': params, 'batch_stats': batch_stats},
                                images, dropout_rng, frozen_bn)
  out = gather_outputs(out, model.axis_name)
  c, k = out['z'].shape[:2]
  m = losses.class_similarity_means(z=out['z'])
  score = model.apply_pue(params, losses.pue_input(m=m, k=k)).reshape(c, k, 1)
  latent = losses.latent_distribution(latent_logits=out['latent_logits'], T=dmue_cfg.T)
  gram_src = out['aux_logits'] if dmue_cfg.sp_on_aux_logits else out['aux_feats']
  terms = {
      'ce': losses.scaled_ce(target_logits=out['target_logits'],
                             score=score if dmue_cfg.score_scaling else jnp.ones_like(score)),
      'soft': losses.soft_loss(target_logits=out['target_logits'], latent=latent),
      'sp': losses.sp_loss(aux=gram_src, target_feats=out['target_feats']),
      'aux': losses.aux_loss(aux_logits=out['aux_logits']),
  }
  terms['total'], up, down = total_loss(terms, dmue_cfg, epoch)
  extra = {'score': score[..., 0], 'latent': latent, 'new_stats': new_stats,
           'target_logits': out['target_logits'], 'ramp_up': up, 'ramp_down': down,
           # Row c of the grouped batch is annotated c: its entries of column c.
           'label_similarity': jnp.diagonal(m.reshape(c, k, c), axis1=0, axis2=2).T}
  return terms, extra


def baseline_terms(model: dmue_model.DMUEModel, params, batch_stats, images, dropout_rng,
                   frozen_bn: bool = False):
  """Plain cross-entropy on the inference model (config.dmue.enabled = False); with
  `frozen_bn` in eval mode (running statistics, no dropout: Q7)."""
  c, k = images.shape[:2]
  flat = images.reshape((c * k,) + images.shape[2:])
  logits, _, new_stats = dmue_model.InferenceModel(model).apply(
      {'params': params, 'batch_stats': batch_stats}, flat, train=not frozen_bn,
      dropout_rng=dropout_rng)
  new_stats = batch_stats if frozen_bn else new_stats
  logits = gather_samples(logits.reshape(c, k, c), model.axis_name, 1)
  k = logits.shape[1]
  logits = logits.reshape(c * k, c)
  labels = jnp.repeat(jnp.arange(c), k)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  zero = jnp.zeros((), jnp.float32)
  terms = {'total': ce, 'ce': ce, 'soft': zero, 'sp': zero, 'aux': zero}
  extra = {'score': jnp.ones((c, k), jnp.float32), 'new_stats': new_stats,
           'target_logits': logits.reshape(c, k, c), 'ramp_up': jnp.ones(()),
           'ramp_down': jnp.zeros(())}
  return terms, extra


# ------------------------------------------------------------------ data parallelism
def gather_samples(x: jax.Array, axis_name: str | None, sample_axis: int) -> jax.Array:
  """Inside shard_map: this device's samples (`sample_axis`) -> the global batch's, the same
  array on every device. Outside (axis_name None): x itself."""
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=sample_axis, tiled=True, to='invarying')


def gather_outputs(out: dict, axis_name: str | None) -> dict:
  """The per-sample outputs of `DMUEModel.apply_train` for the global batch.

  The DMUE statistics (class-similarity means, the Gram matrices of the SP term) and the loss
  terms need every sample of the batch; what crosses devices here is per-sample vectors (D
  features, C logits), never a feature map.
  """
  if axis_name is None:
    return out
  gathered = {}
  for name, x in out.items():
    if name in ('aux_logits', 'aux_feats'):
      # [C, (C-1)k', P]: rows are (other class, sample); the samples are what is sharded.
      c, _, p = x.shape
      x = gather_samples(x.reshape(c, c - 1, -1, p), axis_name, 2).reshape(c, -1, p)
    else:
      x = gather_samples(x, axis_name, 1)
    gathered[name] = x
  return gathered


def sharded_terms(terms_fn, mesh: jax.sharding.Mesh):
  """`terms_fn` run per device on its share of a [C, k, ...] batch (shard_map).

  terms_fn(params, batch_stats, inputs, epoch, rng) -> (terms, extra), inputs holding the
  [C, k, ...] 'image' (and 'erase') arrays of the batch, built on a model whose
  axis_name is parallel.AXIS. Each device runs the networks on its k/N samples of every class;
  BatchNorm statistics are reduced over the devices and the per-sample outputs gathered for
  the DMUE statistics, so every output is the global batch's and the same on every device.
  The parameters enter as this device's copy (varying): the transpose of that is the sum of
  the devices' gradients, the one all-reduce of the parameters' size.
  """
  axis = parallel.AXIS

  def local(params, batch_stats, inputs, epoch, rng):
    params = {name: (tree if name == 'pue' else
                     jax.tree.map(lambda a: jax.lax.pcast(a, axis, to='varying'), tree))
              for name, tree in params.items()}
    return terms_fn(params, batch_stats, inputs, epoch, rng)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(None, axis), P(), P()),
                       out_specs=P())


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
  Compiled on each call (run op by op, the CPU kernels' many small operations take several
  times longer); inside a caller's jit it is traced into the caller's program.
  """
  grouped, _ = group_by_class(images, labels, config.model.num_classes)
  return jax.jit(functools.partial(_grouped_terms, config=config))(
      variables, grouped, epoch, rng)


def _grouped_terms(variables: Variables, grouped, epoch, rng, *, config):
  model = make_model(config)
  if uses_dmue(config):
    terms, _ = dmue_terms(model, config.dmue, variables['params'], variables['batch_stats'],
                          grouped, epoch, rng)
  else:
    terms, _ = baseline_terms(model, variables['params'], variables['batch_stats'], grouped,
                              rng)
  return terms


# ------------------------------------------------------------------ steps
def train_step(state: TrainState, batch, rng, *, config, steps_per_epoch: int, mesh=None,
               frozen_bn: bool = False):
  """One optimiser step on a grouped batch {'image': [C,k,H,W,3], 'label': [C,k]}.

  Images are uint8 (normalised here, on the device) or already normalised floats. With a mesh
  of several devices the networks run under `sharded_terms`, each device on its k/N samples.
  `frozen_bn`: the network in eval mode (Q7, see `DMUEModel.apply_train`).
  Returns (new state, metrics). Randomness: fold_in(rng, step).
  """
  model = make_model(config)
  epoch = state.step // steps_per_epoch
  dropout_rng = jax.random.fold_in(rng, state.step)
  sharded = mesh is not None and mesh.size > 1
  if sharded:
    model = dataclasses.replace(model, axis_name=parallel.AXIS)

  def terms_fn(params, batch_stats, inputs, epoch, rng):
    images = input_pipeline.normalize_images(inputs['image'], inputs.get('erase'))
    if uses_dmue(config):
      return dmue_terms(model, config.dmue, params, batch_stats, images, epoch, rng, frozen_bn)
    return baseline_terms(model, params, batch_stats, images, rng, frozen_bn)

  if sharded:
    terms_fn = sharded_terms(terms_fn, mesh)

  def loss_fn(params):
    inputs = {name: batch[name] for name in ('image', 'erase') if name in batch}
    terms, extra = terms_fn(params, state.batch_stats, inputs, epoch, dropout_rng)
    return terms['total'], (terms, extra)

  grads, (terms, extra) = jax.grad(loss_fn, has_aux=True)(state.params)
  tx = make_optimizer(config, steps_per_epoch)
  params = state.params
  if sharded:
    # Each device updates its 1/N of every large parameter (parallel.state_sharding).
    split = lambda tree: jax.lax.with_sharding_constraint(
        tree, parallel.update_sharding(tree, mesh))
    grads, params = split(grads), split(params)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=extra['new_stats'], opt_state=opt_state)
  c = batch['image'].shape[0]
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
      # Per sample, for the training dynamics (`record_dynamics`); not a logged scalar.
      SAMPLE_LOGITS: extra['target_logits'],
  }
  return new_state, metrics


SAMPLE_LOGITS = 'sample_logits'


# ------------------------------------------------------------------ training dynamics
@flax.struct.dataclass
class Dynamics:
  """What training saw of each training sample, by dataset index (N samples, C classes).

  margin_sum: sum over the steps that drew the sample of its margin, the target logit of its
    trained-on label minus the largest other logit (training mode: augmentation, dropout);
    margin_sum / count is the area under the margin (Pleiss et al., NeurIPS 2020).
  prob_sum: [N, C] the sum of its target softmax over those steps.
  count: how many steps drew it.
  Saved with every checkpoint, so a resumed run carries it exactly.
  """
  margin_sum: jax.Array
  prob_sum: jax.Array
  count: jax.Array

  @classmethod
  def zeros(cls, num_samples: int, num_classes: int) -> 'Dynamics':
    return cls(margin_sum=jnp.zeros((num_samples,), jnp.float32),
               prob_sum=jnp.zeros((num_samples, num_classes), jnp.float32),
               count=jnp.zeros((num_samples,), jnp.int32))


@functools.partial(jax.jit, donate_argnums=0)
def record_dynamics(dynamics: Dynamics, logits, index) -> Dynamics:
  """Adds one step's target logits [C, k, C] (row c trained as class c) at the dataset
  positions index [C, k]."""
  c = logits.shape[0]
  logits = logits.astype(jnp.float32)
  own = jnp.eye(c, dtype=bool)[:, None, :]
  label_logit = jnp.sum(jnp.where(own, logits, 0.0), axis=-1)
  other = jnp.max(jnp.where(own, -jnp.inf, logits), axis=-1)
  flat = index.reshape(-1)
  return Dynamics(
      margin_sum=dynamics.margin_sum.at[flat].add((label_logit - other).reshape(-1)),
      prob_sum=dynamics.prob_sum.at[flat].add(jax.nn.softmax(logits, -1).reshape(-1, c)),
      count=dynamics.count.at[flat].add(1))


def eval_logits(variables: Variables, images, *, config):
  """Inference-path logits [N, C] (running statistics, no dropout)."""
  model = make_model(config)
  inf = dmue_model.inference_variables(variables)
  logits, _, _ = dmue_model.InferenceModel(model).apply(inf, images, train=False)
  return logits


def predict_logits(variables: Variables, images, config):
  """[B, C] logits of the inference model (trunk + target branch + neck + target head)."""
  return compiler.jit(functools.partial(eval_logits, config=config))(variables,
                                                                      jnp.asarray(images))


# ------------------------------------------------------------------ the training loop
class NonFiniteLossError(UserError):
  """The loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


def _non_finite(what: str, step: int, steps_per_epoch: int,
                directory) -> NonFiniteLossError:
  """The error that stops a run at 1-based `step`; `what` says what became non-finite."""
  return NonFiniteLossError(
      f'{what} at step {step} (epoch {(step - 1) // steps_per_epoch}); the run stopped and the '
      f'last good checkpoint in {directory} is kept. Lower the learning rates (config.optim.*) '
      'or check the data.')


@jax.jit
def _all_finite(tree) -> jax.Array:
  """[] bool: every entry of every array in `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@dataclasses.dataclass
class RunData:
  """What the loop needs from the dataset: sources, (noisy) labels and bookkeeping."""
  splits: Any
  labels: np.ndarray         # [N] training labels after label noise
  clean_labels: np.ndarray   # [N] annotated labels before noise
  flipped: np.ndarray        # [N] bool, which labels the noise changed
  steps_per_epoch: int


def prepare_data(config) -> RunData:
  """Loads the dataset, settles num_classes, applies label noise, derives steps per epoch."""
  splits = _load_splits(config)
  names = list(splits.class_names)
  if config.input.dataset == 'folder' and config.model.num_classes == 0:
    config.model.num_classes = len(names)
  if config.model.num_classes != len(names):
    raise config_lib.ConfigError(
        f'config.model.num_classes={config.model.num_classes} but dataset '
        f'{config.input.dataset!r} has {len(names)} classes ({", ".join(names)}); set '
        f'--config.model.num_classes={len(names)}.')
  clean = np.asarray(datasets.train_labels(splits), np.int64)
  labels, flipped = input_pipeline.apply_label_noise(
      clean, rate=config.input.label_noise, num_classes=len(names),
      seed=config.input.label_noise_seed)
  batch = config.input.batch_per_class * len(names)
  spe = config.steps_per_epoch or max(1, len(clean) // batch)
  return RunData(splits, labels, clean, flipped, int(spe))


def _load_splits(config):
  """datasets.load, with process 0 preparing first when there are several processes.

  Processes that share a filesystem would otherwise all build the same TFDS files at once and
  collide when they move them into place; the others read what process 0 prepared (or build
  their own where the disk is not shared).
  """
  if jax.process_count() == 1:
    return datasets.load(config.input)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  splits, failure = None, None
  if jax.process_index() == 0:
    try:
      splits = datasets.load(config.input)
    except Exception as e:  # pylint: disable=broad-except
      failure = e
  # Doubles as the barrier. Every process learns whether process 0 failed (a missing dataset,
  # say), so the others stop at once instead of waiting for a collective that never comes.
  failed = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
  if failure is not None:
    raise failure
  if int(failed):
    raise UserError('process 0 could not prepare the dataset; its error message says why. Fix '
                    'that and restart every process.')
  return splits if splits is not None else datasets.load(config.input)


def initial_variables(config, rng) -> Variables:
  """Random variables ('' or 'scratch'), or those of config.model.init_from: official torch
  weights, a dmue_jax backbone (.npz, `backbones.save_backbone`), or 'synthfer_pretrained'
  (the cached backbone `pretrain.ensure_pretrained` makes)."""
  if config.model.init_from in ('', 'scratch'):
    return init_variables(config, rng)
  path = config.model.init_from
  if path == backbones.KEYWORD:
    path = backbones.cached_path(config)
    if not os.path.exists(path):
      raise UserError(
          "config.model.init_from='synthfer_pretrained': the pretrained backbone for this "
          f'config is not built yet ({path}). Start the run with `python -m dmue_jax.main`, '
          'which builds it once, or call dmue_jax.pretrain.ensure_pretrained(config) first.')
  if path.endswith('.npz'):
    try:
      return backbones.load_backbone(path, init_variables(config, rng))
    except (OSError, ValueError, KeyError) as e:
      raise checkpoints.CheckpointError(
          f'config.model.init_from={path}: cannot load it as a dmue_jax backbone ({e}).') from e
  variables = convert_torch.load_official_checkpoint(config.model.init_from, config)
  if not uses_dmue(config):
    variables = dmue_model.inference_variables(variables)
  return variables


def evaluate_split(p_eval, variables, source, config, mesh) -> dict:
  """Accuracy, mean class accuracy, per-class accuracy and confusion matrix on `source`."""
  preds, labels = predict_split(p_eval, variables, source, config, mesh)
  return metrics_lib.classification_summary(labels, preds, config.model.num_classes)


def predict_split(p_eval, variables, source, config, mesh, *, return_logits=False):
  """Runs the jitted eval function over a whole split; returns (preds, labels[, logits])."""
  all_logits, all_labels = [], []
  for batch in input_pipeline.eval_batches(
      source, batch_size=config.input.eval_batch_size, image_size=config.input.image_size,
      resize_size=config.input.resize_size, process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=config.input.num_workers):
    mask = parallel.to_host(parallel.global_batch(
        {'m': batch['mask']}, parallel.eval_batch_sharding(mesh), 0)['m'])
    glob = parallel.global_batch({'image': batch['image'], 'label': batch['label']},
                                 parallel.eval_batch_sharding(mesh), 0)
    logits = parallel.to_host(p_eval(variables, glob['image']))
    all_logits.append(logits[mask])
    all_labels.append(parallel.to_host(glob['label'])[mask])
  logits = np.concatenate(all_logits)
  labels = np.concatenate(all_labels)
  preds = logits.argmax(axis=1)
  return (preds, labels, logits) if return_logits else (preds, labels)


def _program_key(config, steps_per_epoch: int) -> str:
  """The settings a compiled step or state layout depends on: the network, the DMUE terms, the
  optimiser, the input size and the steps per epoch (the schedules count epochs)."""
  return json.dumps({'model': config.model.to_dict(), 'dmue': config.dmue.to_dict(),
                     'optim': config.optim.to_dict(), 'image_size': config.input.image_size,
                     'steps_per_epoch': steps_per_epoch}, sort_keys=True, default=str)


# Per process, a few entries: the runs of one comparison (its noise rates, a resume, the
# evaluation after it) share one traced and compiled program instead of building their own.
_PROGRAMS: dict[tuple, Any] = {}
_MAX_PROGRAMS = 16


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
  if key not in _PROGRAMS:
    while len(_PROGRAMS) >= _MAX_PROGRAMS:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[key] = build()
  return _PROGRAMS[key]


def state_shape(config, steps_per_epoch: int, state: TrainState | None = None) -> TrainState:
  """The TrainState's shapes and dtypes (a restore target), without building its variables;
  those of `state` when the caller has built one (tracing the initialisation costs seconds)."""
  if state is not None:
    build = lambda: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  else:
    build = lambda: jax.eval_shape(
        lambda key: create_train_state(config, key, steps_per_epoch), jax.random.key(0))
  return _cached(('state', _program_key(config, steps_per_epoch)), build)


def make_jitted_steps(config, mesh, steps_per_epoch: int, *, frozen_bn: bool = False):
  """(train_step, eval_fn) jitted over the mesh (see `parallel.state_sharding`), batches
  sharded; `frozen_bn`: the train step in eval mode (Q7). Runs in one process with the same
  `_program_key` get the same functions, so they trace and compile once."""
  key = ('steps', _program_key(config, steps_per_epoch), mesh, frozen_bn)
  # A private copy: the functions trace again for new shapes, after the caller's config may
  # have changed.
  return _cached(key, lambda: _jitted_steps(copy.deepcopy(config), mesh, steps_per_epoch,
                                            frozen_bn))


def _jitted_steps(config, mesh, steps_per_epoch: int, frozen_bn: bool):
  repl = parallel.replicated(mesh)
  state_sharding = parallel.state_sharding(state_shape(config, steps_per_epoch), mesh)
  p_train = compiler.jit(
      functools.partial(train_step, config=config, steps_per_epoch=steps_per_epoch, mesh=mesh,
                        frozen_bn=frozen_bn),
      in_shardings=(state_sharding, parallel.train_batch_sharding(mesh), repl),
      out_shardings=(state_sharding, repl), donate_argnums=0)
  p_eval = compiler.jit(functools.partial(eval_logits, config=config),
                        in_shardings=(repl, parallel.eval_batch_sharding(mesh)),
                        out_shardings=parallel.eval_batch_sharding(mesh))
  return p_train, p_eval


def resolved_settings(config) -> dict:
  """What the config's 'auto' settings became on this backend (results.json, checkpoint meta)."""
  return {'kernels': kernels.resolve(config.model.kernels),
          'dtype': config_lib.resolve_dtype(config.model.dtype),
          'branch_mode': make_model(config).branch_mode}


def _meta(config, data: RunData, step: int) -> dict:
  return {**resolved_settings(config),
          'step': int(step), 'epoch': int(step // data.steps_per_epoch),
          'steps_per_epoch': data.steps_per_epoch, 'seed': int(config.seed),
          'class_names': list(data.splits.class_names),
          'num_classes': int(config.model.num_classes), 'dmue': bool(config.dmue.enabled),
          'config': config.to_json()}


@dataclasses.dataclass
class FinishedRun:
  """What a finished training run leaves in memory for the stage after it (the report)."""
  results: dict
  state: Any          # the final TrainState
  data: RunData
  dynamics: Dynamics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       variables: Variables | None = None,
                       hooks: Sequence[Callable[[int], None]] = ()) -> dict:
  """Trains (resuming from the latest checkpoint in workdir), evaluates, writes results.

  Writes <workdir>/checkpoints, metrics.jsonl, tensorboard/, results.json and
  confusion_matrix.png (process 0). Returns the results dict. `variables`: the starting
  weights (default: `initial_variables`); unused when resuming. `hooks`: called with the step
  number after each log step's metrics are written. The ambiguity report is the commands'
  next stage (`dmue_jax.main.train_and_analyze`, which takes `run_training`'s final state).
  """
  return run_training(config, workdir, variables, hooks).results


def run_training(config: ml_collections.ConfigDict, workdir: str,
                 variables: Variables | None = None,
                 hooks: Sequence[Callable[[int], None]] = ()) -> FinishedRun:
  """`train_and_evaluate`, returning also the final state, data and training dynamics."""
  config_lib.validate(config)
  checkpoints.check_workdir(workdir)
  parallel.initialize_distributed(config.parallel)
  is_main = jax.process_index() == 0
  data = prepare_data(config)
  spe, c, k = data.steps_per_epoch, config.model.num_classes, config.input.batch_per_class
  total_steps = config.num_epochs * spe
  mesh = parallel.make_mesh()
  parallel.check_divisible(k, config.input.eval_batch_size)
  os.makedirs(workdir, exist_ok=True)

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  mgr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  start_step = 0
  # Placed before restoring, so that restored dynamics land on the mesh as well.
  dynamics = jax.device_put(Dynamics.zeros(len(data.labels), c), parallel.replicated(mesh))
  if mgr.latest_step() is not None:
    state, _ = checkpoints.restore(mgr, mgr.latest_step(), state_shape(config, spe))
    start_step = int(state.step)
    saved = checkpoints.restore_dynamics(mgr, start_step, dynamics)
    if saved is None:
      logging.warning('Checkpoint step %d holds no training dynamics: they count from here.',
                      start_step)
    dynamics = saved if saved is not None else dynamics
    cli.say(f'Resumed from {mgr.directory} at step {start_step}.')
  else:
    if variables is None:
      variables = initial_variables(config, init_rng)
    state = create_train_state(config, init_rng, spe, variables=variables)
    state_shape(config, spe, state)  # the steps' shardings take these shapes: no second trace
  state = jax.device_put(state, parallel.state_sharding(state, mesh))
  p_train, p_eval = make_jitted_steps(config, mesh, spe)

  writer = (metrics_lib.MetricWriter(workdir, class_names=data.splits.class_names)
            if is_main else None)
  if writer is not None:
    writer.truncate_after(start_step)
  batches = input_pipeline.TrainBatches(
      data.splits.train, data.labels, num_classes=c, batch_per_class=k,
      image_size=config.input.image_size, resize_size=config.input.resize_size,
      augment=config.input.augment, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  progress = _progress(is_main and config.progress_bar, total_steps, start_step)
  timer = _Throughput(c * k)
  last_eval = None
  # The loop only dispatches: batches travel as uint8 and are placed two steps ahead, and the
  # host reads results back only at log, evaluation and checkpoint steps. `first_bad` keeps,
  # on the device, the first step whose loss was not finite.
  local_batches = batches.iterate(start_step, num_steps=total_steps - start_step,
                                  num_threads=config.input.num_workers, raw=True)
  device_batches = parallel.prefetch_to_device(
      ({'image': b['image'], 'erase': b['erase'], 'label': b['label'],
        'index': b['index'].astype(np.int32)} for b in local_batches),
      parallel.train_batch_sharding(mesh), 1)
  first_bad = jax.device_put(jnp.zeros((), jnp.int32), parallel.replicated(mesh))
  p_train_frozen = None
  for step, batch in zip(range(start_step, total_steps), device_batches):
    if frozen_after_mid_epoch_eval(config, step, spe):
      if p_train_frozen is None:
        p_train_frozen, _ = make_jitted_steps(config, mesh, spe, frozen_bn=True)
      state, step_metrics = p_train_frozen(state, batch, dropout_rng)
    else:
      state, step_metrics = p_train(state, batch, dropout_rng)
    dynamics = record_dynamics(dynamics, step_metrics.pop(SAMPLE_LOGITS), batch['index'])
    first_bad = _first_non_finite(first_bad, step_metrics['train_loss'], step + 1)
    done = step + 1
    if progress is not None:
      progress.update(1)
    log_step = done % config.log_every_steps == 0 or done == total_steps
    epoch_end = done % spe == 0
    mid_eval = mid_epoch_eval(config, step, spe)
    save_step = (epoch_end or mid_eval or done % config.checkpoint_every_steps == 0
                 or done == total_steps)
    # The first step is waited for too: the rate is measured from its end (compilation done).
    if not (log_step or save_step or step == start_step):
      continue
    host_metrics = jax.device_get(step_metrics)
    _check_finite(first_bad, spe, mgr)
    timer.tick(done)
    if progress is not None:
      progress.set_postfix(loss=f'{float(host_metrics["train_loss"]):.4f}',
                           img_s=f'{timer.rate():.1f}')
    if writer is not None and log_step:
      writer.write(done, {'epoch': step // spe, **host_metrics,
                          'images_per_second': timer.rate()})
      for hook in hooks:
        hook(done)
    evaluated = mid_eval or (epoch_end and ((done // spe) % config.eval_every_epochs == 0
                                            or done == total_steps))
    if evaluated:
      last_eval = evaluate_split(p_eval, state.variables, data.splits.test, config, mesh)
      if writer is not None:
        writer.write(done, {'epoch': step // spe, **last_eval})
      if is_main:
        cli.say(f'step {done} epoch {step // spe}: eval accuracy '
                f'{last_eval["eval_accuracy"]:.4f}, mean class accuracy '
                f'{last_eval["eval_mean_class_accuracy"]:.4f}')
    if save_step:
      # The loss is computed before the update, so a step can leave NaN/Inf parameters behind
      # a finite loss: never let such a state replace the last good checkpoint.
      if not bool(parallel.to_host(_all_finite(state.params))):
        mgr.wait_until_finished()
        raise _non_finite('the parameters became non-finite', done, spe, mgr.directory)
      ckpt_metrics = ({'eval_accuracy': last_eval['eval_accuracy']}
                      if evaluated and last_eval is not None else None)
      checkpoints.save(mgr, done, state, _meta(config, data, done), metrics=ckpt_metrics,
                       dynamics=dynamics)
  if progress is not None:
    progress.close()

  if last_eval is None:  # resumed after the end, or no epoch end in this run
    last_eval = evaluate_split(p_eval, state.variables, data.splits.test, config, mesh)
  results = {**last_eval, **best_evaluation(workdir),
             'steps': int(total_steps), 'epochs': int(config.num_epochs),
             'steps_per_epoch': spe, 'train_images_per_second': timer.rate(),
             'class_names': list(data.splits.class_names), 'dmue': bool(config.dmue.enabled),
             'num_devices': jax.device_count(), 'num_processes': jax.process_count(),
             **resolved_settings(config)}
  if is_main:
    metrics_lib.write_json(os.path.join(workdir, 'results.json'), results)
    metrics_lib.plot_confusion_matrix(np.asarray(results['confusion_matrix']),
                                      data.splits.class_names,
                                      os.path.join(workdir, 'confusion_matrix.png'))
    writer.close()
  mgr.close()
  return FinishedRun(results, state, data, dynamics)


def mid_epoch_eval(config, step: int, steps_per_epoch: int) -> bool:
  """Whether 0-based `step` ends with a mid-epoch test: the reference tests on the test split
  after every config.eval_every_steps-th batch of an epoch (and at its end, separately)."""
  every = config.eval_every_steps
  batch = step % steps_per_epoch + 1
  return bool(every) and batch % every == 0 and batch != steps_per_epoch


def frozen_after_mid_epoch_eval(config, step: int, steps_per_epoch: int) -> bool:
  """Whether 0-based `step` trains in eval mode (README, Reference quirks, Q7): after the
  epoch's first mid-epoch test, until the epoch ends."""
  every = config.eval_every_steps
  return (bool(config.eval_freezes_rest_of_epoch) and bool(every)
          and every < step % steps_per_epoch + 1 <= steps_per_epoch)


def best_evaluation(workdir: str) -> dict:
  """{'best_eval_accuracy', 'best_eval_step'} over every evaluation of the run so far (from
  metrics.jsonl): chosen on the test split, as the paper's numbers were."""
  path = os.path.join(workdir, metrics_lib.METRICS_FILE)
  records = [r for r in metrics_lib.read_jsonl(path) if 'eval_accuracy' in r] if (
      os.path.exists(path)) else []
  if not records:
    return {}
  best = max(records, key=lambda r: (r['eval_accuracy'], -r['step']))
  return {'best_eval_accuracy': best['eval_accuracy'], 'best_eval_step': best['step']}


@functools.partial(jax.jit, donate_argnums=0)
def _first_non_finite(first_bad, loss, step):
  """The first 1-based step whose loss was not finite (0 while all were)."""
  return jnp.where((first_bad == 0) & ~jnp.isfinite(loss), step, first_bad)


def _check_finite(first_bad, steps_per_epoch: int, mgr) -> None:
  """Stops the run if a loss was non-finite, once the checkpoint being written is complete."""
  bad = int(parallel.to_host(first_bad))
  if bad:
    mgr.wait_until_finished()
    raise _non_finite('the training loss became non-finite', bad, steps_per_epoch,
                      mgr.directory)


class _Throughput:
  """Images per second between the first and the latest synchronised step (the first,
  compiling step excluded); `tick(step)` after the host has read that step's results."""

  def __init__(self, images_per_step: int):
    self.images_per_step = images_per_step
    self.start = None
    self.first_step = 0
    self.count = 0
    self.elapsed = 0.0

  def tick(self, step: int):
    now = time.perf_counter()
    if self.start is None:
      self.start, self.first_step = now, step
    else:
      self.count, self.elapsed = step - self.first_step, now - self.start

  def rate(self) -> float:
    if not self.count:
      return 0.0
    return self.count * self.images_per_step / self.elapsed


def _progress(enabled: bool, total: int, initial: int):
  if not enabled:
    return None
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                   desc='train')
