"""The shared configuration skeleton and its validation.

Every file in `configs/` starts from `base_config()` and changes what its dataset needs, so
all runs have exactly the same fields (other tools read them by name). `validate()` turns a
wrong value into one clear `ConfigError` before any work starts.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from dmue_jax.errors import UserError

BACKBONES = ('resnet18', 'resnet34', 'resnet50', 'resnet50_ibn', 'resnet18_narrow')
DATASETS = ('synthfer', 'rafdb', 'affectnet', 'affectnet7', 'ferplus', 'folder')


class ConfigError(UserError, ValueError):
  """A configuration value that cannot work; the message names the field and the fix."""
  exit_code = 2


def base_config() -> ml_collections.ConfigDict:
  """Returns the full set of fields with the reference (RAF-DB, ResNet-18) defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_epochs = 36
  # None = len(train split) // (batch_per_class * num_classes), as one pass of the data.
  config.steps_per_epoch = ml_collections.FieldReference(None, field_type=int)
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.eval_every_epochs = 1
  config.analyze_at_end = True
  config.progress_bar = True

  config.input = ml_collections.ConfigDict()
  config.input.dataset = 'rafdb'
  config.input.data_dir = ''          # manual dir holding the downloaded dataset
  config.input.cache_dir = ''         # where prepared TFDS files go; '' = <data_dir>/tfds
  config.input.image_size = 224       # crop size fed to the network
  config.input.resize_size = 256      # resize before the crop (reference: 256 -> 224)
  config.input.batch_per_class = 10   # k: every training batch holds exactly k per class
  config.input.label_noise = 0.0      # symmetric label-noise rate applied to the train split
  config.input.label_noise_seed = 0
  config.input.augment = True         # the reference augmentation (SPEC Q5)
  config.input.eval_batch_size = 64
  config.input.num_workers = 0        # threads building batches ahead; 0 = the usable cores
  config.input.synthfer_num_train = 2800
  config.input.synthfer_num_test = 700
  config.input.synthfer_seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.backbone = 'resnet18'
  config.model.num_classes = 7
  config.model.width = 64             # base width of the ResNet (64 = the standard nets)
  # 'auto' = what the reference builds: its ResNet stem (Q1: no ReLU, 2x2 max-pool) for
  # ResNet-18/34/50, the usual ReLU + 3x3/2 pool for ResNet-50-IBN-a. Or 'reference' /
  # 'standard' explicitly.
  config.model.stem = 'auto'
  config.model.last_stride = 2
  config.model.pooling = 'gap'        # 'gap' or 'gem'
  config.model.bnneck = True
  config.model.dropout = 0.5
  config.model.branch_mode = 'auto'   # 'auto' (loop on CPU, vmap elsewhere), 'vmap', 'loop'
  # Compute dtype: 'auto' = bfloat16 on GPU and TPU, float32 on CPU. Parameters, optimiser
  # state, BatchNorm statistics, losses and the similarity statistics stay float32.
  config.model.dtype = 'auto'
  # Layer implementations: 'auto' = the CPU kernels (custom gradients for XLA:CPU) on a CPU
  # backend, XLA's own elsewhere; 'xla' or 'cpu' to force one (fast_grads.resolve).
  config.model.kernels = 'auto'
  config.model.init_from = ''         # official torch weights to start from ('' = random)

  config.dmue = ml_collections.ConfigDict()
  config.dmue.enabled = True          # False = plain cross-entropy baseline, same pipeline
  config.dmue.ramp_a = 10.0
  config.dmue.T = 1.2
  config.dmue.w = 0.5
  config.dmue.gamma = 1000.0
  # Reference quirks (SPEC Q2-Q4); True reproduces the authors' code.
  config.dmue.freeze_pue = True       # Q2: the PUE MLP is never updated
  config.dmue.freeze_neck = True      # Q2: the BN-neck is never updated
  config.dmue.sp_on_aux_logits = True  # Q3: Gram of aux logits vs target features
  config.dmue.neck_stats_all_passes = True  # Q4: neck running stats updated by all 2C+1 passes

  config.optim = ml_collections.ConfigDict()
  # Piecewise constant by epoch: ((end_epoch, lr), ...), lr holds while epoch < end_epoch.
  # The reference RAF-DB/AffectNet schedule, including its bump at epochs 22-24.
  config.optim.backbone_lr = ((6, 1e-4), (12, 5e-5), (20, 1e-5), (22, 1e-5), (25, 5e-5),
                              (60, 1e-5))
  config.optim.head_lr = ((4, 1e-3), (8, 5e-4), (14, 1e-4), (22, 1e-5), (25, 5e-5),
                          (60, 1e-5))
  # The PUE MLP's own schedule when it is learned (dmue.freeze_pue False; the reference never
  # updates it). () = the heads' schedule.
  config.optim.pue_lr = ()
  config.optim.weight_decay = 1e-4
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8

  config.parallel = ml_collections.ConfigDict()
  config.parallel.coordinator_address = ''  # host:port; '' = single process or auto (TPU pods)
  config.parallel.num_processes = 1
  config.parallel.process_id = 0
  return config


