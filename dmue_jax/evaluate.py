r"""Re-evaluates a run's best checkpoint on its test split.

  python -m dmue_jax.evaluate --workdir runs/demo [--step N]

Prints the summary and writes <workdir>/evaluate.json (accuracy, mean class accuracy,
per-class accuracy, confusion matrix, the step evaluated).
"""

import json
import os

from absl import flags
import jax

from dmue_jax import checkpoints
from dmue_jax import cli
from dmue_jax import config_lib
from dmue_jax import metrics as metrics_lib
from dmue_jax import parallel
from dmue_jax import train

FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when run as a command, so notebooks can import this module next to others.
  flags.DEFINE_string('workdir', None, 'Directory of a training run.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the best).')
  flags.mark_flags_as_required(['workdir'])


def evaluate(workdir: str, step: int | None = None) -> dict:
  """Restores `step` (default: best) of `workdir` and evaluates it on the test split."""
  mgr, step, meta = checkpoints.open_run(workdir, step)
  config = checkpoints.config_from_meta(meta)
  config_lib.validate(config, for_training=False)
  data = train.prepare_data(config)
  state, _ = checkpoints.restore(mgr, step, train.state_shape(config, data.steps_per_epoch))
  mesh = parallel.make_mesh()
  _, p_eval = train.make_jitted_steps(config, mesh, data.steps_per_epoch)
  variables = jax.device_put(state.variables, parallel.replicated(mesh))
  summary = train.evaluate_split(p_eval, variables, data.splits.test, config, mesh)
  summary = {'step': int(step), 'class_names': list(data.splits.class_names), **summary}
  if jax.process_index() == 0:
    metrics_lib.write_json(os.path.join(workdir, 'evaluate.json'), summary)
  return summary


def main(argv):
  del argv
  with cli.user_errors():
    summary = evaluate(FLAGS.workdir, FLAGS.step)
  print(json.dumps({k: summary[k] for k in ('step', 'eval_accuracy',
                                            'eval_mean_class_accuracy', 'per_class_accuracy')}))


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
