r"""DMUE against its plain cross-entropy baseline, from the same start.

  python -m dmue_jax.compare --config configs/default.py --workdir runs/compare
  python -m dmue_jax.compare --config configs/default.py --workdir runs/compare \
      --label-noise 0,0.1,0.3
  python -m dmue_jax.compare --config configs/default.py --workdir runs/ablate --ablate all

For each label-noise rate, two runs of the config: the baseline (`dmue.enabled=False`, the
inference network trained with cross-entropy) and DMUE. Both start from bit-identical weights
(the baseline's are DMUE's target branch, trunk, neck and head), with the same schedule,
batches, augmentation and dropout seed; only the method differs. `--ablate` adds DMUE arms
with one part switched off (ABLATIONS), from the same start. Each arm is an ordinary training
run in <workdir>/noise_<rate>/<arm>, so it resumes exactly like one. Writes
<workdir>/comparison.json and prints a side-by-side table (also in comparison.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from dmue_jax import cli
from dmue_jax import main as main_lib
from dmue_jax import pretrain
from dmue_jax.config_lib import ConfigError
from dmue_jax import metrics as metrics_lib
from dmue_jax import train
from dmue_jax.models import dmue as dmue_model

ARMS = ('baseline', 'dmue')
# DMUE with one part off: arm name -> config.dmue fields. Each is a switch of the config.
ABLATIONS = {
    'no_sp': {'gamma': 0.0},                       # the similarity-preserving (Gram) term
    'no_soft': {'w': 0.0},                         # the soft loss on the mined distribution
    'no_score': {'score_scaling': False},          # PUE score scaling of the target's CE
    'no_aux': {'w': 0.0, 'gamma': 0.0, 'aux_weight': 0.0},  # the auxiliary branches altogether
    'no_ramps': {'ramps': False},                  # ramp-up / ramp-down held at 1
    'sp_on_features': {'sp_on_aux_logits': False},  # Reference quirks Q3, as the paper has it
}
# What the table shows, when the runs have it (the report's figures need a known truth).
FIELDS = ('eval_accuracy', 'eval_mean_class_accuracy', 'noisy_label_auroc', 'flagged_precision',
          'flagged_recall', 'suggested_label_accuracy', 'latent_kl_to_truth',
          'baseline_kl_to_truth')


def arm_config(config, arm: str, label_noise: float):
  """The config of one arm ('baseline', 'dmue' or an ABLATIONS name): the run's, with the
  method and the noise rate set."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.dmue.enabled = arm != 'baseline'
    out.dmue.update(ABLATIONS.get(arm, {}))
    out.input.label_noise = float(label_noise)
  return out


def settled_config(config):
  """`config` with model.num_classes taken from the data when it is 0 (a folder dataset), as
  training settles it, so that the starting weights can be built before training."""
  if config.input.dataset != 'folder' or config.model.num_classes:
    return config
  out = copy.deepcopy(config)
  train.prepare_data(out)
  return out


def start_variables(config, arm: str):
  """The arm's starting weights: DMUE's initial variables (random from config.seed, or
  config.model.init_from), the inference subset of them for the baseline."""
  dmue_config = arm_config(config, 'dmue', config.input.label_noise)
  pretrain.prepare_start(dmue_config)
  init_rng, _ = jax.random.split(jax.random.key(config.seed))
  variables = train.initial_variables(dmue_config, init_rng)
  if arm == 'baseline':
    variables = dmue_model.inference_variables(variables)
  return variables


def fingerprint(variables) -> str:
  """SHA-256 of the weights both arms share (trunk, target branch, neck, head), for the
  record that they started alike."""
  inf = dmue_model.inference_variables(variables)
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(inf),
                           key=lambda item: jax.tree_util.keystr(item[0])):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()


def noise_dir(workdir: str, rate: float) -> str:
  return os.path.join(workdir, f'noise_{rate:g}')


