"""Runs a few DMUE train steps on fixed synthetic global batches, on meshes of 1 and of more
(fake CPU) devices in one process, and saves each mesh's losses and variables.

Used by parallel_test.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4:

  python tests/parallel_worker.py OUT_DIR NUM_STEPS KERNELS 1 4    # writes OUT_DIR/{1,4}.npz
"""

import os
import sys

import jax
import numpy as np

from configs import default
from dmue_jax import parallel
from dmue_jax import train

C, K, SIZE = 7, 4, 32


def global_batch_numpy(step):
  rng = np.random.default_rng(100 + step)
  images = rng.normal(size=(C, K, SIZE, SIZE, 3)).astype(np.float32)
  labels = np.repeat(np.arange(C), K).reshape(C, K).astype(np.int32)
  return {'image': images, 'label': labels}


def train_on(config, devices: int, num_steps: int) -> dict:
  """{'losses', 'devices', keystr of each variable: array} after num_steps on `devices`."""
  mesh = jax.make_mesh((devices,), (parallel.AXIS,), devices=jax.devices()[:devices],
                       axis_types=(jax.sharding.AxisType.Auto,))
  state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=1)
  state = jax.device_put(state, parallel.state_sharding(state, mesh))
  p_train, _ = train.make_jitted_steps(config, mesh, steps_per_epoch=1)
  losses = []
  for step in range(num_steps):
    batch = parallel.global_batch(global_batch_numpy(step), parallel.train_batch_sharding(mesh),
                                  1)
    state, metrics = p_train(state, batch, jax.random.key(1))
    losses.append([float(metrics[n]) for n in ('train_loss', 'loss_ce', 'loss_soft',
                                               'loss_sp', 'loss_aux')])
  return {'losses': np.asarray(losses), 'devices': devices, **flat_variables(state)}


def flat_variables(state) -> dict:
  """{keystr of each parameter and BatchNorm statistic: its value on the host}."""
  variables = jax.tree.map(parallel.to_host, state.variables)
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(variables)}


def main(out_dir, num_steps, kernels, device_counts):
  config = default.get_config('tiny')
  config.model.kernels = kernels
  config.input.batch_per_class = K
  config.input.image_size = SIZE
  config.dmue.ramp_a = 0.5  # all loss terms active from the second step
  # Adam with eps 1e-8 moves an entry whose gradient is ~0 by about +-lr, whichever sign the
  # float32 rounding gives it, so two correct reduction orders can end lr apart. A large eps
  # makes the update linear in small gradients: rounding noise then stays at noise level and
  # the parameters can be compared tightly.
  config.optim.eps = 1e-2
  for devices in device_counts:
    np.savez(os.path.join(out_dir, f'{devices}.npz'), **train_on(config, devices, num_steps))


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3], [int(n) for n in sys.argv[4:]])
