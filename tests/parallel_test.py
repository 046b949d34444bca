"""Data parallelism: N devices and N processes compute what one device computes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import conftest
import parallel_worker
from configs import default
from dmue_jax import checkpoints
from dmue_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'parallel_worker.py')


def env_with(devices, **extra):
  """A subprocess's environment: `devices` CPU devices (also on a machine with a GPU) and the
  tests' compiler settings (conftest.xla_flags)."""
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
              XLA_FLAGS=conftest.xla_flags(devices), **extra)


def run_worker(out_dir, steps, kernels, devices=(1, 4)):
  """tests/parallel_worker.py's results {device count: its npz}, from one process with
  max(devices) CPU devices."""
  # The worker's parameter equalities are to float32 rounding. Under the tests' compiler
  # settings (conftest.FAST_COMPILE_FLAGS) the largest entry is 0.62 of assert_same_training's
  # tolerance with XLA's kernels (with XLA:CPU's default fusion emitters the unoptimised
  # backend rounded the CPU set's two programs 270 times the tolerance apart).
  env = env_with(max(devices))
  proc = subprocess.run([sys.executable, WORKER, str(out_dir), str(steps), kernels,
                         *map(str, devices)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {n: np.load(os.path.join(out_dir, f'{n}.npz')) for n in devices}


def assert_same_training(a, b):
  """Losses, parameters and BatchNorm statistics agree entry by entry to rtol 1e-5.

  a, b: {'losses': [...], keystr of a variable: array} (tests/parallel_worker.py's file).

  Sharded reductions sum in another order, so float32 rounding (~1e-7 relative) differs; the
  worker's large Adam eps keeps that rounding from being amplified to +-lr for near-zero
  gradients. atol 2e-6 covers entries that are themselves near zero (measured on 2 CPU
  cores: largest parameter difference 9.6e-7, largest relative loss difference 1.1e-6).
  The neck's running variance is the one statistic that moves more: a variance amplifies the
  relative rounding of the features it is taken over, and it was the closest entry to rtol
  1e-5 with XLA's convolutions (0.88 of the tolerance) and past it with the valid-tap ones
  (1.39e-5 relative, one of 128 entries), so the neck's running variance gets
  rtol 3e-5.
  """
  np.testing.assert_allclose(a['losses'], b['losses'], rtol=1e-5, atol=1e-6)
  params = [k for k in a if k.startswith("['params']")]
  assert params
  for k in params + [k for k in a if k.startswith("['batch_stats']")]:
    rtol = 3e-5 if k == "['batch_stats']['neck']['bn']['var']" else 1e-5
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=2e-6, err_msg=k)


@pytest.mark.slow
def test_four_devices_equal_one_with_xla_kernels(tmp_path):
  """A few train steps on fixed batches, with XLA's own kernels (the graph a GPU or TPU runs).
  The CPU set is compared through the training command (test_main_trains_the_same_...)."""
  runs = run_worker(tmp_path, 3, kernels='xla')
  assert int(runs[4]['devices']) == 4
  assert_same_training(runs[1], runs[4])


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(args, expect_success=True, timeout=600):
  """Runs `python args...` as two jax.distributed processes on 127.0.0.1; returns their stderr
  (and their exit codes, with expect_success=False)."""
  port = free_port()
  procs = []
  for pid in range(2):
    env = env_with(1, DMUE_COORDINATOR=f'127.0.0.1:{port}', DMUE_NUM_PROCESSES='2',
                   DMUE_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  errs = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0 or not expect_success, err[-3000:]
    errs.append(err)
  return errs if expect_success else (errs, [p.returncode for p in procs])


def main_args(workdir):
  """`python -m dmue_jax.main` on the tiny config, k=4, two epochs of 3 steps, every step logged,
  checkpoints at the epochs' ends, every loss term at full weight in the second epoch (ramp_a
  0.5). Adam's update of a near-zero gradient is +-lr whichever sign float32 rounding gives it;
  a large eps keeps the programs' roundings at noise level over the six steps (as
  tests/parallel_worker.py)."""
  return ['-m', 'dmue_jax.main', '--config', 'configs/default.py:tiny',
          '--workdir', str(workdir), '--config.log_every_steps=1', '--config.optim.eps=1e-2',
          '--config.dmue.ramp_a=0.5',
          '--config.checkpoint_every_steps=3', '--config.input.batch_per_class=4',
          '--config.progress_bar=False', '--config.analyze_at_end=False',
          f'--config.input.cache_dir={workdir.parent / "tfds"}']


def logged_losses(workdir):
  """[(step, train_loss)] from workdir/metrics.jsonl."""
  with open(workdir / 'metrics.jsonl') as f:
    recs = [json.loads(line) for line in f]
  return [(r['step'], r['train_loss']) for r in recs if 'train_loss' in r]


def main_losses(workdir, devices):
  env = env_with(devices)
  proc = subprocess.run([sys.executable, *main_args(workdir)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return logged_losses(workdir)


def final_training(workdir):
  """assert_same_training's view of a main_args run: its logged losses and the variables of
  its last checkpoint (step 6; the tiny config's state layout, which main_args' overrides keep)."""
  mgr = checkpoints.manager(str(workdir), read_only=True)
  state, _ = checkpoints.restore(mgr, 6, train.state_shape(default.get_config('tiny'), 3))
  mgr.close()
  return {'losses': [l for _, l in logged_losses(workdir)],
          **parallel_worker.flat_variables(state)}


@pytest.fixture(scope='module')
def one_device_main(tmp_path_factory):
  """(workdir, logged losses) of the training command on one device."""
  workdir = tmp_path_factory.mktemp('main') / 'one'
  return workdir, main_losses(workdir, 1)


@pytest.mark.slow
def test_main_trains_the_same_on_one_and_four_devices(one_device_main, tmp_path):
  """The training command with the CPU set: the same logged losses, and the same weights and
  BatchNorm statistics in the last checkpoint."""
  one_dir, one = one_device_main
  four = main_losses(tmp_path / 'four', 4)
  assert [s for s, _ in one] == [1, 2, 3, 4, 5, 6]
  assert [s for s, _ in four] == [s for s, _ in one]
  assert_same_training(final_training(one_dir), final_training(tmp_path / 'four'))


@pytest.mark.slow
def test_two_process_main_resumes_checkpoints_and_matches_one(one_device_main, tmp_path):
  """The training command on two processes (one shared workdir and dataset cache), restarted
  from the one-device run's checkpoint at the end of epoch 1: both processes resume there,
  process 0 prepares the data, both write the orbax checkpoints, only process 0 writes metrics,
  and the second epoch's losses are the one-device run's."""
  one_dir, one = one_device_main
  workdir = tmp_path / 'two'
  shutil.copytree(one_dir / 'checkpoints', workdir / 'checkpoints')
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  shutil.rmtree(workdir / 'checkpoints' / '6')
  shutil.copy(one_dir / 'metrics.jsonl', workdir / 'metrics.jsonl')
  errs = run_two_processes(main_args(workdir))
  for err in errs:
    assert 'Resumed from' in err and 'at step 3.' in err, err[-2000:]
  assert os.listdir(tmp_path / 'tfds' / 'synthfer')  # prepared here, by process 0
  two = logged_losses(workdir)
  assert [s for s, _ in two] == [1, 2, 3, 4, 5, 6]
  assert two[:3] == one[:3]
  np.testing.assert_allclose([l for _, l in two[3:]], [l for _, l in one[3:]], rtol=1e-5)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  assert (workdir / 'results.json').exists()


def test_uneven_split_is_a_config_error(tmp_path):
  env = env_with(4)
  proc = subprocess.run(
      [sys.executable, '-m', 'dmue_jax.main', '--config', 'configs/default.py:tiny',
       '--workdir', str(tmp_path / 'w'), '--config.input.batch_per_class=3',
       f'--config.input.cache_dir={tmp_path / "tfds"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  assert 'batch_per_class=3' in proc.stderr and 'Traceback' not in proc.stderr


def test_two_processes_stop_together_when_the_dataset_is_missing(tmp_path):
  """Process 0 prepares the data; when that fails, process 1 must not wait at the barrier."""
  errs, codes = run_two_processes(
      ['-m', 'dmue_jax.main', '--config', 'configs/rafdb.py:runlocal',
       '--workdir', str(tmp_path / 'w'), f'--config.input.data_dir={tmp_path / "nowhere"}'],
      expect_success=False, timeout=240)
  assert codes[0] == 2 and codes[1] != 0
  for err in errs:
    assert 'Traceback' not in err, err[-3000:]
  assert 'nowhere' in errs[0].strip().splitlines()[-1]
  assert 'process 0 could not prepare the dataset' in errs[1].strip().splitlines()[-1]
