r"""Throughput and FLOP benchmark: the DMUE train step against the plain backbone.

  python -m dmue_jax.bench --config configs/rafdb.py --image-size 112 --batch-per-class 10
  python -m dmue_jax.bench --config configs/rafdb.py --image-size 112 --json   # last line JSON
  python -m dmue_jax.bench --config configs/affectnet.py --suite accelerator --json  # GPU/TPU

Synthetic in-memory batches with the config's model settings; each figure is the median of
`--steps` calls after compilation and a warm-up, each ended by `block_until_ready`. It times the
training loop's jitted DMUE step against a plain backbone step, inference of the exported model
against the plain backbone, vmap against loop branches and the input pipeline, and counts XLA's
FLOPs, also of the part of the step the authors' PyTorch code computes. Compared figures run
interleaved, call by call, so that load from other processes hits both sides alike; inference
gets at least 40 calls a side, since its two sides are one network and their ratio is timing
noise that more calls narrow. `--suite accelerator` checks a GPU/TPU host in one command. What
each figure and JSON key means: docs/performance.md, "The benchmark command".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from dmue_jax import cli
from dmue_jax import config_lib
from dmue_jax import input_pipeline
from dmue_jax import kernels
from dmue_jax import parallel
from dmue_jax import train
from dmue_jax.kernels import compiler
from dmue_jax.models import dmue as dmue_model
from dmue_jax.models import resnet

# The benchmark never reaches an epoch boundary; only the schedules' first rates are used.
_STEPS_PER_EPOCH = 1000
# Source images for the pipeline measurement: RAF-DB's aligned faces are 100x100.
_PIPELINE_IMAGE_SIZE = 100
# Inference calls are short: at least this many per side (see the module docstring).
_MIN_INFERENCE_CALLS = 40

# Dense (no sparsity) per-chip peaks in TFLOP/s, from the vendors' data sheets, for the rate a
# step's matmuls and convolutions can reach: (bfloat16, float32 as XLA runs it). XLA's default
# precision runs float32 convolutions and matmuls as TF32 on NVIDIA tensor cores (Ampere and
# later) and as bfloat16 passes on TPUs, so those are the float32 peaks given; chips without
# such units get their plain FP32 peak. Matched in order on the device kind; --peak-tflops
# overrides.
_PEAK_TFLOPS = (
    ('H100 PCIe', (756.0, 378.0)),
    ('H100', (989.0, 494.7)),        # SXM
    ('H200', (989.0, 494.7)),
    ('GH200', (989.0, 494.7)),
    ('A100', (312.0, 156.0)),
    ('L40S', (362.0, 183.0)),
    ('L4', (121.0, 60.0)),
    ('A10', (125.0, 62.5)),
    ('V100', (None, 15.7)),          # no bfloat16 units: the bfloat16 peak is unknown
    ('T4', (None, 8.1)),
    ('TPU v6', (918.0, 918.0)),
    ('TPU v5 lite', (197.0, 197.0)),
    ('TPU v5e', (197.0, 197.0)),
    ('TPU v5p', (459.0, 459.0)),
    ('TPU v5', (459.0, 459.0)),
    ('TPU v4', (275.0, 275.0)),
    ('TPU v3', (123.0, 123.0)),
)


def _define_flags(fv: flags.FlagValues) -> None:
  """The command's flags, on a private FlagValues so that `main` can be called (and tested)
  without clashing with other commands' global flags."""
  config_flags.DEFINE_config_file('config', None, 'Run configuration; its model settings and '
                                  'augmentation are benchmarked.', flag_values=fv,
                                  lock_config=True)
  flags.DEFINE_integer('image-size', None, 'Crop size S (default: the config\'s); the resize '
                       'size is scaled with it.', flag_values=fv)
  flags.DEFINE_integer('batch-per-class', None, "k, samples per class (default: the config's; "
                       'with --suite, per device and 9).', flag_values=fv)
  flags.DEFINE_integer('steps', 3, 'Timed calls per measurement; the median is reported.',
                       flag_values=fv)
  flags.DEFINE_integer('pipeline-steps', 10, 'Batches for the input-pipeline measurement.',
                       flag_values=fv)
  flags.DEFINE_bool('json', False, 'Print the results as one JSON object on the last line.',
                    flag_values=fv)
  flags.DEFINE_bool('skip-vmap', False, 'Skip the vmap-vs-loop comparison: only the config\'s '
                    'branch mode is timed and the other mode\'s rate is null.', flag_values=fv)
  flags.DEFINE_enum('dtype', None, config_lib.DTYPES, "Compute dtype (default: the config's; "
                    "'auto' = bfloat16 on GPU/TPU, float32 on CPU); parameters stay float32.",
                    flag_values=fv)
  flags.DEFINE_bool('profile', False, 'Also time the reference-subset pieces one by one.',
                    flag_values=fv)
  flags.DEFINE_float('peak-tflops', None, 'Peak TFLOP/s of one device for the benchmarked dtype '
                     '(default: a table of common GPUs and TPUs; unknown on CPUs).',
                     flag_values=fv)
  flags.DEFINE_enum('suite', None, ['accelerator'], "'accelerator': the GPU/TPU check of the "
                    'README: the config at 224 px and k=9 per device (unless given), full runs in '
                    'float32 and bfloat16 with both branch modes, weak scaling over 1, 2, 4, ... '
                    'local devices, and the input pipeline against the step; the JSON line holds '
                    "the runs under 'float32' and 'bfloat16', and 'scaling'.", flag_values=fv)
  flags.DEFINE_bool('fast-compile', False, 'Compile without LLVM optimisation: for smoke tests '
                    'only (FLOP counts stay exact, timings are not representative).',
                    flag_values=fv)


