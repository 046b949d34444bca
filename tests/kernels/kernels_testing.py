"""Helpers shared by the kernel tests."""

from dmue_jax.kernels import convolution


def spy(monkeypatch, name, record):
  """Replaces convolution.<name> by a wrapper that calls record(name, args) first."""
  original = getattr(convolution, name)
  monkeypatch.setattr(convolution, name, lambda *a, **kw: record(name, a) or original(*a, **kw))
