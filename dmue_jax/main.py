r"""Trains DMUE (or the plain cross-entropy baseline) and evaluates it.

  python -m dmue_jax.main --config configs/default.py --workdir runs/demo
  python -m dmue_jax.main --config configs/rafdb.py --workdir runs/rafdb \
      --config.input.data_dir=/data/RAF-DB/basic --config.input.batch_per_class=8

Restarting on the same --workdir resumes from its latest checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dmue_jax import cli
from dmue_jax import config_lib
from dmue_jax import parallel
from dmue_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  with cli.user_errors():
    # A config that cannot work stops here, before any work.
    config_lib.validate(FLAGS.config)
    overrides = set(config_flags.get_override_values(FLAGS['config']))
    for line in config_lib.apply_scratch_defaults(FLAGS.config, overrides):
      logging.warning('Training from scratch: %s', line)
    # Before any call that starts the XLA backend (jax.devices() below included).
    parallel.initialize_distributed(FLAGS.config.parallel)
    logging.info('JAX %s, process %d of %d, devices: %s', jax.__version__,
                 jax.process_index(), jax.process_count(), jax.devices())
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  cli.run(main)
