"""What every command shares: clean exits for user errors and for bad flags.

A user error (missing dataset, bad override, unreadable checkpoint) prints one line,
`error: <message>`, to stderr and exits non-zero, without a traceback.
"""

from __future__ import annotations

import contextlib
import sys

from absl import app

from dmue_jax.errors import UserError


def fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


@contextlib.contextmanager
def user_errors():
  """Turns UserError into a clean exit."""
  try:
    yield
  except UserError as e:
    fail(str(e), getattr(e, 'exit_code', 1))


def run(main) -> None:
  """absl.app.run, with a flag-parsing failure (e.g. a bad --config.x override) reported as
  one clear message instead of absl's usage dump or a traceback."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except UserError as e:
    fail(str(e), getattr(e, 'exit_code', 1))


def _parse_flags(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{e}. Check the flag name and value type (overrides look like '
         '--config.input.batch_per_class=4).')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    fail(f'bad --config override: {e}. Fields are listed in dmue_jax/config_lib.py; '
         'values must have the field\'s type.')
