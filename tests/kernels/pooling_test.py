"""The max-pools' first-maximum gradients equal XLA's select-and-scatter (flax's nn.max_pool),
ties and odd sizes included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmue_jax.kernels import pooling


@pytest.mark.parametrize('size', [8, 7])
def test_max_pool_matches_flax_with_ties(size):
  """Value and gradient equal nn.max_pool's (select-and-scatter: first maximum takes it all),
  including windows with tied maxima (after a ReLU) and an odd size (floor mode)."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  x = jnp.maximum(x, 0.3)  # many windows tie at 0.3
  x = x.at[0, 0, 0, 0].set(2.0).at[0, 1, 1, 0].set(2.0)   # a tie across the window's diagonal
  ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))
  cot = jnp.asarray(rng.normal(size=ref(x).shape), jnp.float32)
  np.testing.assert_array_equal(pooling.max_pool_2x2(x), ref(x))
  got = jax.jit(jax.grad(lambda x: jnp.sum(pooling.max_pool_2x2(x) * cot)))(x)
  want = jax.grad(lambda x: jnp.sum(ref(x) * cot))(x)
  np.testing.assert_array_equal(got, want)
  assert float(got[0, 1, 1, 0]) == 0.0 and float(got[0, 0, 0, 0]) == float(cot[0, 0, 0, 0])


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 9, 3), (1, 2, 2, 1), (1, 1, 3, 2)])
def test_max_pool_3x3_matches_flax_with_ties(shape):
  """The standard stem's 3x3/2 pool (padding 1): value equal to nn.max_pool's, gradient equal
  to select-and-scatter's (first maximum of each window in row-major order) up to the order in
  which overlapping windows' gradients are summed; even and odd sizes."""
  rng = np.random.default_rng(5)
  x = jnp.maximum(jnp.asarray(rng.normal(size=shape), jnp.float32), 0.3)  # many ties at 0.3
  ref = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(pooling.max_pool_3x3(x), ref(x))
  cot = jnp.asarray(rng.normal(size=ref(x).shape), jnp.float32)
  got = jax.jit(jax.grad(lambda x: jnp.sum(pooling.max_pool_3x3(x) * cot)))(x)
  want = jax.grad(lambda x: jnp.sum(ref(x) * cot))(x)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_max_pool_3x3_gives_a_tied_window_to_its_first_maximum():
  # One 4x4 map of zeros but for two tied maxima in window (0, 0): rows 0..1, columns 0..1
  # (padding makes it a 3x3 window at -1..1). Only the first in row-major order, (0, 1), gets
  # the window's gradient; (1, 0) gets none from that window, but it is also in window (1, 0)
  # (rows 1..3), where it is the first maximum.
  x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 1, 0].set(1.0).at[0, 1, 0, 0].set(1.0)
  cot = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
  got = jax.grad(lambda x: jnp.sum(pooling.max_pool_3x3(x) * cot))(x)
  want = jax.grad(lambda x: jnp.sum(
      nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1))) * cot))(x)
  np.testing.assert_array_equal(got, want)
  assert float(got[0, 0, 1, 0]) == 1.0 + 2.0  # first maximum of windows (0, 0) and (0, 1)
  assert float(got[0, 1, 0, 0]) == 3.0        # first maximum of window (1, 0) only
