"""Loads a trained model for inference, and writes and reads slim exported checkpoints.

Three places hold a model, and `load` reads any of them:

* a workdir: its best checkpoint (`checkpoints.best_step`: the highest eval accuracy, else the
  latest step), i.e. <workdir>/checkpoints/<step>;
* one checkpoint step folder, <workdir>/checkpoints/<step> (or a copy of one elsewhere);
* an export written by `save_export` (`python -m dmue_jax.export`; its layout is there).

Training checkpoints hold the whole TrainState (every auxiliary branch, the PUE MLP, the
optimiser's moments). An export holds only the inference variables, the target path that
`models.dmue.InferenceModel` runs, so it is about the size of the plain backbone. Either way the
run's config comes from the checkpoint's meta, so inference needs no --config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dmue_jax import checkpoints
from dmue_jax import input_pipeline
from dmue_jax import train
from dmue_jax.checkpoints import CheckpointError
from dmue_jax.kernels import compiler
from dmue_jax.models import dmue as dmue_model

Variables = dict[str, Any]

EXPORT_FORMAT = 'dmue_jax.inference'
EXPORT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """Everything inference needs: the inference variables, the run's config, the class names.

  variables: {'params', 'batch_stats'}, each {'trunk', 'branch', 'neck'[, 'head']} (the
    `models.dmue.inference_variables` layout).
  step: the training step the weights come from (None if unknown).
  path: the folder they were read from, for messages.
  """
  variables: Variables
  config: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  step: int | None
  path: str

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


# ------------------------------------------------------------------------------------ loading
def load(*, workdir: str | None = None, checkpoint: str | None = None) -> LoadedModel:
  """Loads from `checkpoint` when given (an export, a step folder, a workdir, or a step number
  of `workdir`), else from the best checkpoint of `workdir`. Raises CheckpointError."""
  if checkpoint:
    if not os.path.exists(checkpoint) and checkpoint.isdigit() and workdir:
      checkpoint = os.path.join(workdir, 'checkpoints', checkpoint)
    return load_path(checkpoint)
  if not workdir:
    raise CheckpointError('give --workdir (a training run folder) or --checkpoint (an export '
                          'or a checkpoint step folder).')
  return load_workdir(workdir)


def load_path(path: str) -> LoadedModel:
  """Loads an export, a checkpoint step folder or a workdir, recognised by their contents."""
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint {path} does not exist.')
  if _has_items(path, 'variables', 'meta'):
    return load_export(path)
  if _has_items(path, 'state', 'meta'):
    return load_step_dir(path)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return load_workdir(path)
  raise CheckpointError(
      f'{path} is neither an export (written by python -m dmue_jax.export) nor a checkpoint '
      'step folder (<workdir>/checkpoints/<step>, holding state/ and meta/).')


def load_workdir(workdir: str) -> LoadedModel:
  """The best checkpoint of a training run (highest eval accuracy, else the latest)."""
  if not os.path.isdir(workdir):
    raise CheckpointError(f'workdir {workdir} does not exist (or is not a folder).')
  with _quiet_orbax():
    mgr, step, _ = checkpoints.open_run(workdir)
    try:
      path = _read(lambda: ocp.step.find_step_path(
          mgr.directory, ocp.step.standard_name_format(), step=step), mgr.directory)
    finally:
      mgr.close()
  return load_step_dir(os.fspath(path))


def load_step_dir(path: str) -> LoadedModel:
  """One checkpoint step folder (<workdir>/checkpoints/<step>, or a copy of it).

  Reads only the state's params and batch statistics: the optimiser's moments, two thirds of a
  training checkpoint, are never loaded.
  """
  path = os.path.abspath(path)
  with _quiet_orbax():
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    meta = _read(lambda: ckptr.restore(path, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta'], path)
    config = config_from_meta(meta, path)
    target = _restore_target(abstract_train_variables(config))
    args = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    variables = _read(lambda: ckptr.restore(path, args=ocp.args.Composite(state=args))['state'],
                      path)
  return _checked(LoadedModel(variables=dmue_model.inference_variables(variables),
                              config=config, class_names=_class_names(meta, config),
                              step=meta.get('step'), path=path))


def load_export(path: str) -> LoadedModel:
  """A slim export written by `save_export`."""
  path = os.path.abspath(path)
  with _quiet_orbax():
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    meta = _read(lambda: ckptr.restore(path, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta'], path)
    if meta.get('format') != EXPORT_FORMAT or meta.get('version', 0) > EXPORT_VERSION:
      raise CheckpointError(
          f'{path} is not a dmue_jax export this version can read (format '
          f'{meta.get("format")!r}, version {meta.get("version")!r}); export it again with '
          'python -m dmue_jax.export.')
    config = config_from_meta(meta, path)
    abstract = _restore_target(abstract_inference_variables(config))
    variables = _read(lambda: ckptr.restore(path, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(abstract)))['variables'], path)
  return _checked(LoadedModel(variables=variables, config=config,
                              class_names=_class_names(meta, config),
                              step=meta.get('step'), path=path))


def config_from_meta(meta: dict, where: str) -> ml_collections.ConfigDict:
  """The run's config from a checkpoint's meta (JSON round trip: tuples come back as lists)."""
  if not isinstance(meta.get('config'), str):
    raise CheckpointError(f'{where} has no config in its meta (written by an older version); '
                          'it cannot be used for inference.')
  try:
    return checkpoints.config_from_meta(meta)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{where} has an unreadable config in its meta: {e}') from e


def abstract_train_variables(config) -> Variables:
  """Shapes and dtypes of the run's {'params', 'batch_stats'} (the training layout, or the
  inference layout for a plain cross-entropy run), without computing anything."""
  return jax.eval_shape(lambda key: train.init_variables(config, key), jax.random.key(0))


def abstract_inference_variables(config) -> Variables:
  model = dmue_model.InferenceModel(train.make_model(config))
  return jax.eval_shape(lambda key: model.init(key, config.input.image_size),
                        jax.random.key(0))


def _class_names(meta: dict, config) -> tuple[str, ...]:
  names = meta.get('class_names')
  if not names:
    # No names recorded: number the classes so that output still has one entry per class.
    names = [f'class_{i}' for i in range(config.model.num_classes)]
  return tuple(str(n) for n in names)


def _checked(loaded: LoadedModel) -> LoadedModel:
  """The head must produce one logit per class name (a meta edited or copied from another run
  would otherwise give silently wrong labels)."""
  head = loaded.variables['params']['head']['kernel']
  if head.shape[-1] != loaded.num_classes or (
      loaded.config.model.num_classes != loaded.num_classes):
    raise CheckpointError(
        f'{loaded.path}: the model has {head.shape[-1]} outputs and its config '
        f'{loaded.config.model.num_classes} classes, but {loaded.num_classes} class names '
        f'({", ".join(loaded.class_names)}); the checkpoint is from another number of classes '
        'than its meta says. Use the checkpoint folder that training wrote, unmodified.')
  return loaded


def _has_items(path: str, *names: str) -> bool:
  return all(os.path.isdir(os.path.join(path, n)) for n in names)


def _restore_target(abstract):
  """Restore into single-device arrays (inference runs on one device)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      abstract)


