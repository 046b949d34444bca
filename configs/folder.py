r"""DMUE on your own faces: <data_dir>/<split>/<class_name>/*.jpg (split = train, test).

The class list comes from the folder names; model.num_classes is set from it at start-up.

  python -m dmue_jax.main --config configs/folder.py --workdir runs/mine \
      --config.input.data_dir=/path/to/my_faces
"""

from dmue_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.input.dataset = 'folder'
  config.model.num_classes = 0       # 0 = taken from the folder names
  config.input.batch_per_class = 8
  config.dmue.ramp_a = 10.0
  config.num_epochs = 36
  config_lib.apply_presets(config, arg, config_lib.DATASET_PRESETS)
  return config
