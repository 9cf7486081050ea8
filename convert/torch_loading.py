"""Reading PyTorch KPDEM checkpoints safely: tensors come out, nothing in the file ever runs.

Accepted: the released whole-module pickles (`torch.save(DataParallel(keypoints_Net.CoordRegression))`,
or the same classes pickled from a script, `__main__.CoordRegression`), bare state_dicts, dicts
wrapping either under 'state_dict', 'model_state_dict', 'model', 'net' ... (other entries such as
epoch or optimizer state are ignored), in torch's zip format (PyTorch >= 1.6) or the older legacy
pickle format; keys may carry `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes.

Safety: before anything is unpickled, every global the pickle names is checked against an
allowlist (torch's weights_only set: tensors, storages, dtypes, OrderedDict; plus the few module
classes KPDEM pickles contain); any other global is refused with a message naming it. Module
classes never resolve to real code: each allowlisted name (torch.nn.Conv2d, DataParallel,
keypoints_Net.CoordRegression ...) maps to an inert stand-in whose `__setstate__` only stores the
pickled attribute dict, from which tensors are collected by walking `_modules`, `_parameters` and
`_buffers`. Zip files load with `torch.load(weights_only=True)`. Legacy whole-module pickles
cannot (torch's weights_only unpickler rejects the `('module', class, ...)` persistent ids those
files contain), so legacy files fall back to `pickle.Unpickler` restricted by `find_class` to the
same allowlist, with torch's storage layout read here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Mapping

import torch
from torch import _weights_only_unpickler

from kpjax.io import paths
from kpjax.io import torch_file
from kpjax.io.torch_file import pickle_globals

# Module classes a KPDEM whole-module pickle contains. Each becomes an inert stand-in.
MODULE_CLASSES = (
    'torch.nn.modules.container.Sequential',
    'torch.nn.modules.conv.Conv2d',
    'torch.nn.modules.activation.ReLU',
    'torch.nn.modules.pooling.MaxPool2d',
    'torch.nn.modules.pooling.MaxUnpool2d',
    'torch.nn.parallel.data_parallel.DataParallel',
    'keypoints_Net.CoordRegression',  # the released models' network file
    'keypoints_Net.KeyPointsModel',
    '__main__.CoordRegression',  # the same classes defined in the training script itself
    '__main__.KeyPointsModel',
    'convert.torch_model.CoordRegression',  # this repository's torch definition
    'convert.torch_model.KeyPointsModel',
)
# torch 0.4/1.0 modules pickled `_backend` as a call to this (a no-op kept by torch for old pickles).
LEGACY_BACKEND = 'torch.nn.backends.thnn._get_thnn_function_backend'
# Where a wrapping dict keeps the model, most specific first.
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net', 'network', 'model_state', 'module')
PREFIXES = ('module.', '_orig_mod.')

_MAX_DEPTH = 64


# A file that is missing, damaged or not a (KPDEM) PyTorch checkpoint; the message says which. The
# same type as kpjax.io.torch_file's errors, whose file sniffing and legacy header reading this module shares.
TorchCheckpointError = torch_file.TorchFileError


class UnsafeCheckpointError(TorchCheckpointError):
  """A pickle that needs globals outside the allowlist; it was refused before anything ran."""

  def __init__(self, path: str, names):
    self.names = sorted(set(names))
    super().__init__(
        f'refusing to load {path}: its pickle needs {", ".join(self.names)}, which '
        f'{"is" if len(self.names) == 1 else "are"} not allowed: only tensors, the torch.nn layers of KPDEM, '
        'DataParallel and the KPDEM classes (keypoints_Net.CoordRegression/KeyPointsModel) are. Nothing from '
        'the file was run. If you trust the file, load it in PyTorch and save just the weights '
        "(torch.save(model.state_dict(), 'weights.pt')), then convert that.")


class PickledModule:
  """Inert stand-in for a pickled torch.nn.Module: keeps the pickled attribute dict, runs nothing."""
  pickled_name = 'torch.nn.Module'

  def __setstate__(self, state):
    self.pickled_state = state

  def __repr__(self):
    return f'<pickled {self.pickled_name}>'


def _stand_in(full_name: str) -> type:
  return type(full_name.rsplit('.', 1)[1], (PickledModule,), {'pickled_name': full_name, '__module__': __name__})


STAND_INS: dict[str, type] = {name: _stand_in(name) for name in MODULE_CLASSES}


def _legacy_backend() -> None:
  return None


def _extra_globals() -> dict[str, Any]:
  """Our additions to torch's weights_only allowlist: full name -> the object it resolves to."""
  return {**STAND_INS, LEGACY_BACKEND: _legacy_backend}


