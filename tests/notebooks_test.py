"""Every Colab notebook runs top to bottom in smoke mode (DMUE_SMOKE=1: tiny, CPU, no widgets)."""

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, 'colab')
NOTEBOOKS = ('demo.ipynb', 'inference.ipynb', 'train_tpu.ipynb')


@pytest.mark.parametrize('name', NOTEBOOKS)
@pytest.mark.slow
def test_notebook_runs_in_smoke_mode(name, monkeypatch):
  monkeypatch.setenv('DMUE_SMOKE', '1')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name='python3',
                          resources={'metadata': {'path': COLAB}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if o.get('output_type') == 'error']
  assert not errors


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_saved_notebook_has_no_outputs_or_machine_paths(name):
  with open(os.path.join(COLAB, name)) as f:
    text = f.read()
  nb = json.loads(text)
  for cell in nb['cells']:
    if cell['cell_type'] == 'code':
      assert cell.get('outputs') == [] and cell.get('execution_count') is None
  # Only Colab's own paths may appear; nothing from a developer's machine.
  source = '\n'.join(''.join(cell['source']) for cell in nb['cells'])
  for path in re.findall(r"['\"](/[^'\"\s]*)['\"]", source):
    assert path.startswith('/content'), path
  machine = re.findall(r'(?:^|[\s\'"(=])(/(?:work|tmp|home|Users|root)/[^\s\'"]*)',
                       source)
  assert not machine, machine
  assert not re.search(r'[A-Za-z]:\\\\(?:Users|Documents)', source)
