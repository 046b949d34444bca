"""Official PyTorch DMUE weights -> Flax variables, and back.

Four checkpoint layouts are read, all with `torch.load(weights_only=True)`, so a file can never
run code: (a) 'multibranch', a snapshot of the reference training model (base.layer4_<i>.*,
classifiers.<i>.weight, bottleneck.*, project_w.*; with or without DataParallel's 'module.');
(b) 'target', the reference's convert_weights.py output (one base.layer4.*, classifiers.0.weight
[C, D], bottleneck.*); (c) 'msceleb', the MS-Celeb-1M pretraining snapshot ({'state_dict':
feat_net.* + loss_layer.*, 'epoch', ...}); (d) 'torchvision', an ImageNet ResNet (conv1.weight,
..., layer4.*, fc.*). What a layout lacks takes the values `DMUEModel.init` gives for the seed,
and a single layer4 goes into every branch, as the reference's `load_param` does. Every key of
the checkpoint is used or on a fixed ignore list; anything missing, unexpected or mis-shaped
raises `CheckpointError` naming the keys and shapes. Which key goes where: docs/design.md,
"Converting the official weights". API: `load_official_checkpoint`, `load_official_inference`,
`convert_state_dict` (an object already loaded), `to_torch_state_dict` (the inverse, layout (a)).
torch is optional: it is imported only when a checkpoint is read or tensors are asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterable

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from dmue_jax import config_lib
from dmue_jax.errors import UserError
from dmue_jax.models import dmue as dmue_model
from dmue_jax.models import resnet

Variables = dict[str, Any]

FORMATS = ('multibranch', 'target', 'msceleb', 'torchvision')
_DESCRIPTIONS = {
    'multibranch': 'official multi-branch DMUE training snapshot',
    'target': 'official target-branch-only DMUE weights (convert_weights.py)',
    'msceleb': 'official MS-Celeb-1M pretrained backbone (feat_net.*)',
    'torchvision': 'torchvision-style ImageNet ResNet',
}
# The parts of the training model each layout lacks; they come from DMUEModel.init.
_FRESH = {
    'multibranch': (),
    'target': ('aux_heads', 'pue'),
    'msceleb': ('neck', 'aux_heads', 'head', 'pue'),
    'torchvision': ('neck', 'aux_heads', 'head', 'pue'),
}
_MAX_LISTED = 12


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be read or does not fit the configured model."""


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise CheckpointError(
        'Reading PyTorch checkpoints needs PyTorch, which dmue_jax does not require: '
        '`pip install torch` (the CPU build is enough).') from err
  return torch


# ------------------------------------------------------------------ the key mapping
@dataclasses.dataclass(frozen=True)
class _Entry:
  """One PyTorch tensor <-> one Flax leaf (or one slice of a stacked leaf).

  key: the multi-branch key (layout (a)); collection/path: the Flax leaf; index: the slice of
  a stacked leaf (branch or aux head) or None; kind: conv, linear, vector or prelu; shape: the
  Flax shape of the slice.
  """
  key: str
  collection: str
  path: tuple[str, ...]
  index: int | None
  kind: str
  shape: tuple[int, ...]

  @property
  def torch_shape(self) -> tuple[int, ...]:
    return _TO_TORCH_SHAPE[self.kind](self.shape)


_TO_TORCH_SHAPE: dict[str, Callable[[tuple], tuple]] = {
    'conv': lambda s: (s[3], s[2], s[0], s[1]),
    'linear': lambda s: (s[1], s[0]),
    'vector': lambda s: tuple(s),
    'prelu': lambda s: (1,),
}


