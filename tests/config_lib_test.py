"""Tests of what a real-dataset run starts from, its from-scratch settings and its eval split."""

import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from configs import affectnet
from configs import affectnet7
from configs import default
from configs import ferplus
from configs import folder
from configs import rafdb
from dmue_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET_CONFIGS = {'rafdb': rafdb, 'affectnet': affectnet, 'affectnet7': affectnet7,
                   'ferplus': ferplus, 'folder': folder}


def parse_config_flags(*args):
  """(config, overridden field names) as main.py's flags parse `--config=... args`."""
  argv = ['prog', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config, set(config_flags.get_override_values(flag_values['config']))


# ------------------------------------------------------------------ init_from


@pytest.mark.parametrize('name', sorted(DATASET_CONFIGS))
def test_dataset_configs_need_init_from(name):
  config = DATASET_CONFIGS[name].get_config()
  assert config.model.init_from == ''
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config)
  message = str(err.value)
  for needle in ('config.model.init_from', 'MS-Celeb-1M', 'mv_epoch_17.pt', 'FaceX-Zoo',
                 'addition_module/DMUE', '--config.model.init_from=/path/to/mv_epoch_17.pt',
                 '--config.model.init_from=scratch', f'configs/{name}.py'):
    assert needle in message, needle
  config_lib.validate(config, for_training=False)  # a finished run's config, or bench
  for start in ('scratch', '/weights/mv_epoch_17.pt'):
    config.model.init_from = start
    config_lib.validate(config)


def test_synthfer_starts_from_its_pretrained_backbone_and_tiny_from_scratch():
  for arg in (None, 'paper'):
    config = default.get_config(arg)
    assert config.model.init_from == 'synthfer_pretrained'
    config_lib.validate(config)
  config = default.get_config('tiny')
  assert config.model.init_from == ''
  config_lib.validate(config)
  # The demo's pretrained start exists only for SynthFER.
  config = rafdb.get_config()
  config.model.init_from = 'synthfer_pretrained'
  with pytest.raises(config_lib.ConfigError, match='SynthFER demo'):
    config_lib.validate(config)


def test_runlocal_starts_from_scratch_unless_told_otherwise():
  assert rafdb.get_config('runlocal').model.init_from == 'scratch'
  assert rafdb.get_config('runlocal,paper').model.init_from == 'scratch'
  config_lib.validate(rafdb.get_config('runlocal'))
  config, overrides = parse_config_flags(f'--config={ROOT}/configs/rafdb.py:runlocal')
  assert config.model.init_from == 'scratch' and overrides == set()
  config, overrides = parse_config_flags(f'--config={ROOT}/configs/rafdb.py:runlocal',
                                         '--config.model.init_from=/w/mv_epoch_17.pt',
                                         '--config.dmue.gamma=5')
  assert config.model.init_from == '/w/mv_epoch_17.pt'
  assert overrides == {'model.init_from', 'dmue.gamma'}


@pytest.mark.slow
def test_main_without_init_from_is_one_clear_error(tmp_path):
  workdir = tmp_path / 'w'
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'dmue_jax.main', '--config', 'configs/rafdb.py',
       '--workdir', str(workdir), f'--config.input.data_dir={tmp_path}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: config.model.init_from is not set')
  assert 'mv_epoch_17.pt' in last and '--config.model.init_from=scratch' in last
  assert not workdir.exists()
  assert not (tmp_path / 'tfds').exists()  # no dataset preparation started either


# ------------------------------------------------------------------ scratch defaults


def scratch_config(num_epochs=36):
  config = rafdb.get_config()
  config.model.init_from = 'scratch'
  config.num_epochs = num_epochs
  return config


def test_scratch_defaults_at_default_py_length_are_default_py():
  config = scratch_config(num_epochs=12)
  lines = config_lib.apply_scratch_defaults(config, set())
  synthfer = default.get_config()
  for section, field in (('optim', 'backbone_lr'), ('optim', 'head_lr'), ('optim', 'pue_lr'),
                         ('dmue', 'gamma'), ('dmue', 'ramp_a'), ('model', 'stem')):
    assert config[section][field] == synthfer[section][field], field
    assert any(line.startswith(f'{section}.{field}: ') for line in lines), field
  assert len(lines) == 6


