"""Compiles the tiny config's train step on 1 and on all (fake CPU) devices and prints, as one
JSON line per case, what each device computes: XLA's FLOPs and the collectives with their
shapes. A case is BRANCH_MODE:KERNELS:METHOD (METHOD dmue or baseline); one process compiles
them all.

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python tests/sharding_worker.py vmap:xla:dmue loop:cpu:dmue
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from dmue_jax import parallel
from dmue_jax import train

K = 4
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
# `%name = f32[7,4,128]{...} all-gather(` or a tuple of such shapes.
_OP = re.compile(r'=\s*(\(?[^=]*?\)?)\s+(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')
_CONV = re.compile(r'=\s*(\w+)\[([\d,]*)\]\S*\s+convolution\(')


def compiled_step(config, mesh):
  spe = 3
  state = train.state_shape(config, spe)
  shardings = parallel.state_sharding(state, mesh)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       state, shardings)
  c, size = config.model.num_classes, config.input.image_size
  batch_sharding = parallel.train_batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((c, K, size, size, 3), jnp.uint8,
                                         sharding=batch_sharding),
           'erase': jax.ShapeDtypeStruct((c, K, 4), jnp.int32, sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((c, K), jnp.int32, sharding=batch_sharding)}
  p_train, _ = train.make_jitted_steps(config, mesh, spe)
  return p_train.lower(state, batch, jax.random.key(1)).compile()


def collectives(hlo: str) -> list:
  """[(op, [[dtype, [dims]], ...])] for every collective of the compiled module."""
  found = []
  for line in hlo.splitlines():
    match = _OP.search(line)
    if match:
      shapes = [[t, [int(d) for d in dims.split(',') if d]]
                for t, dims in _SHAPE.findall(match.group(1))]
      found.append([match.group(2), shapes])
  return found


def convolutions(hlo: str) -> list:
  """The output shape of every convolution of the compiled module."""
  return [[int(d) for d in m.group(2).split(',') if d]
          for m in map(_CONV.search, hlo.splitlines()) if m]


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost['flops'])


def main(mode, kernels, method):
  config = default.get_config('tiny')
  config.model.branch_mode = mode
  config.model.kernels = kernels
  config.input.batch_per_class = K
  config.dmue.enabled = method == 'dmue'
  devices = np.array(jax.devices())
  one = compiled_step(config, jax.sharding.Mesh(devices[:1], (parallel.AXIS,)))
  many = compiled_step(config, parallel.make_mesh())
  print(json.dumps({'devices': len(devices), 'one_flops': flops(one),
                    'flops': flops(many), 'collectives': collectives(many.as_text()),
                    'one_collectives': collectives(one.as_text()),
                    'convolutions': convolutions(many.as_text()),
                    'one_convolutions': convolutions(one.as_text()),
                    'param_shapes': sorted({tuple(x.shape) for x in jax.tree.leaves(
                        train.state_shape(config, 3).variables)})}))


if __name__ == '__main__':
  for case in sys.argv[1:]:
    main(*case.split(':'))
