"""Orbax checkpoints of the train state: save, resume from the latest, restore the best.

Layout: <workdir>/checkpoints/<step>/{state, meta}. `state` is the TrainState pytree (params,
batch statistics, optimiser state, step); `meta` is JSON (epoch, the step's data position, the
RNG seed, class names). The data position and the dropout RNG are pure functions of the step,
so restoring the state is enough for a resumed run to continue bit for bit.

The newest `keep` checkpoints are kept, plus the best one by eval accuracy.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from dmue_jax import config_lib
from dmue_jax import parallel
from dmue_jax.errors import UserError


class CheckpointError(UserError):
  """A checkpoint that cannot be read; the message names the path and the fix."""


def check_workdir(workdir: str) -> None:
  """Rejects URL workdirs (gs://...): metrics, results and checkpoints are written with local
  file I/O, so a bucket must be mounted (gcsfuse) or a shared filesystem used instead."""
  if '://' in workdir:
    raise CheckpointError(
        f'--workdir {workdir}: URLs are not supported. Mount the bucket (e.g. gcsfuse) or use a '
        'shared filesystem, and pass that directory, e.g. --workdir /mnt/bucket/run.')


def manager(workdir: str, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=keep),
      pp.BestN(get_metric_fn=lambda m: m['eval_accuracy'], n=1,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=None if read_only else policy, create=not read_only,
      # best_fn also makes orbax write each step's metrics to disk (best_step reads them).
      best_fn=lambda m: m['eval_accuracy'], best_mode='max',
      read_only=read_only,
      # Synchronous saves: a run killed right after a save still has it complete on disk.
      # Asynchronous saves: training goes on while orbax writes. A step folder appears only
      # once complete, so a run killed mid-save resumes from the checkpoint before it.
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=('state', 'meta', 'dynamics'))


def save(mgr: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         metrics: dict | None = None, dynamics: Any = None) -> None:
  """Saves `state` and JSON `meta` at `step` (a no-op when that step is already saved).

  Returns once the arrays are copied off the devices; the files are written in the background
  (`mgr.wait_until_finished()` or `mgr.close()` waits for them).
  """
  if step in mgr.all_steps():
    return
  items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  if dynamics is not None:
    items['dynamics'] = ocp.args.StandardSave(dynamics)
  mgr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def _replicated_abstract(target: Any) -> Any:
  """`target`'s shapes and dtypes, replicated on every device of the run: a checkpoint restores
  there whichever devices wrote it (one process's checkpoint resumes on two)."""
  repl = parallel.replicated(parallel.make_mesh())

  def abstract(x):
    s = ocp.utils.to_shape_dtype_struct(x)
    return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl)
  return jax.tree.map(abstract, target)


def restore(mgr: ocp.CheckpointManager, step: int, target: Any):
  """Restores (state, meta) at `step`; `target` is a state (or its shapes) to restore into."""
  abstract = _replicated_abstract(target)
  try:
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types; the user needs one clear message.
    raise CheckpointError(
        f'cannot restore checkpoint step {step} from {mgr.directory}: {type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}. It may be from another model or number '
        'of classes (check --config), or damaged: delete that step folder to fall back to '
        'an older checkpoint.') from e
  return out['state'], out['meta']


def restore_dynamics(mgr: ocp.CheckpointManager, step: int, target: Any):
  """The training dynamics saved at `step` (`train.Dynamics`), or None for a checkpoint saved
  without them."""
  if 'dynamics' not in mgr.item_metadata(step):
    return None
  abstract = _replicated_abstract(target)
  try:
    return mgr.restore(step, args=ocp.args.Composite(
        dynamics=ocp.args.StandardRestore(abstract)))['dynamics']
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'cannot restore the training dynamics of step {step} from {mgr.directory}: '
        f'{type(e).__name__}. Delete that step folder to fall back to an older checkpoint.'
    ) from e


def best_step(mgr: ocp.CheckpointManager) -> int | None:
  """The kept step with the highest eval accuracy; the latest step if none has metrics."""
  best, best_acc = None, None
  for step in mgr.all_steps():
    metrics = mgr.metrics(step) if hasattr(mgr, 'metrics') else None
    acc = metrics.get('eval_accuracy') if metrics else None
    if acc is not None and (best_acc is None or acc > best_acc):
      best, best_acc = step, acc
  return best if best is not None else mgr.latest_step()


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def config_from_meta(meta: dict):
  """The run's ConfigDict, rebuilt from the JSON saved with every checkpoint.

  A field added to `config_lib.base_config` after the run was saved (e.g. optim.pue_lr) gets
  its default, so older runs still evaluate, export and analyse.
  """
  config = ml_collections.ConfigDict(json.loads(meta['config']))
  # Runs saved before AffectNet faces were aligned from their landmarks were trained on box
  # crops: evaluate them on what they saw.
  aligned_before = 'affectnet_align' in config.get('input', {})
  _fill_missing(config, config_lib.base_config())
  if not aligned_before:
    config.input.affectnet_align = 'box'
  return config


def _fill_missing(config, defaults) -> None:
  """Adds to `config` (in place) every field of `defaults` it lacks, recursively."""
  for name, value in defaults.items():
    if name not in config:
      config[name] = value
    elif hasattr(value, 'items') and hasattr(config[name], 'items'):
      _fill_missing(config[name], value)


def open_run(workdir: str, step: int | None = None):
  """(manager, step, meta) of `workdir`'s best (or given) checkpoint, read-only.

  Raises CheckpointError naming the workdir when it holds no checkpoint.
  """
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise CheckpointError(f'no checkpoints in {directory}: pass the --workdir of a training run '
                          '(python -m dmue_jax.main ... --workdir DIR).')
  mgr = manager(workdir, read_only=True)
  if step is None:
    step = best_step(mgr)
  if step is None:
    raise CheckpointError(f'{directory} holds no complete checkpoint; train first.')
  try:
    meta = read_meta(mgr, step)
  except Exception as e:  # a damaged or foreign folder
    raise CheckpointError(f'cannot read checkpoint step {step} in {directory}: {e}') from e
  return mgr, step, meta
