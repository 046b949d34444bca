"""The benchmark command end to end on the tiny SynthFER config (narrow net, 32 px)."""

import json
import math
import os

import jax

from dmue_jax import bench
from dmue_jax import compiler

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'default.py')

REQUIRED = (
    'train_images_per_second', 'plain_backbone_train_images_per_second',
    'inference_images_per_second', 'plain_backbone_inference_images_per_second',
    'inference_overhead_vs_plain_backbone', 'flops_per_step', 'achieved_gflops',
    'vmap_images_per_second', 'loop_images_per_second', 'input_pipeline_images_per_second',
    'plain_backbone_flops_per_step', 'reference_subset_flops_per_step',
    'flops_ratio_vs_reference_subsets')


def test_json_line_has_every_measurement(capsys, monkeypatch):
  calls = []
  original = bench._interleaved_medians  # pylint: disable=protected-access

  def spy(fns, steps):
    calls.append((sorted(fns), steps))
    return original(fns, steps)

  monkeypatch.setattr(bench, '_interleaved_medians', spy)
  # --skip-vmap: compiling the second branch mode would double the test's time; the tiny
  # config's own mode is timed and reported under its key.
  results = bench.main(['bench', f'--config={CONFIG}:tiny', '--steps=1', '--pipeline-steps=1',
                        '--json', '--fast-compile', '--skip-vmap', '--peak-tflops=2'])
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
  # The train steps get --steps timed calls; the short inference calls at least 40 each.
  assert (['dmue', 'plain'], 40) in calls
  assert all(steps == 1 for names, steps in calls if names != ['dmue', 'plain'])
  # --fast-compile adds its option to the library's own.
  assert parsed['compiler_options'] == {**(compiler.options() or {}),
                                        'xla_backend_optimization_level': 0}
  assert isinstance(parsed['jax_version'], str) and parsed['jax_version']
  # The step does the reference's work plus a little (heads, neck, losses, metrics).
  assert 1.0 < parsed['flops_ratio_vs_reference_subsets'] < 1.5
  assert parsed['flops_per_step'] > parsed['plain_backbone_flops_per_step']
  assert parsed == results  # what was printed is what main returns
  # One device's 2 TFLOP/s, times the devices.
  assert parsed['peak_gflops'] == 2000.0 * jax.device_count()
  assert math.isclose(parsed['fraction_of_peak'], parsed['achieved_gflops'] / parsed['peak_gflops'])


def test_peak_table():
  assert bench.peak_tflops('NVIDIA H200', 'bfloat16') == 989.0
  assert bench.peak_tflops('NVIDIA H100 PCIe', 'float32') == 378.0  # before the SXM entry
  assert bench.peak_tflops('NVIDIA H100 80GB HBM3', 'float32') == 494.7
  assert bench.peak_tflops('TPU v5 lite', 'float32') == 197.0
  assert bench.peak_tflops('Tesla V100-SXM2-16GB', 'bfloat16') is None
  assert bench.peak_tflops('cpu', 'float32') is None
  results = {'dtype': 'float32', 'achieved_gflops': 10.0}
  bench.add_peak_fraction(results)  # this machine's CPU: unknown
  assert results['peak_gflops'] is None and results['fraction_of_peak'] is None


def test_accelerator_suite_runs_float32_with_both_modes_then_bfloat16(monkeypatch, capsys):
  calls = []

  def fake_run(config, **kwargs):
    calls.append(kwargs)
    rate = {'float32': 100.0, 'bfloat16': 150.0}[kwargs['dtype']]
    return {'train_images_per_second': rate, 'dtype': kwargs['dtype']}

  monkeypatch.setattr(bench, 'run', fake_run)
  monkeypatch.setattr(bench, 'format_table', lambda r: f'table {r["dtype"]}')
  results = bench.main(['bench', f'--config={CONFIG}', '--suite=accelerator', '--json',
                        '--steps=2', '--dtype=float32'])
  assert [(c['dtype'], c['skip_vmap'], c['image_size'], c['batch_per_class'], c['steps'])
          for c in calls] == [('float32', False, 224, 9, 2), ('bfloat16', True, 224, 9, 2)]
  assert results['bfloat16_speedup'] == 1.5
  out = capsys.readouterr().out.strip().splitlines()
  assert out[:2] == ['table float32', 'table bfloat16']
  assert json.loads(out[-1]) == results
