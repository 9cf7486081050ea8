"""Reading PyTorch KPDEM checkpoints: what the file holds, reduced to the network's tensors (numpy).

Accepted: the released whole-module pickles (`torch.save(DataParallel(keypoints_Net.CoordRegression))`,
or the same classes pickled from a script, `__main__.CoordRegression`, or this repository's
`convert.torch_model` / installed `kpjax.convert.torch_model`), bare state_dicts, dicts wrapping either
under 'state_dict', 'model_state_dict', 'model', 'net' ... (other entries such as epoch or optimizer
state are ignored), in torch's zip format (PyTorch >= 1.6) or the older legacy format; keys may carry
`module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes.

The file is read by kpjax.io.torch_file, kpjax's one torch-free reader (nothing in the file runs, no
torch needed), with `KPDEM_MODULES`, the module classes a KPDEM pickle holds, as this use's allowlist:
any other global is refused, naming it, before anything is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Mapping

import numpy as np

from kpjax.errors import TorchFileError
from kpjax.io import paths
from kpjax.io import torch_file

# The classes of a KPDEM whole-module pickle: torch's layers, DataParallel, and the network's own two
# classes under every module name they were saved from.
_NETWORK_MODULES = (
    'keypoints_Net',  # the released models' network file
    '__main__',  # the same classes defined in the training script itself
    'convert.torch_model',  # this repository's torch definition, from a checkout
    'kpjax.convert.torch_model',  # the same, from an installed kpjax (convert/ is installed as kpjax.convert)
)
MODULE_CLASSES = (
    'torch.nn.modules.container.Sequential',
    'torch.nn.modules.conv.Conv2d',
    'torch.nn.modules.activation.ReLU',
    'torch.nn.modules.pooling.MaxPool2d',
    'torch.nn.modules.pooling.MaxUnpool2d',
    'torch.nn.parallel.data_parallel.DataParallel',
) + tuple(f'{module}.{cls}' for module in _NETWORK_MODULES for cls in ('CoordRegression', 'KeyPointsModel'))
KPDEM_MODULES = torch_file.ModuleClasses(
    frozenset(MODULE_CLASSES),
    'only tensors, the torch.nn layers of KPDEM (Sequential, Conv2d, ReLU, MaxPool2d, MaxUnpool2d), DataParallel '
    'and the KPDEM classes CoordRegression/KeyPointsModel (of keypoints_Net, __main__ or convert.torch_model) are')
# Where a wrapping dict keeps the model, most specific first.
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net', 'network', 'model_state', 'module')
PREFIXES = ('module.', '_orig_mod.')


@dataclasses.dataclass
class TorchCheckpoint:
  """What a checkpoint file held, reduced to its model's tensors.

  Attributes:
    state_dict: {key: numpy array} with `module.` / `_orig_mod.` prefixes removed, in file order.
    container: how the tensors were stored, e.g. "whole module DataParallel(keypoints_Net.CoordRegression)"
      or "dict['state_dict']".
    file_format: 'zip' (PyTorch >= 1.6) or 'legacy'.
    prefixes: the prefixes removed.
    path, sha256: the file and its SHA-256.
  """
  state_dict: dict[str, np.ndarray]
  container: str
  file_format: str
  prefixes: tuple[str, ...]
  path: str
  sha256: str


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def is_state_dict(obj: Any) -> bool:
  return (isinstance(obj, Mapping) and len(obj) > 0
          and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


def _describe_module(module: torch_file.PickledModule) -> str:
  inner = ((module.state or {}).get('_modules') or {}).get('module')
  if module.pickled_name.endswith('DataParallel') and isinstance(inner, torch_file.PickledModule):
    return f'{module.pickled_name.rsplit(".", 1)[1]}({inner.pickled_name})'
  return module.pickled_name


def extract_state_dict(obj: Any, path: str = 'the checkpoint') -> tuple[dict[str, np.ndarray], str]:
  """(raw state_dict, how it was stored) from what torch.save wrote: a module, a state_dict or a wrapper."""
  if isinstance(obj, torch_file.PickledModule):
    return torch_file.module_state_dict(obj), f'whole module {_describe_module(obj)}'
  if is_state_dict(obj):
    return dict(obj), 'state_dict'
  if isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      value = obj.get(key)
      if isinstance(value, torch_file.PickledModule):
        return torch_file.module_state_dict(value), f"dict['{key}'] holding whole module {_describe_module(value)}"
      if is_state_dict(value):
        return dict(value), f"dict['{key}']"
    keys = ', '.join(repr(k) for k in list(obj)[:10]) or 'none'
    raise TorchFileError(f'{path} holds a dict without model weights (keys: {keys}); expected a state_dict '
                         f'(parameter name -> tensor), a dict with one under {", ".join(map(repr, WRAPPER_KEYS))}, '
                         'or a whole pickled KPDEM model')
  raise TorchFileError(f'{path} holds a {type(obj).__name__}; expected a state_dict (parameter name -> tensor), '
                       'a dict wrapping one, or a whole pickled KPDEM model')


def strip_prefixes(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
  """Removes leading `module.` / `_orig_mod.` (in any nesting) from every key -> (state_dict, prefixes seen)."""
  out: dict[str, Any] = {}
  seen: list[str] = []
  for key, value in state_dict.items():
    new = key
    while new.startswith(PREFIXES):
      prefix = next(p for p in PREFIXES if new.startswith(p))
      if prefix not in seen:
        seen.append(prefix)
      new = new[len(prefix):]
    if new in out:
      raise TorchFileError(f'keys {key!r} and another one both become {new!r} once the DataParallel/compile '
                           'prefixes are removed')
    out[new] = value
  return out, tuple(seen)


def load_torch_checkpoint(path: str) -> TorchCheckpoint:
  """Reads any accepted checkpoint file safely, without torch -> TorchCheckpoint (raises TorchFileError); `path`
  may be gs://... (read from a local copy, kpjax.io.paths)."""
  if paths.is_remote(path):
    with paths.local_copy(path) as local:
      return dataclasses.replace(load_torch_checkpoint(local), path=path)
  path = os.path.expanduser(path)
  obj, file_format = torch_file.read_object(path, KPDEM_MODULES)
  raw, container = extract_state_dict(obj, path)
  state_dict, prefixes = strip_prefixes(raw)
  return TorchCheckpoint(state_dict=state_dict, container=container, file_format=file_format, prefixes=prefixes,
                         path=path, sha256=sha256_file(path))
