"""The compare command: DMUE and the baseline from identical weights, side by side."""

import json
import os
import subprocess
import sys

import cv2
import jax
import pytest
import numpy as np

from configs import default
from configs import folder
from dmue_jax import compare
from dmue_jax import metrics as metrics_lib
from dmue_jax.models import dmue as dmue_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_both_arms_start_from_the_same_weights():
  config = default.get_config('tiny')
  dmue_vars = compare.start_variables(config, 'dmue')
  base_vars = compare.start_variables(config, 'baseline')
  assert dmue_model.is_inference_variables(base_vars)
  assert not dmue_model.is_inference_variables(dmue_vars)
  for a, b in zip(jax.tree.leaves(dmue_model.inference_variables(dmue_vars)),
                  jax.tree.leaves(base_vars)):
    np.testing.assert_array_equal(a, b)
  assert compare.fingerprint(dmue_vars) == compare.fingerprint(base_vars)
  other = default.get_config('tiny')
  other.seed = 1
  assert compare.fingerprint(compare.start_variables(other, 'dmue')) != compare.fingerprint(
      dmue_vars)


@pytest.mark.slow
def test_compare_command_writes_the_table_and_json(tmp_path):
  workdir = tmp_path / 'cmp'
  cmd = [sys.executable, '-m', 'dmue_jax.compare', '--config', 'configs/default.py:tiny',
         '--workdir', str(workdir), '--label-noise', '0.3', '--config.progress_bar=False',
         f'--config.input.cache_dir={tmp_path / "tfds"}']
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((workdir / 'comparison.json').read_text())
  assert [row['label_noise'] for row in out['runs']] == [0.3]
  for row in out['runs']:
    for arm in compare.ARMS:
      for field in ('eval_accuracy', 'eval_mean_class_accuracy', 'noisy_label_auroc',
                    'flagged_recall', 'suggested_label_accuracy', 'start_fingerprint'):
        assert field in row[arm], (arm, field)
    assert 'latent_kl_to_truth' in row['dmue']
    assert row['dmue']['start_fingerprint'] == row['baseline']['start_fingerprint']
    assert row['accuracy_gain'] == row['dmue']['eval_accuracy'] - row['baseline']['eval_accuracy']
    noise_dir = workdir / f'noise_{row["label_noise"]:g}'
    for arm in compare.ARMS:
      results = json.loads((noise_dir / arm / 'results.json').read_text())
      assert results['dmue'] == (arm == 'dmue')
  # Every arm ran the ambiguity report, with its new columns and keys.
  with open(workdir / 'noise_0.3' / 'dmue' / 'ambiguity' / 'samples.csv') as f:
    header = f.readline().strip().split(',')
  for column in ('suspicion', 'flagged', 'suggested_label', 'suggested_label_name', 'aum',
                 'score'):
    assert column in header, column
  results = json.loads((workdir / 'noise_0.3' / 'dmue' / 'results.json').read_text())
  for key in ('noisy_label_auroc', 'score_auroc', 'flagged_recall', 'num_flagged',
              'suggested_label_accuracy', 'cleanlab_self_confidence_auroc',
              'cleanlab_normalized_margin_auroc', 'aum_auroc', 'best_eval_accuracy'):
    assert key in results, key
  table = proc.stdout
  assert '| label noise | figure | baseline | DMUE | DMUE - baseline |' in table
  assert (workdir / 'comparison.md').read_text().strip() == compare.format_table(out).strip()
  # Run again (in this process): both arms resume at their end, nothing is trained twice (the
  # report, checked above, is left out this time).
  before = {arm: metrics_lib.read_jsonl(str(workdir / 'noise_0.3' / arm / 'metrics.jsonl'))
            for arm in compare.ARMS}
  config = default.get_config('tiny')
  config.input.cache_dir, config.progress_bar = str(tmp_path / 'tfds'), False
  config.analyze_at_end = False
  compare.compare(config, str(workdir), [0.3])
  again = json.loads((workdir / 'comparison.json').read_text())
  assert again['runs'][0]['dmue']['eval_accuracy'] == out['runs'][0]['dmue']['eval_accuracy']
  for arm in compare.ARMS:
    after = metrics_lib.read_jsonl(str(workdir / 'noise_0.3' / arm / 'metrics.jsonl'))
    assert [r['step'] for r in after if 'train_loss' in r] == [
        r['step'] for r in before[arm] if 'train_loss' in r]


@pytest.mark.slow
def test_bad_noise_list_is_one_clear_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'dmue_jax.compare', '--config', 'configs/default.py:tiny',
       '--workdir', str(tmp_path / 'w'), '--label-noise', '0,lots'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert '--label-noise' in proc.stderr.strip().splitlines()[-1]


def test_ablation_arms_switch_one_part_off_and_share_the_start():
  config = default.get_config('tiny')
  reference = compare.arm_config(config, 'dmue', 0.3)
  for arm, fields in compare.ABLATIONS.items():
    cfg = compare.arm_config(config, arm, 0.3)
    assert cfg.dmue.enabled and cfg.input.label_noise == 0.3
    changed = {k for k in cfg.dmue if cfg.dmue[k] != reference.dmue[k]}
    assert changed == set(fields), arm
  assert compare.fingerprint(compare.start_variables(
      compare.arm_config(config, 'no_sp', 0.1), 'no_sp')) == compare.fingerprint(
          compare.start_variables(config, 'dmue'))
  with pytest.raises(compare.ConfigError, match='no_such'):
    compare.compare(config, '/nonexistent', [0.1], ['no_such'])


def test_table_lists_each_ablation_against_baseline_and_dmue():
  row = {'label_noise': 0.3, 'baseline': {'eval_accuracy': 0.80},
         'dmue': {'eval_accuracy': 0.78}, 'no_sp': {'eval_accuracy': 0.83}}
  table = compare.format_table({'ablations': ['no_sp'], 'runs': [row]})
  assert '| 0.3 | eval_accuracy | 0.8000 | 0.7800 | -0.0200 |' in table
  assert '| 0.3 | no_sp | 0.8300 | +0.0300 | +0.0500 |' in table


def test_a_folder_config_takes_its_class_count_from_the_data(tmp_path):
  for split in ('train', 'test'):
    for name in ('happy', 'sad', 'calm'):
      path = tmp_path / 'faces' / split / name / 'a.png'
      path.parent.mkdir(parents=True)
      cv2.imwrite(str(path), np.full((8, 8, 3), 40, np.uint8))
  config = folder.get_config()
  config.input.data_dir, config.input.cache_dir = str(tmp_path / 'faces'), str(tmp_path / 'c')
  assert config.model.num_classes == 0
  settled = compare.settled_config(config)
  assert settled.model.num_classes == 3 and config.model.num_classes == 0
  assert compare.settled_config(settled) is settled
