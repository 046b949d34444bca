r"""Trains DMUE (or the plain cross-entropy baseline) and evaluates it.

  python -m dmue_jax.main --config configs/default.py --workdir runs/demo
  python -m dmue_jax.main --config configs/rafdb.py --workdir runs/rafdb \
      --config.input.data_dir=/data/RAF-DB/basic --config.input.batch_per_class=8

Restarting on the same --workdir resumes from its latest checkpoint. The command orchestrates
the stages: the pretrained start when the config names one (dmue_jax.pretrain), training
(dmue_jax.train), then the ambiguity report (dmue_jax.analyze).
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax

from dmue_jax import analyze
from dmue_jax import cli
from dmue_jax import pretrain
from dmue_jax import train

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined when run as a command only, so that other commands can import train_and_analyze.
  cli.define_run_flags('Directory for checkpoints, metrics and results.')
  flags.DEFINE_bool('log_to_console', False, 'Also show the library\'s INFO logging on the '
                    'console (it always goes to <workdir>/log.txt).')


def train_and_analyze(config, workdir: str, variables=None, hooks=()) -> dict:
  """A whole run: the pretrained start if the config names one, training and evaluation
  (`train.run_training`), then with config.analyze_at_end the ambiguity report of the final
  state (`analyze.analyze`, on what training has in memory). Returns results.json's content."""
  pretrain.prepare_start(config)
  run = train.run_training(config, workdir, variables=variables, hooks=hooks)
  if config.analyze_at_end:
    run.results.update(analyze.analyze(workdir, config=config, state=run.state, data=run.data,
                                       dynamics=run.dynamics))
  return run.results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  with cli.user_errors():
    cli.start_run(FLAGS['config'], FLAGS.workdir, console_info=FLAGS.log_to_console)
    logging.info('JAX %s, process %d of %d, devices: %s', jax.__version__,
                 jax.process_index(), jax.process_count(), jax.devices())
    results = train_and_analyze(FLAGS.config, FLAGS.workdir)
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
  _define_flags()
  cli.run(main)
