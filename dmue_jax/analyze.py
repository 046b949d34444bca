r"""Ambiguity analysis of a trained run: which training labels look wrong, and what else each
face looks like.

  python -m dmue_jax.analyze --workdir runs/demo [--step N]

Also run by the training commands after training (config.analyze_at_end), on the latest
checkpoint by default. On process 0 it writes <workdir>/ambiguity/samples.csv (one row per
training sample, most suspicious first), most_uncertain.png (the most suspicious faces with their
distributions) and score_histogram.png, and adds its metrics to <workdir>/results.json.
The PUE score and the mined distribution depend on the batch they are computed in (pairwise
similarities, training-mode BatchNorm), so they are computed as training computes them: the
training forward on class-balanced batches grouped [C, k] by annotated label (`score_plan`,
`sample_outputs`). Labels are ranked by `suspicion`, from the target head's probabilities, not by
the score. The CSV columns and the metrics: docs/ambiguity.md, "What the report writes".
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from typing import Any

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dmue_jax import checkpoints
from dmue_jax import cli
from dmue_jax import config_lib
from dmue_jax import input_pipeline
from dmue_jax import metrics as metrics_lib
from dmue_jax import parallel
from dmue_jax import train
from dmue_jax.kernels import compiler

OUT_DIR = 'ambiguity'
NUM_SHOWN = 16
# Added to the compared distributions so that a class the prediction gives (numerically) zero
# probability costs a large but finite log-ratio instead of an infinite KL.
KL_EPS = 1e-6


# ------------------------------------------------------------------ metrics (pure NumPy)
def kl_to_truth(*, truth: np.ndarray, pred: np.ndarray, labels: np.ndarray,
                eps: float = KL_EPS) -> np.ndarray:
  """Per-sample KL(truth || pred) over the classes other than the annotated one.

  The mined distribution is 0 at the annotated class by construction, so both distributions are
  restricted to the other C-1 classes and renormalised there before comparing. Zeros: pred is
  floored at `eps` (then renormalised), so a class the truth has and pred lacks costs about
  log(1/eps) rather than infinity; truth entries that are 0 contribute 0 (x log x -> 0).

  Args:
    truth: [N, C] non-negative (any scale per row, e.g. vote counts).
    pred: [N, C] non-negative (a softmax, or the mined distribution).
    labels: int [N] annotated labels.
    eps: the floor on pred.
  Returns:
    float64 [N]; NaN where the truth puts no mass (<= eps of its total) off the annotated class:
    there the restricted truth is undefined.
  """
  truth = np.asarray(truth, np.float64)
  pred = np.asarray(pred, np.float64)
  off = 1.0 - np.eye(truth.shape[1])[np.asarray(labels)]
  t = truth / np.maximum(truth.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny) * off
  mass = t.sum(axis=1)
  valid = mass > eps
  t = t / np.where(valid, mass, 1.0)[:, None]
  p = np.maximum(pred * off, eps) * off
  p = p / p.sum(axis=1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = np.where(t > 0, t * (np.log(t) - np.log(p)), 0.0)
  return np.where(valid, terms.sum(axis=1), np.nan)


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x [N] in increasing order; tied values share their average rank."""
  x = np.asarray(x)
  order = np.argsort(x, kind='stable')
  _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
  ranks = np.empty(x.shape[0], np.float64)
  ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
  return ranks


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
  """Area under the ROC curve of `scores` (higher = more likely positive) for `positives`.

  The Mann-Whitney form: P(score of a random positive > that of a random negative), ties
  counting one half. NaN when either class is empty.

  Args:
    scores: finite float [N].
    positives: bool [N].
  """
  positives = np.asarray(positives, bool)
  num_pos = int(positives.sum())
  num_neg = positives.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float('nan')
  rank_sum = average_ranks(np.asarray(scores, np.float64))[positives].sum()
  return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


