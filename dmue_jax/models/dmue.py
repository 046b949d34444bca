"""The DMUE training model (multi-branch) and its inference model (target branch only).

The training model holds a shared trunk (stem + layer1..layer3), C+1 stacked copies of layer4
(copy c < C is auxiliary branch c, copy C the target branch), a BatchNorm neck shared by every
branch, the auxiliary heads, the target head and the PUE MLP; the inference model keeps copy C
only. The variable layouts: `DMUEModel.init` and `inference_variables`.

Training inputs are grouped by class: x [C, k, H, W, 3], row c holding k samples of class c.
Every subset the reference takes with boolean masks is then a static gather (the recommended
design): auxiliary branch c runs on its "y != c" samples ((C-1)k rows, classes in order, c
skipped), then on its own class's k samples for the latent distribution (a forward pass only,
updating its BatchNorm averages a second time as the reference does), and the target branch runs
on all Ck samples. The C auxiliary copies are applied together (vmap, or a loop over slices of
the stacked parameters), so no FLOP goes to masked-out rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmue_jax import config_lib
from dmue_jax import kernels
from dmue_jax.models import layers
from dmue_jax.models import resnet

Variables = dict[str, Any]


def others(num_classes: int) -> np.ndarray:
  """[C, C-1] int: row c lists the classes other than c, in increasing order."""
  return np.array([[j for j in range(num_classes) if j != c] for c in range(num_classes)],
                  dtype=np.int32)


@jax.custom_vjp
def _unstack_array(a: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(a[i] for i in range(a.shape[0]))


def _unstack_array_fwd(a):
  return _unstack_array(a), None


def _unstack_array_bwd(_, cotangents):
  # One stack of the per-copy gradients (autodiff of the slices would pad each to the full
  # shape and add the pads).
  return (jnp.stack(cotangents),)


_unstack_array.defvjp(_unstack_array_fwd, _unstack_array_bwd)


def unstack(tree) -> list:
  """A tree of stacked arrays [N, ...] -> a list of N trees, copy b holding every a[b]."""
  leaves, treedef = jax.tree.flatten(tree)
  columns = [_unstack_array(a) for a in leaves]
  count = len(columns[0]) if columns else 0
  return [jax.tree.unflatten(treedef, [col[b] for col in columns]) for b in range(count)]


def default_branch_mode() -> str:
  """'loop' on CPU, where vmapped convolutions with batched weights become slow grouped
  convolutions (measured: about 4x slower); 'vmap' on accelerators."""
  return 'loop' if jax.default_backend() == 'cpu' else 'vmap'


class PUE(nn.Module):
  """Pairwise-uncertainty MLP: [N, 2C] -> [N, 1] score in (0, 1).

  Linear(2C -> C) -> PReLU (one slope, init 0.25) -> Linear(C -> 1) -> sigmoid, with PyTorch's
  default Linear initialisation (uniform +-1/sqrt(fan_in)) since the reference never trains it
  (README quirk Q2): its random init *is* the module.
  """
  num_classes: int

  @nn.compact
  def __call__(self, stats):
    c = self.num_classes

    def torch_uniform(fan_in):
      bound = 1.0 / np.sqrt(fan_in)
      return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
          key, shape, dtype, -bound, bound)

    h = nn.Dense(c, kernel_init=torch_uniform(2 * c), bias_init=torch_uniform(2 * c),
                 name='fc1')(stats)
    alpha = self.param('alpha', nn.initializers.constant(0.25), (), jnp.float32)
    h = jnp.where(h >= 0, h, alpha * h)
    h = nn.Dense(1, kernel_init=torch_uniform(c), bias_init=torch_uniform(c), name='fc2')(h)
    return jax.nn.sigmoid(h)


class Neck(nn.Module):
  """The BN-neck over pooled features, optionally per stacked segment (see resnet.BatchNorm)."""
  kernels: layers.Kernels = layers.XLA
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, *, train, stacked=False):
    return resnet.BatchNorm(kernels=self.kernels, axis_name=self.axis_name, name='bn')(
        x, train=train, stacked=stacked)


@dataclasses.dataclass(frozen=True)
class DMUEModel:
  """Builds, initialises and applies the multi-branch model. Stateless; all state is in
  `variables`.

  Attributes mirror config.model; see `from_config`. `axis_name` is set inside shard_map,
  where x holds this device's k/N samples of every class: BatchNorm statistics and dropout
  masks are then those of the global batch (train.sharded_terms).
  """
  num_classes: int
  backbone: str = 'resnet18'
  width: int = 64
  stem: str = 'reference'
  last_stride: int = 2
  pooling: str = 'gap'
  bnneck: bool = True
  dropout: float = 0.5
  branch_mode: str = 'loop'
  dtype: Any = jnp.float32
  kernels: layers.Kernels = layers.XLA
  axis_name: str | None = None

  @classmethod
  def from_config(cls, model_config) -> 'DMUEModel':
    mode = model_config.branch_mode
    return cls(num_classes=model_config.num_classes, backbone=model_config.backbone,
               width=model_config.width,
               stem=config_lib.resolve_stem(model_config.stem, model_config.backbone),
               last_stride=model_config.last_stride, pooling=model_config.pooling,
               bnneck=model_config.bnneck, dropout=model_config.dropout,
               branch_mode=default_branch_mode() if mode == 'auto' else mode,
               dtype=jnp.dtype(config_lib.resolve_dtype(model_config.dtype)),
               kernels=kernels.select(model_config.kernels))

  @property
  def feature_dim(self) -> int:
    return resnet.feature_dim(self.backbone, self.width)

  @property
  def trunk(self) -> resnet.Trunk:
    return resnet.Trunk(self.backbone, self.width, self.stem, self.dtype, self.kernels,
                        self.axis_name)

  @property
  def stage(self) -> resnet.Stage4:
    return resnet.Stage4(self.backbone, self.width, self.last_stride, self.dtype, self.kernels,
                         self.axis_name)

  @property
  def neck(self) -> Neck:
    return Neck(self.kernels, self.axis_name)

  # ---------------------------------------------------------------- initialisation
  def init(self, rng: jax.Array, image_size: int) -> Variables:
    """Random variables for the training model; images are [*, image_size, image_size, 3].

    Layout (C classes, D feature dims):
      params:
        trunk      stem + layer1..layer3 (resnet.Trunk)
        branches   C+1 copies of layer4 with a leading branch axis; copy c < C is auxiliary
                   branch c, copy C the target branch
        neck       BatchNorm1d over D shared by every branch: scale, bias
        aux_heads  kernel [C, D, C-1]: auxiliary head c, no bias
        head       kernel [D, C]: the target head, no bias
        pue        the uncertainty MLP: fc1 (2C -> C, bias), prelu alpha, fc2 (C -> 1, bias)
      batch_stats: trunk, branches (stacked), neck.
    """
    c, d = self.num_classes, self.feature_dim
    k_trunk, k_br, k_aux, k_head, k_pue, k_neck = jax.random.split(rng, 6)
    x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    trunk_vars = self.trunk.init(k_trunk, x, train=False)
    h = self.trunk.apply(trunk_vars, x, train=False)
    branch_vars = jax.vmap(lambda k: self.stage.init(k, h, train=False))(
        jax.random.split(k_br, c + 1))
    neck_vars = self.neck.init(k_neck, jnp.zeros((2, d)), train=False)
    pue_vars = PUE(c).init(k_pue, jnp.zeros((1, 2 * c)))
    params = {
        'trunk': trunk_vars['params'],
        'branches': branch_vars['params'],
        'neck': neck_vars['params'],
        # The reference initialises every head N(0, 0.001^2).
        'aux_heads': {'kernel': 0.001 * jax.random.normal(k_aux, (c, d, c - 1))},
        'head': {'kernel': 0.001 * jax.random.normal(k_head, (d, c))},
        'pue': pue_vars['params'],
    }
    stats = {'trunk': trunk_vars['batch_stats'], 'branches': branch_vars['batch_stats'],
             'neck': neck_vars['batch_stats']}
    return {'params': params, 'batch_stats': stats}

  # ---------------------------------------------------------------- training forward
  def apply_branches(self, params, stats, x, *, train):
    """Applies stacked layer4 copies, copy b to x[b].

    params: stacked with leading axis N, or (loop mode) a list of N per-copy trees from
      `unstack`; stats: stacked; x: [N, rows, h, w, F].
    Returns ([N, rows, h', w', D], new stacked batch_stats).
    """
    mutable = ['batch_stats'] if train else False

    def one(p, s, xb):
      out = self.stage.apply({'params': p, 'batch_stats': s}, xb, train=train, mutable=mutable)
      if train:
        y, new = out
        return y, new['batch_stats']
      return out, s

    if self.branch_mode == 'vmap':
      return jax.vmap(one)(params, stats, x)
    if not isinstance(params, list):
      params = unstack(params)
    ys, new_stats = [], []
    for b in range(x.shape[0]):
      y, s2 = one(params[b], jax.tree.map(lambda a: a[b], stats), x[b])
      ys.append(y)
      new_stats.append(s2)
    return jnp.stack(ys), jax.tree.map(lambda *a: jnp.stack(a), *new_stats)

  def apply_train(self, variables: Variables, x: jax.Array, *, dropout_rng=None,
                  neck_stats_all_passes: bool = True, gram_features: bool = False,
                  frozen_bn: bool = False):
    """The training forward pass on a class-grouped batch.

    Args:
      variables: training variables.
      x: [C, k, H, W, 3] float, row c = k samples of class c.
      dropout_rng: PRNG key for dropout; None disables dropout.
      neck_stats_all_passes: README quirk Q4 (reference): the neck's running statistics see all 2C+1
        passes in the reference order; False: only the target pass updates them.
      gram_features: also return the auxiliary neck features (for the paper's feature Grams).
      frozen_bn: every BatchNorm normalises with its running statistics and leaves them
        alone, and dropout is off: the reference's network after a mid-epoch test left it in
        eval mode (README, Reference quirks, Q7). The loss and gradients are still computed.
    Returns:
      (out, new_batch_stats), out holding
        aux_logits    [C, (C-1)k, C-1]  auxiliary head c on its y != c samples
        target_logits [C, k, C]
        target_feats  [C, k, D]         neck(dropout(z)), the features of G_main
        z             [C, k, D]         pooled target features before dropout (for S)
        latent_logits [C, k, C-1]       auxiliary head c on class c, no dropout
        aux_feats     [C, (C-1)k, D]    (only with gram_features)
    """
    params, stats = variables['params'], variables['batch_stats']
    c = self.num_classes
    k = x.shape[1]
    n = c * k
    img = x.reshape((n,) + x.shape[2:])
    bn_train = not frozen_bn
    if frozen_bn:
      dropout_rng = None
      h = self.trunk.apply({'params': params['trunk'], 'batch_stats': stats['trunk']}, img,
                           train=False)
      trunk_stats = {'batch_stats': stats['trunk']}
    else:
      h, trunk_stats = self.trunk.apply(
          {'params': params['trunk'], 'batch_stats': stats['trunk']}, img, train=True,
          mutable=['batch_stats'])
    hg = h.reshape((c, k) + h.shape[1:])
    # Auxiliary branch c on its y != c samples; then (updating its BatchNorm averages again,
    # in the reference's order) on its own class for the latent distribution; the target branch
    # on everything. The latent pass is cut from the gradient: its output only feeds the
    # detached distribution, and a separate call lets XLA skip its backward pass entirely.
    aux_in = hg[others(c)].reshape((c, (c - 1) * k) + h.shape[1:])
    branches = params['branches']
    if self.branch_mode != 'vmap':
      # One unstack for all C+1 branches: its gradient is one stack, where slicing the aux and
      # target copies separately made XLA pad each branch's gradient and sum the pads.
      branches = unstack(branches)
    first = lambda t: t[:c] if isinstance(t, list) else jax.tree.map(lambda a: a[:c], t)
    last = lambda t: t[c:] if isinstance(t, list) else jax.tree.map(lambda a: a[c:], t)
    aux_feats, aux_stats = self.apply_branches(first(branches), first(stats['branches']),
                                               aux_in, train=bn_train)
    lat_feats, lat_stats = self.apply_branches(
        jax.lax.stop_gradient(first(branches)), aux_stats, jax.lax.stop_gradient(hg),
        train=bn_train)
    tgt_feats, tgt_stats = self.apply_branches(last(branches), last(stats['branches']),
                                               h[None], train=bn_train)
    branch_stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), lat_stats, tgt_stats)
    pool = jax.vmap(lambda f: resnet.pool(f, self.pooling))
    aux_z = pool(aux_feats)                 # [C, (C-1)k, D]
    latent_z = pool(lat_feats)              # [C, k, D]
    z = pool(tgt_feats)[0]                  # [Ck, D]

    d = aux_z.shape[-1]
    aux_z = self._dropout(aux_z.reshape(c, c - 1, k, d), dropout_rng, 0,
                          sample_axis=2).reshape(aux_z.shape)
    target_in = self._dropout(z.reshape(c, k, d), dropout_rng, 1,
                              sample_axis=1).reshape(z.shape)
    if frozen_bn:
      neck_out = tuple(self._neck_eval(params, stats, a) for a in (aux_z, target_in, latent_z))
      neck_stats = stats['neck']
    else:
      neck_out, neck_stats = self._neck_train(params, stats, aux_z, target_in, latent_z,
                                              neck_stats_all_passes)
    aux_f, target_f, latent_f = neck_out
    aux_logits = jnp.einsum('cnd,cdo->cno', aux_f, params['aux_heads']['kernel'])
    latent_logits = jnp.einsum('cnd,cdo->cno', latent_f, params['aux_heads']['kernel'])
    target_logits = target_f @ params['head']['kernel']
    out = {
        'aux_logits': aux_logits,
        'latent_logits': latent_logits,
        'target_logits': target_logits.reshape(c, k, c),
        'target_feats': target_f.reshape(c, k, -1),
        'z': z.reshape(c, k, -1),
    }
    if gram_features:
      out['aux_feats'] = aux_f
    new_stats = {'trunk': trunk_stats['batch_stats'], 'branches': branch_stats,
                 'neck': neck_stats}
    return out, new_stats

  def _dropout(self, x, rng, index, *, sample_axis):
    """Inverted dropout (PyTorch nn.Dropout) with an independent mask per call site.

    x's `sample_axis` holds the samples of a class. Inside shard_map (axis_name set) that axis
    is this device's slice of the global batch's, and the mask is the slice of the global
    batch's mask: N devices drop what one device drops.
    """
    if rng is None or self.dropout == 0.0:
      return x
    keep = 1.0 - self.dropout
    key = jax.random.fold_in(rng, index)
    if self.axis_name is None:
      mask = jax.random.bernoulli(key, keep, x.shape)
    else:
      local = x.shape[sample_axis]
      shape = list(x.shape)
      shape[sample_axis] = local * jax.lax.axis_size(self.axis_name)
      mask = jax.lax.dynamic_slice_in_dim(jax.random.bernoulli(key, keep, tuple(shape)),
                                          jax.lax.axis_index(self.axis_name) * local, local,
                                          axis=sample_axis)
    return jnp.where(mask, x / keep, 0.0)

  def _neck_train(self, params, stats, aux_z, target_in, latent_z, all_passes):
    """Neck on the 2C+1 passes, each with its own batch statistics.

    The reference calls the neck on the aux passes 0..C-1, then the target, then the latent
    passes 0..C-1; with `all_passes` the running statistics are updated in that order (Q4).
    Returns ((aux [C,(C-1)k,D], target [Ck,D], latent [C,k,D]), new neck batch_stats).
    """
    if not self.bnneck:
      return (aux_z, target_in, latent_z), stats['neck']

    def neck(x, batch_stats, stacked):
      y, new = self.neck.apply({'params': params['neck'], 'batch_stats': batch_stats}, x,
                            train=True, stacked=stacked, mutable=['batch_stats'])
      return y, new['batch_stats']

    if all_passes:
      aux_f, s = neck(aux_z, stats['neck'], True)
      target_f, s = neck(target_in, s, False)
      latent_f, s = neck(latent_z, s, True)
      return (aux_f, target_f, latent_f), s
    target_f, s = neck(target_in, stats['neck'], False)
    # The other passes normalise with their own statistics but leave the averages alone.
    aux_f, _ = neck(aux_z, stats['neck'], True)
    latent_f, _ = neck(latent_z, stats['neck'], True)
    return (aux_f, target_f, latent_f), s

  def _neck_eval(self, params, stats, x):
    """The neck on its running statistics (any leading shape)."""
    if not self.bnneck:
      return x
    return self.neck.apply({'params': params['neck'], 'batch_stats': stats['neck']}, x,
                           train=False)

  def apply_pue(self, params, stats_input):
    """[N, 2C] -> [N, 1] uncertainty score."""
    return PUE(self.num_classes).apply({'params': params['pue']}, stats_input)


# -------------------------------------------------------------------- inference
@dataclasses.dataclass(frozen=True)
class InferenceModel:
  """Trunk + target layer4 + pool + neck (running statistics) + target head: the plain
  backbone's cost. Also the model trained by the plain cross-entropy baseline."""
  base: DMUEModel

  def init(self, rng, image_size: int) -> Variables:
    k1, k2, k3 = jax.random.split(rng, 3)
    b = self.base
    x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    trunk_vars = b.trunk.init(k1, x, train=False)
    h = b.trunk.apply(trunk_vars, x, train=False)
    stage_vars = b.stage.init(k2, h, train=False)
    neck_vars = b.neck.init(k3, jnp.zeros((2, b.feature_dim)), train=False)
    head = 0.001 * jax.random.normal(jax.random.fold_in(rng, 7), (b.feature_dim,
                                                                  b.num_classes))
    return {
        'params': {'trunk': trunk_vars['params'], 'branch': stage_vars['params'],
                   'neck': neck_vars['params'], 'head': {'kernel': head}},
        'batch_stats': {'trunk': trunk_vars['batch_stats'],
                        'branch': stage_vars['batch_stats'],
                        'neck': neck_vars['batch_stats']},
    }

  def apply(self, variables: Variables, images: jax.Array, *, train: bool = False,
            dropout_rng=None):
    """images [N, H, W, 3] -> (logits [N, C], {'features': [N, D]}, new batch_stats or None)."""
    b = self.base
    p, s = variables['params'], variables['batch_stats']
    mutable = ['batch_stats'] if train else False
    out = b.trunk.apply({'params': p['trunk'], 'batch_stats': s['trunk']}, images, train=train,
                        mutable=mutable)
    h, trunk_s = out if train else (out, None)
    out = b.stage.apply({'params': p['branch'], 'batch_stats': s['branch']}, h, train=train,
                        mutable=mutable)
    h, branch_s = out if train else (out, None)
    z = resnet.pool(h, b.pooling)
    if train:
      # Grouped rows (class-major, as the train step sends them) when sharded.
      grouped = z.reshape(b.num_classes, -1, z.shape[-1]) if b.axis_name else z
      z = b._dropout(grouped, dropout_rng, 1, sample_axis=1).reshape(z.shape)  # pylint: disable=protected-access
    neck_s = None
    if b.bnneck:
      out = b.neck.apply({'params': p['neck'], 'batch_stats': s['neck']}, z, train=train,
                         mutable=mutable)
      z, neck_s = out if train else (out, None)
    logits = z @ p['head']['kernel']
    new_stats = None
    if train:
      new_stats = {'trunk': trunk_s['batch_stats'], 'branch': branch_s['batch_stats'],
                   'neck': neck_s['batch_stats'] if neck_s is not None else s['neck']}
    return logits, {'features': z}, new_stats


def is_inference_variables(variables: Variables) -> bool:
  return 'branch' in variables['params']


def inference_variables(variables: Variables) -> Variables:
  """Cuts the inference variables (target branch only) out of training variables.

  Inference layout: params {trunk, branch, neck, head} and batch_stats {trunk, branch, neck},
  `branch` being copy C (the target branch) of the stacked `branches`.
  """
  if is_inference_variables(variables):
    return variables
  p, s = variables['params'], variables['batch_stats']
  target = lambda tree: jax.tree.map(lambda a: a[-1], tree)
  return {
      'params': {'trunk': p['trunk'], 'branch': target(p['branches']), 'neck': p['neck'],
                 'head': p['head']},
      'batch_stats': {'trunk': s['trunk'], 'branch': target(s['branches']),
                      'neck': s['neck']},
  }
