r"""DMUE on RAF-DB basic (7 classes), ResNet-18, the reference hyper-parameters.

  python -m dmue_jax.main --config configs/rafdb.py --workdir runs/rafdb \
      --config.input.data_dir=/path/to/RAF-DB/basic

`:runlocal` shrinks the run for a laptop: --config configs/rafdb.py:runlocal
`:paper` learns the PUE MLP and the BN-neck as the paper describes (the authors' code freezes
them, README quirk Q2); every dataset config has both, and `:runlocal,paper` combines them.
"""

from dmue_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.input.dataset = 'rafdb'
  config.model.num_classes = 7
  config.model.backbone = 'resnet18'
  config.dmue.ramp_a = 10.0    # reference: RAF-DB 9-10
  config.num_epochs = 36
  config_lib.apply_presets(config, arg, config_lib.DATASET_PRESETS)
  return config
