"""Device mesh, multi-process start-up and global arrays for data-parallel training.

One jitted step runs over a 1-D mesh with axis 'data'. Training batches [C, k, H, W, 3] are
sharded along k (each device holds k/N samples of *every* class); the train state is
replicated. Because the step is one global jit program (no pmap, no per-device code), XLA
inserts the collectives: BatchNorm statistics, the class-similarity means and the Gram matrices
are over the global batch, so N devices compute what one device computes (unlike the
reference's DataParallel, README quirk Q6).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dmue_jax.config_lib import ConfigError

# The mesh's one axis: the data-parallel devices.
AXIS = 'data'


def initialize_distributed(parallel_config) -> None:
  """Starts jax.distributed when several processes are asked for (config or environment).

  Fields (config.parallel): coordinator_address ('host:port'), num_processes, process_id.
  The environment variables DMUE_COORDINATOR, DMUE_NUM_PROCESSES, DMUE_PROCESS_ID override
  them. On TPU pods with nothing set, JAX finds the peers itself (`jax.distributed.initialize()`
  without arguments) when DMUE_AUTO_DISTRIBUTED=1.
  """
  if jax.distributed.is_initialized():  # the command already did (before its first JAX call)
    return
  address = os.environ.get('DMUE_COORDINATOR', parallel_config.coordinator_address)
  count = int(os.environ.get('DMUE_NUM_PROCESSES', parallel_config.num_processes))
  pid = int(os.environ.get('DMUE_PROCESS_ID', parallel_config.process_id))
  if os.environ.get('DMUE_AUTO_DISTRIBUTED') == '1':
    jax.distributed.initialize()
  elif count > 1:
    if not address:
      raise ConfigError('config.parallel.num_processes > 1 needs '
                       'config.parallel.coordinator_address (host:port of process 0).')
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=pid)


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Arrays smaller than this stay whole on every device in the optimiser update.
MIN_SPLIT_SIZE = 4096


def split_sharding(x, mesh) -> NamedSharding:
  """Where one device updates 1/N of a parameter: its last axis that N divides, for arrays of
  at least MIN_SPLIT_SIZE entries; replicated otherwise."""
  n = mesh.size
  if n > 1 and x.size >= MIN_SPLIT_SIZE:
    for axis in reversed(range(len(x.shape))):
      if x.shape[axis] % n == 0:
        spec = [None] * len(x.shape)
        spec[axis] = AXIS
        return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def update_sharding(tree, mesh):
  """`split_sharding` of every array of `tree` (parameters, gradients, optimiser moments)."""
  return jax.tree.map(lambda x: split_sharding(x, mesh), tree)


def state_sharding(state, mesh):
  """The train state's placement: parameters and BatchNorm statistics replicated (every device
  runs the whole network), the optimiser's moments split (`update_sharding`): each device keeps
  and updates 1/N of them, and the new parameters are gathered once per step."""
  repl = replicated(mesh)
  return state.replace(step=repl, params=jax.tree.map(lambda _: repl, state.params),
                       batch_stats=jax.tree.map(lambda _: repl, state.batch_stats),
                       opt_state=update_sharding(state.opt_state, mesh))


def train_batch_sharding(mesh) -> NamedSharding:
  """[C, k, ...]: the per-class axis k split over devices."""
  return NamedSharding(mesh, P(None, AXIS))


def eval_batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def check_divisible(batch_per_class: int, eval_batch_size: int) -> None:
  """A clear config error when a batch cannot be split evenly over the devices."""
  n = jax.device_count()
  if batch_per_class % n:
    raise ConfigError(f'config.input.batch_per_class={batch_per_class} cannot be split over '
                     f'{n} devices: use a multiple of {n}.')
  if eval_batch_size % n:
    raise ConfigError(f'config.input.eval_batch_size={eval_batch_size} cannot be split over '
                     f'{n} devices: use a multiple of {n}.')


def global_batch(local: dict, sharding: NamedSharding, axis: int) -> dict:
  """Assembles each process's share (split on `axis`) into global jax.Arrays."""
  count = jax.process_count()

  def make(x):
    x = np.asarray(x)
    shape = list(x.shape)
    shape[axis] *= count
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

  return {name: make(v) for name, v in local.items()}


def prefetch_to_device(batches: Iterable[dict], sharding: NamedSharding, axis: int, *,
                       size: int = 2) -> Iterator[dict]:
  """Yields `global_batch(b, sharding, axis)` for each local batch, keeping `size` more batches
  placed on the devices: their host-to-device copies overlap the steps before them."""
  queue = collections.deque()
  for local in batches:
    queue.append(global_batch(local, sharding, axis))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) global array as one NumPy array on every process."""
  if getattr(x, 'is_fully_replicated', False):
    # Every process already holds all of it: no collective (and no peer to wait for).
    return np.asarray(x.addressable_data(0))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
