"""Data parallelism divides the work: on 4 CPU devices each device's train step computes about
a quarter of the one-device step, and only statistics, per-sample vectors and parameters cross
devices (never a feature map or the image batch). Checked on the compiled program."""

import json
import os
import subprocess
import sys

import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, K, N, SIZE = 7, 4, 4, 32


def compiled_facts(cases):
  """sharding_worker's facts for each (branch mode, kernels, method), from one process."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=conftest.xla_flags(N))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'sharding_worker.py'),
                         *(':'.join(case) for case in cases)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(cases):]]


def assert_divided(facts, feature_dims):
  assert facts['devices'] == N
  # The optimiser update is split too (parallel.state_sharding); what stays whole on every
  # device is the DMUE statistics over the gathered per-sample vectors.
  assert facts['flops'] <= 0.3 * facts['one_flops'], facts['flops'] / facts['one_flops']
  assert not facts['one_collectives']
  # Every convolution runs on this device's C*K/N rows, never on the global C*K (trunk, target
  # branch) or (C-1)*K (an auxiliary branch).
  leading = {shape[0] for shape in facts['convolutions']}
  assert C * K // N in leading and not leading & {C * K, (C - 1) * K}, leading
  assert C * K in {shape[0] for shape in facts['one_convolutions']}
  params = {tuple(shape) for shape in facts['param_shapes']}
  gathered = [shapes for op, shapes in facts['collectives'] if op == 'all-gather']
  assert gathered
  for shapes in gathered:
    for _, dims in shapes:
      if tuple(dims) in params:
        continue  # the updated parameters, gathered from their 1/N updates
      # Otherwise per-sample vectors ([C, k, P] or [C, C-1, k, P]), no map, no image.
      assert len(dims) <= 4 and dims[-1] in feature_dims and SIZE not in dims, dims
  for op, shapes in facts['collectives']:
    assert op in ('all-gather', 'all-reduce'), op


# Feature dimensions a gathered per-sample vector may have: pooled features (D = 128 on the
# tiny config) and logits (C, C-1) for DMUE, logits for the baseline.
CASES = {
    # The two pairings 'auto' gives: vmap with XLA's layers (GPU, TPU), the loop with the CPU
    # set.
    ('vmap', 'xla', 'dmue'): {128, C, C - 1},
    ('loop', 'cpu', 'dmue'): {128, C, C - 1},
    ('loop', 'xla', 'baseline'): {C},
}


@pytest.mark.slow
def test_each_device_computes_its_share_of_the_dmue_and_baseline_steps():
  for case, facts in zip(CASES, compiled_facts(list(CASES))):
    try:
      assert_divided(facts, CASES[case])
    except AssertionError as e:
      raise AssertionError(f'{":".join(case)}: {e}') from e
