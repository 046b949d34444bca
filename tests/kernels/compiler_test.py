"""compiler.options / compiler.jit: on CPU, Eigen convolutions and YNNPACK matrix products unless
the user's XLA_FLAGS decide."""

import re

import jax
import jax.numpy as jnp

from dmue_jax.kernels import compiler

_YNN = '"kind":"__ynn_fusion"'  # how a YNNPACK fusion shows in the compiled program


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _compiled_text(jitted) -> str:
  # Wide enough for YNNPACK to take it (it leaves very small convolutions to Eigen anyway).
  x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
  return jitted.lower(x, w).compile().as_text()


def test_cpu_jits_use_eigen_convolutions_and_ynnpack_products(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert compiler.options('cpu') == {compiler.YNN_OPTION: compiler.YNN_DOTS}
  assert compiler.options('gpu') is None
  text = _compiled_text(compiler.jit(_conv))
  assert 'convolution(' in text and _YNN not in text
  # What the option turns off: jaxlib 0.10 fuses the same convolution into YNNPACK by default.
  assert _YNN in _compiled_text(jax.jit(_conv))
  # Matrix products go to YNNPACK, alone: the tanh after one is XLA's own (a loop fusion, or
  # the bare op with the legacy fusion emitters the tests compile with).
  a = jnp.ones((64, 64))
  text = compiler.jit(lambda a, b: jnp.tanh(a @ b)).lower(a, a).compile().as_text()
  assert text.count(_YNN) == 1
  assert re.search(r'= f32\[64,64\]\{1,0\} (?:fusion|tanh)\(%ynn_fusion\)', text)


def test_unknown_value_falls_back_to_eigen_everywhere(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setattr(compiler, '_option_known', lambda name, value: value != compiler.YNN_DOTS)
  assert compiler.options('cpu') == {compiler.YNN_OPTION: ''}
  monkeypatch.setattr(compiler, '_option_known', lambda name, value: False)
  assert compiler.options('cpu') is None


def test_xla_flags_naming_the_option_win(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', f'--{compiler.YNN_OPTION}=individual_convolution')
  assert compiler.options('cpu') is None
  assert compiler.merged({'a': 1}) == {'a': 1}


def test_merged_extra_options_win(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert compiler.merged(None) == {compiler.YNN_OPTION: compiler.YNN_DOTS}
  assert compiler.merged({compiler.YNN_OPTION: 'x', 'b': 0}) == {compiler.YNN_OPTION: 'x', 'b': 0}


def test_unknown_options_are_detected():
  known = compiler._option_known  # pylint: disable=protected-access
  assert known(compiler.YNN_OPTION, '')
  assert not known('xla_no_such_option_anywhere', '')
