r"""DMUE on FERPlus (8 classes, majority protocol), ResNet-18.

  python -m dmue_jax.main --config configs/ferplus.py --workdir runs/ferplus \
      --config.input.data_dir=/path/to/ferplus   # holds fer2013.csv and fer2013new.csv
"""

from dmue_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.input.dataset = 'ferplus'
  config.model.num_classes = 8
  config.input.batch_per_class = 9
  config.dmue.ramp_a = 12.0          # reference: FERPlus 10-14
  config.num_epochs = 36
  config_lib.apply_presets(config, arg, config_lib.DATASET_PRESETS)
  return config