# ------------------------------------------------------------------ timing and FLOPs
def _note(message: str) -> None:
  """Progress on stderr (compiles take minutes on a CPU); stdout keeps the results only."""
  print(f'[bench {time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def _flops(compiled) -> float:
  """XLA's FLOP count of a compiled program (cost_analysis is a dict, or a one-element list in
  older JAX)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost.get('flops', math.nan)) if cost else math.nan


class _Stepper:
  """A compiled step that threads its (donated) state: each call replaces the state."""

  def __init__(self, compiled, state, *args):
    self.compiled, self.state, self.args = compiled, state, args

  def __call__(self):
    self.state, out = self.compiled(self.state, *self.args)
    return self.state, out


def _interleaved_medians(calls: dict[str, Callable[[], Any]], steps: int) -> dict[str, float]:
  """Median seconds per call of each function, timed round-robin after one warm-up each.

  Round-robin rather than one after the other: on a shared CPU the load drifts over minutes,
  and interleaving spreads that drift evenly over the measurements being compared.
  """
  for fn in calls.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in calls}
  for _ in range(steps):
    for name, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """One device's peak TFLOP/s for `dtype` from `_PEAK_TFLOPS`; None when not known."""
  for name, (bf16, fp32) in _PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return None


# ------------------------------------------------------------------ what is benchmarked
@dataclasses.dataclass
class Setup:
  """The benchmarked configuration and one synthetic batch, on the device mesh."""
  config: Any
  num_classes: int
  batch_per_class: int
  image_size: int
  mesh: Any
  batch: dict          # {'image': [C, k, S, S, 3], 'label': [C, k]}, sharded like training
  flat_images: Any     # [B, S, S, 3]
  flat_labels: Any     # [B]
  compiler_options: dict | None = None

  @property
  def batch_size(self) -> int:
    return self.num_classes * self.batch_per_class

  def compile(self, jitted, *args):
    """Ahead-of-time compile: the executable that is timed is the one whose FLOPs are counted."""
    return jitted.lower(*args).compile(
        compiler_options=compiler.merged(self.compiler_options))


def make_setup(config, *, image_size=None, batch_per_class=None, dtype=None,
               fast_compile: bool = False, mesh=None) -> Setup:
  """Applies the overrides to a copy of `config`, validates it and builds a random batch on
  `mesh` (default: every device). The dtype is resolved ('auto' -> this backend's), so that
  the plain backbone and the peak table see the one the step runs in."""
  config = config.copy_and_resolve_references()
  if image_size is not None:
    # Keep the config's resize/crop ratio (reference 256/224), so the augmentation is the same.
    ratio = config.input.resize_size / config.input.image_size
    config.input.image_size = image_size
    config.input.resize_size = int(round(image_size * ratio))
  if batch_per_class is not None:
    config.input.batch_per_class = batch_per_class
  config.model.dtype = config_lib.resolve_dtype(dtype or config.model.dtype)
  config.dmue.enabled = True
  config_lib.validate(config, for_training=False)
  c, k, s = config.model.num_classes, config.input.batch_per_class, config.input.image_size
  mesh = mesh if mesh is not None else parallel.make_mesh()
  if k % mesh.size:  # the grouped batch splits on k (and so the flat one on B = C*k)
    raise config_lib.ConfigError(f'batch_per_class={k} cannot be split over {mesh.size} '
                                 f'devices: use a multiple of {mesh.size}.')
  rng = np.random.default_rng(0)
  images = rng.standard_normal((c, k, s, s, 3), dtype=np.float32)
  labels = np.repeat(np.arange(c, dtype=np.int32)[:, None], k, axis=1)
  batch = jax.device_put({'image': images, 'label': labels}, parallel.train_batch_sharding(mesh))
  flat = jax.device_put(images.reshape((c * k, s, s, 3)), parallel.eval_batch_sharding(mesh))
  flat_labels = jax.device_put(labels.reshape(-1), parallel.eval_batch_sharding(mesh))
  # The backend (LLVM) level only: fusion, and so the FLOP count, is decided before it.
  options = {'xla_backend_optimization_level': 0} if fast_compile else None
  return Setup(config, c, k, s, mesh, batch, flat, flat_labels, options)


def with_branch_mode(config, mode: str):
  config = config.copy_and_resolve_references()
  config.model.branch_mode = mode
  return config


def resolved_branch_mode(config) -> str:
  return train.make_model(config).branch_mode


def random_variables(shapes, seed: int = 0):
  """Fills a tree of shapes with plausible values from NumPy: kernels He-normal, BatchNorm
  scales and variances 1, PReLU slopes 0.25, everything else 0.

  Timings and FLOPs do not depend on the values, and compiling Flax's init (threefry for every
  parameter) takes longer than the step being measured on a small CPU.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      # Stacked kernels (branches [C+1, h, w, i, o], aux heads [C, D, C-1]) have one more axis.
      stacked = leaf.ndim in (3, 5)
      fan_in = math.prod(leaf.shape[1 if stacked else 0:-1])
      value = rng.standard_normal(leaf.shape, dtype=np.float32) * np.sqrt(2.0 / fan_in)
    elif name in ('scale', 'var'):
      value = np.ones(leaf.shape, np.float32)
    elif name == 'alpha':
      value = np.full(leaf.shape, 0.25, np.float32)
    else:
      value = np.zeros(leaf.shape, np.float32)
    return jnp.asarray(value.astype(leaf.dtype))

  return jax.tree_util.tree_map_with_path(fill, shapes)


def dmue_train_step(setup: Setup, config) -> tuple[_Stepper, float]:
  """The training loop's jitted DMUE step, compiled once: (stepper, XLA FLOPs per step)."""
  shapes = jax.eval_shape(lambda key: train.init_variables(config, key), jax.random.key(0))
  state = train.create_train_state(config, jax.random.key(0), _STEPS_PER_EPOCH,
                                   variables=random_variables(shapes))
  state = jax.device_put(state, parallel.state_sharding(state, setup.mesh))
  p_train, _ = train.make_jitted_steps(config, setup.mesh, _STEPS_PER_EPOCH)
  rng = jax.random.key(1)
  compiled = setup.compile(p_train, state, setup.batch, rng)
  return _Stepper(compiled, state, setup.batch, rng), _flops(compiled)


def plain_model(config) -> resnet.PlainResNet:
  """The plain backbone with the DMUE model's kernels and dtype, so that the two compare."""
  m = config.model
  return resnet.PlainResNet(num_classes=m.num_classes, backbone=m.backbone, width=m.width,
                            stem=config_lib.resolve_stem(m.stem, m.backbone),
                            last_stride=m.last_stride,
                            dtype=jnp.dtype(config_lib.resolve_dtype(m.dtype)),
                            kernels=kernels.select(m.kernels))


def plain_variables(setup: Setup):
  """Random PlainResNet variables (see `random_variables`)."""
  model = plain_model(setup.config)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          setup.flat_images[:2])
  return random_variables(shapes)


