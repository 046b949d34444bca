"""End to end: the training command on the embedded SynthFER data, resume, kill and restart."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest
from configs import default
from dmue_jax import checkpoints
from dmue_jax import metrics as metrics_lib
from dmue_jax import parallel
from dmue_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The whole run (below) is also the reference for the run on XLA's kernels: it names the CPU
# set ('auto' on a CPU) on any host, and Adam's eps is large. Adam's update of a near-zero
# gradient is +-lr whichever sign rounding gives it; a large eps keeps two kernel sets' float32
# roundings at noise level (as tests/parallel_worker.py).
EPS = 1e-2


def tiny_config(tmp_cache):
  """The tiny config as run_main runs it."""
  config = default.get_config('tiny')
  config.input.cache_dir = str(tmp_cache)
  config.progress_bar = False
  config.analyze_at_end = False
  config.optim.eps = EPS
  config.model.kernels = 'cpu'
  return config


def run_main(workdir, cache, *extra, check=True):
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, '-m', 'dmue_jax.main', '--config', 'configs/default.py:tiny',
         '--workdir', str(workdir), f'--config.input.cache_dir={cache}',
         '--config.progress_bar=False', '--config.analyze_at_end=False',
         f'--config.optim.eps={EPS}', '--config.model.kernels=cpu', *extra]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return proc


def train_losses(workdir):
  recs = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {r['step']: r['train_loss'] for r in recs if 'train_loss' in r}


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.mark.slow
def test_train_and_evaluate_then_resume(tmp_path, cache):
  workdir = str(tmp_path / 'run')
  config = tiny_config(cache)
  results = train.train_and_evaluate(config, workdir)
  for name in ('eval_accuracy', 'eval_mean_class_accuracy', 'per_class_accuracy',
               'confusion_matrix', 'steps', 'train_images_per_second'):
    assert name in results
  assert results['steps'] == 6
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  assert os.path.getsize(os.path.join(workdir, 'confusion_matrix.png')) > 1000
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  losses = train_losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  evals = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
           if 'eval_accuracy' in r]
  assert [r['step'] for r in evals] == [3, 6]
  # The same command again resumes at the end: no step is trained twice.
  mtime = os.path.getmtime(os.path.join(workdir, 'metrics.jsonl'))
  again = train.train_and_evaluate(tiny_config(cache), workdir)
  assert train_losses(workdir) == losses
  assert again['eval_accuracy'] == results['eval_accuracy']
  # More epochs on the same workdir continue from step 6 instead of restarting.
  config = tiny_config(cache)
  config.num_epochs = 3
  train.train_and_evaluate(config, workdir)
  longer = train_losses(workdir)
  assert sorted(longer) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
  assert all(longer[s] == losses[s] for s in losses)
  assert os.path.getmtime(os.path.join(workdir, 'metrics.jsonl')) >= mtime


@pytest.mark.slow
def test_short_run_with_xla_kernels_matches_the_cpu_kernels(tmp_path, cache, whole_run):
  """The training loop on XLA's own kernels (the graph a GPU or TPU runs) logs the losses the
  CPU kernels (the whole run's) give, and results.json records the resolved kernels and
  dtype."""
  config = tiny_config(cache)
  config.model.kernels = 'xla'
  workdir = str(tmp_path / 'xla')
  results = train.train_and_evaluate(config, workdir)
  assert (results['kernels'], results['dtype']) == ('xla', 'float32')
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['kernels'] == 'xla'
  with open(os.path.join(whole_run[0], 'results.json')) as f:
    assert json.load(f)['kernels'] == 'cpu'
  xla, cpu = train_losses(workdir), train_losses(whole_run[0])
  assert sorted(xla) == [1, 2, 3, 4, 5, 6]
  # The same weights give the same loss; after updates the two float32 roundings drift apart
  # (the SP term's gamma = 100 amplifies them), slowly.
  tolerance = {1: 1e-5, 2: 1e-4}
  for step, loss in xla.items():
    assert loss == pytest.approx(cpu[step], rel=tolerance.get(step, 1e-2)), step


@pytest.fixture(scope='module')
def whole_run(cache, tmp_path_factory):
  """(workdir, process) of one uninterrupted `python -m dmue_jax.main` run of the tiny config."""
  workdir = tmp_path_factory.mktemp('whole') / 'run'
  return workdir, run_main(workdir, cache)


@pytest.mark.slow
def test_console_shows_progress_and_results_and_the_log_keeps_the_rest(whole_run):
  workdir, proc = whole_run
  err = proc.stderr.splitlines()
  assert not [line for line in err if re.match(r'I\d{4} ', line)], proc.stderr[-2000:]
  evals = [line.split(':')[0] for line in err if 'eval accuracy' in line]
  assert evals == ['step 3 epoch 0', 'step 6 epoch 1'], proc.stderr
  assert len(err) <= 5, proc.stderr
  assert proc.stdout.startswith('test accuracy ')
  assert str(workdir / 'results.json') in proc.stdout
  log = (workdir / 'log.txt').read_text()
  assert 'checkpoint' in log and 'eval accuracy' in log


@pytest.mark.slow
def test_killed_and_restarted_run_equals_uninterrupted(tmp_path, cache, whole_run, capsys):
  whole, broken = whole_run[0], tmp_path / 'broken'
  # SIGKILL right after step 5 was logged; the last checkpoint saved is step 4, written in the
  # background, so the one complete on disk is step 4 or, if the kill came first, step 3.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tests', 'crash_worker.py'), str(broken), str(cache),
       '5'], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert not os.path.exists(broken / 'results.json')
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(cache), str(broken))  # the restart, in this process
  # It really resumed rather than training again from scratch.
  restarted = capsys.readouterr().err
  assert re.search(r'Resumed from \S+ at step [34]\.', restarted), restarted[-2000:]
  assert train_losses(broken) == train_losses(whole)
  # The training dynamics (per-sample margins and softmax sums) resume exactly too.
  saved = {}
  for name, workdir in (('whole', whole), ('broken', broken)):
    mgr = checkpoints.manager(str(workdir), read_only=True)
    saved[name] = checkpoints.restore_dynamics(mgr, 6, train.Dynamics.zeros(140, 7))
    mgr.close()
  assert int(saved['whole'].count.sum()) == 6 * 7 * 2  # 6 steps of 7 classes x 2
  for a, b in zip(jax.tree.leaves(saved['whole']), jax.tree.leaves(saved['broken'])):
    np.testing.assert_array_equal(a, b)
  a = json.loads((whole / 'results.json').read_text())
  b = json.loads((broken / 'results.json').read_text())
  assert a['eval_accuracy'] == b['eval_accuracy']
  assert a['confusion_matrix'] == b['confusion_matrix']
  # The evaluate command restores the final checkpoint and reproduces the run's own figures.
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-m', 'dmue_jax.evaluate', '--workdir', str(whole), '--step', '6'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  written = json.loads((whole / 'evaluate.json').read_text())
  assert printed['step'] == written['step'] == 6
  assert written['eval_accuracy'] == a['eval_accuracy']
  assert written['confusion_matrix'] == a['confusion_matrix']


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, cache):
  workdir = str(tmp_path / 'nan')
  config = tiny_config(cache)
  config.checkpoint_every_steps = 1
  # A huge head learning rate: the first update leaves enormous (still finite) weights whose
  # activations overflow on the next forward pass.
  config.optim.head_lr = ((100, 1e30),)
  with pytest.raises(train.NonFiniteLossError, match=r'at step \d+') as caught:
    train.train_and_evaluate(config, workdir)
  failed_step = int(re.search(r'at step (\d+)', str(caught.value)).group(1))
  assert 'last good checkpoint' in str(caught.value)
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert saved and saved[-1] < failed_step
  assert not os.path.exists(os.path.join(workdir, 'results.json'))


@pytest.mark.parametrize('override, needle', [
    ('--config.input.batch_per_klass=4', 'batch_per_klass'),
    ('--config.input.batch_per_class=four', 'batch_per_class'),
    ('--config.model.backbone=vgg', 'config.model.backbone'),
])
def test_bad_override_is_one_clear_error(tmp_path, override, needle):
  proc = run_main(tmp_path / 'bad', tmp_path / 'cache', override, check=False)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  assert needle in proc.stderr
  assert '\\n' not in proc.stderr  # no repr-escaped message
  assert proc.stderr.strip().splitlines()[-1].startswith('error:')


def test_missing_dataset_is_one_clear_error(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-m', 'dmue_jax.main', '--config', 'configs/rafdb.py:runlocal',
       '--workdir', str(tmp_path / 'w'), f'--config.input.data_dir={tmp_path / "nowhere"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert 'nowhere' in proc.stderr


def test_url_workdir_is_one_clear_error(tmp_path):
  proc = run_main('gs://bucket/run', tmp_path / 'cache', check=False)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  assert 'gcsfuse' in proc.stderr.strip().splitlines()[-1]
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


def test_unknown_config_variant_is_one_clear_error(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-m', 'dmue_jax.main', '--config', 'configs/rafdb.py:runlocal,tiny',
       '--workdir', str(tmp_path / 'w')],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert "'tiny'" in lines[0] and 'paper, runlocal' in lines[0]
  assert not os.path.exists(tmp_path / 'w')


def _stats_by_step(workdir, steps, config):
  """{step: the flattened batch statistics saved at that step}."""
  mgr = checkpoints.manager(workdir, read_only=True)
  out = {}
  for step in steps:
    state, _ = checkpoints.restore(mgr, step, train.state_shape(config, 3))
    out[step] = np.concatenate([np.ravel(a) for a in jax.tree.leaves(state.batch_stats)])
  mgr.close()
  return out


@pytest.mark.parametrize('freeze', [True, False])
@pytest.mark.slow
def test_mid_epoch_test_freezes_batch_norm_until_the_epoch_ends(tmp_path, cache, freeze):
  """Q7: with a test after every batch, the epoch's first test (after step 1) leaves the
  network in eval mode for steps 2 and 3: the running statistics stop changing until the next
  epoch's first step. The switch turns that off. Every test is recorded, and the best one."""
  config = tiny_config(cache)
  config.eval_every_steps = 1
  config.eval_freezes_rest_of_epoch = freeze
  config.keep_checkpoints = 10
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  evals = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
           if 'eval_accuracy' in r]
  assert [r['step'] for r in evals] == [1, 2, 3, 4, 5, 6]
  best = max(evals, key=lambda r: (r['eval_accuracy'], -r['step']))
  assert (results['best_eval_accuracy'], results['best_eval_step']) == (
      best['eval_accuracy'], best['step'])
  stats = _stats_by_step(workdir, range(1, 7), config)
  same = lambda a, b: np.array_equal(stats[a], stats[b])
  assert not same(3, 4)  # a new epoch trains BatchNorm again
  pairs = [same(1, 2), same(2, 3), same(4, 5)]
  assert pairs == [freeze] * 3


