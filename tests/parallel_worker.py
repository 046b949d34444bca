"""Runs a few DMUE train steps on fixed synthetic global batches and saves losses and params.

Used by parallel_test.py in subprocesses: with 1 device, with 4 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4) and as each of two jax.distributed
processes (DMUE_COORDINATOR / DMUE_NUM_PROCESSES / DMUE_PROCESS_ID).

  python tests/parallel_worker.py OUT.npz NUM_STEPS
"""

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


def main(out, num_steps, kernels='auto'):
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
  parallel.initialize_distributed(config.parallel)
  mesh = parallel.make_mesh()
  parallel.check_divisible(K, config.input.eval_batch_size)
  state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=1)
  state = jax.device_put(state, parallel.state_sharding(state, mesh))
  p_train, _ = train.make_jitted_steps(config, mesh, steps_per_epoch=1)
  share = K // jax.process_count()
  cols = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
  losses = []
  for step in range(num_steps):
    full = global_batch_numpy(step)
    local = {name: v[:, cols] for name, v in full.items()}
    batch = parallel.global_batch(local, parallel.train_batch_sharding(mesh), 1)
    state, metrics = p_train(state, batch, jax.random.key(1))
    losses.append([float(metrics[n]) for n in ('train_loss', 'loss_ce', 'loss_soft',
                                               'loss_sp', 'loss_aux')])
  params = jax.tree.map(parallel.to_host, state.params)
  stats = jax.tree.map(parallel.to_host, state.batch_stats)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path({'params': params,
                                                             'batch_stats': stats})}
    np.savez(out, losses=np.asarray(losses), devices=jax.device_count(), **flat)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
