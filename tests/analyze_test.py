"""The ambiguity analysis: its metrics on hand-made numbers, its batches, and the command's
outputs on a tiny run's checkpoint."""

import csv
import json
import os

import numpy as np
import pytest

from conftest import make_run
from dmue_jax import analyze
from dmue_jax import input_pipeline
from dmue_jax import losses
from dmue_jax import metrics as metrics_lib
from dmue_jax import train

NAMES = ['a', 'b', 'c']


# ------------------------------------------------------------------ kl_to_truth
def test_kl_restricted_to_the_other_classes():
  # label 0: truth (0.5, 0.3, 0.2) -> (0.6, 0.4) over classes 1, 2; the mined distribution is
  # 0 at the label already, the softmax is renormalised over 1, 2 -> (0.5, 0.5) in both cases.
  truth = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
  pred = np.array([[0.0, 0.5, 0.5], [0.8, 0.1, 0.1]])
  kl = analyze.kl_to_truth(truth=truth, pred=pred, labels=np.array([0, 0]))
  expected = 0.6 * np.log(0.6 / 0.5) + 0.4 * np.log(0.4 / 0.5)
  np.testing.assert_allclose(kl, [expected, expected], rtol=1e-5)


def test_kl_zero_truth_entries_and_scale():
  # Votes (any scale) are normalised; a zero truth entry contributes nothing.
  truth = np.array([[4.0, 4.0, 0.0], [0.0, 3.0, 1.0]])
  pred = np.array([[0.0, 0.25, 0.75], [0.2, 0.6, 0.2]])
  kl = analyze.kl_to_truth(truth=truth, pred=pred, labels=np.array([0, 2]))
  # Row 2: label 2, truth off it is (0, 1) over classes 0, 1; pred (0.25, 0.75).
  np.testing.assert_allclose(kl, [-np.log(0.25), -np.log(0.75)], rtol=1e-5)


def test_kl_identical_is_zero_and_undefined_rows_are_nan():
  truth = np.array([[0.0, 0.7, 0.3], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6]])
  pred = np.array([[0.0, 0.7, 0.3], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
  kl = analyze.kl_to_truth(truth=truth, pred=pred, labels=np.array([0, 1, 2]))
  # Row 1: the truth has no mass off its label, nothing to compare with.
  assert np.isnan(kl[1])
  np.testing.assert_allclose(kl[[0, 2]], [0.0, 0.0], atol=1e-9)


def test_kl_missing_class_is_large_but_finite():
  kl = analyze.kl_to_truth(truth=np.array([[0.5, 0.5, 0.0]]), pred=np.array([[0.0, 0.0, 1.0]]),
                           labels=np.array([0]))
  # Floored at eps, renormalised: about log(1 / eps).
  np.testing.assert_allclose(kl, [-np.log(analyze.KL_EPS / (1 + analyze.KL_EPS))], rtol=1e-6)


# ------------------------------------------------------------------ roc_auc
def brute_force_auc(scores, positives):
  pos, neg = scores[positives], scores[~positives]
  diff = pos[:, None] - neg[None, :]
  return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_roc_auc_hand_made():
  pos = np.array([False, False, True, True])
  assert analyze.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), pos) == pytest.approx(0.75)
  assert analyze.roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), pos) == pytest.approx(1.0)
  assert analyze.roc_auc(np.array([0.4, 0.3, 0.2, 0.1]), pos) == pytest.approx(0.0)
  assert analyze.roc_auc(np.ones(4), pos) == pytest.approx(0.5)
  # Ties across classes count one half: (0.5 + 1 + 1 + 1) / 4.
  assert analyze.roc_auc(np.array([1.0, 0.0, 1.0, 2.0]),
                         np.array([False, False, True, True])) == pytest.approx(0.875)


def test_roc_auc_matches_pairwise_count_with_ties():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 6, size=300).astype(float)  # many ties
  positives = rng.random(300) < 0.2
  assert analyze.roc_auc(scores, positives) == pytest.approx(brute_force_auc(scores, positives))


def test_roc_auc_needs_both_classes():
  assert np.isnan(analyze.roc_auc(np.arange(3.0), np.zeros(3, bool)))
  assert np.isnan(analyze.roc_auc(np.arange(3.0), np.ones(3, bool)))


