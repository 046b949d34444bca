r"""DMUE on AffectNet, 7 classes (contempt dropped), ResNet-18, the reference hyper-parameters (batch 70, 36 epochs).

  python -m dmue_jax.main --config configs/affectnet7.py --workdir runs/affectnet7 \
      --config.input.data_dir=/path/to/AffectNet
"""

from dmue_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.input.dataset = 'affectnet7'
  config.model.num_classes = 7
  config.input.batch_per_class = 10  # 7 x 10 = 70, the reference batch
  config.dmue.ramp_a = 6.0           # reference: AffectNet 4-6
  config.num_epochs = 36
  config_lib.apply_presets(config, arg, config_lib.DATASET_PRESETS)
  return config
