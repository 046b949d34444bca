"""Data parallelism: N devices and N processes compute what one device computes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'parallel_worker.py')


def env_with(**extra):
  # CPU devices also on a machine with a GPU: several processes or fake devices need them.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  # Full XLA optimisation unless XLA_FLAGS is given: the worker's parameter equalities are to
  # float32 rounding, and the unoptimised backend rounds the 1- and 4-device programs
  # differently (up to 270 times the tolerance). The training command's tests compare logged
  # losses only, which agree either way, and take the quicker unoptimised backend.
  env.pop('XLA_FLAGS', None)
  env.update(extra)
  return env


def run_worker(out, steps, kernels='auto', **env):
  proc = subprocess.run([sys.executable, WORKER, str(out), str(steps), kernels], cwd=ROOT,
                        env=env_with(**env), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(out)


def assert_same_training(a, b):
  """Losses, parameters and BatchNorm statistics agree entry by entry to rtol 1e-5.

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
  params = [k for k in a.files if k.startswith("['params']")]
  assert params
  for k in params + [k for k in a.files if k.startswith("['batch_stats']")]:
    rtol = 3e-5 if k == "['batch_stats']['neck']['bn']['var']" else 1e-5
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=2e-6, err_msg=k)


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  return run_worker(tmp_path_factory.mktemp('one') / 'one.npz', 3)


@pytest.mark.slow
def test_four_devices_equal_one(one_device, tmp_path):
  four = run_worker(tmp_path / 'four.npz', 3,
                    XLA_FLAGS='--xla_force_host_platform_device_count=4')
  assert int(four['devices']) == 4 and int(one_device['devices']) == 1
  assert_same_training(one_device, four)


@pytest.mark.slow
def test_four_devices_equal_one_with_xla_kernels(tmp_path):
  """The same with XLA's own kernels, the graph a GPU or TPU runs."""
  one = run_worker(tmp_path / 'one.npz', 3, kernels='xla')
  four = run_worker(tmp_path / 'four.npz', 3, kernels='xla',
                    XLA_FLAGS='--xla_force_host_platform_device_count=4')
  assert int(four['devices']) == 4
  assert_same_training(one, four)


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
    env = env_with(DMUE_COORDINATOR=f'127.0.0.1:{port}', DMUE_NUM_PROCESSES='2',
                   DMUE_PROCESS_ID=str(pid), XLA_FLAGS=conftest.xla_flags(1))
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


def main_args(workdir, epochs=1):
  """`python -m dmue_jax.main` on the tiny config, k=4, every step logged."""
  return ['-m', 'dmue_jax.main', '--config', 'configs/default.py:tiny',
          '--workdir', str(workdir), '--config.log_every_steps=1',
          '--config.input.batch_per_class=4', '--config.progress_bar=False',
          '--config.analyze_at_end=False', f'--config.num_epochs={epochs}',
          f'--config.input.cache_dir={workdir.parent / "tfds"}']


def logged_losses(workdir):
  """[(step, train_loss)] from workdir/metrics.jsonl."""
  with open(workdir / 'metrics.jsonl') as f:
    recs = [json.loads(line) for line in f]
  return [(r['step'], r['train_loss']) for r in recs if 'train_loss' in r]


def main_losses(workdir, devices):
  env = env_with(XLA_FLAGS=conftest.xla_flags(devices))
  proc = subprocess.run([sys.executable, *main_args(workdir)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return logged_losses(workdir)


@pytest.fixture(scope='module')
def one_device_main(tmp_path_factory):
  """The losses the training command logs on one device (tiny config, k=4, one epoch)."""
  return main_losses(tmp_path_factory.mktemp('main') / 'one', 1)


@pytest.mark.slow
def test_main_logs_same_losses_on_one_and_four_devices(one_device_main, tmp_path):
  one = one_device_main
  four = main_losses(tmp_path / 'four', 4)
  assert [s for s, _ in one] == [1, 2, 3]
  assert [s for s, _ in four] == [s for s, _ in one]
  np.testing.assert_allclose([l for _, l in four], [l for _, l in one], rtol=1e-5)


def run_two_process_main(workdir, epochs):
  """`python -m dmue_jax.main` as two jax.distributed processes sharing one workdir."""
  errs = run_two_processes(main_args(workdir, epochs))
  return logged_losses(workdir), errs


@pytest.mark.slow
def test_two_process_main_checkpoints_resumes_and_matches_one(one_device_main, tmp_path):
  """The training command on two processes (one shared workdir and dataset cache): process 0
  prepares the data, both write the orbax checkpoints, only process 0 writes metrics, and a
  restart resumes on both processes."""
  workdir = tmp_path / 'two'
  first, _ = run_two_process_main(workdir, epochs=1)
  assert [s for s, _ in first] == [1, 2, 3]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3']
  assert (workdir / 'results.json').exists()
  np.testing.assert_allclose([l for _, l in first], [l for _, l in one_device_main], rtol=1e-5)
  longer, errs = run_two_process_main(workdir, epochs=2)
  for err in errs:
    assert 'Resumed from' in err and 'at step 3.' in err, err[-2000:]
  assert [s for s, _ in longer] == [1, 2, 3, 4, 5, 6]
  assert longer[:3] == first


def test_uneven_split_is_a_config_error(tmp_path):
  env = env_with(XLA_FLAGS='--xla_force_host_platform_device_count=4')
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