# ------------------------------------------------------------------ the per-sample table
@dataclasses.dataclass
class SampleTable:
  """Everything known per training sample, in dataset order (N samples, C classes).

  score / latent are None for a plain cross-entropy run; truth / true_label None without a
  true distribution.
  """
  class_names: list[str]
  labels: np.ndarray               # int [N] annotated (trained-on) labels
  original_labels: np.ndarray      # int [N] before label noise
  flipped: np.ndarray              # bool [N]
  probs: np.ndarray                # [N, C] target head softmax, inference path
  score: np.ndarray | None         # [N]
  latent: np.ndarray | None        # [N, C]
  truth: np.ndarray | None         # [N, C] normalised to sum 1
  true_label: np.ndarray | None    # int [N]
  label_similarity: np.ndarray | None = None  # [N] m[i, y_i], the PUE input (DMUE runs)
  aum: np.ndarray | None = None                # [N] mean training margin (train.Dynamics)
  train_probs: np.ndarray | None = None        # [N, C] mean training softmax

  @property
  def mislabeled(self) -> np.ndarray | None:
    return None if self.true_label is None else self.labels != self.true_label

  def suspicion_order(self) -> np.ndarray:
    """Sample positions, most suspicious first."""
    return np.argsort(-self.suspicion(), kind='stable')

  def label_probs(self) -> np.ndarray:
    return self.probs[np.arange(self.labels.shape[0]), self.labels]

  def suspicion(self) -> np.ndarray:
    """[N] how likely each label is wrong, higher = more suspicious (see `suspicion`)."""
    return suspicion(self)

  def suggested_label(self) -> np.ndarray:
    """[N] the most likely other class: the argmax, off the annotated label, of the final
    and the training-averaged softmax together."""
    probs = self.probs if self.train_probs is None else self.probs + self.train_probs
    probs = np.where(np.eye(probs.shape[1], dtype=bool)[self.labels], -np.inf, probs)
    return probs.argmax(axis=1)


def self_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """cleanlab's self-confidence: p(annotated label)."""
  return probs[np.arange(labels.shape[0]), labels]


