"""Classification metrics and the run's outputs: metrics.jsonl, TensorBoard, results, plots."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """[C, C] counts, row = true class, column = predicted class."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
  return cm


def classification_summary(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
  """eval_accuracy, eval_mean_class_accuracy, per_class_accuracy [C], confusion_matrix."""
  cm = confusion_matrix(labels, preds, num_classes)
  support = cm.sum(axis=1)
  per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
  return {
      'eval_accuracy': float(np.trace(cm) / max(cm.sum(), 1)),
      'eval_mean_class_accuracy': float(np.nanmean(per_class)) if np.any(support) else 0.0,
      'per_class_accuracy': [None if np.isnan(a) else float(a) for a in per_class],
      'confusion_matrix': cm.tolist(),
  }


def _jsonable(v: Any):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  if hasattr(v, 'item') and getattr(v, 'shape', None) == ():
    return v.item()
  return v


METRICS_FILE = 'metrics.jsonl'


def _summary_writer_class():
  """tensorboardX's SummaryWriter, or None without it (TensorBoard output is optional;
  metrics.jsonl is always written).

  tensorboardX imports torch when it is installed, only to accept torch tensors, which this
  writer never passes; that import costs every run seconds, so torch is hidden from it unless
  something has loaded torch already.
  """
  hide_torch = 'torch' not in sys.modules
  if hide_torch:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  except ImportError:
    return None
  finally:
    if hide_torch:
      sys.modules.pop('torch', None)


class MetricWriter:
  """Appends JSON lines to <workdir>/metrics.jsonl and scalars to TensorBoard event files.

  A per-class list (per_class_accuracy) becomes one TensorBoard scalar per class, tagged
  `<name>/<class name>` (or `<name>/<index>` without class names). Only the writing process
  (process 0) should build one.
  """

  def __init__(self, workdir: str, class_names: Sequence[str] | None = None):
    os.makedirs(workdir, exist_ok=True)
    self.class_names = list(class_names) if class_names is not None else None
    self.path = os.path.join(workdir, METRICS_FILE)
    writer_class = _summary_writer_class()
    self._tb = writer_class(os.path.join(workdir, 'tensorboard')) if writer_class else None

  def truncate_after(self, step: int) -> None:
    """Drops records of steps after `step`: a resumed run redoes them."""
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut by a kill mid-write
        if rec.get('step', 0) <= step:
          kept.append(line if line.endswith('\n') else line + '\n')
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, record: dict) -> None:
    rec = {'step': int(step), **{k: _jsonable(v) for k, v in record.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(rec) + '\n')
    if self._tb is not None:
      for tag, value in self._scalars(rec):
        self._tb.add_scalar(tag, value, step)
      self._tb.flush()

  def _scalars(self, rec: dict):
    """(tag, number) pairs of a record: numbers as they are, number lists one per entry."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for k, v in rec.items():
      if k == 'step':
        continue
      if number(v):
        yield k, v
      elif isinstance(v, list) and v and all(number(x) or x is None for x in v):
        # Confusion matrices are lists of lists and stay out; a class without test samples
        # (None) is skipped rather than plotted as 0.
        names = (self.class_names if self.class_names is not None
                 and len(self.class_names) == len(v) else range(len(v)))
        for name, x in zip(names, v):
          if x is not None:
            yield f'{k}/{name}', x

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj: dict) -> None:
  """Writes atomically so a kill never leaves half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str,
                          title: str = 'Confusion matrix') -> None:
  """Row-normalised confusion matrix with counts, saved as PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cm = np.asarray(cm)
  norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.7 * n))
  ax.imshow(norm, cmap='Blues', vmin=0, vmax=1)
  ax.set_xticks(range(n), class_names, rotation=45, ha='right')
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title)
  for i in range(n):
    for j in range(n):
      ax.text(j, i, f'{norm[i, j]:.2f}\n({cm[i, j]})', ha='center', va='center', fontsize=7,
              color='white' if norm[i, j] > 0.5 else 'black')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
