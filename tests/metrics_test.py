"""MetricWriter: metrics.jsonl and the TensorBoard scalars, per-class ones included."""

import glob
import os
import struct
import subprocess
import sys

import numpy as np
from tensorboardX.proto import event_pb2

from dmue_jax import metrics


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from the TFRecord-framed event files under logdir."""
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, the record, its crc
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_per_class_accuracy_becomes_one_scalar_per_class(tmp_path):
  summary = metrics.classification_summary(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]),
                                           num_classes=3)
  writer = metrics.MetricWriter(str(tmp_path), class_names=['happy', 'sad', 'angry'])
  writer.write(10, {'loss': np.float32(0.5), **summary})
  writer.close()
  scalars = read_scalars(os.path.join(tmp_path, 'tensorboard'))
  assert scalars['per_class_accuracy/happy'] == [(10, 0.5)]
  assert np.isclose(scalars['per_class_accuracy/sad'][0][1], 2 / 3)
  # 'angry' has no test sample (None): left out, not plotted as 0; the matrix stays out too.
  assert not any(tag.startswith(('per_class_accuracy/angry', 'confusion_matrix'))
                 for tag in scalars)
  assert scalars['loss'] == [(10, 0.5)]
  assert np.isclose(scalars['eval_accuracy'][0][1], 3 / 5)
  # metrics.jsonl keeps the lists whole.
  [record] = metrics.read_jsonl(os.path.join(tmp_path, 'metrics.jsonl'))
  assert record['per_class_accuracy'][2] is None and record['confusion_matrix'][1] == [1, 2, 0]


def test_without_class_names_the_tags_are_indices(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {'per_class_accuracy': [0.25, 1.0]})
  writer.close()
  scalars = read_scalars(os.path.join(tmp_path, 'tensorboard'))
  assert scalars == {'per_class_accuracy/0': [(1, 0.25)], 'per_class_accuracy/1': [(1, 1.0)]}


def test_tensorboard_writer_leaves_torch_unloaded(tmp_path):
  """tensorboardX would import torch (seconds per run) only to accept torch tensors: a run's
  writer writes its events without loading it, and torch still imports afterwards."""
  script = ('import sys\n'
            'from dmue_jax import metrics\n'
            f'writer = metrics.MetricWriter({str(tmp_path)!r})\n'
            'writer.write(1, {"loss": 0.5})\n'
            'writer.close()\n'
            'assert writer._tb is not None\n'
            'assert "torch" not in sys.modules, "torch was loaded"\n'
            'import torch\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-c', script], cwd=root, capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=root), timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert read_scalars(os.path.join(tmp_path, 'tensorboard'))['loss'] == [(1, 0.5)]