def test_average_ranks():
  np.testing.assert_allclose(analyze.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])),
                             [3.5, 1.0, 3.5, 2.0])


# ------------------------------------------------------------------ batches and summary
def test_score_plan_covers_every_sample_once():
  labels = np.array([0] * 5 + [1] * 2 + [2] * 3)
  rng = np.random.default_rng(1)
  labels = labels[rng.permutation(labels.size)]
  index, first = analyze.score_plan(labels, 3, 2)
  assert index.shape == first.shape == (3, 3, 2)  # ceil(5 / 2) batches, C, k
  for c in range(3):
    assert np.all(labels[index[:, c]] == c)
    members = np.flatnonzero(labels == c)
    # In order, chunked by k, wrapping around for the short classes.
    np.testing.assert_array_equal(index[:, c].ravel(), members[np.arange(6) % members.size])
  counts = np.bincount(index[first], minlength=labels.size)
  np.testing.assert_array_equal(counts, np.ones(labels.size))


def hand_table(score=True, truth=True):
  """Six samples: 2 and 5 carry a wrong annotation (5 by label noise) and the lowest scores.

  The softmax leans to the true class everywhere (0.6 of it), constant probabilities would
  leave every ranking tied."""
  labels = np.array([0, 1, 2, 2, 1, 2])
  true_label = np.array([0, 1, 0, 2, 1, 1])
  t = np.full((6, 3), 0.1)
  t[np.arange(6), true_label] = 0.8
  latent = np.full((6, 3), 0.5)
  latent[np.arange(6), labels] = 0.0
  probs = np.full((6, 3), 0.2)
  probs[np.arange(6), true_label] = 0.6
  return analyze.SampleTable(
      class_names=NAMES, labels=labels, original_labels=np.array([0, 1, 2, 2, 1, 1]),
      flipped=np.array([False] * 5 + [True]),
      probs=probs,
      score=np.array([0.9, 0.8, 0.2, 0.7, 0.6, 0.1]) if score else None,
      latent=latent if score else None,
      truth=t if truth else None, true_label=true_label if truth else None)


def test_summarize_with_truth():
  m = analyze.summarize(hand_table())
  # The suspicion ranking puts both wrong labels (p(label) 0.2) above the clean ones (0.6).
  assert m['noisy_label_auroc'] == pytest.approx(1.0)
  assert m['cleanlab_self_confidence_auroc'] == pytest.approx(1.0)
  assert m['score_auroc'] == pytest.approx(1.0)  # the PUE score, lowest on 2 and 5
  assert m['flipped_label_auroc'] == pytest.approx(1.0)
  assert m['num_mislabeled'] == 2
  assert m['mean_score_noisy'] == pytest.approx(0.15)
  assert m['mean_score_clean'] == pytest.approx(0.75)
  assert m['kl_num_samples'] == 6
  for key in ('latent_kl_to_truth', 'baseline_kl_to_truth'):
    assert np.isfinite(m[key])
  # Two clear loss clusters: exactly the two wrong labels are flagged, and the most likely
  # other class is their true one.
  assert m['num_flagged'] == 2
  assert m['flagged_precision'] == m['flagged_recall'] == 1.0
  assert m['suggested_label_accuracy'] == 1.0


def test_suspicion_ranks_by_class_adjusted_confidence_and_training_history():
  """Sample 1's final p(label) is as high as sample 0's, but training mostly disagreed with
  its label: the geometric mean with the training softmax ranks it more suspicious. Class
  adjustment: class 1's labels are less confident overall, so its 0.5 is not suspicious."""
  table = analyze.SampleTable(
      class_names=NAMES, labels=np.array([0, 0, 0, 1, 1]), original_labels=np.zeros(5, int),
      flipped=np.zeros(5, bool),
      probs=np.array([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1], [0.5, 0.4, 0.1], [0.4, 0.5, 0.1],
                      [0.4, 0.5, 0.1]]),
      score=None, latent=None, truth=None, true_label=None,
      train_probs=np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1],
                            [0.4, 0.5, 0.1], [0.4, 0.5, 0.1]]))
  probs = analyze.report_probs(table)
  np.testing.assert_allclose(probs.sum(1), 1.0)
  np.testing.assert_allclose(probs[1], np.array([0.4, np.sqrt(0.07), 0.1]) /
                             (0.4 + np.sqrt(0.07) + 0.1))
  s = table.suspicion()
  assert s[1] > s[0] and s[2] > s[0]
  assert s[3] == s[4] < s[2]  # p(label) 0.5, the class's average: not suspicious
  # Without training dynamics the final softmax alone decides: samples 0 and 1 tie.
  table.train_probs = None
  s = table.suspicion()
  assert s[0] == s[1]


