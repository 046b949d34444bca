r"""Backbone weight files: the SynthFER pretrained start's place in the cache, and the .npz format.

A backbone file holds the trunk, one layer4 and the BN-neck of a trained network. `load_backbone`
expands it into the training model (its layer4 into every branch; heads and PUE MLP fresh), the
way a pretrained torch backbone is loaded. `config.model.init_from` takes such a file, or
KEYWORD for the SynthFER demo's start, which `dmue_jax.pretrain` trains once and caches here:
this module only finds and reads it, so training can load it without depending on the stage
that makes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os

import flax
import jax
import numpy as np

from dmue_jax import config_lib
from dmue_jax import datasets
from dmue_jax.models import dmue as dmue_model

KEYWORD = config_lib.SYNTHFER_PRETRAINED
# The pretraining draw: its own generator seed, offset from the run's.
SEED_OFFSET = 1000
FILE = 'backbone.npz'
_PARTS = ('trunk', 'branch', 'neck')


def pretrain_config(config):
  """The stage-1 config: the run's network and schedule, plain cross-entropy, a disjoint draw
  of the same size without added label noise (its annotations are the generator's own)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.dmue.enabled = False
    out.model.init_from = 'scratch'
    out.input.label_noise = 0.0
    out.input.synthfer_seed = config.input.synthfer_seed + SEED_OFFSET
    out.analyze_at_end = False
    out.eval_every_steps = 0
  return out


def cache_dir(config) -> str:
  """Where the weights for `config` are kept: under the dataset cache, one folder per key."""
  cfg = pretrain_config(config)
  key = {name: cfg.model[name] for name in ('backbone', 'width', 'stem', 'last_stride',
                                            'pooling', 'bnneck', 'dropout', 'num_classes')}
  key.update({name: cfg.input[name] for name in ('image_size', 'resize_size', 'batch_per_class',
                                                 'synthfer_seed', 'synthfer_num_train',
                                                 'augment')})
  key.update(epochs=cfg.num_epochs, steps_per_epoch=cfg.steps_per_epoch,
             optim=json.loads(cfg.optim.to_json()), seed=cfg.seed)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  root = config.input.cache_dir or datasets.default_synthfer_cache_dir()
  return os.path.join(root, 'pretrained', f'synthfer_{digest}')


def cached_path(config) -> str:
  """Where the pretrained backbone for `config` is (or will be) cached."""
  return os.path.join(cache_dir(config), FILE)


def save_backbone(path: str, variables) -> None:
  """Saves the trunk, layer4 and neck of inference variables (npz, atomically)."""
  flat = {}
  for collection in ('params', 'batch_stats'):
    tree = {part: variables[collection][part] for part in _PARTS}
    for key, value in flax.traverse_util.flatten_dict(tree, sep='/').items():
      flat[f'{collection}/{key}'] = np.asarray(jax.device_get(value))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load_backbone(path: str, fresh):
  """Training (or inference) variables `fresh` with their trunk, every layer4 copy and neck
  replaced by the saved backbone's. Raises ValueError naming a missing or misshaped entry."""
  with np.load(path) as saved:
    flat = dict(saved)
  training = not dmue_model.is_inference_variables(fresh)
  out = jax.tree.map(np.asarray, fresh)
  for name, value in flat.items():
    collection, part, *rest = name.split('/')
    target_part = 'branches' if (part == 'branch' and training) else part
    node = out[collection][target_part]
    for key in rest[:-1]:
      node = node[key]
    want = tuple(np.shape(node[rest[-1]]))
    copies = want[1:] if target_part == 'branches' else want
    if tuple(np.shape(value)) != copies:
      raise ValueError(f'{path}: {name} has shape {np.shape(value)}, the model needs '
                       f'{copies}. Was it made for another backbone or image size?')
    node[rest[-1]] = np.array(np.broadcast_to(value, want))
  return out
