"""The shared configuration skeleton and its validation.

Every file in `configs/` starts from `base_config()` and changes what its dataset needs, so
all runs have exactly the same fields (other tools read them by name). `validate()` turns a
wrong value into one clear `ConfigError` before any work starts.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from dmue_jax.errors import UserError

BACKBONES = ('resnet18', 'resnet34', 'resnet50', 'resnet50_ibn', 'resnet18_narrow',
             'resnet10_narrow')
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
  # The reference also tests after every 200th batch of an epoch (0 = epoch ends only), and
  # that test leaves its network in eval mode until the epoch ends (README, Reference quirks,
  # Q7): BatchNorm on its running statistics, not updating them, dropout off.
  config.eval_every_steps = 200
  config.eval_freezes_rest_of_epoch = True
  config.analyze_at_end = True
  config.progress_bar = True

  config.input = ml_collections.ConfigDict()
  config.input.dataset = 'rafdb'
  config.input.data_dir = ''          # manual dir holding the downloaded dataset
  # The split evaluated during and after training: 'test', or 'validation' where the dataset
  # has one (FERPlus: PublicTest; folder: <data_dir>/validation/), for model selection.
  config.input.eval_split = 'test'
  # AffectNet faces: 'landmarks' aligns each face from its 68 CSV landmarks as the reference
  # aligns its faces; 'box' crops the CSV face box (no margin, no alignment).
  config.input.affectnet_align = 'landmarks'
  config.input.cache_dir = ''         # where prepared TFDS files go; '' = <data_dir>/tfds
  config.input.image_size = 224       # crop size fed to the network
  config.input.resize_size = 256      # resize before the crop (reference: 256 -> 224)
  config.input.batch_per_class = 10   # k: every training batch holds exactly k per class
  config.input.label_noise = 0.0      # symmetric label-noise rate applied to the train split
  config.input.label_noise_seed = 0
  config.input.augment = True         # the reference augmentation (README quirk Q5)
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
  # backend, XLA's own elsewhere; 'xla' or 'cpu' to force one (kernels.resolve).
  config.model.kernels = 'auto'
  # Official torch weights to start from (the MS-Celeb-1M ResNet-18 for the paper's runs), or
  # 'scratch' for random weights. The dataset configs require it (check_init_from); '' is
  # random weights only for SynthFER.
  config.model.init_from = ''

  config.dmue = ml_collections.ConfigDict()
  config.dmue.enabled = True          # False = plain cross-entropy baseline, same pipeline
  config.dmue.ramp_a = 10.0
  config.dmue.T = 1.2
  config.dmue.w = 0.5
  config.dmue.gamma = 1000.0
  # Ablation switches (docs/ablations.md); the defaults are the method.
  config.dmue.score_scaling = True  # False: the target CE is not scaled by the PUE score
  config.dmue.aux_weight = 1.0      # weight of the auxiliary branches' own loss
  config.dmue.ramps = True          # False: ramp-up and ramp-down held at 1
  # Reference quirks (README quirk Q2-Q4); True reproduces the authors' code.
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


def validate(config: ml_collections.ConfigDict, *, for_training: bool = True) -> None:
  """Raises ConfigError naming the field when a value cannot work.

  Args:
    config: the full config.
    for_training: also check what only starting a training run needs (`check_init_from`).
      Commands that read a finished run's config or build no weights pass False.
  """
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
  if d.aux_weight < 0:
    raise ConfigError(f'config.dmue.aux_weight={d.aux_weight} must be 0 or more.')
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
  _check_input_protocol(i)
  if for_training:
    check_init_from(config)


# The datasets whose eval split may be 'validation' (a folder dataset needs the folder too).
_HAS_VALIDATION = ('ferplus', 'folder')


def _check_input_protocol(i: ml_collections.ConfigDict) -> None:
  if i.eval_split not in ('test', 'validation'):
    raise ConfigError(f"config.input.eval_split={i.eval_split!r}: use 'test' or 'validation'.")
  if i.eval_split == 'validation' and i.dataset not in _HAS_VALIDATION:
    raise ConfigError(f"config.input.eval_split='validation': {i.dataset} has no validation "
                      f"split (only {', '.join(_HAS_VALIDATION)} have one); use 'test'.")
  if i.affectnet_align not in ('landmarks', 'box'):
    raise ConfigError(f"config.input.affectnet_align={i.affectnet_align!r}: use 'landmarks' "
                      "or 'box'.")


# What the paper's runs start from, as the authors' config.py names it, and where their
# README links it.
PRETRAINED_FILE = 'mv_epoch_17.pt'
# init_from for the SynthFER demo's pretrained start (dmue_jax.pretrain makes it).
SYNTHFER_PRETRAINED = 'synthfer_pretrained'
PRETRAINED_README = ('https://github.com/JDAI-CV/FaceX-Zoo/tree/main/addition_module/DMUE'
                     '#pre-training')


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError when a real-dataset run does not say what it starts from.

  The paper's accuracy needs the MS-Celeb-1M backbone; from random weights the same
  schedule learns far less, so an empty `model.init_from` must not quietly mean random
  weights. SynthFER (configs/default.py) trains from scratch by design.
  """
  dataset = config.input.dataset
  if config.model.init_from == SYNTHFER_PRETRAINED and dataset != 'synthfer':
    raise ConfigError("config.model.init_from='synthfer_pretrained' is the SynthFER demo's "
                      'pretrained start; for configs/{dataset}.py pass a weights file or '
                      "'scratch'.".format(dataset=dataset))
  if config.model.init_from or dataset == 'synthfer':
    return
  raise ConfigError(
      f'config.model.init_from is not set, and configs/{dataset}.py needs it: the paper starts '
      'from the ResNet-18 pretrained on MS-Celeb-1M that the authors publish with their code '
      f"(their config.py loads it as pretrain/checkpoints/out_dir_res18/{PRETRAINED_FILE}; the "
      'Pre-training section of the FaceX-Zoo DMUE README links it, '
      f'{PRETRAINED_README}). Their DMUE snapshots load too. Pass '
      f'--config.model.init_from=/path/to/{PRETRAINED_FILE}, or '
      '--config.model.init_from=scratch to train from random weights on purpose.')