def plain_train_step(setup: Setup) -> tuple[_Stepper, float]:
  """PlainResNet + softmax cross-entropy + optax.adam on the same B images."""
  model = plain_model(setup.config)
  variables = plain_variables(setup)
  tx = optax.adam(1e-4)

  def step(state, images, labels):
    params, stats, opt_state = state

    def loss_fn(p):
      (logits, _), new = model.apply({'params': p, 'batch_stats': stats}, images, train=True,
                                     mutable=['batch_stats'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return ce, new['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss

  state = (variables['params'], variables['batch_stats'], tx.init(variables['params']))
  repl = parallel.replicated(setup.mesh)
  state = jax.device_put(state, repl)
  jitted = jax.jit(step, donate_argnums=0)
  compiled = setup.compile(jitted, state, setup.flat_images, setup.flat_labels)
  return _Stepper(compiled, state, setup.flat_images, setup.flat_labels), _flops(compiled)


def inference_calls(setup: Setup, train_variables) -> dict[str, Callable[[], Any]]:
  """{'dmue': exported model, 'plain': PlainResNet}, each compiled on the B flat images."""
  config = setup.config
  exported = dmue_model.inference_variables(train_variables)
  dmue_fn = setup.compile(jax.jit(functools.partial(train.eval_logits, config=config)),
                          exported, setup.flat_images)
  model = plain_model(config)
  # Replicated like the exported model's (they come from the train state), so that on several
  # devices both run the same data-parallel program.
  plain_vars = jax.device_put(plain_variables(setup), parallel.replicated(setup.mesh))
  plain_fn = setup.compile(jax.jit(lambda v, x: model.apply(v, x, train=False)[0]),
                           plain_vars, setup.flat_images)
  return {'dmue': lambda: dmue_fn(exported, setup.flat_images),
          'plain': lambda: plain_fn(plain_vars, setup.flat_images)}


# ------------------------------------------------------------------ the reference's subsets
@dataclasses.dataclass
class Piece:
  """One separately compiled part of the reference step, counted `times` times."""
  name: str
  times: int
  call: Callable[[], Any]
  flops: float


def reference_pieces(setup: Setup, train_variables) -> list[Piece]:
  """The computation of the authors' step, piece by piece, with exactly their shapes.

  The reference runs the shared trunk on all B images; auxiliary branch c forward and backward
  on its (C-1)k samples with y != c; the target branch forward and backward on all B; auxiliary
  branch c forward only on its k samples of class c (the latent distribution is `.detach()`ed
  after the softmax, so autograd records nothing there); then one Adam update of trunk, all
  layer4 copies and the heads. Each piece is value_and_grad of a sum (or a plain forward) so
  that XLA keeps exactly that work; branch gradients include the input gradient, which the
  trunk's backward needs.
  """
  model = train.make_model(setup.config)
  c, k = setup.num_classes, setup.batch_per_class
  params, stats = train_variables['params'], train_variables['batch_stats']
  trunk_vars = {'params': params['trunk'], 'batch_stats': stats['trunk']}
  take0 = lambda tree: jax.tree.map(lambda a: a[0], tree)
  stage_params, stage_stats = take0(params['branches']), take0(stats['branches'])

  def trunk_loss(p, x):
    h, _ = model.trunk.apply({'params': p, 'batch_stats': trunk_vars['batch_stats']}, x,
                             train=True, mutable=['batch_stats'])
    return jnp.sum(h.astype(jnp.float32))

  def stage_out(p, h):
    y, _ = model.stage.apply({'params': p, 'batch_stats': stage_stats}, h, train=True,
                             mutable=['batch_stats'])
    return y

  stage_loss = lambda p, h: jnp.sum(stage_out(p, h).astype(jnp.float32))
  h_shape = jax.eval_shape(lambda x: model.trunk.apply(trunk_vars, x, train=False),
                           setup.flat_images)
  h = jax.random.normal(jax.random.key(2), h_shape.shape, jnp.float32).astype(h_shape.dtype)

  tx = train.make_optimizer(setup.config, _STEPS_PER_EPOCH)
  opt_state = tx.init(params)

  def optimizer(p, g, s):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  specs = [
      ('trunk forward+backward [B]', 1, jax.value_and_grad(trunk_loss),
       (params['trunk'], setup.flat_images)),
      ('aux layer4 forward+backward [(C-1)k]', c, jax.value_and_grad(stage_loss, (0, 1)),
       (stage_params, h[:(c - 1) * k])),
      ('target layer4 forward+backward [B]', 1, jax.value_and_grad(stage_loss, (0, 1)),
       (stage_params, h)),
      ('latent layer4 forward [k]', c, stage_out, (stage_params, h[:k])),
      ('Adam update (all parameters)', 1, optimizer, (params, params, opt_state)),
  ]
  pieces = []
  for name, times, fn, args in specs:
    compiled = setup.compile(jax.jit(fn), *args)
    pieces.append(Piece(name, times, functools.partial(compiled, *args), _flops(compiled)))
  return pieces


# ------------------------------------------------------------------ input pipeline
def pipeline_rate(setup: Setup, steps: int) -> float:
  """Images/s of the training pipeline alone on synthetic 100x100 uint8 faces."""
  c, k = setup.num_classes, setup.batch_per_class
  per_class = 2 * k  # more than one batch per class, so the stream crosses a pass boundary
  rng = np.random.default_rng(0)
  size = _PIPELINE_IMAGE_SIZE
  images = rng.integers(0, 256, (c * per_class, size, size, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(c), per_class)
  source = [{'image': img, 'label': int(y)} for img, y in zip(images, labels)]
  cfg = setup.config.input
  return input_pipeline.measure_throughput(
      source, labels, num_classes=c, batch_per_class=k, image_size=cfg.image_size,
      resize_size=cfg.resize_size, augment=cfg.augment, steps=steps)


# ------------------------------------------------------------------ the whole benchmark
def run(config, *, image_size=None, batch_per_class=None, steps: int = 3,
        pipeline_steps: int = 10, skip_vmap: bool = False, dtype=None,
        profile: bool = False, fast_compile: bool = False,
        peak: float | None = None) -> dict:
  """Runs every measurement on all devices; returns the results dict (its keys are described
  in docs/performance.md, "The benchmark command"). pipeline_steps=0 leaves the input pipeline
  out (null)."""
  if steps < 1:
    raise config_lib.ConfigError(f'--steps={steps} must be at least 1.')
  load_start = os.getloadavg()[0]
  setup = make_setup(config, image_size=image_size, batch_per_class=batch_per_class,
                     dtype=dtype, fast_compile=fast_compile)
  config = setup.config
  b = setup.batch_size
  devices = setup.mesh.size
  mode = resolved_branch_mode(config)
  other = 'vmap' if mode == 'loop' else 'loop'

  _note(f'compiling the DMUE train step ({mode})')
  dmue_step, flops = dmue_train_step(setup, config)
  _note('compiling the plain-backbone train step')
  plain_step, plain_flops = plain_train_step(setup)
  train_calls = {mode: dmue_step, 'plain': plain_step}
  mode_flops = {mode: flops}
  if not skip_vmap:
    _note(f'compiling the DMUE train step ({other})')
    train_calls[other], mode_flops[other] = dmue_train_step(setup,
                                                            with_branch_mode(config, other))
  _note(f'timing the train steps ({", ".join(train_calls)})')
  train_times = _interleaved_medians(train_calls, steps)

  _note('compiling and timing inference')
  train_variables = dmue_step.state.variables
  infer_times = _interleaved_medians(inference_calls(setup, train_variables),
                                     max(steps, _MIN_INFERENCE_CALLS))

  _note('compiling the reference-subset pieces')
  pieces = reference_pieces(setup, train_variables)
  reference_flops = sum(p.times * p.flops for p in pieces)
  mode_rate = lambda m: b / train_times[m] if m in train_times else None
  # XLA counts one device's share of a sharded step; the achieved rate is all devices'.
  results = {
      'train_images_per_second': b / train_times[mode],
      'plain_backbone_train_images_per_second': b / train_times['plain'],
      'inference_images_per_second': b / infer_times['dmue'],
      'plain_backbone_inference_images_per_second': b / infer_times['plain'],
      'inference_overhead_vs_plain_backbone': infer_times['dmue'] / infer_times['plain'],
      'flops_per_step': flops,
      'achieved_gflops': flops * devices / train_times[mode] / 1e9,
      'plain_backbone_flops_per_step': plain_flops,
      'flops_ratio_vs_plain_backbone': flops / plain_flops,
      'reference_subset_flops_per_step': reference_flops,
      'flops_ratio_vs_reference_subsets': flops / reference_flops,
      'vmap_images_per_second': mode_rate('vmap'),
      'loop_images_per_second': mode_rate('loop'),
      'vmap_flops_per_step': mode_flops.get('vmap'),
      'loop_flops_per_step': mode_flops.get('loop'),
      'input_pipeline_images_per_second': None,
      'branch_mode': mode,
      'kernels': train.resolved_settings(config)['kernels'],
      'train_step_seconds': train_times[mode],
      'plain_backbone_train_step_seconds': train_times['plain'],
      'backbone': config.model.backbone,
      'stem': config_lib.resolve_stem(config.model.stem, config.model.backbone),
      'num_classes': setup.num_classes,
      'batch_per_class': setup.batch_per_class,
      'image_size': setup.image_size,
      'dtype': config.model.dtype,
      'steps': steps,
      'device': f'{jax.device_count()}x {jax.devices()[0].device_kind}',
      'devices': devices,
      'platform': jax.default_backend(),
      'host_cpus': os.cpu_count(),
      'jax_version': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'compiler_options': compiler.merged(setup.compiler_options),
      'fast_compile': fast_compile,
      'load_average_start': load_start,
  }
  if pipeline_steps > 0:
    _note('timing the input pipeline')
    results['input_pipeline_images_per_second'] = pipeline_rate(setup, pipeline_steps)
  if profile:
    _note('timing the pieces')
    piece_times = _interleaved_medians({p.name: p.call for p in pieces}, steps)
    results['profile'] = {
        p.name: {'times': p.times, 'seconds_each': piece_times[p.name],
                 'gflop_each': p.flops / 1e9,
                 'gflops_per_second': p.flops / piece_times[p.name] / 1e9}
        for p in pieces}
    results['reference_subset_seconds'] = sum(p.times * piece_times[p.name] for p in pieces)
  results['load_average_end'] = os.getloadavg()[0]
  add_peak_fraction(results, peak)
  return results


def device_peak_tflops(dtype: str, peak: float | None = None) -> float | None:
  """One device's peak TFLOP/s in `dtype`: `peak` where given, else this chip's from the table;
  None where unknown."""
  per_device = peak if peak is not None else peak_tflops(jax.devices()[0].device_kind, dtype)
  return per_device if per_device is not None and per_device > 0 else None


def add_peak_fraction(results: dict, peak: float | None = None) -> None:
  """Adds peak_gflops (the run's devices together) and fraction_of_peak (achieved / peak), or
  None for both where the chip's peak is unknown. `peak`: one device's TFLOP/s, overriding the
  table."""
  per_device = device_peak_tflops(results['dtype'], peak)
  if per_device is None:
    results['peak_gflops'] = results['fraction_of_peak'] = None
    return
  results['peak_gflops'] = per_device * 1e3 * results.get('devices', jax.device_count())
  results['fraction_of_peak'] = results['achieved_gflops'] / results['peak_gflops']


# ------------------------------------------------------------------ the accelerator suite
# The reference's AffectNet batch (8 classes x 9), per device.
ACCELERATOR_IMAGE_SIZE = 224
ACCELERATOR_BATCH_PER_CLASS = 9
SUITE_DTYPES = ('float32', 'bfloat16')
SUITE_MODES = ('vmap', 'loop')


def device_counts(total: int) -> list[int]:
  """The meshes the scaling part measures: 1, 2, 4, ... up to `total`, and `total` itself."""
  if total < 1:
    raise ValueError(f'need at least one device, not {total}')
  counts = [1]
  while counts[-1] * 2 <= total:
    counts.append(counts[-1] * 2)
  return counts if counts[-1] == total else counts + [total]


def _num_local_devices() -> int:
  return jax.local_device_count()


def local_mesh(n: int) -> jax.sharding.Mesh:
  """A mesh over this process's first n devices."""
  return jax.sharding.Mesh(np.array(jax.local_devices()[:n]), (parallel.AXIS,))


def scaling_entry(*, dtype, branch_mode, devices, kernels, batch_size, step_seconds,
                  flops_per_step) -> dict:
  """One measured scaling point; flops_per_step is one device's share, as XLA counts it."""
  return {'dtype': dtype, 'branch_mode': branch_mode, 'devices': devices, 'kernels': kernels,
          'batch_size': batch_size, 'step_seconds': step_seconds,
          'images_per_second': batch_size / step_seconds, 'flops_per_step': flops_per_step}


def time_train_steps(config, *, devices: int, image_size: int, batch_per_class: int,
                     dtype: str, modes: Sequence[str], steps: int,
                     fast_compile: bool = False) -> list[dict]:
  """The DMUE step on the first `devices` local devices with batch_per_class * devices per
  class (weak scaling), once per branch mode, timed interleaved: one scaling entry per mode."""
  setup = make_setup(config, image_size=image_size, batch_per_class=batch_per_class * devices,
                     dtype=dtype, fast_compile=fast_compile, mesh=local_mesh(devices))
  steppers, flops = {}, {}
  for mode in modes:
    _note(f'scaling: compiling the DMUE train step ({dtype}, {mode}, n={devices})')
    steppers[mode], flops[mode] = dmue_train_step(setup, with_branch_mode(setup.config, mode))
  _note(f'scaling: timing {", ".join(modes)} on n={devices}')
  times = _interleaved_medians(steppers, steps)
  kernels = train.resolved_settings(setup.config)['kernels']
  return [scaling_entry(dtype=dtype, branch_mode=mode, devices=devices, kernels=kernels,
                        batch_size=setup.batch_size, step_seconds=times[mode],
                        flops_per_step=flops[mode]) for mode in modes]


def entries_from_run(results: dict) -> list[dict]:
  """The scaling entries a full run already measured: its devices, each branch mode it timed."""
  b = results['num_classes'] * results['batch_per_class']
  return [scaling_entry(dtype=results['dtype'], branch_mode=mode, devices=results['devices'],
                        kernels=results['kernels'], batch_size=b,
                        step_seconds=b / results[f'{mode}_images_per_second'],
                        flops_per_step=results[f'{mode}_flops_per_step'])
          for mode in SUITE_MODES if results.get(f'{mode}_images_per_second')]


def measure_scaling(config, *, image_size: int, batch_per_class: int, steps: int,
                    dtypes: Sequence[str] = SUITE_DTYPES, modes: Sequence[str] = SUITE_MODES,
                    fast_compile: bool = False, measured: Sequence[dict] = ()) -> list[dict]:
  """Weak scaling over `device_counts(local devices)`: one entry per dtype, branch mode and
  device count, in that order. Points in `measured` (the suite's full runs) are reused, not
  compiled again."""
  counts = device_counts(_num_local_devices())
  entries = [e for e in measured if e['dtype'] in dtypes and e['branch_mode'] in modes and
             e['devices'] in counts]
  have = {(e['dtype'], e['branch_mode'], e['devices']) for e in entries}
  for dtype in dtypes:
    for n in counts:
      todo = [m for m in modes if (dtype, m, n) not in have]
      if todo:
        entries += time_train_steps(config, devices=n, image_size=image_size,
                                    batch_per_class=batch_per_class, dtype=dtype, modes=todo,
                                    steps=steps, fast_compile=fast_compile)
  entries.sort(key=lambda e: (dtypes.index(e['dtype']), modes.index(e['branch_mode']),
                              e['devices']))
  return entries


def add_scaling_figures(entries: list[dict], peak: float | None = None) -> list[dict]:
  """Adds per_device_images_per_second; scaling_efficiency = rate(n) / (n * rate(1)) against
  the one-device point of the same dtype and branch mode (None without one); fraction_of_peak,
  one device's FLOP rate over one device's peak (None where the peak is unknown)."""
  one = {(e['dtype'], e['branch_mode']): e['images_per_second']
         for e in entries if e['devices'] == 1}
  for e in entries:
    n, rate = e['devices'], e['images_per_second']
    rate_1 = one.get((e['dtype'], e['branch_mode']))
    e['per_device_images_per_second'] = rate / n
    e['scaling_efficiency'] = rate / (n * rate_1) if rate_1 else None
    per_device = device_peak_tflops(e['dtype'], peak)
    flops = e['flops_per_step']
    known = per_device is not None and flops is not None and math.isfinite(flops)
    e['fraction_of_peak'] = flops / e['step_seconds'] / (per_device * 1e12) if known else None
  return entries


def pipeline_vs_step(pipeline_rate: float | None, scaling: Sequence[dict], devices: int) -> dict:
  """The input pipeline against the fastest step on `devices` devices: a ratio above 1 means
  the pipeline keeps up and the step bounds training; below 1 the pipeline bounds it."""
  fastest = max((e for e in scaling if e['devices'] == devices),
                key=lambda e: e['images_per_second'], default=None)
  ratio = (pipeline_rate / fastest['images_per_second']
           if pipeline_rate is not None and fastest is not None else None)
  return {
      'pipeline_images_per_second': pipeline_rate,
      'pipeline_to_step_ratio': ratio,
      'bound_by': None if ratio is None else 'input pipeline' if ratio < 1 else 'train step',
      'fastest_step': None if fastest is None else {
          k: fastest[k] for k in ('dtype', 'branch_mode', 'devices', 'images_per_second')},
  }


def run_accelerator_suite(config, *, image_size=None, batch_per_class=None, steps: int = 3,
                          pipeline_steps: int = 10, fast_compile: bool = False,
                          peak: float | None = None, **kwargs) -> dict:
  """The GPU/TPU check (docs/performance.md): full runs in float32 and bfloat16 with both branch
  modes on all devices, weak scaling over the local devices, the pipeline against the step.

  batch_per_class is per device (default 9), image_size defaults to 224. Returns {'float32':
  run, 'bfloat16': run, 'bfloat16_speedup', 'scaling': [...], 'pipeline_images_per_second',
  'pipeline_to_step_ratio', 'bound_by', ...}.
  """
  kwargs.pop('dtype', None)
  kwargs.pop('skip_vmap', None)
  size = image_size or ACCELERATOR_IMAGE_SIZE
  k = batch_per_class or ACCELERATOR_BATCH_PER_CLASS
  out = {}
  for dtype in SUITE_DTYPES:
    _note(f'accelerator suite: {dtype}')
    # The pipeline is host work, the same for either dtype: timed once.
    out[dtype] = run(config, image_size=size, batch_per_class=k * jax.device_count(),
                     dtype=dtype, skip_vmap=False, steps=steps,
                     pipeline_steps=pipeline_steps if dtype == SUITE_DTYPES[0] else 0,
                     fast_compile=fast_compile, peak=peak, **kwargs)
  out['bfloat16_speedup'] = (out['bfloat16']['train_images_per_second'] /
                             out['float32']['train_images_per_second'])
  local = _num_local_devices()
  measured = [e for dtype in SUITE_DTYPES for e in entries_from_run(out[dtype])
              if e['devices'] == local]
  scaling = measure_scaling(config, image_size=size, batch_per_class=k, steps=steps,
                            fast_compile=fast_compile, measured=measured)
  out['scaling'] = add_scaling_figures(scaling, peak)
  out.update(pipeline_vs_step(out['float32']['input_pipeline_images_per_second'], scaling,
                              local))
  out.update({'device_kind': jax.devices()[0].device_kind, 'num_local_devices': local,
              'num_devices': jax.device_count(), 'batch_per_class_per_device': k,
              'image_size': size,
              'kernels': {dtype: out[dtype]['kernels'] for dtype in SUITE_DTYPES}})
  return out


def format_table(r: dict) -> str:
  """The results as a readable table."""
  b = r['num_classes'] * r['batch_per_class']
  gf = lambda x: f'{x / 1e9:10.1f}' if x is not None else f'{"-":>10}'
  rate = lambda x: f'{x:10.1f}' if x is not None else f'{"-":>10}'
  lines = [
      f'DMUE benchmark: {r["backbone"]} ({r["stem"]} stem), C={r["num_classes"]}, '
      f'k={r["batch_per_class"]} (B={b}), {r["image_size"]} px, {r["dtype"]}, '
      f'{r["kernels"]} kernels, {r["device"]}, JAX {r["jax_version"]}',
      f'load average {r["load_average_start"]:.2f} -> {r["load_average_end"]:.2f}; '
      f'XLA_FLAGS={r["xla_flags"]!r}; compiler options {r["compiler_options"]}',
      f'{"":44}{"img/s":>10}{"GFLOP":>10}{"GFLOP/s":>10}',
      f'{"train step, DMUE (" + r["branch_mode"] + ")":44}{rate(r["train_images_per_second"])}'
      f'{gf(r["flops_per_step"])}{r["achieved_gflops"]:10.1f}',
      f'{"train step, plain backbone":44}'
      f'{rate(r["plain_backbone_train_images_per_second"])}'
      f'{gf(r["plain_backbone_flops_per_step"])}'
      f'{r["plain_backbone_flops_per_step"] / r["plain_backbone_train_step_seconds"] / 1e9:10.1f}',
      f'{"reference subset computation":44}{"":10}{gf(r["reference_subset_flops_per_step"])}',
      f'{"train step, branch_mode=vmap":44}{rate(r["vmap_images_per_second"])}',
      f'{"train step, branch_mode=loop":44}{rate(r["loop_images_per_second"])}',
      f'{"inference, exported DMUE model":44}{rate(r["inference_images_per_second"])}',
      f'{"inference, plain backbone":44}'
      f'{rate(r["plain_backbone_inference_images_per_second"])}',
      f'{"input pipeline alone":44}{rate(r["input_pipeline_images_per_second"])}',
      f'FLOPs: DMUE step / plain step = {r["flops_ratio_vs_plain_backbone"]:.3f}; '
      f'DMUE step / reference subsets = {r["flops_ratio_vs_reference_subsets"]:.3f}',
      f'inference time, DMUE / plain backbone = {r["inference_overhead_vs_plain_backbone"]:.3f}',
      (f'DMUE step at {r["fraction_of_peak"]:.1%} of the devices\' peak '
       f'({r["peak_gflops"] / 1e3:.1f} TFLOP/s, {r["dtype"]})' if r.get('peak_gflops')
       else 'peak FLOP/s of this device unknown (--peak-tflops gives it)'),
  ]
  if 'profile' in r:
    lines.append(f'{"piece (x times)":52}{"s each":>10}{"GFLOP each":>12}{"GFLOP/s":>10}')
    for name, p in r['profile'].items():
      lines.append(f'{name + " x" + str(p["times"]):52}{p["seconds_each"]:10.3f}'
                   f'{p["gflop_each"]:12.2f}{p["gflops_per_second"]:10.1f}')
    lines.append(f'reference pieces in total: {r["reference_subset_seconds"]:.2f} s '
                 f'(the DMUE step: {r["train_step_seconds"]:.2f} s)')
  return '\n'.join(lines)


def format_suite(r: dict) -> str:
  """The accelerator suite's scaling and pipeline figures as a readable table."""
  opt = lambda x, fmt, width: f'{x:{width}{fmt}}' if x is not None else f'{"-":>{width}}'
  lines = [
      f'weak scaling on {r["num_local_devices"]} local {r["device_kind"]} device(s): '
      f'k={r["batch_per_class_per_device"]} per class per device, {r["image_size"]} px',
      f'{"dtype":10}{"mode":6}{"devices":>8}{"kernels":>8}{"img/s":>11}{"img/s/dev":>11}'
      f'{"efficiency":>11}{"of peak":>9}',
  ]
  for e in r['scaling']:
    lines.append(f'{e["dtype"]:10}{e["branch_mode"]:6}{e["devices"]:8d}{e["kernels"]:>8}'
                 f'{e["images_per_second"]:11.1f}{e["per_device_images_per_second"]:11.1f}'
                 f'{opt(e["scaling_efficiency"], ".3f", 11)}'
                 f'{opt(e["fraction_of_peak"], ".1%", 9)}')
  fastest, ratio = r['fastest_step'], r['pipeline_to_step_ratio']
  if ratio is None:
    lines.append('input pipeline not measured')
  else:
    bound = ('the train step bounds training (the pipeline keeps up)' if ratio >= 1 else
             'the input pipeline bounds training (it cannot feed the step)')
    lines.append(f'input pipeline {r["pipeline_images_per_second"]:.1f} img/s, fastest step '
                 f'({fastest["dtype"]}, {fastest["branch_mode"]}, {fastest["devices"]} devices) '
                 f'{fastest["images_per_second"]:.1f} img/s: pipeline/step = {ratio:.2f}, '
                 f'{bound}')
  return '\n'.join(lines)


def _json_safe(value):
  """NaN/inf are not JSON; report them as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def main(argv: Sequence[str]) -> dict:
  """Parses argv (argv[0] is the program name), runs the benchmark, prints, returns results."""
  fv = flags.FlagValues()
  _define_flags(fv)
  try:
    fv(list(argv))
  except flags.Error as e:
    cli.fail(f'{e}. Usage: python -m dmue_jax.bench --config CONFIG [--image-size N] '
             '[--batch-per-class K] [--steps S] [--json]')
  if fv.config is None:
    cli.fail('--config is required, e.g. --config configs/rafdb.py.')
  kwargs = dict(image_size=fv['image-size'].value, batch_per_class=fv['batch-per-class'].value,
                steps=fv.steps, pipeline_steps=fv['pipeline-steps'].value,
                skip_vmap=fv['skip-vmap'].value, dtype=fv.dtype, profile=fv.profile,
                fast_compile=fv['fast-compile'].value, peak=fv['peak-tflops'].value)
  with cli.user_errors():
    if fv.suite == 'accelerator':
      results = run_accelerator_suite(fv.config, **kwargs)
    else:
      results = run(fv.config, **kwargs)
  if fv.suite == 'accelerator':
    for dtype in ('float32', 'bfloat16'):
      print(format_table(results[dtype]), flush=True)
    print(f'bfloat16 / float32 train step rate: {results["bfloat16_speedup"]:.2f}x', flush=True)
    print(format_suite(results), flush=True)
  else:
    print(format_table(results), flush=True)
  if fv.json:
    print(json.dumps(_json_safe(results)), flush=True)
  return results


if __name__ == '__main__':
  cli.enable_compilation_cache()
  main(sys.argv)
