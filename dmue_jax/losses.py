"""DMUE's statistics and loss terms as pure functions of arrays.

All functions take the class-grouped layout of the training batch: C classes, k samples each,
B = Ck, row-major (sample i of class c is flat index c*k + i). With that layout every subset the
reference builds with boolean masks ("y == c", "y != c") is a static slice or gather, so these
functions are plain batched matrix ops. `dmue_jax.models.dmue.others(C)` lists, per class c, the
classes of its "y != c" subset in the order the auxiliary inputs use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dmue_jax.models import dmue as dmue_model


def class_similarity_means(*, z: jax.Array) -> jax.Array:
  """Per-sample mean cosine similarity to each class, min-max scaled per row.

  z: [C, k, D] features (pooled target features before dropout).
  Returns m: [B, C], m[i, c] = mean_j∈class c cos(z_i, z_j) (j = i included), each row scaled
  to [0, 1] by its min and max, as the reference does (no epsilon).
  """
  c, k, d = z.shape
  flat = z.reshape(c * k, d).astype(jnp.float32)
  norms = jnp.linalg.norm(flat, axis=1, keepdims=True)
  # The reference divides the dot products by the outer product of the norms.
  cos = (flat @ flat.T) / (norms @ norms.T)
  m = cos.reshape(c * k, c, k).mean(axis=2)
  lo = m.min(axis=1, keepdims=True)
  hi = m.max(axis=1, keepdims=True)
  return (m - lo) / (hi - lo)


def pue_input(*, m: jax.Array, k: int) -> jax.Array:
  """[B, 2C]: the class-similarity means next to the one-hot annotated label (grouped)."""
  c = m.shape[1]
  onehot = jnp.repeat(jnp.eye(c, dtype=m.dtype), k, axis=0)
  return jnp.concatenate([m, onehot], axis=1)


def latent_distribution(*, latent_logits: jax.Array, T: float) -> jax.Array:
  """The mined label distribution of every sample, gradient stopped.

  latent_logits: [C, k, C-1], auxiliary head c on the samples of class c.
  Returns d: [C, k, C]: softmax -> p^(1/T) renormalised -> a 0 inserted at index c.
  """
  c = latent_logits.shape[0]
  p = jax.nn.softmax(latent_logits.astype(jnp.float32), axis=-1)
  p = p ** (1.0 / T)
  p = p / p.sum(axis=-1, keepdims=True)
  # Scatter column j of branch c's C-1 outputs into class others[c][j]; class c stays 0.
  place = jax.nn.one_hot(dmue_model.others(c), c, dtype=p.dtype)  # [C, C-1, C]
  d = jnp.einsum('ckj,cjo->cko', p, place)
  return jax.lax.stop_gradient(d)


def soft_loss(*, target_logits: jax.Array, latent: jax.Array) -> jax.Array:
  """Mean over all B x C entries of (softmax(t) with the label entry zeroed - d)^2.

  target_logits, latent: [C, k, C] (grouped: the label of row c is c).
  """
  c = target_logits.shape[0]
  probs = jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1)
  mask = 1.0 - jnp.eye(c, dtype=probs.dtype)[:, None, :]
  return jnp.mean(jnp.square(probs * mask - latent))


def _row_normalize(g: jax.Array) -> jax.Array:
  """torch.nn.functional.normalize(g, p=2, dim=-1): divides by max(||row||, 1e-12)."""
  norm = jnp.linalg.norm(g, axis=-1, keepdims=True)
  return g / jnp.maximum(norm, 1e-12)


def sp_loss(*, aux: jax.Array, target_feats: jax.Array) -> jax.Array:
  """Similarity-preserving loss between each auxiliary branch and the target branch.

  aux: [C, (C-1)k, P] what branch c's Gram is built from (the reference: its logits, P = C-1;
    README quirk Q3), rows in the order of its "y != c" subset.
  target_feats: [C, k, D] target features after dropout and neck.
  Returns mean over c of MSE(normalize(aux_c aux_cᵀ), normalize(f_sub f_subᵀ)), f_sub the
  target features of the same "y != c" rows.
  """
  c, k, d = target_feats.shape
  f_sub = target_feats[dmue_model.others(c)].reshape(c, (c - 1) * k, d).astype(jnp.float32)
  aux = aux.astype(jnp.float32)
  g_aux = _row_normalize(jnp.einsum('cnp,cmp->cnm', aux, aux))
  g_main = _row_normalize(jnp.einsum('cnd,cmd->cnm', f_sub, f_sub))
  return jnp.mean(jnp.square(g_aux - g_main))


def aux_loss(*, aux_logits: jax.Array) -> jax.Array:
  """Mean over branches of the cross-entropy of auxiliary branch c on its y != c samples.

  aux_logits: [C, (C-1)k, C-1]; in the grouped order the remapped label (y, or y-1 above c) of
  branch c's rows is simply 0..C-2, each repeated k times.
  """
  c, m, _ = aux_logits.shape
  k = m // (c - 1)
  labels = jnp.repeat(jnp.arange(c - 1), k)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      aux_logits.astype(jnp.float32), jnp.broadcast_to(labels, (c, m)))
  return ce.mean()


def scaled_ce(*, target_logits: jax.Array, score: jax.Array) -> jax.Array:
  """Cross-entropy of the score-scaled target logits s_i * t_i (grouped labels).

  target_logits: [C, k, C]; score: [C, k, 1].
  """
  c, k, _ = target_logits.shape
  labels = jnp.repeat(jnp.arange(c), k).reshape(c, k)
  logits = (target_logits * score).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def ramp_up(epoch, alpha: float):
  """exp(-5 (1 - e/alpha)^2) for e <= alpha, else 1 (the reference's utils/ramp.py)."""
  e = jnp.asarray(epoch, jnp.float32)
  return jnp.where(e > alpha, 1.0, jnp.exp(-5.0 * jnp.square(1.0 - e / alpha)))


def ramp_down(epoch, alpha: float):
  """1 for e < alpha, else exp(-(1 - alpha/e)^2)."""
  e = jnp.asarray(epoch, jnp.float32)
  safe = jnp.maximum(e, 1e-6)
  return jnp.where(e < alpha, 1.0, jnp.exp(-jnp.square(1.0 - alpha / safe)))
