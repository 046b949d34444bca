r"""Trains DMUE (or the plain cross-entropy baseline) and evaluates it.

  python -m dmue_jax.main --config configs/default.py --workdir runs/demo
  python -m dmue_jax.main --config configs/rafdb.py --workdir runs/rafdb \
      --config.input.data_dir=/data/RAF-DB/basic --config.input.batch_per_class=8

Restarting on the same --workdir resumes from its latest checkpoint.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dmue_jax import cli
from dmue_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_bool('log_to_console', False, 'Also show the library\'s INFO logging on the '
                  'console (it always goes to <workdir>/log.txt).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  with cli.user_errors():
    cli.start_run(FLAGS['config'], FLAGS.workdir, console_info=FLAGS.log_to_console)
    logging.info('JAX %s, process %d of %d, devices: %s', jax.__version__,
                 jax.process_index(), jax.process_count(), jax.devices())
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
      print(summary(results, FLAGS.workdir))


def summary(results: dict, workdir: str) -> str:
  """The run's final figures in a few lines, for the console."""
  lines = [f'test accuracy {results["eval_accuracy"]:.4f}, mean class accuracy '
           f'{results["eval_mean_class_accuracy"]:.4f}']
  if 'best_eval_accuracy' in results:
    lines[0] += (f' (best {results["best_eval_accuracy"]:.4f} at step '
                 f'{results["best_eval_step"]})')
  if 'noisy_label_auroc' in results:
    lines.append(f'wrong labels: ranked with AUROC {results["noisy_label_auroc"]:.3f}, '
                 f'{results["num_flagged"]} flagged')
  elif 'num_flagged' in results:
    lines.append(f'{results["num_flagged"]} training labels flagged as likely wrong')
  lines.append(f'results: {os.path.join(workdir, "results.json")}; log: '
               f'{os.path.join(workdir, "log.txt")}')
  return '\n'.join(lines)


if __name__ == '__main__':
  cli.run(main)
