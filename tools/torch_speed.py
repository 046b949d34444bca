"""Times the PyTorch re-creation of the reference DMUE train step (and a plain ResNet-18 step).

This is the CPU yardstick for `python -m dmue_jax.bench`, a tool rather than a test: the
authors' training step (the tests' tests/torch_reference.py follows their forward and loss
operation by operation) and a plain
ResNet-18 cross-entropy step, on the same machine, batch and image size. Needs torch:

  python3 tools/torch_speed.py --image-size 112 --batch-per-class 10 [--steps 5] [--threads N]

Prints one JSON line: {"torch_dmue_images_per_second", "torch_plain_images_per_second", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def _time(step, steps: int) -> float:
  """Seconds per call of `step`, after two warm-up calls."""
  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - start) / steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image-size', type=int, default=112)
  parser.add_argument('--batch-per-class', type=int, default=10)
  parser.add_argument('--num-classes', type=int, default=7)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  c, k, size = args.num_classes, args.batch_per_class, args.image_size
  batch = c * k
  images = torch.randn(batch, 3, size, size)
  # Shuffled, k of each class, as the reference's sampler gives them.
  labels = torch.arange(c).repeat_interleave(k)[torch.randperm(batch)]

  model = torch_reference.DMUENet('resnet18', c).train()
  # The reference's optimiser: Adam, weight decay added to the gradient.
  opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4)

  def dmue_step():
    out = model(images, labels, 'sp_confidence')
    loss = torch_reference.dmue_loss(out, labels, num_classes=c, epoch=10, ramp_a=6)['total']
    opt.zero_grad()
    loss.backward()
    opt.step()

  # The plain backbone: the same trunk with one layer4 and a linear head.
  plain = torch_reference.DMUENet('resnet18', c)
  trunk = plain.base
  head = torch.nn.Linear(torch_reference.feature_dim('resnet18', 64), c)
  plain_params = [p for n, p in trunk.named_parameters()
                  if not n.startswith('layer4_') or n.startswith(f'layer4_{c}.')]
  plain_params += list(head.parameters())
  plain_opt = torch.optim.Adam(plain_params, lr=1e-4, weight_decay=5e-4)
  trunk.train()

  def plain_step():
    maps = trunk(images, phase='normal')['final']
    loss = F.cross_entropy(head(F.adaptive_avg_pool2d(maps, 1).flatten(1)), labels)
    plain_opt.zero_grad()
    loss.backward()
    plain_opt.step()

  dmue_s = _time(dmue_step, args.steps)
  plain_s = _time(plain_step, args.steps)
  print(json.dumps({
      'torch_dmue_images_per_second': batch / dmue_s,
      'torch_dmue_seconds_per_step': dmue_s,
      'torch_plain_images_per_second': batch / plain_s,
      'torch_plain_seconds_per_step': plain_s,
      'batch': batch, 'image_size': size, 'threads': args.threads,
      'torch_version': torch.__version__, 'load_average': os.getloadavg(),
  }))


if __name__ == '__main__':
  main()
