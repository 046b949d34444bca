r"""Writes a slim inference checkpoint of a trained model, for predict and for deployment.

  python -m dmue_jax.export --workdir runs/demo --out runs/demo_export
  python -m dmue_jax.predict --checkpoint runs/demo_export photo.jpg

The export keeps only what inference runs: trunk, target branch, neck and head with their batch
statistics, plus the run's config and class names (layout in `dmue_jax.inference`). The
auxiliary branches, the PUE MLP and the optimiser state stay behind, so the export is about the
size of the plain backbone while a DMUE training checkpoint holds C+1 copies of layer4 and two
Adam moments for each. The source is the workdir's best checkpoint, or --checkpoint (a step
folder, or a step number of --workdir). Prints the sizes of both.
"""

from __future__ import annotations

import os

from absl import flags
import jax
import numpy as np

from dmue_jax import cli
from dmue_jax import inference
from dmue_jax.checkpoints import CheckpointError

FLAGS = flags.FLAGS


def _define_flags():
  # Only when run as a command: tests import this module beside others that define --workdir.
  flags.DEFINE_string('workdir', None, 'Training run folder; its best checkpoint is exported.')
  flags.DEFINE_string('checkpoint', None, 'A checkpoint step folder, or a step number of '
                      '--workdir, to export instead of the best one.')
  flags.DEFINE_string('out', None, 'The folder to write (must not exist, unless --overwrite).')
  flags.DEFINE_boolean('overwrite', False, 'Replace --out if it exists.')


def export(*, out: str, workdir: str | None = None, checkpoint: str | None = None,
           overwrite: bool = False) -> dict:
  """Loads the model (see inference.load), writes the export to `out`; returns a summary:
  {'source', 'step', 'out', 'source_bytes', 'export_bytes', 'num_params'}."""
  if os.path.exists(out) and not overwrite:  # before the (slow) load
    raise CheckpointError(f'{out} already exists; choose another --out or pass --overwrite.')
  loaded = inference.load(workdir=workdir, checkpoint=checkpoint)
  if os.path.abspath(out) == os.path.abspath(loaded.path):
    raise CheckpointError(f'--out {out} is the checkpoint being exported; choose another folder.')
  inference.save_export(loaded, out, overwrite=overwrite)
  return {'source': loaded.path, 'step': loaded.step, 'out': os.path.abspath(out),
          'source_bytes': inference.directory_size(loaded.path),
          'export_bytes': inference.directory_size(out),
          'num_params': int(sum(np.size(a) for a in jax.tree.leaves(loaded.variables['params'])))}


def _megabytes(n: int) -> str:
  return f'{n / 2**20:.2f} MiB'


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.out:
    cli.fail('give --out, the folder to write the export to.')
  if not FLAGS.workdir and not FLAGS.checkpoint:
    cli.fail('give --workdir (a training run folder) or --checkpoint (a checkpoint step '
             'folder).')
  with cli.user_errors():
    s = export(out=FLAGS.out, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
               overwrite=FLAGS.overwrite)
  step = f'step {s["step"]} ' if s['step'] is not None else ''
  print(f'source  {step}{s["source"]}: {_megabytes(s["source_bytes"])}')
  print(f'export  {s["out"]}: {_megabytes(s["export_bytes"])} '
        f'({s["num_params"]:,} parameters, {s["source_bytes"] / s["export_bytes"]:.1f}x smaller)')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