def compare(config, workdir: str, label_noise: Sequence[float] | None = None,
            ablations: Sequence[str] = ()) -> dict:
  """Trains both arms, and the ablations, at each noise rate (resuming what is done); returns
  comparison.json's content."""
  rates = list(label_noise) if label_noise else [float(config.input.label_noise)]
  unknown = sorted(set(ablations) - set(ABLATIONS))
  if unknown:
    raise ConfigError(f'--ablate: unknown {", ".join(unknown)}; choose from '
                      f'{", ".join(ABLATIONS)} or all.')
  config = settled_config(config)
  rows = []
  for rate in rates:
    row = {'label_noise': rate}
    for arm in (*ARMS, *ablations):
      cfg = arm_config(config, arm, rate)
      variables = start_variables(cfg, arm)
      start = fingerprint(variables)  # before training, which consumes (donates) them
      logging.info('compare: %s at label noise %g', arm, rate)
      results = main_lib.train_and_analyze(cfg, os.path.join(noise_dir(workdir, rate), arm),
                                           variables=variables)
      row[arm] = {name: results[name] for name in FIELDS if name in results}
      row[arm]['start_fingerprint'] = start
    row['accuracy_gain'] = row['dmue']['eval_accuracy'] - row['baseline']['eval_accuracy']
    rows.append(row)
  out = {'config': json.loads(config.to_json()), 'ablations': list(ablations), 'runs': rows}
  if jax.process_index() == 0:
    metrics_lib.write_json(os.path.join(workdir, 'comparison.json'), out)
    with open(os.path.join(workdir, 'comparison.md'), 'w') as f:
      f.write(format_table(out) + '\n')
  return out


def format_table(comparison: dict) -> str:
  """A Markdown table: one row per noise rate and figure, the arms side by side."""
  lines = ['| label noise | figure | baseline | DMUE | DMUE - baseline |',
           '|---|---|---|---|---|']
  for row in comparison['runs']:
    for name in FIELDS:
      if name not in row['baseline'] and name not in row['dmue']:
        continue
      base, ours = row['baseline'].get(name), row['dmue'].get(name)
      fmt = lambda v: '-' if v is None else f'{v:.4f}'
      diff = '-' if base is None or ours is None else f'{ours - base:+.4f}'
      lines.append(f'| {row["label_noise"]:g} | {name} | {fmt(base)} | {fmt(ours)} | {diff} |')
  if comparison.get('ablations'):
    lines += ['', '| label noise | DMUE arm | test accuracy | - baseline | - DMUE |',
              '|---|---|---|---|---|']
    for row in comparison['runs']:
      base, full = row['baseline']['eval_accuracy'], row['dmue']['eval_accuracy']
      for arm in ('dmue', *comparison['ablations']):
        acc = row[arm]['eval_accuracy']
        lines.append(f'| {row["label_noise"]:g} | {arm} | {acc:.4f} | {acc - base:+.4f} | '
                     f'{acc - full:+.4f} |')
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def _define_flags():
  cli.define_run_flags('Directory of the comparison (one run per arm below).')
  flags.DEFINE_list('label-noise', None, 'Label-noise rates to compare at, e.g. 0,0.1,0.3 '
                    '(default: the config\'s input.label_noise).')
  flags.DEFINE_list('ablate', [], 'DMUE arms with one part off, from the same start: '
                    f'{", ".join(ABLATIONS)}, or all.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  with cli.user_errors():
    cli.start_run(FLAGS['config'], FLAGS.workdir)
    try:
      rates = [float(r) for r in FLAGS['label-noise'].value or []]
    except ValueError as e:
      raise ConfigError(f'--label-noise takes numbers such as 0,0.1,0.3: {e}') from e
    ablations = list(ABLATIONS) if FLAGS.ablate == ['all'] else FLAGS.ablate
    out = compare(FLAGS.config, FLAGS.workdir, rates, ablations)
  print(format_table(out))


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
