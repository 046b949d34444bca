r"""The SynthFER pretraining stage: a pretrained start, as the paper starts from MS-Celeb-1M weights.

The paper's gains come from fine-tuning a backbone pretrained on a large related task; the
embedded SynthFER demo has no such weights to download, so this stage makes them: the plain
network (trunk, one layer4, BN-neck) trained with cross-entropy on a *disjoint* SynthFER draw
(another generator seed, so other faces and other annotations than the run's). It never sees
the images or labels under test. The result is cached (`dmue_jax.backbones`), keyed by
everything that shapes it, so only a run's first start pays for it. The training commands call
`ensure_pretrained` before training when `config.model.init_from = 'synthfer_pretrained'`
(configs/default.py).
"""

from __future__ import annotations

import os

from absl import logging

from dmue_jax import analyze
from dmue_jax import backbones
from dmue_jax import train


def ensure_pretrained(config) -> str:
  """The path of the pretrained backbone for `config`, training it first if not cached."""
  path = backbones.cached_path(config)
  directory = os.path.dirname(path)
  if os.path.exists(path):
    return path
  cfg = backbones.pretrain_config(config)
  logging.warning('Pretraining the backbone on a disjoint SynthFER draw (seed %d, %d faces, '
                  '%d epochs), once: it is cached in %s.', cfg.input.synthfer_seed,
                  cfg.input.synthfer_num_train, cfg.num_epochs, directory)
  results = train.train_and_evaluate(cfg, os.path.join(directory, 'run'))
  _, variables, _ = analyze.restore_latest(os.path.join(directory, 'run'))
  backbones.save_backbone(path, variables)
  logging.warning('Pretrained backbone: %.1f %% test accuracy on its own draw.',
                  100 * results['eval_accuracy'])
  return path


def prepare_start(config) -> None:
  """Builds what `config.model.init_from` names when a stage makes it (the SynthFER pretrained
  backbone), so that `train.initial_variables` can load it."""
  if config.model.init_from == backbones.KEYWORD:
    ensure_pretrained(config)