def _allowed_globals() -> dict[str, Any]:
  return {**_weights_only_unpickler._get_allowed_globals(), **_extra_globals()}


@dataclasses.dataclass
class TorchCheckpoint:
  """What a checkpoint file held, reduced to its model's tensors.

  Attributes:
    state_dict: {key: tensor} with `module.` / `_orig_mod.` prefixes removed, in file order.
    container: how the tensors were stored, e.g. "whole module DataParallel(keypoints_Net.CoordRegression)"
      or "dict['state_dict']".
    file_format: 'zip' (PyTorch >= 1.6) or 'legacy'.
    prefixes: the prefixes removed.
    path, sha256: the file and its SHA-256.
  """
  state_dict: dict[str, torch.Tensor]
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


# ---- Scanning: which globals does a pickle name? (torch_file.pickle_globals: parsing only) -----------

def _refuse_unsafe(path: str, names: list[str]) -> None:
  allowed = _allowed_globals()
  bad = [n for n in names if n not in allowed]
  if bad:
    raise UnsafeCheckpointError(path, bad)


# ---- Zip format (PyTorch >= 1.6): torch.load(weights_only=True) ------------------------------------

def _load_zip(path: str) -> Any:
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      pickles = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
      if any(n.endswith('constants.pkl') or '/code/' in n for n in names):
        raise TorchCheckpointError(f'{path} is a TorchScript archive (torch.jit.save), not a torch.save checkpoint; '
                                   "save the model's weights with torch.save(model.state_dict(), 'weights.pt')")
      if len(pickles) != 1:
        raise TorchCheckpointError(f'{path} is a zip archive but not a PyTorch checkpoint (no single data.pkl inside)')
      data = archive.read(pickles[0])
  except zipfile.BadZipFile as e:
    raise TorchCheckpointError(f'{path} is a damaged zip archive ({e}); is the download complete?') from None
  try:
    names = pickle_globals(data)
  except Exception as e:  # pickletools raises ValueError and friends on damaged data
    raise TorchCheckpointError(f'{path}: its data.pkl is damaged ({type(e).__name__}: {e})') from None
  _refuse_unsafe(path, names)
  return _torch_load(path)


_MODULE_PERSISTENT_IDS = 'persistent_load of storage'  # torch's weights_only refusal of legacy module pickles


def _torch_load(path: str) -> Any:
  """torch.load(weights_only=True) with the stand-ins allowlisted; errors become TorchCheckpointErrors."""
  try:
    with torch.serialization.safe_globals([(obj, name) for name, obj in _extra_globals().items()]):
      return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:  # a second line of defence behind the scans
    if _MODULE_PERSISTENT_IDS in str(e):
      raise
    found = re.findall(r'GLOBAL (\S+)', str(e))
    if found:
      raise UnsafeCheckpointError(path, found) from None
    reason = [line for line in str(e).splitlines() if line.strip()]
    raise TorchCheckpointError(f'refusing to load {path}: {reason[-2] if len(reason) > 1 else reason[0]}') from None
  except Exception as e:
    raise TorchCheckpointError(f'cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}') from None


# ---- Legacy format (PyTorch < 1.6, e.g. the released models) ----------------------------------------

