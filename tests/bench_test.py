"""The benchmark command end to end on the tiny SynthFER config (narrow net, 32 px), and the
accelerator suite's scaling and pipeline figures (timings faked, and once real on two CPU
devices)."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

import conftest

from configs import default
from dmue_jax import bench
from dmue_jax import config_lib
from dmue_jax import kernels
from dmue_jax.kernels import compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'default.py')

REQUIRED = (
    'train_images_per_second', 'plain_backbone_train_images_per_second',
    'inference_images_per_second', 'plain_backbone_inference_images_per_second',
    'inference_overhead_vs_plain_backbone', 'flops_per_step', 'achieved_gflops',
    'vmap_images_per_second', 'loop_images_per_second', 'input_pipeline_images_per_second',
    'plain_backbone_flops_per_step', 'reference_subset_flops_per_step',
    'flops_ratio_vs_reference_subsets')


@pytest.mark.slow  # compiles the step, the plain step, inference and the pieces
@pytest.mark.slow
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
  # 'auto' settings are reported as what they became on this backend.
  assert parsed['dtype'] == config_lib.resolve_dtype('auto')
  assert parsed['kernels'] == kernels.resolve('auto')
  assert parsed['devices'] == jax.device_count()
  assert parsed[f'{mode}_flops_per_step'] == parsed['flops_per_step']
  assert parsed[f'{skipped}_flops_per_step'] is None
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


def test_dtype_follows_the_config():
  config = default.get_config('tiny')
  assert config.model.dtype == 'auto'
  assert bench.make_setup(config).config.model.dtype == config_lib.resolve_dtype('auto')
  assert bench.make_setup(config, dtype='bfloat16').config.model.dtype == 'bfloat16'


def test_device_counts():
  assert bench.device_counts(1) == [1]
  assert bench.device_counts(3) == [1, 2, 3]
  assert bench.device_counts(4) == [1, 2, 4]
  assert bench.device_counts(6) == [1, 2, 4, 6]
  assert bench.device_counts(8) == [1, 2, 4, 8]
  with pytest.raises(ValueError):
    bench.device_counts(0)


# The suite test's fake machine: 4 local devices, C=7, k=9 per device, a rate per dtype and
# branch mode on one device, and a weak-scaling efficiency per device count.
DEVICES, C, K = 4, 7, 9
BASE = {('float32', 'vmap'): 100.0, ('float32', 'loop'): 80.0,
        ('bfloat16', 'vmap'): 200.0, ('bfloat16', 'loop'): 150.0}
EFFICIENCY = {1: 1.0, 2: 0.9, 4: 0.75}
FLOPS = 1e12  # one device's share of a step
PIPELINE = 500.0


def fake_rate(dtype, mode, n):
  return BASE[dtype, mode] * n * EFFICIENCY[n]


def test_accelerator_suite(monkeypatch, capsys):
  runs, timed = [], []

  def fake_run(config, **kwargs):
    runs.append(kwargs)
    dtype = kwargs['dtype']
    return {'dtype': dtype, 'num_classes': C, 'batch_per_class': K * DEVICES,
            'devices': DEVICES, 'kernels': 'xla',
            'train_images_per_second': fake_rate(dtype, 'vmap', DEVICES),
            **{f'{m}_images_per_second': fake_rate(dtype, m, DEVICES) for m in bench.SUITE_MODES},
            **{f'{m}_flops_per_step': FLOPS for m in bench.SUITE_MODES},
            'input_pipeline_images_per_second': PIPELINE if kwargs['pipeline_steps'] else None}

  def fake_time(config, *, devices, image_size, batch_per_class, dtype, modes, steps,
                fast_compile=False):
    timed.append((dtype, devices, tuple(modes), image_size, batch_per_class, steps))
    b = C * batch_per_class * devices
    return [bench.scaling_entry(dtype=dtype, branch_mode=m, devices=devices, kernels='xla',
                                batch_size=b, step_seconds=b / fake_rate(dtype, m, devices),
                                flops_per_step=FLOPS) for m in modes]

  monkeypatch.setattr(bench, 'run', fake_run)
  monkeypatch.setattr(bench, 'time_train_steps', fake_time)
  monkeypatch.setattr(bench, '_num_local_devices', lambda: DEVICES)
  monkeypatch.setattr(bench, 'format_table', lambda r: f'table {r["dtype"]}')
  results = bench.main(['bench', f'--config={CONFIG}', '--suite=accelerator', '--json',
                        '--steps=2', '--dtype=float32', '--peak-tflops=2'])

  # Full runs: float32 then bfloat16, both branch modes, k per device; the pipeline once.
  assert [(r['dtype'], r['skip_vmap'], r['image_size'], r['batch_per_class'], r['steps'],
           r['pipeline_steps'] > 0) for r in runs] == [
               ('float32', False, 224, K * jax.device_count(), 2, True),
               ('bfloat16', False, 224, K * jax.device_count(), 2, False)]
  assert results['bfloat16_speedup'] == 2.0
  # Scaling: 1 and 2 devices timed (both modes together); 4 = all, reused from the full runs.
  assert timed == [(d, n, ('vmap', 'loop'), 224, K, 2)
                   for d in ('float32', 'bfloat16') for n in (1, 2)]
  points = [(e['dtype'], e['branch_mode'], e['devices']) for e in results['scaling']]
  assert points == [(d, m, n) for d in ('float32', 'bfloat16') for m in ('vmap', 'loop')
                    for n in (1, 2, 4)]
  for e in results['scaling']:
    n = e['devices']
    rate = fake_rate(e['dtype'], e['branch_mode'], n)
    assert math.isclose(e['images_per_second'], rate)
    assert math.isclose(e['per_device_images_per_second'], rate / n)
    assert math.isclose(e['scaling_efficiency'], EFFICIENCY[n])
    # One device's FLOPs per second against one device's 2 TFLOP/s.
    assert math.isclose(e['fraction_of_peak'], FLOPS / e['step_seconds'] / 2e12)
    assert e['kernels'] == 'xla'
  # The fastest step on all 4 devices is bfloat16/vmap at 600 img/s; the pipeline gives 500.
  assert results['fastest_step'] == {'dtype': 'bfloat16', 'branch_mode': 'vmap',
                                     'devices': 4, 'images_per_second': 600.0}
  assert results['pipeline_images_per_second'] == PIPELINE
  assert math.isclose(results['pipeline_to_step_ratio'], PIPELINE / 600.0)
  assert results['bound_by'] == 'input pipeline'
  assert results['num_local_devices'] == DEVICES
  assert results['device_kind'] == jax.devices()[0].device_kind
  assert results['kernels'] == {'float32': 'xla', 'bfloat16': 'xla'}

  out = capsys.readouterr().out.strip().splitlines()
  assert out[:2] == ['table float32', 'table bfloat16']
  assert json.loads(out[-1]) == results
  table = '\n'.join(out[:-1])
  for e in results['scaling']:
    row = (f'{e["dtype"]:10}{e["branch_mode"]:6}{e["devices"]:8d}{"xla":>8}'
           f'{e["images_per_second"]:11.1f}{e["per_device_images_per_second"]:11.1f}'
           f'{e["scaling_efficiency"]:11.3f}{e["fraction_of_peak"]:9.1%}')
    assert row in table, row
  assert 'pipeline/step = 0.83, the input pipeline bounds training' in table


def test_scaling_figures_without_peak_or_one_device_point():
  entries = [bench.scaling_entry(dtype='float32', branch_mode='vmap', devices=2, kernels='cpu',
                                 batch_size=28, step_seconds=0.5, flops_per_step=1e9)]
  bench.add_scaling_figures(entries)  # this machine's CPU: peak unknown
  assert entries[0]['scaling_efficiency'] is None and entries[0]['fraction_of_peak'] is None
  assert entries[0]['per_device_images_per_second'] == 28.0
  keeps_up = bench.pipeline_vs_step(100.0, entries, 2)
  assert keeps_up['pipeline_to_step_ratio'] == 100.0 / 56.0
  assert keeps_up['bound_by'] == 'train step'
  assert bench.pipeline_vs_step(None, entries, 2)['bound_by'] is None


@pytest.mark.slow
def test_weak_scaling_on_two_cpu_devices():
  # A real run: the tiny config's step compiled and timed on meshes of 1 and 2 (fake) devices.
  script = (
      'import json\n'
      'from configs import default\n'
      'from dmue_jax import bench\n'
      "entries = bench.measure_scaling(default.get_config('tiny'), image_size=32, "
      "batch_per_class=2, steps=1, dtypes=('float32',), modes=('vmap',), fast_compile=True)\n"
      'print(json.dumps(bench.add_scaling_figures(entries)))\n')
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=conftest.xla_flags(2))
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  entries = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [e['devices'] for e in entries] == [1, 2]
  assert [e['batch_size'] for e in entries] == [7 * 2, 7 * 4]  # k = 2 per device
  for e in entries:
    assert e['images_per_second'] > 0 and e['per_device_images_per_second'] > 0, e
    assert e['scaling_efficiency'] > 0 and e['fraction_of_peak'] is None
    assert e['flops_per_step'] > 0 and e['kernels'] == 'cpu'
  assert entries[0]['scaling_efficiency'] == 1.0