def normalized_margin(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """cleanlab's normalized margin: p(label) - max other p, mapped to [0, 1]."""
  own = self_confidence(probs, labels)
  other = np.where(np.eye(probs.shape[1], dtype=bool)[labels], -np.inf, probs).max(axis=1)
  return (own - other + 1.0) / 2.0


def report_probs(table: SampleTable) -> np.ndarray:
  """[N, C] the probabilities the report judges labels by: the normalised geometric mean of
  the final target head's softmax and its average over training (where recorded), so that a
  label the final model has memorised still looks unlikely if training long disagreed."""
  if table.train_probs is None:
    return table.probs
  probs = np.sqrt(np.maximum(table.probs, 0.0) * np.maximum(table.train_probs, 0.0))
  return probs / np.maximum(probs.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)


def suspicion(table: SampleTable) -> np.ndarray:
  """The report's wrong-label ranking in (0, 1), higher = more suspicious.

  With p = `report_probs`' probability of the annotated label and t its average over the
  samples annotated with the same class (confident learning's per-class threshold), the
  suspicion is t / (p + t): 0.5 for a label as likely as its class's average, towards 1 the
  less likely it is. Dividing by t keeps a class the model is less sure of from being flagged
  wholesale. Chosen by measurement on the default SynthFER run, from random and from
  pretrained weights, against the final softmax alone, the area under the margin, rank
  averages and cleanlab's own adjustment (docs/ambiguity.md).
  """
  probs = report_probs(table)
  p = probs[np.arange(table.labels.shape[0]), table.labels]
  c = probs.shape[1]
  totals = np.bincount(table.labels, weights=p, minlength=c)
  counts = np.bincount(table.labels, minlength=c)
  t = (totals / np.maximum(counts, 1))[table.labels]
  return t / np.maximum(p + t, np.finfo(np.float64).tiny)


def score_plan(labels: np.ndarray, num_classes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The class-balanced batches that cover every training sample.

  Batch b, row c holds positions b*k .. b*k+k-1 of class c's samples (dataset order), wrapping
  around for a class shorter than the largest.
  Returns (index int64 [num_batches, C, k] dataset positions, first bool [num_batches, C, k]
  marking each sample's first appearance: exactly one True per sample).
  """
  members = input_pipeline.class_members(labels, num_classes)
  num_batches = max(-(-m.size // k) for m in members)
  slots = np.arange(num_batches * k).reshape(num_batches, k)
  index = np.stack([m[slots % m.size] for m in members], axis=1)
  first = np.stack([slots < m.size for m in members], axis=1)
  return index, first


def sample_outputs(variables, images, *, config) -> dict[str, jax.Array]:
  """Score, mined distribution and inference probabilities of one grouped batch.

  images: [C, k, H, W, 3], row c = samples annotated c.
  Returns {'probs': [C, k, C]} and, for DMUE runs, {'score': [C, k], 'latent': [C, k, C],
  'label_similarity': [C, k]}.
  """
  c, k = images.shape[:2]
  logits = train.eval_logits(variables, images.reshape((c * k,) + images.shape[2:]),
                             config=config)
  out = {'probs': jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(c, k, c)}
  if train.uses_dmue(config):
    # No dropout rng: the score and d_i of training without its noise. The epoch only sets the
    # ramps, which weight loss terms that are discarded here.
    _, extra = train.dmue_terms(train.make_model(config), config.dmue, variables['params'],
                                variables['batch_stats'], images, 0, None)
    out['score'] = extra['score']
    out['latent'] = extra['latent']
    out['label_similarity'] = extra['label_similarity']
  return out


def collect(config, variables, data: train.RunData, mesh) -> SampleTable:
  """Runs `sample_outputs` over the batches of `score_plan`; gathers one row per sample."""
  c, k = config.model.num_classes, config.input.batch_per_class
  size, resize = config.input.image_size, config.input.resize_size
  source = data.splits.train
  index, first = score_plan(data.labels, c, k)
  # Each process builds its own columns of the k axis, as the training batches do.
  local = k // jax.process_count()
  cols = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  repl = parallel.replicated(mesh)
  sharding = parallel.train_batch_sharding(mesh)
  step_fn = compiler.jit(functools.partial(sample_outputs, config=config),
                         in_shardings=(repl, sharding), out_shardings=repl)

  def make(b: int) -> dict[str, np.ndarray]:
    positions = index[b, :, cols]
    image = np.empty((c, local, size, size, 3), np.float32)
    truth = np.zeros((c, local, c), np.float32)
    true_label = np.full((c, local), -1, np.int32)
    for row in range(c):
      for col in range(local):
        example = source[int(positions[row, col])]
        image[row, col] = input_pipeline.eval_transform(example['image'], image_size=size,
                                                        resize_size=resize)
        truth[row, col] = example['distribution']
        true_label[row, col] = example.get('true_label', -1)
    return {'image': image, 'truth': truth, 'true_label': true_label}

  n = len(source)
  table: dict[str, np.ndarray] = {}
  batches = input_pipeline.prefetch_map(make, range(index.shape[0]),
                                        num_threads=config.input.num_workers)
  for b, batch in enumerate(batches):
    glob = parallel.global_batch(batch, sharding, 1)
    outs = {name: parallel.to_host(v) for name, v in step_fn(variables, glob['image']).items()}
    outs['truth'] = parallel.to_host(glob['truth'])
    outs['true_label'] = parallel.to_host(glob['true_label'])
    keep = first[b]
    for name, value in outs.items():
      if name not in table:
        table[name] = np.zeros((n,) + value.shape[2:], value.dtype)
      table[name][index[b][keep]] = value[keep]

  truth = true_label = None
  if data.splits.has_distribution:
    totals = table['truth'].sum(axis=1, keepdims=True)
    truth = table['truth'] / np.where(totals > 0, totals, 1.0)
    # SynthFER stores its true label; elsewhere the truth's argmax is the best answer.
    true_label = np.where(table['true_label'] >= 0, table['true_label'], truth.argmax(axis=1))
  return SampleTable(
      class_names=list(data.splits.class_names), labels=np.asarray(data.labels),
      original_labels=np.asarray(data.clean_labels), flipped=np.asarray(data.flipped, bool),
      probs=table['probs'], score=table.get('score'), latent=table.get('latent'),
      truth=truth, true_label=true_label, label_similarity=table.get('label_similarity'))


def with_dynamics(table: SampleTable, dynamics) -> SampleTable:
  """The table with the training dynamics (`train.Dynamics`, host arrays) filled in. A sample
  training never drew (a short run) gets a margin of 0 and a uniform training softmax."""
  if dynamics is None:
    return table
  count = np.asarray(dynamics.count, np.float64)
  seen = np.maximum(count, 1.0)
  c = table.probs.shape[1]
  aum = np.where(count > 0, np.asarray(dynamics.margin_sum) / seen, 0.0)
  train_probs = np.where(count[:, None] > 0, np.asarray(dynamics.prob_sum) / seen[:, None],
                         1.0 / c)
  return dataclasses.replace(table, aum=aum, train_probs=train_probs)


def estimated_issue_count(table: SampleTable) -> int:
  """How many labels are wrong, estimated from the per-sample losses -log p(label) of
  `report_probs` with two-component Gaussian mixtures (clean and wrong labels, as DivideMix
  separates them): the number of samples more likely in the high-loss component, the smaller
  of the counts on the loss and on its logarithm. Each scale over-counts in one regime (the
  loss when the model is strong and clean losses pile up near 0; its log when the model is
  weak), measured on the default SynthFER run from random and from pretrained weights
  (docs/ambiguity.md).

  Confident learning's estimate (cleanlab's `num_label_issues`) counts every sample the model
  gets wrong: about twice the true number there.
  """
  from sklearn.mixture import GaussianMixture  # pylint: disable=g-import-not-at-top
  probs = report_probs(table)
  loss = -np.log(np.maximum(probs[np.arange(table.labels.shape[0]), table.labels], 1e-12))
  if loss.size < 4 or np.ptp(loss) == 0:
    return 0
  counts = []
  for values in (loss, np.log(loss + 1e-6)):
    mixture = GaussianMixture(2, random_state=0).fit(values[:, None])
    high = int(np.argmax(mixture.means_[:, 0]))
    counts.append(int(np.sum(mixture.predict_proba(values[:, None])[:, high] > 0.5)))
  return min(counts)


def flag_label_issues(table: SampleTable) -> np.ndarray:
  """bool [N]: the samples the report believes mislabelled, the `estimated_issue_count` most
  suspicious (so the flags are the top of samples.csv)."""
  flagged = np.zeros(table.labels.shape[0], bool)
  flagged[table.suspicion_order()[:estimated_issue_count(table)]] = True
  return flagged


def cleanlab_flags(table: SampleTable) -> np.ndarray:
  """cleanlab's `find_label_issues` on the final softmax, for comparison."""
  from cleanlab.filter import find_label_issues  # pylint: disable=g-import-not-at-top
  # One process: cleanlab's default forks workers, which a multithreaded JAX process must not.
  return find_label_issues(table.labels, table.probs, n_jobs=1)


def summarize(table: SampleTable) -> dict[str, Any]:
  """The metrics listed in docs/ambiguity.md, "What the report writes" (NaN-free: a metric that
  cannot be computed is left out)."""
  out: dict[str, Any] = {'num_train_samples': int(table.labels.shape[0])}
  flagged = flag_label_issues(table)
  out['num_flagged'] = int(flagged.sum())
  if table.score is not None:
    out['mean_score'] = float(table.score.mean())
    if table.flipped.any():
      out['flipped_label_auroc'] = roc_auc(-table.score, table.flipped)
  if table.truth is None:
    return out
  if table.latent is not None:
    latent_kl = kl_to_truth(truth=table.truth, pred=table.latent, labels=table.labels)
    out['latent_kl_to_truth'] = float(np.nanmean(latent_kl))
  baseline_kl = kl_to_truth(truth=table.truth, pred=table.probs, labels=table.labels)
  out['kl_num_samples'] = int(np.sum(~np.isnan(baseline_kl)))
  if out['kl_num_samples']:
    out['baseline_kl_to_truth'] = float(np.nanmean(baseline_kl))
  else:
    out.pop('latent_kl_to_truth', None)
  noisy = table.mislabeled
  out['num_mislabeled'] = int(noisy.sum())
  if 0 < out['num_mislabeled'] < noisy.size:
    out['noisy_label_auroc'] = roc_auc(table.suspicion(), noisy)
    out['cleanlab_self_confidence_auroc'] = roc_auc(
        -self_confidence(table.probs, table.labels), noisy)
    out['cleanlab_normalized_margin_auroc'] = roc_auc(
        -normalized_margin(table.probs, table.labels), noisy)
    out['label_prob_auroc'] = out['cleanlab_self_confidence_auroc']
    if table.aum is not None:
      out['aum_auroc'] = roc_auc(-table.aum, noisy)
    if table.label_similarity is not None:
      out['label_similarity_auroc'] = roc_auc(-table.label_similarity, noisy)
    if table.score is not None:
      out['score_auroc'] = roc_auc(-table.score, noisy)
      out['mean_score_clean'] = float(table.score[~noisy].mean())
      out['mean_score_noisy'] = float(table.score[noisy].mean())
    for prefix, chosen in (('flagged', flagged), ('cleanlab_flagged', cleanlab_flags(table))):
      if chosen.any():
        out[f'{prefix}_precision'] = float(noisy[chosen].mean())
      out[f'{prefix}_recall'] = float(chosen[noisy].mean())
    out['suggested_label_accuracy'] = float(
        (table.suggested_label()[noisy] == table.true_label[noisy]).mean())
  return out


# ------------------------------------------------------------------ outputs
def write_csv(path: str, table: SampleTable) -> None:
  """samples.csv: one row per training sample, most suspicious first."""
  names = table.class_names
  header = ['index', 'label', 'label_name', 'original_label', 'suspicion', 'flagged',
            'suggested_label', 'suggested_label_name']
  if table.aum is not None:
    header += ['aum']
  if table.score is not None:
    header += ['score'] + [f'latent_{n}' for n in names]
  header += [f'prob_{n}' for n in names]
  if table.truth is not None:
    header += [f'true_{n}' for n in names] + ['true_label', 'true_label_name']
  header += ['flipped']
  if table.truth is not None:
    header += ['mislabeled']
  fmt = lambda v: f'{float(v):.6g}'
  suspicion_ = table.suspicion()
  flagged = flag_label_issues(table)
  suggested = table.suggested_label()
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for i in table.suspicion_order():
      y = int(table.labels[i])
      row = [int(i), y, names[y], int(table.original_labels[i]), fmt(suspicion_[i]),
             int(flagged[i]), int(suggested[i]), names[int(suggested[i])]]
      if table.aum is not None:
        row += [fmt(table.aum[i])]
      if table.score is not None:
        row += [fmt(table.score[i])] + [fmt(v) for v in table.latent[i]]
      row += [fmt(v) for v in table.probs[i]]
      if table.truth is not None:
        t = int(table.true_label[i])
        row += [fmt(v) for v in table.truth[i]] + [t, names[t]]
      row += [int(table.flipped[i])]
      if table.truth is not None:
        row += [int(table.mislabeled[i])]
      writer.writerow(row)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_most_uncertain(path: str, table: SampleTable, source, count: int = NUM_SHOWN) -> None:
  """A grid of the `count` most suspicious faces, each above its distribution as bars.

  Bars: the mined distribution (the target softmax for a plain run); black ticks: the truth.
  """
  plt = _pyplot()
  shown = table.suspicion_order()[:count]
  cols = 4
  rows = -(-len(shown) // cols)
  names = table.class_names
  height = 3.8 * rows + 0.5
  fig = plt.figure(figsize=(3.0 * cols, height))
  # One sub-grid per sample keeps its bars tight under its face; the outer grid leaves room
  # for the two-line titles.
  outer = fig.add_gridspec(rows, cols, left=0.04, right=0.98, bottom=0.03,
                           top=1 - 1.0 / height, hspace=0.3, wspace=0.25)
  bars = table.latent if table.latent is not None else table.probs
  for slot, i in enumerate(shown):
    cell = outer[slot // cols, slot % cols].subgridspec(2, 1, height_ratios=[2.6, 1.0],
                                                       hspace=0.08)
    ax_img, ax_bar = fig.add_subplot(cell[0]), fig.add_subplot(cell[1])
    i = int(i)
    y = int(table.labels[i])
    ax_img.imshow(np.asarray(source[i]['image']).squeeze(), cmap='gray')
    ax_img.set_anchor('S')  # the square image sits right above its bars, not mid-cell
    ax_img.set_xticks([])
    ax_img.set_yticks([])
    title = f'#{i} label {names[y]}'
    if table.score is not None:
      title += f'\nscore {table.score[i]:.3f}'
    if table.true_label is not None:
      title += f', true {names[int(table.true_label[i])]}'
    if table.flipped[i]:
      title += ' (flipped)'
    ax_img.set_title(title, fontsize=8)
    colors = ['tab:red' if j == y else 'tab:blue' for j in range(len(names))]
    ax_bar.bar(range(len(names)), bars[i], color=colors)
    if table.truth is not None:
      ax_bar.scatter(range(len(names)), table.truth[i], marker='_', s=120, color='black',
                     zorder=3)
    ax_bar.set_ylim(0, 1)
    ax_bar.set_yticks([0, 0.5, 1])
    ax_bar.set_xticks(range(len(names)), [n[:3] for n in names], fontsize=7)
    # The mined distribution is 0 at the label, so the label is marked on the axis too.
    ax_bar.get_xticklabels()[y].set_color('tab:red')
    ax_bar.tick_params(axis='y', labelsize=7)
  what = 'mined distribution' if table.latent is not None else 'target softmax'
  fig.suptitle(f'Most suspicious training samples: {what} (bars; red = annotated label)'
               + ('; true distribution (black)' if table.truth is not None else ''), fontsize=10)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_score_histogram(path: str, table: SampleTable) -> None:
  """Histogram of the scores (p(label) for a plain run): clean vs label-noise flipped, and the
  not-flipped samples whose annotation still differs from the truth where it is known."""
  plt = _pyplot()
  values = table.score if table.score is not None else table.label_probs()
  groups = []
  if table.flipped.any():
    clean = ~table.flipped
    if table.mislabeled is not None and (clean & table.mislabeled).any():
      groups.append(('clean', clean & ~table.mislabeled))
      groups.append(('annotation != truth (not flipped)', clean & table.mislabeled))
    else:
      groups.append(('clean', clean))
    groups.append(('flipped by label noise', table.flipped))
  elif table.mislabeled is not None and table.mislabeled.any():
    groups = [('annotation == truth', ~table.mislabeled),
              ('annotation != truth', table.mislabeled)]
  else:
    groups = [('all', np.ones_like(table.flipped))]
  fig, ax = plt.subplots(figsize=(6.5, 4.0))
  bins = np.linspace(values.min(), values.max() + 1e-9, 41)
  for name, mask in groups:
    ax.hist(values[mask], bins=bins, histtype='step', linewidth=1.5, density=True,
            label=f'{name} ({int(mask.sum())})')
  ax.set_xlabel('uncertainty score' if table.score is not None else 'p(annotated label)')
  ax.set_ylabel('density')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def update_results(path: str, metrics: dict) -> None:
  """Read-modify-write of results.json (created when the run has none yet)."""
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  results.update(metrics)
  metrics_lib.write_json(path, results)


# ------------------------------------------------------------------ the command
def restore_latest(workdir: str, step: int | None = None):
  """(config, variables, step) of `workdir`'s latest (or given) checkpoint."""
  mgr, _, _ = checkpoints.open_run(workdir, step)
  step = mgr.latest_step() if step is None else step
  meta = checkpoints.read_meta(mgr, step)
  config = checkpoints.config_from_meta(meta)
  config_lib.validate(config, for_training=False)
  state, _ = checkpoints.restore(mgr, step, train.state_shape(config, meta['steps_per_epoch']))
  mgr.close()
  return config, state.variables, step


def restore_dynamics(workdir: str, step: int, num_samples: int, num_classes: int):
  """The training dynamics saved with checkpoint `step`, or None."""
  mgr, _, _ = checkpoints.open_run(workdir, step)
  dynamics = checkpoints.restore_dynamics(mgr, step,
                                          train.Dynamics.zeros(num_samples, num_classes))
  mgr.close()
  return dynamics


def analyze(workdir: str, *, config=None, state=None, data: train.RunData | None = None,
            step: int | None = None, dynamics=None) -> dict:
  """Analyses the training set of a run; writes <workdir>/ambiguity/ and updates results.json.

  Args:
    workdir: the run's directory.
    config: the run's config; None = the one saved with the checkpoint.
    state: the final TrainState; None = restore checkpoint `step` (default: the latest).
    data: the run's RunData (labels after noise, flips); None = `train.prepare_data(config)`,
      which reproduces them (the noise is a pure function of its seed).
    step: the checkpoint to restore when `state` is None.
    dynamics: the run's `train.Dynamics`; None = those saved with that checkpoint (if any).
  Returns:
    The metrics added to results.json (`summarize`, listed in docs/ambiguity.md).
  """
  if state is None:
    saved_config, variables, step = restore_latest(workdir, step)
    config = config or saved_config
  else:
    variables, step = state.variables, int(jax.device_get(state.step))
  if data is None:
    data = train.prepare_data(config)
  if dynamics is None and state is None:
    dynamics = restore_dynamics(workdir, step, len(data.labels), config.model.num_classes)
  mesh = parallel.make_mesh()
  variables = jax.device_put(variables, parallel.replicated(mesh))
  table = with_dynamics(collect(config, variables, data, mesh),
                        None if dynamics is None else jax.device_get(dynamics))
  metrics = {'analysis_step': step, **summarize(table)}
  if not train.uses_dmue(config):
    logging.info('Plain cross-entropy run: no uncertainty score or mined distribution; rows are '
                 'ranked by the probability of the annotated label.')
  if table.truth is None:
    logging.info('The dataset has no true label distribution: samples.csv and the pictures are '
                 'written, the agreement metrics (KL to truth, noisy-label AUROC) are skipped.')
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, OUT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, 'samples.csv'), table)
    plot_most_uncertain(os.path.join(out_dir, 'most_uncertain.png'), table, data.splits.train)
    plot_score_histogram(os.path.join(out_dir, 'score_histogram.png'), table)
    update_results(os.path.join(workdir, 'results.json'), metrics)
  logging.info('Ambiguity analysis of %s: %s', workdir,
               ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
                         for k, v in metrics.items()))
  return metrics


def main(argv):
  del argv
  with cli.user_errors():
    metrics = analyze(flags.FLAGS.workdir, step=flags.FLAGS.step)
  print(json.dumps(metrics))


def _define_flags():
  # Defined when run as a command only, so that the training commands can import this module.
  flags.DEFINE_string('workdir', None, 'Directory of a training run.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to analyse (default: the latest).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