def test_scratch_defaults_scale_with_the_run():
  config = scratch_config(num_epochs=36)
  reference = rafdb.get_config()
  lines = config_lib.apply_scratch_defaults(config, set())
  assert config.optim.backbone_lr == ((24, 1e-3), (33, 3e-4), (300, 1e-4))
  assert config.optim.head_lr == ((24, 1e-3), (33, 3e-4), (300, 1e-4))
  assert config.optim.pue_lr == ((24, 3e-3), (33, 1e-3), (300, 3e-4))
  assert (config.dmue.gamma, config.dmue.ramp_a, config.model.stem) == (0.0, 12.0, 'standard')
  gamma = next(line for line in lines if line.startswith('dmue.gamma'))
  assert f'{reference.dmue.gamma!r} -> 0.0' in gamma and '--config.dmue.gamma' in gamma
  # What the reference keeps: everything that is not about starting from random weights.
  assert config.input.batch_per_class == reference.input.batch_per_class
  assert config.dmue.T == reference.dmue.T and config.model.backbone == 'resnet18'
  config_lib.validate(config)

  short = scratch_config(num_epochs=1)
  config_lib.apply_scratch_defaults(short, set())
  assert short.optim.head_lr == ((1, 1e-3), (1, 3e-4), (8, 1e-4))
  config_lib.validate(short)


def test_scratch_defaults_keep_what_the_user_set():
  config, overrides = parse_config_flags(
      f'--config={ROOT}/configs/rafdb.py', '--config.model.init_from=scratch',
      '--config.dmue.gamma=1000.0', '--config.optim.head_lr=((5, 0.01), (60, 0.001))',
      '--config.model.stem=reference')
  assert overrides == {'model.init_from', 'dmue.gamma', 'optim.head_lr', 'model.stem'}
  config = config.copy_and_resolve_references()
  lines = config_lib.apply_scratch_defaults(config, overrides)
  assert config.dmue.gamma == 1000.0 and config.model.stem == 'reference'
  np.testing.assert_allclose(config.optim.head_lr, [[5, 0.01], [60, 0.001]])
  assert config.optim.backbone_lr == ((24, 1e-3), (33, 3e-4), (300, 1e-4))
  assert sorted(line.split(':')[0] for line in lines) == [
      'dmue.ramp_a', 'optim.backbone_lr', 'optim.pue_lr']


def test_runlocal_gets_scratch_defaults():
  config = rafdb.get_config('runlocal')
  lines = config_lib.apply_scratch_defaults(config, set())
  assert lines and config.optim.head_lr == ((1, 1e-3), (2, 3e-4), (17, 1e-4))
  config_lib.validate(config)


@pytest.mark.parametrize('init_from', ['', '/w/mv_epoch_17.pt'])
def test_no_scratch_defaults_when_starting_from_weights(init_from):
  config = rafdb.get_config()
  config.model.init_from = init_from
  before = config.to_json()
  assert config_lib.apply_scratch_defaults(config, set()) == []
  assert config.to_json() == before


def test_synthfer_is_left_as_it_is():
  config = default.get_config()
  config.model.init_from = 'scratch'
  config.num_epochs = 36
  before = config.to_json()
  assert config_lib.apply_scratch_defaults(config, set()) == []
  assert config.to_json() == before


# ------------------------------------------------------------------ eval split


def test_eval_split_is_validated():
  config = ferplus.get_config()
  config.model.init_from = 'scratch'
  config.input.eval_split = 'validation'
  config_lib.validate(config)
  config.input.eval_split = 'val'
  with pytest.raises(config_lib.ConfigError, match="'test' or 'validation'"):
    config_lib.validate(config)
  for name in ('rafdb', 'affectnet', 'affectnet7'):
    config = DATASET_CONFIGS[name].get_config()
    config.model.init_from = 'scratch'
    config.input.eval_split = 'validation'
    with pytest.raises(config_lib.ConfigError, match=f'{name} has no validation split'):
      config_lib.validate(config)
