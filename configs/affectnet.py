r"""DMUE on AffectNet, 8 classes, ResNet-18, the reference hyper-parameters (batch 72, 36 epochs).

  python -m dmue_jax.main --config configs/affectnet.py --workdir runs/affectnet \
      --config.input.data_dir=/path/to/AffectNet
"""

from dmue_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.input.dataset = 'affectnet'
  config.model.num_classes = 8
  config.input.batch_per_class = 9   # 8 x 9 = 72, the reference batch
  config.dmue.ramp_a = 6.0           # reference: AffectNet 4-6
  config.num_epochs = 36
  config_lib.apply_presets(config, arg, config_lib.DATASET_PRESETS)
  return config