def test_flag_count_is_estimated_from_the_loss_mixture():
  rng = np.random.default_rng(0)
  n, c = 400, 4
  labels = rng.integers(0, c, n)
  wrong = rng.random(n) < 0.2
  p_label = np.where(wrong, rng.uniform(0.02, 0.1, n), rng.uniform(0.7, 0.95, n))
  probs = np.tile(((1 - p_label) / (c - 1))[:, None], (1, c))
  probs[np.arange(n), labels] = p_label
  table = analyze.SampleTable(
      class_names=list('abcd'), labels=labels, original_labels=labels, flipped=wrong,
      probs=probs, score=None, latent=None, truth=None, true_label=None)
  assert analyze.estimated_issue_count(table) == wrong.sum()
  np.testing.assert_array_equal(analyze.flag_label_issues(table), wrong)


def test_training_dynamics_fill_the_table():
  table = hand_table()
  dynamics = train.Dynamics(margin_sum=np.array([2.0, 0.0, -3.0, 4.0, 1.0, -1.0]),
                            prob_sum=np.tile([[0.6, 0.2, 0.2]], (6, 1)) * 2,
                            count=np.array([2, 0, 3, 2, 1, 1]))
  filled = analyze.with_dynamics(table, dynamics)
  np.testing.assert_allclose(filled.aum, [1.0, 0.0, -1.0, 2.0, 1.0, -1.0])
  np.testing.assert_allclose(filled.train_probs[0], [0.6, 0.2, 0.2])
  np.testing.assert_allclose(filled.train_probs[1], [1 / 3] * 3)  # never drawn: uniform
  assert 'aum_auroc' in analyze.summarize(filled)


def test_summarize_label_similarity_auroc():
  table = hand_table()
  # Mislabeled samples 2 and 5 against the 4 clean ones: 2 (0.1) is below all 4; 5 (0.5) is
  # below 3 and ties with sample 0 (half a pair): (4 + 3.5) / 8 pairs ordered right.
  table.label_similarity = np.array([0.5, 0.9, 0.1, 0.8, 0.7, 0.5])
  m = analyze.summarize(table)
  assert m['label_similarity_auroc'] == pytest.approx(7.5 / 8)
  assert m['score_auroc'] == pytest.approx(1.0)  # the score's, unchanged
  table.label_similarity = None
  assert 'label_similarity_auroc' not in analyze.summarize(table)


def test_summarize_without_truth_skips_the_agreement_metrics(tmp_path):
  table = hand_table(truth=False)
  m = analyze.summarize(table)
  assert set(m) == {'num_train_samples', 'num_flagged', 'mean_score', 'flipped_label_auroc'}
  path = str(tmp_path / 'samples.csv')
  analyze.write_csv(path, table)
  with open(path) as f:
    rows = list(csv.DictReader(f))
  # By suspicion: the two wrong labels (p(label) 0.2) first, flagged, then the rest.
  assert sorted(int(r['index']) for r in rows[:2]) == [2, 5]
  assert [int(r['flagged']) for r in rows] == [1, 1, 0, 0, 0, 0]
  suspicion = [float(r['suspicion']) for r in rows]
  assert suspicion == sorted(suspicion, reverse=True)
  # Their suggested label is the class the softmax prefers.
  assert [r['suggested_label_name'] for r in rows[:2]] == [
      NAMES[0] if rows[0]['index'] == '2' else NAMES[1],
      NAMES[1] if rows[0]['index'] == '2' else NAMES[0]]
  assert not any(k.startswith('true_') or k == 'mislabeled' for k in rows[0])


def test_plain_run_table_is_ranked_by_suspicion_too(tmp_path):
  """A plain cross-entropy run has no PUE score or mined distribution; its report ranks and
  flags the same way."""
  table = hand_table(score=False)
  m = analyze.summarize(table)
  assert m['noisy_label_auroc'] == 1.0 and 'score_auroc' not in m
  path = str(tmp_path / 'samples.csv')
  analyze.write_csv(path, table)
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert sorted(int(r['index']) for r in rows[:2]) == [2, 5]
  assert 'score' not in rows[0]


