"""Training from scratch learns: on a small generated folder dataset, `init_from=scratch`
switches to the from-scratch settings, and DMUE ends well above chance (README, Reproduce the
paper)."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('vertical', 'horizontal', 'diagonal')


def pattern(cls: int, rng) -> np.ndarray:
  """A 40x40 noisy grey image with stripes whose direction is the class."""
  y, x = np.mgrid[0:40, 0:40]
  phase = rng.uniform(0, 2 * np.pi)
  coord = (x, y, (x + y) / np.sqrt(2))[cls]
  stripes = 0.5 + 0.5 * np.sin(coord * 2 * np.pi / 8 + phase)
  image = 60 + 120 * stripes + rng.normal(0, 25, (40, 40))
  return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def write_dataset(root, per_class):
  rng = np.random.default_rng(0)
  for split, count in per_class.items():
    for cls, name in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(count):
        cv2.imwrite(os.path.join(root, split, name, f'{i}.png'), pattern(cls, rng))
  return str(root)


@pytest.mark.slow
def test_scratch_dmue_run_learns(tmp_path):
  data = write_dataset(tmp_path / 'data', {'train': 48, 'test': 20})
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'dmue_jax.main', '--config', 'configs/folder.py',
         '--workdir', str(workdir), f'--config.input.data_dir={data}',
         f'--config.input.cache_dir={tmp_path / "tfds"}', '--config.model.init_from=scratch',
         '--config.model.backbone=resnet10_narrow', '--config.input.image_size=32',
         '--config.input.resize_size=36', '--config.input.batch_per_class=4',
         '--config.num_epochs=4', '--config.progress_bar=False',
         '--config.analyze_at_end=False']
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Training from scratch: dmue.gamma' in proc.stderr
  results = json.loads((workdir / 'results.json').read_text())
  # Chance is 1/3.
  assert results['eval_accuracy'] >= 0.6, results['eval_accuracy']