class _RestrictedUnpickler(torch_file.RestrictedUnpickler):
  """An unpickler whose globals can only be allowlisted objects; reads torch's legacy storage ids."""
  unsafe_error = UnsafeCheckpointError

  def __init__(self, file, path: str, storages: dict, max_bytes: int | None = None):
    super().__init__(file, path, _allowed_globals())
    self._max_bytes = max_bytes  # a storage cannot hold more than the file does
    self._storages = storages  # root key -> (untyped storage, dtype)
    self._views = {}

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise TorchCheckpointError(f'{self._path}: unexpected persistent id {pid!r}; not a torch.save file')
    kind = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
    if kind == 'module':  # ('module', class, source file, source): the class already passed find_class
      cls = pid[1]
      if not (isinstance(cls, type) and issubclass(cls, PickledModule)):
        raise UnsafeCheckpointError(self._path, [repr(cls)])
      return cls
    if kind != 'storage' or len(pid) != 6:
      raise TorchCheckpointError(f'{self._path}: unexpected persistent id kind {kind!r}; not a torch.save file')
    storage_type, root_key, _, numel, view_metadata = pid[1:]
    dtype = getattr(storage_type, 'dtype', None)
    if not isinstance(dtype, torch.dtype):
      raise TorchCheckpointError(f'{self._path}: storage of unknown type {storage_type!r}')
    if root_key not in self._storages:
      nbytes = int(numel) * torch._utils._element_size(dtype)
      if nbytes < 0 or (self._max_bytes is not None and nbytes > self._max_bytes):
        raise TorchCheckpointError(f'{self._path} is damaged: a storage claims {nbytes} bytes, more than the file has')
      untyped = torch.UntypedStorage(nbytes)
      self._storages[root_key] = (untyped, dtype)
    untyped, _ = self._storages[root_key]
    if view_metadata is not None:  # (view key, offset, size) in elements, as torch wrote them before 1.0
      view_key, offset, size = view_metadata
      size_of = torch._utils._element_size(dtype)
      if view_key not in self._views:
        self._views[view_key] = untyped[offset * size_of:(offset + size) * size_of]
      untyped = self._views[view_key]
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _load_legacy(path: str) -> Any:
  """A legacy-format file: scanned, then torch.load(weights_only=True), or for whole-module pickles
  (which torch's weights_only unpickler cannot read) the restricted unpickler below."""
  _scan_legacy(path)
  try:
    return _torch_load(path)
  except pickle.UnpicklingError:  # ('module', class, ...) persistent ids: a whole-module pickle
    return _load_legacy_modules(path)


def _scan_legacy(path: str) -> None:
  """Refuses a legacy file whose main pickle names a disallowed global, before anything is unpickled."""
  with open(path, 'rb') as f:
    torch_file.read_legacy_header(f, path)
    try:
      names = pickle_globals(f)
    except Exception as e:
      raise TorchCheckpointError(f'{path}: damaged or truncated legacy checkpoint ({type(e).__name__}: {e})') from None
  _refuse_unsafe(path, names)


def _load_legacy_modules(path: str) -> Any:
  """Reads a legacy whole-module pickle with `_RestrictedUnpickler`, then the raw storages after it."""
  storages: dict = {}
  with open(path, 'rb') as f:
    torch_file.read_legacy_header(f, path)
    try:
      size = os.path.getsize(path)
      result = _RestrictedUnpickler(f, path, storages, max_bytes=size).load()
      keys = _RestrictedUnpickler(f, path, storages).load()
      for key in keys:  # each storage: int64 element count, then its bytes (little-endian)
        untyped, dtype = storages[key]
        count = struct.unpack('<q', torch_file.read_exactly(f, 8, path))[0]
        nbytes = count * torch._utils._element_size(dtype)
        if nbytes != untyped.nbytes():
          raise TorchCheckpointError(f'{path}: storage {key} holds {nbytes} bytes, its tensors need {untyped.nbytes()}')
        if nbytes:
          data = torch.frombuffer(bytearray(torch_file.read_exactly(f, nbytes, path)), dtype=torch.uint8)
          torch.empty(0, dtype=torch.uint8).set_(untyped).copy_(data)
    except TorchCheckpointError:
      raise
    except Exception as e:
      raise TorchCheckpointError(f'{path}: damaged or truncated legacy checkpoint ({type(e).__name__}: {e})') from None
  return result


def load_object(path: str) -> tuple[Any, str]:
  """Safely unpickles a torch.save file -> (object, 'zip' | 'legacy'); modules come back as stand-ins."""
  if torch_file.file_format(path) == 'zip':
    return _load_zip(path), 'zip'
  return _load_legacy(path), 'legacy'


# ---- From the unpickled object to a state_dict ---------------------------------------------------

