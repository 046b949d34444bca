"""What every command shares: clean exits for user errors and for bad flags.

A user error (missing dataset, bad override, unreadable checkpoint) prints one line,
`error: <message>`, to stderr and exits non-zero, without a traceback.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tqdm

from dmue_jax import checkpoints
from dmue_jax import config_lib
from dmue_jax import parallel
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


def enable_compilation_cache(directory: str | None = None) -> None:
  """Keeps compiled XLA programs on disk so a restarted or repeated run skips compilation.

  The DMUE step takes tens of seconds to compile on a small CPU; a resumed run (Colab after a
  runtime reset, a crash) gets it back from the cache. The folder: `directory`, else
  JAX_COMPILATION_CACHE_DIR, else ~/.cache/dmue_jax/xla. JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
  sets which programs are kept (default: those compiling for 1 s or more);
  DMUE_NO_COMPILATION_CACHE=1 turns the cache off.
  """
  if os.environ.get('DMUE_NO_COMPILATION_CACHE') == '1':
    return
  directory = (directory or os.environ.get('JAX_COMPILATION_CACHE_DIR') or
               os.path.join(os.path.expanduser('~'), '.cache', 'dmue_jax', 'xla'))
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', 1.0)))


def say(message: str) -> None:
  """A progress line for the person at the console (and the log): above the progress bar,
  which it does not break."""
  std_logging.getLogger('dmue_jax').info(message)
  if getattr(say, 'to_console', True):
    tqdm.tqdm.write(message, file=sys.stderr)


def log_to_file(workdir: str, *, console_info: bool = False) -> str:
  """Sends the library's INFO logging (orbax, TFDS, absl, ours) to <workdir>/log.txt and keeps
  only warnings and errors on the console, unless `console_info` (--log_to_console) or a
  --verbosity above INFO asks for more. Returns the log file's path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'log.txt')
  handler = std_logging.FileHandler(path)
  handler.setLevel(std_logging.DEBUG)
  handler.setFormatter(std_logging.Formatter(
      '%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s'))
  std_logging.getLogger().addHandler(handler)
  if not console_info and logging.get_verbosity() <= logging.INFO:
    absl_handler = logging.get_absl_handler()
    absl_handler.setLevel(std_logging.WARNING)
    # orbax warns at every save without an eval metric (most saves): the log keeps it.
    # TFDS warns that SynthFER uses its own builder config, which is how it is made.
    noise = ('tracked_metric', 'Using custom data configuration', 'has no dataset_info.json',
             'Waiting for previous save to complete')
    absl_handler.addFilter(lambda record: not any(n in record.getMessage() for n in noise))
    say.to_console = True
  else:
    say.to_console = False  # the INFO log line already reaches the console
  return path


def start_run(config_flag, workdir: str, *, console_info: bool = False) -> None:
  """What a training command does before any work: validate the config (a config that cannot
  work stops here), apply the from-scratch settings the user did not override, start
  jax.distributed, and send the library's logging to <workdir>/log.txt.

  config_flag: the --config flag (FLAGS['config']), whose value is the config.
  """
  config = config_flag.value
  config_lib.validate(config)
  checkpoints.check_workdir(workdir)
  overrides = set(config_flags.get_override_values(config_flag))
  for line in config_lib.apply_scratch_defaults(config, overrides):
    logging.warning('Training from scratch: %s', line)
  # Before any call that starts the XLA backend.
  parallel.initialize_distributed(config.parallel)
  log_to_file(workdir, console_info=console_info)


def run(main) -> None:
  """absl.app.run, with a flag-parsing failure (e.g. a bad --config.x override) reported as
  one clear message instead of absl's usage dump or a traceback."""
  enable_compilation_cache()
  try:
    app.run(main, flags_parser=_parse_flags)
  except UserError as e:
    fail(str(e), getattr(e, 'exit_code', 1))


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # A UserError raised inside a config's get_config (an unknown ":variant") arrives wrapped
    # twice, by ml_collections and by absl, each adding a traceback to the message.
    inner = _innermost_user_error(e)
    if inner is not None:
      fail(str(inner), getattr(inner, 'exit_code', 1))
    if isinstance(e, flags.Error):
      fail(f'{e}. Check the flag name and value type (overrides look like '
           '--config.input.batch_per_class=4).')
    message = _plain_message(e)
    end = '' if message.endswith(('.', '?', '!')) else '.'
    fail(f'bad --config override: {message}{end} Fields are listed in dmue_jax/config_lib.py; '
         'values must have the field\'s type.')


def _innermost_user_error(e: BaseException | None) -> UserError | None:
  """The deepest UserError in e's chain of causes (None if there is none)."""
  found = None
  while e is not None:
    if isinstance(e, UserError):
      found = e
    e = e.__cause__ or e.__context__
  return found


def _plain_message(e: BaseException) -> str:
  """The text of an error that may wrap another (ml_collections raises AttributeError(KeyError));
  a KeyError's str() is the repr of its message, with quotes and escaped newlines."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = e.args[0] if isinstance(e, KeyError) and e.args else e
  return ' '.join(str(text).split())


def define_run_flags(workdir_help: str) -> None:
  """--config (a config file, overridable field by field) and --workdir, both required: the
  flags every training command takes."""
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.mark_flags_as_required(['config', 'workdir'])
