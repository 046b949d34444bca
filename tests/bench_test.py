"""The benchmark command end to end on the tiny SynthFER config (narrow net, 32 px)."""

import json
import math
import os

from dmue_jax import bench

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'default.py')

REQUIRED = (
    'train_images_per_second', 'plain_backbone_train_images_per_second',
    'inference_images_per_second', 'plain_backbone_inference_images_per_second',
    'inference_overhead_vs_plain_backbone', 'flops_per_step', 'achieved_gflops',
    'vmap_images_per_second', 'loop_images_per_second', 'input_pipeline_images_per_second',
    'plain_backbone_flops_per_step', 'reference_subset_flops_per_step',
    'flops_ratio_vs_reference_subsets')


def test_json_line_has_every_measurement(capsys):
  # --skip-vmap: compiling the second branch mode would double the test's time; the tiny
  # config's own mode is timed and reported under its key.
  results = bench.main(['bench', f'--config={CONFIG}:tiny', '--steps=1', '--pipeline-steps=1',
                        '--json', '--fast-compile', '--skip-vmap'])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  parsed = json.loads(last)
  mode = parsed['branch_mode']
  skipped = {'vmap': 'loop', 'loop': 'vmap'}[mode]
  assert parsed[f'{skipped}_images_per_second'] is None
  assert parsed[f'{mode}_images_per_second'] == parsed['train_images_per_second']
  for key in REQUIRED:
    if key == f'{skipped}_images_per_second':
      continue
    value = parsed[key]
    assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
  assert isinstance(parsed['device'], str) and parsed['device']
  assert isinstance(parsed['jax_version'], str) and parsed['jax_version']
  # The step does the reference's work plus a little (heads, neck, losses, metrics).
  assert 1.0 < parsed['flops_ratio_vs_reference_subsets'] < 1.5
  assert parsed['flops_per_step'] > parsed['plain_backbone_flops_per_step']
  assert parsed == results  # what was printed is what main returns