# ------------------------------------------------------------------ the command on a checkpoint
@pytest.mark.slow
def test_analyze_writes_one_row_per_training_sample(tmp_path):
  run = make_run(str(tmp_path / 'run'))
  config = run.config
  # The metrics join what training wrote there.
  metrics_lib.write_json(os.path.join(run.workdir, 'results.json'), {'eval_accuracy': 0.25})
  metrics = analyze.analyze(run.workdir)
  data = train.prepare_data(config)
  n, c = len(data.labels), config.model.num_classes
  names = list(run.class_names)
  assert metrics['analysis_step'] == 3  # the latest checkpoint, not the best (2)
  assert metrics['num_train_samples'] == n

  out = os.path.join(run.workdir, 'ambiguity')
  with open(os.path.join(out, 'samples.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == n
  assert sorted(int(r['index']) for r in rows) == list(range(n))
  expected = (['index', 'label', 'label_name', 'original_label', 'suspicion', 'flagged',
               'suggested_label', 'suggested_label_name', 'score']
              + [f'latent_{x}' for x in names] + [f'prob_{x}' for x in names]
              + [f'true_{x}' for x in names] + ['true_label', 'true_label_name', 'flipped',
                                                'mislabeled'])
  assert list(rows[0]) == expected
  scores = np.array([float(r['score']) for r in rows])
  assert np.all((scores > 0) & (scores < 1))
  suspicion = np.array([float(r['suspicion']) for r in rows])
  assert np.all(np.diff(suspicion) <= 0)  # most suspicious first
  index = np.array([int(r['index']) for r in rows])
  label = np.array([int(r['label']) for r in rows])
  np.testing.assert_array_equal(label, data.labels[index])
  np.testing.assert_array_equal([int(r['flipped']) for r in rows], data.flipped[index])
  latent = np.array([[float(r[f'latent_{x}']) for x in names] for r in rows])
  probs = np.array([[float(r[f'prob_{x}']) for x in names] for r in rows])
  np.testing.assert_allclose(latent[np.arange(n), label], 0.0)
  np.testing.assert_allclose(latent.sum(1), 1.0, atol=1e-4)
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)

  # The scores of batch 0 (the first k samples of every class) as the training forward gives.
  index0, _ = analyze.score_plan(data.labels, c, config.input.batch_per_class)
  images = np.stack([[input_pipeline.eval_transform(
      data.splits.train[int(i)]['image'], image_size=config.input.image_size,
      resize_size=config.input.resize_size) for i in row] for row in index0[0]])
  state = run.states[3]
  _, extra = train.dmue_terms(train.make_model(config), config.dmue, state.params,
                              state.batch_stats, images, 0, None)
  by_index = dict(zip(index, scores))
  np.testing.assert_allclose([by_index[i] for i in index0[0].ravel()],
                             np.asarray(extra['score']).ravel(), rtol=1e-4)
  # label_similarity is the PUE input at the annotated class: m[i, y_i] of batch 0.
  k = config.input.batch_per_class
  fwd, _ = train.dmue_forward(train.make_model(config), config.dmue,
                              {'params': state.params, 'batch_stats': state.batch_stats},
                              images, None)
  m = np.asarray(losses.class_similarity_means(z=fwd['z']))
  np.testing.assert_allclose(np.asarray(extra['label_similarity']).ravel(),
                             m[np.arange(c * k), np.repeat(np.arange(c), k)], rtol=1e-5)

  for name in ('most_uncertain.png', 'score_histogram.png'):
    assert os.path.getsize(os.path.join(out, name)) > 5000
  with open(os.path.join(run.workdir, 'results.json')) as f:
    results = json.load(f)
  for key in ('noisy_label_auroc', 'score_auroc', 'latent_kl_to_truth', 'baseline_kl_to_truth',
              'mean_score_clean', 'mean_score_noisy', 'label_similarity_auroc',
              'cleanlab_self_confidence_auroc', 'cleanlab_normalized_margin_auroc',
              'flagged_recall', 'suggested_label_accuracy', 'num_flagged'):
    assert key in results
    assert results[key] == metrics[key]
  assert results['eval_accuracy'] == 0.25
