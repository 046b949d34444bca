"""The SynthFER pretraining stage: trained once on a disjoint draw, cached, and loaded through
config.model.init_from into every branch."""

import os

import jax
import numpy as np
import pytest

from configs import default
from dmue_jax import backbones
from dmue_jax import checkpoints
from dmue_jax import pretrain
from dmue_jax import train
from dmue_jax.models import dmue as dmue_model


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  config = default.get_config('tiny')
  config.input.cache_dir = str(tmp_path_factory.mktemp('cache'))
  config.progress_bar = False
  return config


def test_stage_one_is_a_disjoint_plain_run(tiny):
  cfg = backbones.pretrain_config(tiny)
  assert not cfg.dmue.enabled and cfg.input.label_noise == 0.0
  assert cfg.input.synthfer_seed != tiny.input.synthfer_seed
  other = default.get_config('tiny')
  other.input.cache_dir = tiny.input.cache_dir
  other.model.width = 32
  assert backbones.cache_dir(other) != backbones.cache_dir(tiny)


@pytest.mark.slow
def test_pretrained_backbone_loads_through_init_from(tiny):
  path = pretrain.ensure_pretrained(tiny)
  assert path.startswith(tiny.input.cache_dir) and os.path.exists(path)
  mtime = os.path.getmtime(path)
  assert pretrain.ensure_pretrained(tiny) == path and os.path.getmtime(path) == mtime  # cached
  with np.load(path) as saved:
    conv1 = saved['params/trunk/conv1/kernel']
    layer4 = saved['params/branch/layer4_0/conv1/kernel']
  for init_from in (path, backbones.KEYWORD):
    tiny.model.init_from = init_from
    variables = train.initial_variables(tiny, jax.random.key(0))
    np.testing.assert_array_equal(variables['params']['trunk']['conv1']['kernel'], conv1)
    branches = variables['params']['branches']['layer4_0']['conv1']['kernel']
    assert branches.shape[0] == tiny.model.num_classes + 1
    for b in range(branches.shape[0]):
      np.testing.assert_array_equal(branches[b], layer4)
  # The plain baseline takes the same backbone in its inference layout.
  tiny.dmue.enabled = False
  base = train.initial_variables(tiny, jax.random.key(0))
  assert dmue_model.is_inference_variables(base)
  np.testing.assert_array_equal(base['params']['branch']['layer4_0']['conv1']['kernel'], layer4)
  tiny.dmue.enabled = True
  # A backbone for another network is one clear error.
  tiny.model.backbone = 'resnet18'
  tiny.model.init_from = path
  with pytest.raises(checkpoints.CheckpointError, match='another backbone'):
    train.initial_variables(tiny, jax.random.key(0))