# The SynthFER run's settings (configs/default.py), for 12 epochs; scaled to the run's.
SCRATCH_EPOCHS = 12
SCRATCH_LR = ((8, 1e-3), (11, 3e-4), (100, 1e-4))
SCRATCH_PUE_LR = ((8, 3e-3), (11, 1e-3), (100, 3e-4))
# The SP term off: from random weights gamma = 1000 lets it dominate while the features are
# random, and with 100 it still costs DMUE its lead over the baseline (digit scans, 30 % noise:
# 94.2 % with 100, 96.1 % with 0, baseline 95.0 %; docs/ablations.md).
SCRATCH_GAMMA = 0.0
SCRATCH_RAMP_A = 4.0
SCRATCH_STEM = 'standard'


def _scaled_schedule(schedule, num_epochs: int) -> tuple[tuple[int, float], ...]:
  factor = num_epochs / SCRATCH_EPOCHS
  return tuple((max(1, round(end * factor)), lr) for end, lr in schedule)


def _user_set(name: str, user_overrides: set[str]) -> bool:
  """Whether the user set the field `name` ('dmue.gamma') or a section holding it."""
  return any(name == o or name.startswith(o + '.') for o in user_overrides)


def apply_scratch_defaults(config: ml_collections.ConfigDict,
                           user_overrides: set[str]) -> list[str]:
  """Switches a dataset config's reference settings to from-scratch ones for init_from=scratch.

  The reference rates, gamma and ramp are tuned for fine-tuning the MS-Celeb-1M backbone;
  from random weights they barely move it, and gamma = 1000 lets the similarity term
  dominate while the features are still random. So, unless the user set the field, this
  applies the SynthFER run's settings: its schedules with the epoch boundaries scaled from 12
  epochs to config.num_epochs, gamma 0 (SCRATCH_GAMMA), ramp_a 4 scaled the same way, and
  the standard stem (the reference stem exists to match the pretrained weights). Nothing
  changes for SynthFER or when the run starts from a file.

  Args:
    config: the config after the command-line overrides (changed in place).
    user_overrides: dotted names, relative to config, of the fields the user set; main.py
      passes the --config.* flags given on the command line,
      `set(config_flags.get_override_values(FLAGS['config']))`, e.g. {'dmue.gamma'}.

  Returns:
    One line per changed field ('dmue.gamma: 1000.0 -> 0.0 (...)'), for the log.
  """
  if config.model.init_from != 'scratch' or config.input.dataset == 'synthfer':
    return []
  epochs = config.num_epochs
  scratch = {
      'optim.backbone_lr': _scaled_schedule(SCRATCH_LR, epochs),
      'optim.head_lr': _scaled_schedule(SCRATCH_LR, epochs),
      'optim.pue_lr': _scaled_schedule(SCRATCH_PUE_LR, epochs),
      'dmue.gamma': SCRATCH_GAMMA,
      'dmue.ramp_a': SCRATCH_RAMP_A * epochs / SCRATCH_EPOCHS,
      'model.stem': SCRATCH_STEM,
  }
  changed = []
  for name, value in scratch.items():
    section, field = name.split('.')
    old = config[section][field]
    if _user_set(name, user_overrides) or old == value:
      continue
    config[section][field] = value
    changed.append(f'{name}: {old!r} -> {value!r} (init_from=scratch: the from-scratch '
                   f'setting of configs/default.py for {epochs} epochs; set --config.{name} '
                   'to keep another value)')
  return changed


def paper_behaviour(config: ml_collections.ConfigDict) -> None:
  """The `:paper` variant: the PUE MLP and the BN-neck are learned, as the paper describes
  (README quirk Q2), instead of staying at their initialisation as in the authors' code."""
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
  # A try-out needs no download; --config.model.init_from (applied after this) still wins.
  if not config.model.init_from:
    config.model.init_from = 'scratch'


# The variants every dataset config offers after the ":" of --config.
DATASET_PRESETS = {'runlocal': shrink_for_laptop, 'paper': paper_behaviour}