def _read(fn, where: str):
  """Runs an orbax read, turning its many exception types into one clear CheckpointError."""
  try:
    return fn()
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).splitlines()[0].rstrip('.') if str(e) else ''
    raise CheckpointError(
        f'cannot read checkpoint {where}: {type(e).__name__}: {first}. It may be damaged, '
        'incomplete, or from another model or number of classes.') from e


@contextlib.contextmanager
def _quiet_orbax():
  """Hides orbax's informational warnings (read-only managers, missing metadata), which would
  bury a command's own one-line messages; errors still show."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


# ------------------------------------------------------------------------------------ export
def save_export(loaded: LoadedModel, out: str, *, overwrite: bool = False) -> None:
  """Writes `loaded` as a slim inference checkpoint at `out` (a new folder).

  Layout of an export directory:
    <out>/variables   orbax StandardSave of {'params', 'batch_stats'} in the inference layout
                      (trunk, target layer4, neck, head and their batch statistics)
    <out>/meta        JSON: format, version, class_names, num_classes, dmue, step, source,
                      config (JSON)
  """
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise CheckpointError(f'{out} already exists; choose another --out or pass --overwrite.')
  meta = {'format': EXPORT_FORMAT, 'version': EXPORT_VERSION,
          'class_names': list(loaded.class_names), 'num_classes': loaded.num_classes,
          'dmue': bool(loaded.config.dmue.enabled), 'step': loaded.step,
          'source': loaded.path, 'config': loaded.config.to_json()}
  variables = dmue_model.inference_variables(loaded.variables)
  with _quiet_orbax():
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
      ckptr.save(out, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                              meta=ocp.args.JsonSave(meta)),
                 force=overwrite)
    except OSError as e:
      raise CheckpointError(f'cannot write {out}: {e.strerror or e}.') from e


def directory_size(path: str) -> int:
  """Total bytes of the files under `path`."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      total += os.path.getsize(os.path.join(root, name))
  return total


# -------------------------------------------------------------------------------- classifying
class Classifier:
  """Class probabilities for face crops with a loaded model.

  Crops of any size go through the config's evaluation transform (resize to
  config.input.resize_size, centre crop config.input.image_size, normalise), as in evaluation.
  Batches are padded to a power of two (at most `max_batch`) so that a varying number of faces
  compiles a handful of shapes, not one per count.
  """

  def __init__(self, loaded: LoadedModel, *, max_batch: int = 32):
    self.loaded = loaded
    self.max_batch = max_batch
    self.image_size = int(loaded.config.input.image_size)
    self.resize_size = int(loaded.config.input.resize_size)
    self._logits = compiler.jit(functools.partial(train.eval_logits, config=loaded.config))

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.loaded.class_names

  def preprocess(self, crop: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] -> float32[S, S, 3]."""
    return input_pipeline.eval_transform(crop, image_size=self.image_size,
                                         resize_size=self.resize_size)

  def logits(self, images: np.ndarray) -> np.ndarray:
    """float32[N, S, S, 3] preprocessed images -> float32[N, C] logits."""
    images = np.asarray(images, np.float32)
    out = []
    for start in range(0, len(images), self.max_batch):
      chunk = images[start:start + self.max_batch]
      n = len(chunk)
      padded = min(self.max_batch, 1 << (n - 1).bit_length())
      if padded > n:
        chunk = np.concatenate([chunk, np.zeros((padded - n,) + chunk.shape[1:], chunk.dtype)])
      logits = self._logits(self.loaded.variables, jnp.asarray(chunk))
      out.append(np.asarray(logits, np.float32)[:n])
    if not out:
      return np.zeros((0, self.loaded.num_classes), np.float32)
    return np.concatenate(out)

  def probabilities(self, crops: list[np.ndarray]) -> np.ndarray:
    """uint8[H_i, W_i, 3] crops -> float32[N, C] softmax probabilities (rows sum to 1)."""
    if not crops:
      return np.zeros((0, self.loaded.num_classes), np.float32)
    logits = self.logits(np.stack([self.preprocess(c) for c in crops])).astype(np.float64)
    # In float64 on the host, so that each row sums to 1 to well within float32 precision.
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
