"""The layering of kpjax/ holds: folders are layers and imports point down, read from the source with `ast`.

    kpjax/errors.py (and kpjax/__init__.py, the version)  <  io  <  model  <  data  <  metrics  <  inference
        <  train  <  export  <  serve  <  cli

Every import counts, at module level or inside a function (lazy imports too), as do module names given to
importlib as strings. Only kpjax/cli/* and the entry shims (kpjax/evaluate.py, kpjax/predict.py,
kpjax/**/__main__.py) may import kpjax.cli. kpjax never imports torch, and kpjax.train.config_check
validates a config without Flax.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'kpjax')
LAYERS = ('io', 'model', 'data', 'metrics', 'inference', 'train', 'export', 'serve', 'cli')
BOTTOM = -1  # the layer of kpjax.errors and kpjax/__init__.py: every layer may import them
TOP_LEVEL = {'kpjax': BOTTOM, 'kpjax.errors': BOTTOM, 'kpjax.dsnt': LAYERS.index('model')}  # dsnt: model.dsnt's name
ENTRY_SHIMS = {'kpjax.evaluate', 'kpjax.predict'}  # and every __main__


def _modules() -> dict[str, str]:
  """{dotted module name: file} of every module under kpjax/."""
  found = {}
  for dirpath, dirnames, filenames in os.walk(PACKAGE):
    dirnames[:] = sorted(d for d in dirnames if d != '__pycache__')
    for f in sorted(filenames):
      if f.endswith('.py'):
        parts = os.path.relpath(os.path.join(dirpath, f[:-3]), ROOT).split(os.sep)
        found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = os.path.join(dirpath, f)
  return found


MODULES = _modules()


def _is_shim(module: str) -> bool:
  return module in ENTRY_SHIMS or module.endswith('.__main__')


def _layer(module: str) -> int:
  if module in TOP_LEVEL:
    return TOP_LEVEL[module]
  parts = module.split('.')
  assert len(parts) > 1 and parts[1] in LAYERS, (
      f'{module} is in no layer: put it in one of kpjax/{{{",".join(LAYERS)}}}/ (or list it in TOP_LEVEL)')
  return LAYERS.index(parts[1])


def _resolve(name: str) -> str | None:
  """The kpjax module `name` refers to (itself, or the module that defines it), or None outside kpjax."""
  while name and name not in MODULES:
    name = name.rpartition('.')[0]
  return name or None


@functools.lru_cache(maxsize=None)
def imports(module: str) -> list[tuple[str, int]]:
  """[(kpjax module, line)] that `module` imports anywhere in its file."""
  path = MODULES[module]
  tree = ast.parse(open(path, encoding='utf-8').read(), path)
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from the package `level - 1` levels above this module's
        anchor = package.split('.')[:len(package.split('.')) - (node.level - 1)]
        base = '.'.join(anchor + ([base] if base else []))
      names += [(f'{base}.{alias.name}', node.lineno) for alias in node.names]  # a submodule or a name in base
    elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
          and node.value in MODULES):  # importlib.import_module('kpjax.model.network') and the like
      names.append((node.value, node.lineno))
  return [(r, line) for r, line in ((_resolve(n), line) for n, line in names) if r is not None and r != module]


def test_the_tree_is_what_this_test_reads():
  assert {'kpjax.errors', 'kpjax.inference.checkpoints', 'kpjax.train.config_check', 'kpjax.cli.common',
          'kpjax.train.__main__', 'kpjax.model'} <= set(MODULES)
  assert any(m == 'kpjax.model.network' for m, _ in imports('kpjax.model'))  # a lazy importlib table counts
  assert any(m == 'kpjax.train.loop' for m, _ in imports('kpjax.train'))  # an import inside a function counts
  assert any(m == 'kpjax.cli.train' for m, _ in imports('kpjax.train.__main__'))


def test_no_library_module_imports_the_cli():
  offenders = [f'{m}:{line} imports {target}' for m in MODULES if not (m.startswith('kpjax.cli') or _is_shim(m))
               for target, line in imports(m) if target == 'kpjax.cli' or target.startswith('kpjax.cli.')]
  assert not offenders, offenders


def test_imports_point_down_the_layers():
  offenders = []
  for module in MODULES:
    if _is_shim(module):
      continue
    for target, line in imports(module):
      if _layer(target) > _layer(module):
        offenders.append(f'{module}:{line} imports {target} ({LAYERS[_layer(target)]} is above '
                         f'{LAYERS[_layer(module)] if _layer(module) >= 0 else "the bottom"})')
  assert not offenders, offenders


def test_the_bottom_imports_nothing_of_kpjax():
  assert imports('kpjax.errors') == [] and imports('kpjax') == []


def test_entry_shims_only_call_the_cli():
  shims = [m for m in MODULES if _is_shim(m)]
  assert len(shims) >= 6, shims  # evaluate, predict and the __main__ of train, export, data.build, data.synthetic
  for module in shims:
    assert {t.split('.')[1] for t, _ in imports(module)} == {'cli'}, module


def test_kpjax_never_imports_torch():
  offenders = []
  for module, path in MODULES.items():
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ''] if isinstance(node, ast.ImportFrom) and not node.level else [])
      offenders += [f'{module}:{node.lineno} imports {n}' for n in names if n == 'torch' or n.startswith('torch.')]
  assert not offenders, offenders


CHILD = '''
import importlib, json, sys
import kpjax.train.config_check
flax_after_config_check = sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.'))
for name in sys.argv[1:]:
  importlib.import_module(name)
print(json.dumps({'flax_after_config_check': flax_after_config_check,
                  'torch_after_everything': sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')),
                  'flax_after_everything': 'flax' in sys.modules}))
'''


def test_config_check_needs_no_flax_and_nothing_loads_torch():
  """In a fresh process: config_check alone, then every library module (entry shims run their CLI: left out)."""
  library = [m for m in MODULES if not _is_shim(m)]
  proc = subprocess.run([sys.executable, '-c', CHILD, *library], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got['flax_after_config_check'] == []
  assert got['torch_after_everything'] == []
  assert got['flax_after_everything']  # the check is not vacuous: the network modules do load Flax


@pytest.mark.parametrize('module, target, ok', [
    ('kpjax.train.loop', 'kpjax.inference.checkpoints', True),
    ('kpjax.data.geometry', 'kpjax.model.layers', True),
    ('kpjax.model.network', 'kpjax.data.spec', False),
    ('kpjax.inference.checkpoints', 'kpjax.train.workdir', False),
    ('kpjax.io.atomic', 'kpjax.errors', True),
    ('kpjax.dsnt', 'kpjax.model.dsnt', True),
])
def test_the_layer_rule_itself(module, target, ok):
  assert (_layer(target) <= _layer(module)) == ok