def resolve_stem(stem: str, backbone: str) -> str:
  """'auto' -> the stem the reference uses with that backbone."""
  if stem != 'auto':
    return stem
  return 'standard' if backbone == 'resnet50_ibn' else 'reference'


DTYPES = ('auto', 'float32', 'bfloat16')


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
  """config.model.dtype -> 'float32' or 'bfloat16': 'auto' is bfloat16 on GPU and TPU."""
  if dtype != 'auto':
    return dtype
  import jax  # pylint: disable=g-import-not-at-top (configs load without JAX)
  return 'float32' if (backend or jax.default_backend()) == 'cpu' else 'bfloat16'


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field when a value cannot work."""
  m, i, d = config.model, config.input, config.dmue
  if m.backbone not in BACKBONES:
    raise ConfigError(f'config.model.backbone={m.backbone!r} is unknown; choose one of '
                      f'{", ".join(BACKBONES)}.')
  if i.dataset not in DATASETS:
    raise ConfigError(f'config.input.dataset={i.dataset!r} is unknown; choose one of '
                      f'{", ".join(DATASETS)}.')
  if m.num_classes < 2 and not (i.dataset == 'folder' and m.num_classes == 0):
    raise ConfigError(f'config.model.num_classes={m.num_classes} must be at least 2.')
  if i.batch_per_class < 2:
    raise ConfigError(f'config.input.batch_per_class={i.batch_per_class} must be at least 2: '
                      'the per-class similarity statistics need two samples of each class.')
  if not 0.0 <= i.label_noise < 1.0:
    raise ConfigError(f'config.input.label_noise={i.label_noise} must be in [0, 1).')
  if i.image_size < 32 or i.resize_size < i.image_size:
    raise ConfigError(f'config.input.image_size={i.image_size} must be >= 32 and at most '
                      f'config.input.resize_size={i.resize_size}.')
  if m.stem not in ('auto', 'reference', 'standard'):
    raise ConfigError(f"config.model.stem={m.stem!r}: use 'auto', 'reference' or 'standard'.")
  if m.pooling not in ('gap', 'gem'):
    raise ConfigError(f"config.model.pooling={m.pooling!r}: use 'gap' or 'gem'.")
  if m.branch_mode not in ('auto', 'vmap', 'loop'):
    raise ConfigError(f"config.model.branch_mode={m.branch_mode!r}: use 'auto', 'vmap' or "
                      "'loop'.")
  if m.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={m.dtype!r}: use 'auto', 'float32' or 'bfloat16'.")
  if m.kernels not in ('auto', 'xla', 'cpu'):
    raise ConfigError(f"config.model.kernels={m.kernels!r}: use 'auto', 'xla' or 'cpu'.")
  if d.T <= 0:
    raise ConfigError(f'config.dmue.T={d.T} must be positive.')
  if d.ramp_a <= 0:
    raise ConfigError(f'config.dmue.ramp_a={d.ramp_a} must be positive.')
  for name in ('backbone_lr', 'head_lr', 'pue_lr'):
    sched = config.optim[name]
    ends = [e for e, _ in sched]
    if (not sched and name != 'pue_lr') or ends != sorted(ends):
      raise ConfigError(f'config.optim.{name} must be a non-empty list of (end_epoch, lr) '
                        'pairs with increasing end epochs.')
  if config.input.num_workers < 0:
    raise ConfigError(f'config.input.num_workers={config.input.num_workers} must be 0 (the '
                      'usable cores) or a positive number of threads.')
  if config.num_epochs < 1:
    raise ConfigError(f'config.num_epochs={config.num_epochs} must be at least 1.')


def paper_behaviour(config: ml_collections.ConfigDict) -> None:
  """The `:paper` variant: the PUE MLP and the BN-neck are learned, as the paper describes
  (SPEC Q2), instead of staying at their initialisation as in the authors' code."""
  config.dmue.freeze_pue = False
  config.dmue.freeze_neck = False


def apply_presets(config: ml_collections.ConfigDict, arg: str | None,
                  presets: dict[str, Callable[[ml_collections.ConfigDict], None]]) -> None:
  """Applies the presets named in `arg`, the text after ':' in --config (comma-separated, in
  order: `configs/rafdb.py:runlocal,paper`). An unknown name is a ConfigError listing the
  valid ones, rather than a silently ignored typo."""
  for name in filter(None, (arg or '').split(',')):
    if name not in presets:
      raise ConfigError(f'unknown config variant {name!r} after the ":" of --config; this config '
                        f'has {", ".join(sorted(presets))} (comma-separated to combine them).')
    presets[name](config)


def shrink_for_laptop(config: ml_collections.ConfigDict) -> None:
  """The `:runlocal` variant: a few tiny steps that exercise the whole run on a CPU."""
  config.num_epochs = 2
  config.steps_per_epoch = 5
  config.input.image_size = 112
  config.input.resize_size = 128
  config.input.batch_per_class = 2
  config.model.backbone = 'resnet18_narrow'


# The variants every dataset config offers after the ":" of --config.
DATASET_PRESETS = {'runlocal': shrink_for_laptop, 'paper': paper_behaviour}