@pytest.mark.slow
def test_frozen_train_step_has_no_dropout_and_keeps_statistics():
  # The training loop's own steps (tiny_config's, which the runs above compiled already when
  # this process ran them).
  config = tiny_config('')
  state = train.create_train_state(config, jax.random.key(0), 3,
                                   variables=conftest.random_variables(config, seed=0))
  rng = np.random.default_rng(0)
  # The loop's batch: uint8 images, no erase boxes (h = 0), labels, dataset indices.
  batch = {'image': np.asarray(rng.integers(0, 255, (7, 2, 32, 32, 3)), np.uint8),
           'erase': np.zeros((7, 2, 4), np.int32),
           'label': np.repeat(np.arange(7, dtype=np.int32), 2).reshape(7, 2),
           'index': np.arange(14, dtype=np.int32).reshape(7, 2)}
  mesh = parallel.make_mesh()
  shardings = parallel.state_sharding(state, mesh)
  batch = jax.device_put(batch, parallel.train_batch_sharding(mesh))
  state = jax.device_get(state)
  losses = {}
  for frozen in (False, True):
    step, _ = train.make_jitted_steps(config, mesh, 3, frozen_bn=frozen)
    # Placed as the loop places it; the steps donate the state they are given, so each call
    # gets its own copy.
    outs = [step(jax.device_put(state, shardings), batch, jax.random.key(seed))
            for seed in (1, 2)]
    losses[frozen] = [float(m['train_loss']) for _, m in outs]
    if frozen:
      for new_state, _ in outs:
        for a, b in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(state.batch_stats)):
          np.testing.assert_array_equal(a, b)
  assert losses[True][0] == losses[True][1]      # no dropout: the rng changes nothing
  assert losses[False][0] != losses[False][1]
