"""Prepares a notebook runtime (Colab or a local Jupyter) for the notebooks in this folder.

Every notebook's first cell finds the repository, puts this folder on `sys.path` and calls

    runtime = setup_runtime.setup(ROOT, smoke=SMOKE)

On Colab, `setup` installs JAX for the runtime's accelerator (`jax[tpu]` on a TPU, `jax[cuda12]`
on a GPU, plain `jax` otherwise) within the range that requirements.txt allows, then the rest of
requirements.txt with that jax and jaxlib pinned (`install` says why). It then imports jax, prints
the backend and devices, and warns if an accelerator was found but JAX runs on the CPU. Outside
Colab it installs nothing; under DMUE_SMOKE=1 (the test suite) neither, and it forces the CPU.

The logic is in small functions that take their inputs as arguments (the environment, the probes
and the command runner are injectable), so tests/colab_setup_test.py checks it without
installing anything. Importing this module has no side effects.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Mapping, MutableMapping, Sequence

# The pip extra that brings each accelerator's JAX plugin; plain `jax` runs on the CPU.
JAX_EXTRAS = {'tpu': 'tpu', 'gpu': 'cuda12', 'cpu': None}
ACCELERATOR_NAMES = {'tpu': 'a TPU', 'gpu': 'a GPU'}
# Pinned while requirements.txt installs, so pip cannot replace them.
PINNED = ('jax', 'jaxlib')

_JAX_LINE = re.compile(r'^jax(?:\[[^\]]*\])?\s*(?P<spec>[<>=!~].*)?$')


def smoke_mode(environ: Mapping[str, str] = os.environ) -> bool:
  """True under DMUE_SMOKE=1: tiny configs, CPU only, no installs, no Drive, no widgets."""
  return environ.get('DMUE_SMOKE') == '1'


def on_colab() -> bool:
  return importlib.util.find_spec('google.colab') is not None


def detect_accelerator(environ: Mapping[str, str] = os.environ,
                       exists: Callable[[str], bool] = os.path.exists,
                       glob: Callable[[str], list] = glob_lib.glob,
                       has_gpu: Callable[[], bool] | None = None) -> str:
  """'tpu', 'gpu' or 'cpu', from the environment and devices, without importing jax."""
  # The GPU first: a TPU machine has no nvidia-smi, but a GPU machine may have /dev/vfio.
  if (has_gpu or nvidia_smi_runs)():
    return 'gpu'
  if (environ.get('COLAB_TPU_ADDR') or environ.get('TPU_NAME') or glob('/dev/accel*') or
      exists('/dev/vfio')):
    return 'tpu'
  return 'cpu'


def nvidia_smi_runs() -> bool:
  try:
    subprocess.run(['nvidia-smi'], check=True, capture_output=True, timeout=60)
  except (OSError, subprocess.SubprocessError):
    return False
  return True


def jax_specifier(requirements_text: str) -> str:
  """The version range of the `jax` line, e.g. '>=0.7,<0.11' ('' if the line has none)."""
  for line in requirements_text.splitlines():
    line = line.split('#', 1)[0].split(';', 1)[0].strip()
    match = _JAX_LINE.match(line)
    if match:
      return re.sub(r'\s+', '', match.group('spec') or '')
  raise ValueError('requirements.txt has no jax line.')


def read_jax_specifier(requirements_path: str) -> str:
  with open(requirements_path) as f:
    return jax_specifier(f.read())


def jax_pip_spec(accelerator: str, specifier: str) -> str:
  """What to pip install for `accelerator`: 'jax[tpu]>=0.7,<0.11', 'jax[cuda12]…' or 'jax…'."""
  if accelerator not in JAX_EXTRAS:
    raise ValueError(f'accelerator={accelerator!r}: use one of {sorted(JAX_EXTRAS)}.')
  extra = JAX_EXTRAS[accelerator]
  return f'jax[{extra}]{specifier}' if extra else f'jax{specifier}'


def constraints_text(versions: Mapping[str, str]) -> str:
  """A pip constraints file pinning each package: {'jax': '0.8.1'} -> 'jax==0.8.1\\n'."""
  return ''.join(f'{name}=={version}\n' for name, version in versions.items())


def installed_versions(packages: Sequence[str] = PINNED, *, python: str = sys.executable,
                       run: Callable = subprocess.run) -> dict[str, str]:
  """The installed version of each package that is installed, read in a fresh interpreter.

  A subprocess, because this process must not import jax before it is installed (and the
  metadata it had cached may predate the install).
  """
  code = ('import importlib.metadata as m, json, sys\n'
          'versions = {}\n'
          'for p in sys.argv[1:]:\n'
          '  try:\n'
          '    versions[p] = m.version(p)\n'
          '  except m.PackageNotFoundError:\n'
          '    pass\n'
          'print(json.dumps(versions))\n')
  out = run([python, '-c', code, *packages], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def pip_install(args: Sequence[str], *, python: str = sys.executable,
                run: Callable = subprocess.run) -> None:
  run([python, '-m', 'pip', 'install', '-q', *args], check=True)


def install(root: str, accelerator: str, *, python: str = sys.executable,
            run: Callable = subprocess.run) -> dict[str, str]:
  """Installs JAX for `accelerator`, then requirements.txt around it; returns the pins.

  The runtime's preinstalled JAX stays if it is in range (pip then only adds the accelerator's
  plugin); otherwise pip installs the newest version in range. requirements.txt is installed
  with a pip constraints file that pins the jax and jaxlib just installed: without it a later
  requirement could upgrade jax to a version whose accelerator plugin is missing, and JAX would
  silently run on the CPU.
  """
  requirements = os.path.join(root, 'requirements.txt')
  pip_install([jax_pip_spec(accelerator, read_jax_specifier(requirements))],
              python=python, run=run)
  pins = installed_versions(PINNED, python=python, run=run)
  with tempfile.NamedTemporaryFile('w', prefix='jax_constraints_', suffix='.txt',
                                   delete=False) as f:
    f.write(constraints_text(pins))
  try:
    pip_install(['-r', requirements, '-c', f.name], python=python, run=run)
  finally:
    os.remove(f.name)
  return pins


def fallback_warning(accelerator: str, backend: str, specifier: str = '') -> str | None:
  """The message to show when an accelerator was found but JAX runs on the CPU, else None."""
  if accelerator not in ACCELERATOR_NAMES or backend != 'cpu':
    return None
  return (f'WARNING: this runtime has {ACCELERATOR_NAMES[accelerator]}, but JAX fell back to '
          "the CPU (jax.default_backend() == 'cpu').\n"
          'Fix: Runtime > Restart session, then run all cells again. If it persists, '
          f'reinstall JAX for the accelerator, restart and run all cells:\n'
          f"  !pip install -U '{jax_pip_spec(accelerator, specifier)}'")


@dataclasses.dataclass(frozen=True)
class Runtime:
  root: str
  accelerator: str         # what the machine has: 'tpu', 'gpu' or 'cpu'
  backend: str             # what JAX uses: jax.default_backend()
  devices: tuple
  installed: dict          # the pinned versions installed, {} if nothing was installed
  warning: str | None      # the fall-back-to-CPU warning, if any


def setup(root: str, *, smoke: bool | None = None, install_packages: bool | None = None,
          environ: MutableMapping[str, str] | None = None) -> Runtime:
  """Installs what the notebooks need, makes `root` the working directory and importable.

  Args:
    root: the repository root (it holds requirements.txt and dmue_jax/).
    smoke: DMUE_SMOKE mode (None = read the environment): no installs, CPU backend.
    install_packages: None = only on Colab; a local Jupyter keeps its own environment.
    environ: the environment to read and, under smoke, to set JAX_PLATFORMS in.

  Returns:
    The accelerator found, JAX's backend and devices, the installed pins and the warning.
  """
  environ = os.environ if environ is None else environ
  root = os.path.abspath(root)
  smoke = smoke_mode(environ) if smoke is None else smoke
  installed = {}
  if smoke:
    # Must precede the first `import jax` in this process.
    environ['JAX_PLATFORMS'] = 'cpu'
    accelerator = 'cpu'
  else:
    accelerator = detect_accelerator(environ)
    if install_packages is None:
      install_packages = on_colab()
    if install_packages:
      installed = install(root, accelerator)
  os.chdir(root)
  if root not in sys.path:
    sys.path.insert(0, root)
  return check_backend(root, accelerator, installed)


def check_backend(root: str, accelerator: str, installed: dict) -> Runtime:
  """Imports jax (only now, after any install), prints what it runs on, warns on a fallback."""
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  warning = fallback_warning(accelerator, backend,
                             read_jax_specifier(os.path.join(root, 'requirements.txt')))
  print(f'jax {jax.__version__}, backend {backend}: {jax.devices()}')
  if installed.get('jax') and installed['jax'] != jax.__version__:
    # jax was imported before this install (a re-run cell): the new version needs a restart.
    print(f"Installed jax {installed['jax']}, but this session has {jax.__version__} "
          'loaded: Runtime > Restart session, then run all cells again.')
  if warning:
    print(warning, file=sys.stderr)
  return Runtime(root=root, accelerator=accelerator, backend=backend,
                 devices=tuple(jax.devices()), installed=installed, warning=warning)
