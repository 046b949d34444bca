"""The vectorised loss terms against an independent loop-based NumPy reference.

The reference below computes each term the way the authors' code does: shuffled
batch order, boolean-mask subsets of variable size, one Python loop iteration per class.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from dmue_jax import losses


# ---------------------------------------------------------------- NumPy loop reference
def np_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def np_ce(logits, labels):
  logp = np.log(np_softmax(logits))
  return -np.mean(logp[np.arange(len(labels)), labels])


def np_normalize_rows(g):
  return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def ref_similarity_means(z, y, num_classes):
  """m [B, C] in batch order: class-wise mean cosine similarity, min-max scaled."""
  b = len(y)
  cos = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      cos[i, j] = z[i] @ z[j] / (np.linalg.norm(z[i]) * np.linalg.norm(z[j]))
  m = np.stack([cos[:, y == c].mean(axis=1) for c in range(num_classes)], axis=1)
  lo, hi = m.min(axis=1, keepdims=True), m.max(axis=1, keepdims=True)
  return (m - lo) / (hi - lo)


def ref_latent(latent_logits_per_class, y, num_classes, temp):
  """d [B, C] in batch order from per-class latent logits (rows = samples of class c)."""
  d = np.zeros((len(y), num_classes))
  for c in range(num_classes):
    p = np_softmax(latent_logits_per_class[c]) ** (1.0 / temp)
    p = p / p.sum(axis=1, keepdims=True)
    full = np.insert(p, c, 0.0, axis=1)
    d[np.nonzero(y == c)[0]] = full
  return d


def ref_terms(*, y, num_classes, t, score, f, aux_logits, latent_logits, temp):
  """All four terms the reference's way. aux_logits[c]: [#(y != c), C-1] in batch order."""
  ce = np_ce(t * score, y)
  probs = np_softmax(t)
  probs[np.arange(len(y)), y] = 0.0
  soft = np.mean((probs - ref_latent(latent_logits, y, num_classes, temp)) ** 2)
  g_main = f @ f.T
  sp, aux = 0.0, 0.0
  for c in range(num_classes):
    sel = np.nonzero(y != c)[0]
    g_aux = np_normalize_rows(aux_logits[c] @ aux_logits[c].T)
    g_sub = np_normalize_rows(g_main[sel][:, sel])
    sp += np.mean((g_aux - g_sub) ** 2)
    remapped = np.where(y[sel] < c, y[sel], y[sel] - 1)
    aux += np_ce(aux_logits[c], remapped)
  return {'ce': ce, 'soft': soft, 'sp': sp / num_classes, 'aux': aux / num_classes}


# ---------------------------------------------------------------- helpers
def random_batch(rng, num_classes, k, dim):
  y = rng.permutation(np.repeat(np.arange(num_classes), k))
  b = len(y)
  data = {
      'y': y,
      'z': rng.normal(size=(b, dim)),
      'f': rng.normal(size=(b, dim)),
      't': rng.normal(size=(b, num_classes)) * 3,
      'score': rng.uniform(0.2, 1.0, size=(b, 1)),
      'aux_logits': [rng.normal(size=(int(np.sum(y != c)), num_classes - 1)) * 2
                     for c in range(num_classes)],
      'latent_logits': [rng.normal(size=(k, num_classes - 1)) * 2 for c in range(num_classes)],
  }
  return data


def to_grouped(data, num_classes, k):
  """Maps batch-order arrays to the class-grouped layout the JAX functions take."""
  y = data['y']
  order = np.argsort(y, kind='stable')
  g = lambda a: jnp.asarray(a[order].reshape((num_classes, k) + a.shape[1:]), jnp.float32)
  aux = []
  for c in range(num_classes):
    sel = np.nonzero(y != c)[0]             # batch order (the reference)
    grouped_sel = order[y[order] != c]      # grouped order (ours)
    pos = np.searchsorted(sel, grouped_sel)
    aux.append(data['aux_logits'][c][pos])
  return {
      'z': g(data['z']), 'f': g(data['f']), 't': g(data['t']), 'score': g(data['score']),
      'aux_logits': jnp.asarray(np.stack(aux), jnp.float32),
      'latent_logits': jnp.asarray(np.stack(data['latent_logits']), jnp.float32),
  }


