"""Shared fixtures: training workdirs with real checkpoints, made without training.

`make_run` writes <workdir>/checkpoints exactly as `train.train_and_evaluate` does (same manager,
same `save`, the same meta keys) for the `:tiny` config of configs/default.py. The variables are
random but not initial: batch statistics and heads get non-trivial values, so that a test that
compares logits would notice a wrong branch, missing statistics or a swapped head.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from dmue_jax import checkpoints
from dmue_jax import train

# The tests compile far more than they run: XLA's backend (LLVM) optimisation is off for them
# and for the subprocesses they start (fusion, sharding and FLOP counts are decided before it;
# the programs run slower, on tiny batches), and XLA:CPU emits fusions with its legacy emitters
# (the tiny train step compiles in 3 s instead of 6.4 s). Set before JAX starts its backend.
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
for _flag in FAST_COMPILE_FLAGS.split():
  if _flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_flag}'.strip()
# The compiler options that restore XLA:CPU's default emitters for one jit, where a test checks
# kernel numerics as runs compile them (tests/kernels/cpu_set_test.py).
DEFAULT_EMITTERS = {'xla_cpu_use_fusion_emitters': True}


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test subprocess with `devices` fake CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}'


# One persistent XLA compilation cache for the whole session, shared with the subprocesses the
# tests start (they inherit the environment): the same tiny programs are compiled once, not in
# every test that trains. Set before any compilation. The process that starts the session makes
# it (the xdist workers inherit it) and removes it at the end.
_OWN_CACHE_DIR = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_CACHE_DIR = tempfile.mkdtemp(prefix='dmue_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE_DIR
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
# Every program, however quick to compile: the subprocesses compile the same small ones again.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
# On a GPU, float32 matrix products may run in TF32 (10 mantissa bits); the tests compare
# float32 results at float32 tolerances, so they ask for full precision.
jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE_DIR:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


SYNTHFER_CLASSES = ('Surprise', 'Fear', 'Disgust', 'Happiness', 'Sadness', 'Anger', 'Neutral')


@dataclasses.dataclass
class Run:
  workdir: str
  config: Any
  class_names: tuple[str, ...]
  states: dict  # step -> TrainState saved at that step
  best_step: int


def random_variables(config, seed: int):
  """Variables with the layout of train.init_variables, filled from NumPy.

  Flax's own init runs every layer eagerly and takes about a minute on a loaded 2-core CPU; the
  shapes (train.state_shape, traced once per config) plus NumPy take well under a second.
  """
  shapes = train.state_shape(config, 1).variables
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [p.key for p in path]
    shape = leaf.shape
    stacked = names[1] in ('branches', 'aux_heads')  # a leading branch / class axis
    if names[-1] == 'kernel':
      fan_in = math.prod(shape[1 if stacked else 0:-1])
      scale = 0.3 if names[1] == 'head' else math.sqrt(2.0)  # logits of a few units
      return rng.normal(0.0, scale / math.sqrt(fan_in), shape).astype(np.float32)
    if names[-1] in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if names[-1] in ('bias', 'mean'):
      return rng.normal(0.0, 0.1, shape).astype(np.float32)
    if names[-1] == 'alpha':
      return np.full(shape, 0.25, np.float32)
    raise ValueError(f'unknown variable {"/".join(names)}')

  return jax.tree_util.tree_map_with_path(fill, shapes)


def make_run(workdir: str, *, dmue: bool = True, steps=(2, 3), accuracies=(0.6, 0.4),
             class_names=SYNTHFER_CLASSES, config=None, meta_config=None) -> Run:
  """Saves one checkpoint per step (different weights each) with the given eval accuracies.

  The best step (highest accuracy) is deliberately not the latest one. meta_config: a config
  to record in the meta instead of the one the state was made with (a mismatched checkpoint).
  """
  if config is None:
    config = default.get_config('tiny')
  config.dmue.enabled = dmue
  mgr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  states = {}
  for i, (step, acc) in enumerate(zip(steps, accuracies)):
    state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=1,
                                     variables=random_variables(config, seed=i))
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    meta = {'step': step, 'epoch': step, 'steps_per_epoch': 1, 'seed': int(config.seed),
            'class_names': list(class_names), 'num_classes': int(config.model.num_classes),
            'dmue': bool(config.dmue.enabled),
            'config': (meta_config or config).to_json()}
    checkpoints.save(mgr, step, state, meta, metrics={'eval_accuracy': acc})
    states[step] = state
  mgr.close()
  best = max(zip(accuracies, steps))[1]
  return Run(workdir=workdir, config=config, class_names=tuple(class_names), states=states,
             best_step=best)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory) -> Run:
  """A DMUE run of the :tiny config: checkpoints at steps 2 (best) and 3 (latest)."""
  return make_run(str(tmp_path_factory.mktemp('tiny_run')))


@pytest.fixture(scope='session')
def baseline_run(tmp_path_factory) -> Run:
  """A plain cross-entropy run (dmue disabled): its checkpoints already hold the inference
  layout."""
  return make_run(str(tmp_path_factory.mktemp('baseline_run')), dmue=False, steps=(1,),
                  accuracies=(0.5,))
