"""colab/setup_runtime.py: the notebooks' install logic, checked without installing anything."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'colab'))
import setup_runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_jax_specifier_reads_the_jax_line_not_comments_or_other_packages():
  text = ('# For GPU: pip install -U "jax[cuda12]>=0.1,<0.2" (a comment, not a requirement)\n'
          'jaxtyping>=0.2\n'
          'jax >= 0.7, <0.11  # the range\n'
          'flax>=0.11\n')
  assert setup_runtime.jax_specifier(text) == '>=0.7,<0.11'


@pytest.mark.parametrize('line, expected', [
    ('jax[cpu]>=0.8', '>=0.8'),
    ("jax==0.9.1; python_version >= '3.11'", '==0.9.1'),
    ('jax', ''),
])
def test_jax_specifier_forms(line, expected):
  assert setup_runtime.jax_specifier(line + '\n') == expected


def test_jax_specifier_without_a_jax_line_raises():
  with pytest.raises(ValueError, match='no jax line'):
    setup_runtime.jax_specifier('flax>=0.11\njaxlib>=0.7\n')


def test_the_repository_requirements_have_a_bounded_jax_range():
  spec = setup_runtime.read_jax_specifier(os.path.join(ROOT, 'requirements.txt'))
  assert '>=' in spec and '<' in spec, spec


@pytest.mark.parametrize('accelerator, expected', [
    ('tpu', 'jax[tpu]>=0.7,<0.11'),
    ('gpu', 'jax[cuda12]>=0.7,<0.11'),
    ('cpu', 'jax>=0.7,<0.11'),
])
def test_jax_pip_spec(accelerator, expected):
  assert setup_runtime.jax_pip_spec(accelerator, '>=0.7,<0.11') == expected


def test_jax_pip_spec_rejects_an_unknown_accelerator():
  with pytest.raises(ValueError, match='accelerator'):
    setup_runtime.jax_pip_spec('npu', '>=0.7')


def test_constraints_text_pins_each_version():
  assert (setup_runtime.constraints_text({'jax': '0.8.1', 'jaxlib': '0.8.1'}) ==
          'jax==0.8.1\njaxlib==0.8.1\n')


def _detect(environ=None, paths=(), has_gpu=False):
  return setup_runtime.detect_accelerator(
      environ or {}, exists=lambda p: p in paths,
      glob=lambda pattern: [p for p in paths if p.startswith(pattern.rstrip('*'))],
      has_gpu=lambda: has_gpu)


def test_detect_accelerator():
  assert _detect() == 'cpu'
  assert _detect(has_gpu=True) == 'gpu'
  assert _detect({'COLAB_TPU_ADDR': '10.0.0.2:8470'}) == 'tpu'
  assert _detect({'TPU_NAME': 'local'}) == 'tpu'
  assert _detect(paths=('/dev/accel0',)) == 'tpu'
  assert _detect(paths=('/dev/vfio',)) == 'tpu'
  # nvidia-smi working means a GPU, even where /dev/vfio exists for other reasons.
  assert _detect(paths=('/dev/vfio',), has_gpu=True) == 'gpu'


def test_fallback_warning_when_a_gpu_runs_jax_on_the_cpu():
  warning = setup_runtime.fallback_warning('gpu', 'cpu', '>=0.7,<0.11')
  assert 'GPU' in warning and 'fell back' in warning and 'CPU' in warning
  assert 'Runtime > Restart' in warning
  assert "jax[cuda12]>=0.7,<0.11" in warning


def test_fallback_warning_names_jax_tpu_for_a_tpu():
  assert 'jax[tpu]' in setup_runtime.fallback_warning('tpu', 'cpu', '>=0.7,<0.11')


@pytest.mark.parametrize('accelerator, backend', [
    ('gpu', 'gpu'), ('tpu', 'tpu'), ('cpu', 'cpu')])
def test_no_fallback_warning_when_jax_uses_what_there_is(accelerator, backend):
  assert setup_runtime.fallback_warning(accelerator, backend, '>=0.7') is None


class FakeRun:
  """Records the commands instead of running them; answers the version query."""

  def __init__(self, versions):
    self.versions = versions
    self.commands = []
    self.constraints = None

  def __call__(self, command, **kwargs):
    self.commands.append(list(command))
    if '-c' in command and 'pip' in command:
      with open(command[command.index('-c') + 1]) as f:
        self.constraints = f.read()
    stdout = json.dumps(self.versions) if command[1] == '-c' else ''
    return subprocess.CompletedProcess(command, 0, stdout=stdout, stderr='')


def test_install_pins_the_installed_jax_while_installing_requirements(tmp_path):
  (tmp_path / 'requirements.txt').write_text('jax>=0.7,<0.11\nflax>=0.11\n')
  run = FakeRun({'jax': '0.8.1', 'jaxlib': '0.8.1'})
  pins = setup_runtime.install(str(tmp_path), 'gpu', python='python', run=run)
  assert pins == {'jax': '0.8.1', 'jaxlib': '0.8.1'}
  first, query, requirements = run.commands
  assert first == ['python', '-m', 'pip', 'install', '-q', 'jax[cuda12]>=0.7,<0.11']
  assert query[:2] == ['python', '-c'] and query[-2:] == ['jax', 'jaxlib']
  assert requirements[:7] == ['python', '-m', 'pip', 'install', '-q', '-r',
                              str(tmp_path / 'requirements.txt')]
  assert requirements[7] == '-c'
  assert run.constraints == 'jax==0.8.1\njaxlib==0.8.1\n'
  assert not os.path.exists(requirements[8])  # the temporary constraints file is removed


def test_installed_versions_reads_them_in_a_fresh_interpreter():
  versions = setup_runtime.installed_versions(('pytest', 'no-such-package-dmue'))
  assert set(versions) == {'pytest'} and versions['pytest'] == pytest.__version__


def test_smoke_setup_installs_nothing_and_forces_the_cpu(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(setup_runtime, 'install', lambda *a, **k: pytest.fail('installed'))
  monkeypatch.setattr(sys, 'path', list(sys.path))
  environ = {'DMUE_SMOKE': '1'}
  runtime = setup_runtime.setup(ROOT, environ=environ)
  assert environ['JAX_PLATFORMS'] == 'cpu'
  assert runtime.backend == 'cpu' and runtime.accelerator == 'cpu'
  assert runtime.installed == {} and runtime.warning is None and runtime.devices
  assert os.getcwd() == ROOT and ROOT in sys.path
