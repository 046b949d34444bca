"""Tests for dmue_jax.export and the export half of dmue_jax.inference.

An export must give the full model's inference logits exactly, hold nothing but the inference
path (so it is the plain backbone's size), and load in predict through --checkpoint.
"""

import json
import os
import subprocess
import sys

import chex
import cv2
import jax
import numpy as np
import pytest
import skimage.data

import conftest
from dmue_jax import config_lib
from dmue_jax import export
from dmue_jax import inference
from dmue_jax import train
from dmue_jax.errors import UserError
from dmue_jax.models import dmue as dmue_model
from dmue_jax.models import resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def exported(tiny_run, tmp_path_factory):
  """(summary, loaded export) of the tiny run's best checkpoint."""
  out = str(tmp_path_factory.mktemp('export') / 'model')
  summary = export.export(workdir=tiny_run.workdir, out=out)
  return summary, inference.load(checkpoint=out)


def images(n=8, size=32, seed=0):
  # n a power of two: the Classifier pads batches to one, and the same shape runs the same
  # compiled convolutions as train.predict_logits (other shapes differ by float32 rounding).
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def num_params(tree) -> int:
  return int(sum(np.size(a) for a in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_export_holds_only_the_inference_path(exported):
  _, loaded = exported
  assert set(loaded.variables) == {'params', 'batch_stats'}
  assert set(loaded.variables['params']) == {'trunk', 'branch', 'neck', 'head'}
  assert set(loaded.variables['batch_stats']) == {'trunk', 'branch', 'neck'}
  assert loaded.class_names == conftest.SYNTHFER_CLASSES
  assert loaded.config.input.image_size == 32 and loaded.config.input.resize_size == 36


def test_export_is_the_plain_backbones_size(exported, tiny_run):
  summary, loaded = exported
  config = tiny_run.config
  plain = jax.eval_shape(
      lambda k: resnet.PlainResNet(
          7, config.model.backbone, config.model.width,
          config_lib.resolve_stem(config.model.stem, config.model.backbone)).init(
              k, images(1), train=False),
      jax.random.key(0))
  # The same network; only the neck's BatchNorm (2 x D) and the fc bias (C) differ.
  d = train.make_model(config).feature_dim
  assert summary['num_params'] == num_params(plain['params']) + 2 * d - 7
  assert summary['export_bytes'] < 1.1 * 4 * summary['num_params'] + 256 * 1024
  # The training checkpoint has 8 copies of layer4 and the Adam moments (zeros here, which
  # compress: a trained checkpoint is larger still).
  assert summary['source_bytes'] > 4 * summary['export_bytes']
  print(f'\nfull checkpoint {summary["source_bytes"]} bytes, export {summary["export_bytes"]}')


@pytest.mark.slow
def test_export_logits_equal_the_full_models(exported, tiny_run):
  summary, loaded = exported
  full = tiny_run.states[summary['step']].variables
  x = images()
  expected = np.asarray(train.predict_logits(full, x, tiny_run.config))
  got = inference.Classifier(loaded).logits(x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert np.ptp(expected) > 1.0  # a real comparison, not of near-zero logits


def test_export_of_a_chosen_step(tiny_run, tmp_path):
  out = str(tmp_path / 'step2')
  summary = export.export(workdir=tiny_run.workdir, checkpoint='2', out=out)
  assert summary['step'] == 2
  expected = dmue_model.inference_variables(tiny_run.states[2].variables)
  chex.assert_trees_all_equal(inference.load(checkpoint=out).variables, expected)


def test_baseline_run_exports(baseline_run, tmp_path):
  """A plain cross-entropy run saves the inference layout already; it exports as is, only
  the optimiser state staying behind."""
  out = str(tmp_path / 'baseline')
  export.export(workdir=baseline_run.workdir, out=out)
  loaded = inference.load(checkpoint=out)
  assert not loaded.config.dmue.enabled
  chex.assert_trees_all_equal(loaded.variables, baseline_run.states[1].variables)


def test_existing_out_needs_overwrite(exported, tiny_run):
  summary, _ = exported
  with pytest.raises(UserError, match='already exists'):
    export.export(workdir=tiny_run.workdir, out=summary['out'])
  with pytest.raises(UserError, match='is the checkpoint being exported'):
    export.export(checkpoint=summary['out'], out=summary['out'], overwrite=True)
  again = export.export(workdir=tiny_run.workdir, out=summary['out'], overwrite=True)
  assert again['export_bytes'] == pytest.approx(summary['export_bytes'], rel=0.05)


def test_damaged_export_is_a_clear_error(tmp_path, exported):
  summary, _ = exported
  bad = tmp_path / 'bad'
  (bad / 'variables').mkdir(parents=True)
  (bad / 'meta').mkdir()
  with pytest.raises(UserError, match='cannot read checkpoint'):
    inference.load(checkpoint=str(bad))


@pytest.mark.slow
def test_commands_export_then_predict_from_the_export(tiny_run, tmp_path):
  out = str(tmp_path / 'model')
  photo = str(tmp_path / 'astronaut.png')
  cv2.imwrite(photo, cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
  proc = subprocess.run(
      [sys.executable, '-m', 'dmue_jax.export', '--workdir', tiny_run.workdir, '--out', out],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
  assert 'MiB' in proc.stdout and out in proc.stdout
  proc = subprocess.run(
      [sys.executable, '-m', 'dmue_jax.predict', '--checkpoint', out, '--json', photo],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
  (result,) = json.loads(proc.stdout)
  (face,) = result['faces']
  np.testing.assert_allclose(face['box'], (177, 66, 95, 95), atol=4)
  assert list(face['probabilities']) == list(conftest.SYNTHFER_CLASSES)
  assert sum(face['probabilities'].values()) == pytest.approx(1.0, abs=1e-5)