def is_state_dict(obj: Any) -> bool:
  return (isinstance(obj, Mapping) and len(obj) > 0
          and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def module_state_dict(root: PickledModule) -> dict[str, torch.Tensor]:
  """What `root.state_dict()` would give, by walking the pickled attribute dicts (no method is called)."""
  out: dict[str, torch.Tensor] = {}
  seen: set[int] = set()

  def walk(module, prefix, depth):
    if depth > _MAX_DEPTH or id(module) in seen:
      raise TorchCheckpointError('the pickled module tree is cyclic or absurdly deep; not a KPDEM model')
    seen.add(id(module))
    state = getattr(module, 'pickled_state', None)
    if not isinstance(state, Mapping):
      raise TorchCheckpointError(f'pickled {module.pickled_name} at {prefix or "<root>"} has no attribute dict')
    skip = state.get('_non_persistent_buffers_set') or set()
    for group in ('_parameters', '_buffers'):
      entries = state.get(group) or {}
      if not isinstance(entries, Mapping):
        raise TorchCheckpointError(f'{prefix}{group} of the pickled {module.pickled_name} is not a dict')
      for name, value in entries.items():
        if value is None or (group == '_buffers' and name in skip):
          continue
        if not isinstance(value, torch.Tensor):
          raise TorchCheckpointError(f'{prefix}{name} of the pickled {module.pickled_name} is a '
                                     f'{type(value).__name__}, not a tensor')
        out[prefix + str(name)] = value
    children = state.get('_modules') or {}
    if not isinstance(children, Mapping):
      raise TorchCheckpointError(f'{prefix}_modules of the pickled {module.pickled_name} is not a dict')
    for name, child in children.items():
      if child is None:
        continue
      if not isinstance(child, PickledModule):
        raise TorchCheckpointError(f'submodule {prefix}{name} is a {type(child).__name__}, not a module')
      walk(child, f'{prefix}{name}.', depth + 1)

  walk(root, '', 0)
  return out


def _describe_module(module: PickledModule) -> str:
  children = (getattr(module, 'pickled_state', None) or {}).get('_modules') or {}
  inner = children.get('module') if module.pickled_name.endswith('DataParallel') else None
  if isinstance(inner, PickledModule):
    return f'{module.pickled_name.rsplit(".", 1)[1]}({inner.pickled_name})'
  return module.pickled_name


def extract_state_dict(obj: Any, path: str = 'the checkpoint') -> tuple[dict[str, torch.Tensor], str]:
  """(raw state_dict, how it was stored) from whatever torch.save wrote: module, state_dict or wrapper."""
  if isinstance(obj, PickledModule):
    return module_state_dict(obj), f'whole module {_describe_module(obj)}'
  if is_state_dict(obj):
    return dict(obj), 'state_dict'
  if isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      value = obj.get(key)
      if isinstance(value, PickledModule):
        return module_state_dict(value), f"dict['{key}'] holding whole module {_describe_module(value)}"
      if is_state_dict(value):
        return dict(value), f"dict['{key}']"
    keys = ', '.join(repr(k) for k in list(obj)[:10]) or 'none'
    raise TorchCheckpointError(f'{path} holds a dict without model weights (keys: {keys}); expected a state_dict '
                               f'(parameter name -> tensor), a dict with one under {", ".join(map(repr, WRAPPER_KEYS))}, '
                               'or a whole pickled KPDEM model')
  raise TorchCheckpointError(f'{path} holds a {type(obj).__name__}; expected a state_dict (parameter name -> tensor), '
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
      raise TorchCheckpointError(f'keys {key!r} and another one both become {new!r} once the DataParallel/compile '
                                 'prefixes are removed')
    out[new] = value
  return out, tuple(seen)


def load_torch_checkpoint(path: str) -> TorchCheckpoint:
  """Reads any accepted checkpoint file safely -> TorchCheckpoint (raises TorchCheckpointError); `path` may
  be gs://... (read from a local copy, kpjax.io.paths)."""
  if paths.is_remote(path):
    with paths.local_copy(path) as local:
      return dataclasses.replace(load_torch_checkpoint(local), path=path)
  path = os.path.expanduser(path)
  obj, file_format = load_object(path)
  raw, container = extract_state_dict(obj, path)
  state_dict, prefixes = strip_prefixes(raw)
  return TorchCheckpoint(state_dict=state_dict, container=container, file_format=file_format, prefixes=prefixes,
                         path=path, sha256=sha256_file(path))


__all__ = ['TorchCheckpointError', 'UnsafeCheckpointError', 'TorchCheckpoint', 'load_torch_checkpoint',
           'load_object', 'extract_state_dict', 'strip_prefixes', 'module_state_dict', 'pickle_globals',
           'MODULE_CLASSES', 'WRAPPER_KEYS', 'sha256_file', 'PickledModule']