class LossesTest(parameterized.TestCase):

  @parameterized.product(num_classes=(7, 8), k=(2, 3), seed=(0, 1))
  def test_terms_match_loop_reference(self, num_classes, k, seed):
    rng = np.random.default_rng(seed)
    data = random_batch(rng, num_classes, k, dim=16)
    expected = ref_terms(y=data['y'], num_classes=num_classes, t=data['t'],
                         score=data['score'], f=data['f'], aux_logits=data['aux_logits'],
                         latent_logits=data['latent_logits'], temp=1.2)
    g = to_grouped(data, num_classes, k)
    latent = losses.latent_distribution(latent_logits=g['latent_logits'], T=1.2)
    got = {
        'ce': losses.scaled_ce(target_logits=g['t'], score=g['score']),
        'soft': losses.soft_loss(target_logits=g['t'], latent=latent),
        'sp': losses.sp_loss(aux=g['aux_logits'], target_feats=g['f']),
        'aux': losses.aux_loss(aux_logits=g['aux_logits']),
    }
    for name in expected:
      np.testing.assert_allclose(float(got[name]), expected[name], rtol=2e-5, atol=1e-7,
                                 err_msg=name)

  @parameterized.product(num_classes=(7, 8))
  def test_similarity_means_match_loop_reference(self, num_classes):
    rng = np.random.default_rng(3)
    k = 3
    data = random_batch(rng, num_classes, k, dim=12)
    expected = ref_similarity_means(data['z'], data['y'], num_classes)
    g = to_grouped(data, num_classes, k)
    got = np.asarray(losses.class_similarity_means(z=g['z']))
    order = np.argsort(data['y'], kind='stable')
    np.testing.assert_allclose(got, expected[order], rtol=1e-5, atol=1e-6)
    chex.assert_shape(got, (num_classes * k, num_classes))
    self.assertAlmostEqual(float(got.min(axis=1).max()), 0.0, places=6)
    self.assertAlmostEqual(float(got.max(axis=1).min()), 1.0, places=6)

  def test_pue_input_is_means_and_onehot(self):
    m = jnp.arange(12.0).reshape(6, 2) / 12
    x = np.asarray(losses.pue_input(m=m, k=3))
    chex.assert_shape(x, (6, 4))
    np.testing.assert_array_equal(x[:, 2:], np.repeat(np.eye(2), 3, axis=0))
    np.testing.assert_allclose(x[:, :2], np.asarray(m))

  def test_latent_distribution_zero_at_label_and_normalised(self):
    rng = np.random.default_rng(0)
    lat = jnp.asarray(rng.normal(size=(7, 4, 6)), jnp.float32)
    d = np.asarray(losses.latent_distribution(latent_logits=lat, T=1.2))
    chex.assert_shape(d, (7, 4, 7))
    for c in range(7):
      np.testing.assert_array_equal(d[c, :, c], 0.0)
    np.testing.assert_allclose(d.sum(-1), 1.0, rtol=1e-6)

  def test_no_gradient_reaches_latent_distribution(self):
    rng = np.random.default_rng(0)
    lat = jnp.asarray(rng.normal(size=(7, 2, 6)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(7, 2, 7)), jnp.float32)

    def loss(lat_logits):
      d = losses.latent_distribution(latent_logits=lat_logits, T=1.2)
      return losses.soft_loss(target_logits=t, latent=d)

    grad = jax.grad(loss)(lat)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    # ...while the target logits do get a gradient through the same loss.
    gt = jax.grad(lambda tt: losses.soft_loss(
        target_logits=tt, latent=losses.latent_distribution(latent_logits=lat, T=1.2)))(t)
    self.assertGreater(float(jnp.abs(gt).sum()), 0.0)

  @parameterized.parameters((0, 10.0), (3, 10.0), (9, 10.0), (10, 10.0), (11, 10.0),
                            (20, 10.0), (35, 6.0), (4, 6.0), (6, 6.0))
  def test_ramps_match_reference_formula(self, epoch, alpha):
    up = 1.0 if epoch > alpha else math.exp(-5 * (1 - epoch / alpha) ** 2)
    down = 1.0 if epoch < alpha else math.exp(-1 * (1 - alpha / epoch) ** 2)
    self.assertAlmostEqual(float(losses.ramp_up(epoch, alpha)), up, places=6)
    self.assertAlmostEqual(float(losses.ramp_down(epoch, alpha)), down, places=6)

  def test_ramp_values_at_chosen_epochs(self):
    # Hand-computed: exp(-5 * 0.25) at half of alpha, 1 at alpha; exp(-(1-10/20)^2) at 2 alpha.
    self.assertAlmostEqual(float(losses.ramp_up(5, 10.0)), 0.2865048, places=6)
    self.assertAlmostEqual(float(losses.ramp_up(10, 10.0)), 1.0, places=6)
    self.assertAlmostEqual(float(losses.ramp_up(0, 10.0)), 0.0067379, places=6)
    self.assertAlmostEqual(float(losses.ramp_down(20, 10.0)), 0.7788008, places=6)
    self.assertAlmostEqual(float(losses.ramp_down(9, 10.0)), 1.0, places=6)


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_agree(self):
    rng = np.random.default_rng(5)
    data = to_grouped(random_batch(rng, 8, 2, 8), 8, 2)

    def all_terms(d):
      latent = losses.latent_distribution(latent_logits=d['latent_logits'], T=1.2)
      return {
          'ce': losses.scaled_ce(target_logits=d['t'], score=d['score']),
          'soft': losses.soft_loss(target_logits=d['t'], latent=latent),
          'sp': losses.sp_loss(aux=d['aux_logits'], target_feats=d['f']),
          'aux': losses.aux_loss(aux_logits=d['aux_logits']),
          'm': losses.class_similarity_means(z=d['z']),
      }

    got = self.variant(all_terms)(data)
    chex.assert_trees_all_close(got, all_terms(data), rtol=1e-6)


if __name__ == '__main__':
  pytest.main([__file__])