def _to_flax(kind: str, array: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return array.transpose(2, 3, 1, 0)   # OIHW -> HWIO
  if kind == 'linear':
    return array.T                       # [out, in] -> [in, out]
  if kind == 'prelu':
    return array.reshape(())
  return array


def _to_torch(kind: str, array: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return array.transpose(3, 2, 0, 1)
  if kind == 'linear':
    return array.T
  if kind == 'prelu':
    return array.reshape(1)
  return array


_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}


def _module_key(path: Iterable[str]) -> str:
  """Flax path inside a ResNet module -> the PyTorch key suffix.

  ('layer1_0', 'downsample_bn', 'scale') -> 'layer1.0.downsample.1.weight'.
  """
  *modules, leaf = path
  parts = []
  for name in modules:
    name = re.sub(r'^layer(\d)_(\d+)$', r'layer\1.\2', name)
    name = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(name, name)
    parts.append(name)
  parts.append(_LEAF_NAMES[leaf])
  return '.'.join(parts)


def _kind(path: tuple[str, ...], ndim: int) -> str:
  if path[-1] == 'kernel':
    return 'conv' if ndim == 4 else 'linear'
  return 'vector'


def _entries(shapes: Variables, num_classes: int, bnneck: bool) -> list[_Entry]:
  """The multi-branch layout's entries for the training variables of shape tree `shapes`."""
  c = num_classes
  out = []
  for collection, tree in shapes.items():
    for path, leaf in flax.traverse_util.flatten_dict(tree).items():
      top, rest, shape = path[0], path[1:], tuple(leaf.shape)
      if top == 'trunk':
        out.append(_Entry('base.' + _module_key(rest), collection, path, None,
                          _kind(path, len(shape)), shape))
      elif top == 'branches':
        # Stage4 names its blocks layer4_<j>; branch b is layer4_<b> in the reference, whose
        # blocks are layer4_<b>.<j>.
        block = int(rest[0].split('_')[1])
        suffix = _module_key(rest[1:])
        for b in range(c + 1):
          out.append(_Entry(f'base.layer4_{b}.{block}.{suffix}', collection, path, b,
                            _kind(path, len(shape) - 1), shape[1:]))
      elif top == 'neck':
        if bnneck:
          out.append(_Entry('bottleneck.' + _LEAF_NAMES[path[-1]], collection, path, None,
                            'vector', shape))
      elif top == 'head':
        out.append(_Entry(f'classifiers.{c}.weight', collection, path, None, 'linear', shape))
      elif top == 'aux_heads':
        for i in range(c):
          out.append(_Entry(f'classifiers.{i}.weight', collection, path, i, 'linear',
                            shape[1:]))
      elif top == 'pue':
        if rest == ('alpha',):
          out.append(_Entry('project_w.1.weight', collection, path, None, 'prelu', shape))
        else:
          layer = {'fc1': 0, 'fc2': 2}[rest[0]]
          leaf_name = _LEAF_NAMES[rest[-1]]
          out.append(_Entry(f'project_w.{layer}.{leaf_name}', collection, path, None,
                            _kind(path, len(shape)), shape))
      else:
        raise ValueError(f'unknown part of the model variables: {"/".join(path)}')
  return out


def _part(entry: _Entry) -> str:
  return entry.path[0]


def _source_key(entry: _Entry, fmt: str) -> str | None:
  """Where `entry` is found in a checkpoint of layout `fmt`; None: not there (fresh init)."""
  part = _part(entry)
  if part in _FRESH[fmt]:
    return None
  if fmt == 'multibranch':
    return entry.key
  if fmt == 'target':
    if part == 'head':
      return 'classifiers.0.weight'
    if part == 'branches':
      return re.sub(r'^base\.layer4_\d+\.', 'base.layer4.', entry.key)
    return entry.key
  # msceleb and torchvision hold a plain one-layer4 ResNet.
  key = re.sub(r'^base\.layer4_\d+\.', 'base.layer4.', entry.key)[len('base.'):]
  return 'feat_net.' + key if fmt == 'msceleb' else key


def _is_ignored(key: str, fmt: str) -> bool:
  """Checkpoint keys that are known and deliberately not loaded."""
  if key.endswith('.num_batches_tracked'):
    return True   # PyTorch's BatchNorm step counter; unused with a fixed momentum
  if fmt == 'msceleb':
    # The reference skips the MV-softmax layer and any key with 'fc' (the IBN net's fc).
    return key.startswith('loss_layer.') or any(p.startswith('fc') for p in key.split('.'))
  if fmt == 'torchvision':
    return key.startswith('fc.')
  return False


# ------------------------------------------------------------------ reading checkpoints
def _read(path: str):
  torch = _import_torch()
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except FileNotFoundError as err:
    raise CheckpointError(f'{path}: no such checkpoint file.') from err
  except Exception as err:  # pylint: disable=broad-except
    # torch raises pickle, zipfile and RuntimeError variants; all mean the same to the user.
    raise CheckpointError(
        f'{path}: cannot read it as a PyTorch checkpoint (expected a file written by '
        f'torch.save holding a state dict of tensors, or the MS-Celeb-1M snapshot '
        f'{{"state_dict": ...}}; objects other than tensors and plain containers are '
        f'refused, weights_only=True). Reason: {type(err).__name__}: {err}') from err


def _to_numpy(key: str, value, source: str) -> np.ndarray:
  """A float32 copy (never a view: the caller may keep using its tensors)."""
  if isinstance(value, np.ndarray):
    return np.array(value, np.float32)
  torch = _import_torch()
  if not isinstance(value, torch.Tensor):
    raise CheckpointError(f'{source}: {key} is a {type(value).__name__}, not a tensor.')
  return np.array(value.detach().cpu().to(torch.float32).numpy())


def detect_format(state: Any, source: str = 'checkpoint') -> tuple[str, dict[str, Any]]:
  """Returns (layout name, flat {key: tensor} with 'module.' prefixes removed).

  A {'state_dict': ...} wrapper (the MS-Celeb snapshot's, or a user's) is unwrapped first.
  """
  if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
    state = state['state_dict']
  if not isinstance(state, dict):
    raise CheckpointError(f'{source}: holds a {type(state).__name__}, expected a state dict '
                          f'(a mapping from parameter names to tensors).')
  flat = {str(k).removeprefix('module.'): v for k, v in state.items()}
  if any(k.startswith('feat_net.') for k in flat):
    return 'msceleb', flat
  if any(k.startswith('base.layer4_') for k in flat):
    return 'multibranch', flat
  if any(k.startswith('base.') for k in flat):
    return 'target', flat
  if 'conv1.weight' in flat:
    return 'torchvision', flat
  shown = ', '.join(sorted(flat)[:6]) or 'no keys'
  raise CheckpointError(
      f'{source}: not a DMUE or ResNet checkpoint I know (found {shown}). Expected one of: '
      f'{"; ".join(_DESCRIPTIONS.values())}.')


# ------------------------------------------------------------------ diagnostics
def _describe_architecture(flat: dict[str, Any], prefix: str) -> str | None:
  """A guess like 'resnet34 with width 64' from a checkpoint's trunk keys, for messages."""
  conv1 = flat.get(prefix + 'conv1.weight')
  if conv1 is None or not hasattr(conv1, 'shape') or len(conv1.shape) != 4:
    return None
  width = int(conv1.shape[0])
  blocks = []
  for stage in (1, 2, 3):
    ids = {m.group(1) for k in flat
           for m in [re.match(rf'{re.escape(prefix)}layer{stage}\.(\d+)\.', k)] if m}
    blocks.append(len(ids))
  bottleneck = prefix + 'layer1.0.conv3.weight' in flat
  ibn = prefix + 'layer1.0.bn1.IN.weight' in flat
  # The narrow backbones first: at their width, they are the name to give.
  for name, (kind, layers) in sorted(resnet.SPECS.items(),
                                     key=lambda item: not resnet.is_narrow(item[0])):
    narrow = resnet.is_narrow(name)
    if tuple(layers[:3]) == tuple(blocks) and (kind != 'basic') == bottleneck and (
        (kind == 'bottleneck_ibn') == ibn) and (not narrow or width == resnet.NARROW_WIDTH):
      return name if narrow else f'{name} with width {width}'
  return f'an unknown ResNet (width {width}, blocks {blocks})'


def _checkpoint_classes(flat: dict[str, Any], fmt: str) -> int | None:
  if fmt == 'multibranch':
    branches = {int(m.group(1)) for k in flat for m in [re.match(r'base\.layer4_(\d+)\.', k)]
                if m}
    return len(branches) - 1 if branches else None
  if fmt == 'target':
    head = flat.get('classifiers.0.weight')
    return int(head.shape[0]) if head is not None and hasattr(head, 'shape') else None
  return None


def _listing(items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f' ... and {len(items) - len(shown)} more' if len(items) > len(shown) else ''
  return '; '.join(shown) + more


def _raise_mismatch(source, fmt, flat, config, missing, unexpected, misshaped):
  c = config.model.num_classes
  width = ('' if resnet.is_narrow(config.model.backbone)
           else f'width={config.model.width}, ')
  lines = [f'{source}: the {_DESCRIPTIONS[fmt]} does not fit the configured model '
           f'(backbone={config.model.backbone}, {width}num_classes={c}, '
           f'bnneck={config.model.bnneck}).']
  found_c = _checkpoint_classes(flat, fmt)
  if found_c is not None and found_c != c:
    lines.append(f'It was trained for {found_c} classes but config.model.num_classes={c}: '
                 f'set --config.model.num_classes={found_c}.')
  prefix = {'multibranch': 'base.', 'target': 'base.', 'msceleb': 'feat_net.'}.get(fmt, '')
  arch = _describe_architecture(flat, prefix)
  if arch is not None:
    lines.append(f'Its trunk looks like {arch}.')
  if missing:
    lines.append(f'Missing keys ({len(missing)}): {_listing(missing)}.')
  if unexpected:
    lines.append(f'Unexpected keys ({len(unexpected)}): {_listing(unexpected)}.')
  if misshaped:
    lines.append(f'Mis-shaped keys ({len(misshaped)}): {_listing(misshaped)}.')
  if config.model.bnneck and any(k.startswith('bottleneck.') for k in missing):
    lines.append('A checkpoint without bottleneck.* was trained without the BN-neck: set '
                 '--config.model.bnneck=False.')
  if not config.model.bnneck and any(k.startswith('bottleneck.') for k in unexpected):
    lines.append('The checkpoint has a BN-neck (bottleneck.*): set --config.model.bnneck=True.')
  if any(re.fullmatch(r'classifiers\.\d+\.bias', k) for k in unexpected):
    lines.append("Its heads have biases (the reference's BiasInCls=True); DMUE heads here have "
                 'none, as in the reference default.')
  raise CheckpointError('\n  '.join(lines))


# ------------------------------------------------------------------ conversion
_TRAINING_PARTS = ('trunk', 'branches', 'neck', 'aux_heads', 'head', 'pue')
_INFERENCE_PARTS = ('trunk', 'branches', 'neck', 'head')


def _variable_shapes(config) -> Variables:
  model = dmue_model.DMUEModel.from_config(config.model)
  # Shapes only: eval_shape traces init without running any convolution.
  return jax.eval_shape(lambda rng: model.init(rng, 32), jax.random.key(0))


def _fresh_parts(config, parts: tuple[str, ...], seed: int) -> Variables:
  """The values `DMUEModel.init(key(seed))` gives the top-level parts `parts`."""
  model = dmue_model.DMUEModel.from_config(config.model)
  fresh = _init_fresh(model, config.input.image_size, jax.random.key(seed))
  return {col: {p: tree[p] for p in parts if p in tree} for col, tree in fresh.items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_fresh(model, image_size, rng):
  """Every part some layout lacks (neck, heads, PUE), as `model.init(rng)` sets them.

  Under jit the trunk and branch initialisers are dead code, so this compiles in seconds where
  the full op-by-op initialisation takes much longer; with the model as a static argument, a
  second checkpoint for the same model reuses the compilation.
  """
  variables = model.init(rng, image_size)
  keep = ('neck', 'aux_heads', 'head', 'pue')
  return {col: {p: tree[p] for p in keep if p in tree} for col, tree in variables.items()}


def convert_state_dict(state: Any, config, *, seed: int | None = None,
                       source: str = 'checkpoint',
                       parts: tuple[str, ...] = _TRAINING_PARTS) -> Variables:
  """A loaded checkpoint object (any layout above) -> training variables (numpy leaves).

  Args:
    state: what torch.load returned (tensors or numpy arrays as values).
    config: the run config (uses config.model.*, config.input.image_size, config.seed).
    seed: for the parts the checkpoint lacks; None = config.seed.
    source: names the checkpoint in messages.
    parts: the top-level parts to return (all by default); every checkpoint key is checked
      either way, only the returned parts are initialised where the checkpoint lacks them.
  """
  fmt, flat = detect_format(state, source)
  c = config.model.num_classes
  shapes = _variable_shapes(config)

  slices: dict[tuple[str, tuple[str, ...]], dict[Any, np.ndarray]] = {}
  used, missing, misshaped = set(), [], []
  for entry in _entries(shapes, c, config.model.bnneck):
    key = _source_key(entry, fmt)
    if key is None:
      continue
    if key not in flat:
      if key not in missing:
        missing.append(key)
      continue
    used.add(key)
    array = _to_numpy(key, flat[key], source)
    if tuple(array.shape) != entry.torch_shape:
      text = f'{key} expected {list(entry.torch_shape)}, found {list(array.shape)}'
      if text not in misshaped:
        misshaped.append(text)
      continue
    if _part(entry) in parts:
      slices.setdefault((entry.collection, entry.path), {})[entry.index] = _to_flax(
          entry.kind, array)
  unexpected = [k for k in flat if k not in used and not _is_ignored(k, fmt)]
  if missing or unexpected or misshaped:
    _raise_mismatch(source, fmt, flat, config, missing, unexpected, misshaped)

  out: dict[str, dict] = {}
  for (collection, path), by_index in slices.items():
    value = by_index[None] if None in by_index else np.stack(
        [by_index[i] for i in range(len(by_index))])
    out.setdefault(collection, {})[path] = value

  # Without a BN-neck the reference has no bottleneck.* keys; ours keeps an unused neck.
  absent = set(_FRESH[fmt]) | (set() if config.model.bnneck else {'neck'})
  fresh_parts = tuple(p for p in parts if p in absent)
  if fresh_parts:
    seed = config.seed if seed is None else seed
    fresh = _fresh_parts(config, fresh_parts, seed)
    for collection, tree in fresh.items():
      for path, value in flax.traverse_util.flatten_dict(tree).items():
        out.setdefault(collection, {})[path] = np.asarray(value)
    logging.info('%s: %s; freshly initialised (seed %d): %s.', source, _DESCRIPTIONS[fmt], seed,
                 ', '.join(fresh_parts))
  if fmt != 'multibranch':
    logging.info('%s: its single layer4 is copied into all %d branches.', source, c + 1)
  _warn_stem(fmt, config, source)

  variables = {col: flax.traverse_util.unflatten_dict(flat_tree)
               for col, flat_tree in out.items()}
  want = {col: {p: tree[p] for p in parts if p in tree} for col, tree in shapes.items()}
  got = jax.tree.map(lambda a: tuple(a.shape), variables)
  if got != jax.tree.map(lambda a: tuple(a.shape), want):  # a bug here, not in the checkpoint
    raise AssertionError(f'conversion produced {got}, the model needs {want}')
  return variables


def _warn_stem(fmt, config, source):
  """The stem has no parameters, so a wrong config.model.stem cannot be detected: say so.

  torchvision nets use the standard stem; the official nets (DMUE and MS-Celeb pretraining)
  the no-ReLU 2x2-pool one (README quirk Q1), except ResNet-50-IBN-a, which has the standard one.
  """
  backbone = config.model.backbone
  if fmt == 'torchvision':
    expected = 'standard'
  elif backbone == 'resnet50_ibn':
    expected = 'standard'
  elif backbone in ('resnet18', 'resnet18_narrow', 'resnet50'):
    expected = 'reference'
  else:
    return  # no official resnet34 weights: nothing to compare with
  stem = config_lib.resolve_stem(config.model.stem, backbone)
  if stem != expected:
    logging.warning('%s: the %s was trained with the %r stem but config.model.stem=%r.',
                    source, _DESCRIPTIONS[fmt], expected, stem)


def load_official_checkpoint(path: str, config, *, seed: int | None = None) -> Variables:
  """Official PyTorch weights at `path` -> DMUE training variables {'params', 'batch_stats'}.

  Accepts layouts (a)-(d) of the module docstring; what is copied and what is freshly
  initialised (seed None = config.seed): docs/design.md, "Converting the official weights".
  Raises CheckpointError (naming the path) when the file cannot be read or does not fit
  config.model.
  """
  variables = convert_state_dict(_read(path), config, seed=seed, source=str(path))
  return jax.tree.map(jnp.asarray, variables)


def load_official_inference(path: str, config, *, seed: int | None = None) -> Variables:
  """Official PyTorch weights at `path` -> inference variables (`dmue.inference_variables`).

  Meant for (b) target-only weights and (a) snapshots, which hold everything inference needs
  (nothing is initialised then, except an unused neck when config.model.bnneck is False); for
  (c)/(d) the neck and head are freshly initialised.
  """
  variables = convert_state_dict(_read(path), config, seed=seed, source=str(path),
                                 parts=_INFERENCE_PARTS)
  return jax.tree.map(jnp.asarray, dmue_model.inference_variables(variables))


# ------------------------------------------------------------------ back to PyTorch
def to_torch_state_dict(variables: Variables, config, *, as_tensors: bool = False,
                        num_batches_tracked: int = 0) -> dict[str, Any]:
  """Training variables -> the official multi-branch state dict (layout (a), no 'module.').

  Values are float32 numpy arrays, or torch tensors with `as_tensors` (torch needed then); each
  BatchNorm gets a `num_batches_tracked` of the given value so that the reference model's
  `load_state_dict` accepts the result as it is. Inference variables are not accepted: the
  multi-branch layout needs every branch.
  """
  if dmue_model.is_inference_variables(variables):
    raise ValueError('to_torch_state_dict needs training variables (with all branches).')
  c = config.model.num_classes
  flat = {col: flax.traverse_util.flatten_dict(tree) for col, tree in variables.items()}
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32), variables)
  out: dict[str, Any] = {}
  for entry in _entries(shapes, c, config.model.bnneck):
    value = np.asarray(flat[entry.collection][entry.path], np.float32)
    if entry.index is not None:
      value = value[entry.index]
    out[entry.key] = np.ascontiguousarray(_to_torch(entry.kind, value))
  for key in [k for k in out if k.endswith('.running_mean')]:
    out[key[:-len('running_mean')] + 'num_batches_tracked'] = np.asarray(
        num_batches_tracked, np.int64)
  if as_tensors:
    torch = _import_torch()
    out = {k: torch.from_numpy(np.array(v)) for k, v in out.items()}
  return out
