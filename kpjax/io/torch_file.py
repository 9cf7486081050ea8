"""Reading torch.save files into numpy arrays without torch and without running anything from the file.

kpjax's one reader of PyTorch files: `config.init_backbone` reads torchvision's VGG19 state dict with
`read_state_dict`, and `convert/` reads the released KPDEM checkpoints (whole pickled
`DataParallel(CoordRegression)` modules, state dicts, dicts wrapping either) with `read_object`.
Both torch.save formats hold one pickle of the saved object whose tensors refer, by key, to raw
storage bytes kept outside the pickle:

- zip (PyTorch >= 1.6): `<name>/data.pkl` (the pickle) and `<name>/data/<key>` (each storage's bytes,
  little-endian unless `<name>/byteorder` says otherwise).
- legacy (PyTorch < 1.6): five pickles in a row (magic number, protocol 1001, system info, the object,
  the list of storage keys), then for every key of that list an int64 element count (little-endian)
  and the storage's bytes. Whole modules appear there as `('module', class, source file, source)`
  persistent ids.

Safety: the pickle is scanned first (`pickle_globals`) and refused, naming every global outside the
allowlist, before anything is unpickled; the scan is for the message, the guard is the unpickler's
`find_class`, which resolves only allowlisted names, each to an inert object made afresh for each file:
tokens for storage types and dtypes, functions that only record (storage, offset, size, stride), and
for whole modules (only where the caller names their classes, `ModuleClasses`) stand-in classes
(`PickledModule`) whose instances keep the pickled attribute dict as data. Module pickles also need
builtins.set (`_non_persistent_buffers_set`), torch.device (DataParallel's `src_device_obj`),
torch.nn.parameter.Parameter (torch 0.4's parameters) and torch 0.4/1.0's pickled `_backend`
(`torch.nn.backends.thnn._get_thnn_function_backend`); these resolve to a plain set and to functions
that return a string, their argument or None. Every name is one torch's own files use. Tensors become
numpy arrays once the storages are read, each a contiguous copy of its strided view (offset, sizes and
strides checked against the storage first); `module_state_dict` then walks a stand-in's `_modules`,
`_parameters` and `_buffers` as torch's `Module.state_dict()` would, calling nothing.

Not torch.load(weights_only=True): kpjax must read these files without torch, and torch's restricted
unpickler refuses legacy whole-module pickles (their module persistent ids) and would build real
torch.nn classes for zip ones.
"""

from __future__ import annotations

import _compat_pickle  # the Python 2 -> 3 name table pickle itself applies to protocol < 3 pickles
import collections
import dataclasses
import io
import os
import pickle
import pickletools
import struct
import zipfile
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from kpjax.errors import TorchFileError, UnsafeTorchFileError
from kpjax.io import paths

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy torch.save file
LEGACY_PROTOCOL = 1001  # second pickle

# torch storage class stem -> numpy dtype (torch.FloatStorage, torch.cuda.HalfStorage ...).
STORAGE_DTYPES: dict[str, np.dtype] = {
    'Double': np.dtype(np.float64), 'Float': np.dtype(np.float32), 'Half': np.dtype(np.float16),
    'BFloat16': np.dtype(ml_dtypes.bfloat16), 'Long': np.dtype(np.int64), 'Int': np.dtype(np.int32),
    'Short': np.dtype(np.int16), 'Char': np.dtype(np.int8), 'Byte': np.dtype(np.uint8), 'Bool': np.dtype(np.bool_),
    'ComplexFloat': np.dtype(np.complex64), 'ComplexDouble': np.dtype(np.complex128),
}
# Stems with a tensor class (torch.FloatTensor ...), which torch < 0.4 pickled tensors as.
TENSOR_STEMS = ('Double', 'Float', 'Half', 'BFloat16', 'Long', 'Int', 'Short', 'Char', 'Byte', 'Bool')
# torch dtype name -> numpy dtype (pickled as `torch.float32` ... beside untyped storages).
TORCH_DTYPES: dict[str, np.dtype] = {
    'float64': np.dtype(np.float64), 'float32': np.dtype(np.float32), 'float16': np.dtype(np.float16),
    'bfloat16': np.dtype(ml_dtypes.bfloat16), 'int64': np.dtype(np.int64), 'int32': np.dtype(np.int32),
    'int16': np.dtype(np.int16), 'int8': np.dtype(np.int8), 'uint8': np.dtype(np.uint8),
    'uint16': np.dtype(np.uint16), 'uint32': np.dtype(np.uint32), 'uint64': np.dtype(np.uint64),
    'bool': np.dtype(np.bool_), 'complex64': np.dtype(np.complex64), 'complex128': np.dtype(np.complex128),
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn), 'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
}
# The floating-point dtypes arrays come out in (bfloat16 and float8 are ml_dtypes types, not np.floating).
FLOAT_DTYPES = frozenset(d for name, d in TORCH_DTYPES.items() if 'float' in name)
UNTYPED_STORAGE = 'torch.storage.UntypedStorage'  # bytes; the tensor gives the dtype
LEGACY_BACKEND = 'torch.nn.backends.thnn._get_thnn_function_backend'  # torch 0.4/1.0 modules' `_backend`

# What a state dict's pickle may name, for the refusal's message.
STATE_DICT_ALLOWED = ('a state dict holds only tensors (collections.OrderedDict, torch._utils._rebuild_tensor*, '
                      'storage types, dtypes)')
_MAX_DEPTH = 100  # nesting of containers and modules; KPDEM's deepest tensor is 7 modules down


@dataclasses.dataclass(frozen=True)
class ModuleClasses:
  """The whole pickled torch.nn modules one use of the reader accepts.

  Attributes:
    names: full class names as pickled, e.g. 'torch.nn.modules.conv.Conv2d', 'keypoints_Net.CoordRegression';
      each resolves to a stand-in PickledModule subclass, never to the class itself.
    description: what this use allows, for the refusal's message.
  """
  names: frozenset[str]
  description: str


class PickledModule:
  """Inert stand-in for a pickled torch.nn.Module: `state` is its pickled attribute dict, nothing runs.

  Each allowlisted class name gets its own subclass per file, `pickled_name` saying which.
  """
  pickled_name = 'torch.nn.Module'
  state: dict | None = None

  def __setstate__(self, state):
    if self.state is not None or not isinstance(state, dict):
      raise TorchFileError(f'unexpected state {type(state).__name__} for a pickled {self.pickled_name}; '
                           'not a torch.save file')
    self.state = state

  def __repr__(self):
    return f'<pickled {self.pickled_name}>'


def _unsafe(path: str, names: Iterable[str], modules: ModuleClasses | None) -> UnsafeTorchFileError:
  return UnsafeTorchFileError(path, names, modules.description if modules else STATE_DICT_ALLOWED)


# ---- Scanning: which globals does a pickle name? (parsing only, nothing is built) -------------------

def map_global(module: str, name: str) -> str:
  """'module.name' under its Python 3 name (legacy torch files are protocol-2 pickles with Python 2 names)."""
  if (module, name) in _compat_pickle.NAME_MAPPING:
    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
  elif module in _compat_pickle.IMPORT_MAPPING:
    module = _compat_pickle.IMPORT_MAPPING[module]
  return f'{module}.{name}'


def pickle_globals(data: bytes | io.BufferedIOBase) -> list[str]:
  """Every global a pickle refers to (GLOBAL / STACK_GLOBAL opcodes), by parsing its opcodes.

  Reads one pickle (up to its STOP) from `data`, a bytes object or a file positioned at it. Names
  reached through the memo are not tracked: this list is for messages, `find_class` is the guard.
  """
  stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
  names, strings = [], []
  for opcode, arg, _ in pickletools.genops(stream):
    if opcode.name == 'GLOBAL':
      module, name = arg.split(' ', 1)
      names.append(map_global(module, name))
    elif opcode.name == 'STACK_GLOBAL':  # protocol 4: module and name are the last two strings pushed
      names.append(map_global(*strings[-2:]) if len(strings) >= 2 else '<STACK_GLOBAL of unknown name>')
    elif isinstance(arg, str) and 'UNICODE' in opcode.name:
      strings.append(arg)
  return names


# ---- What the pickle builds: records, filled with bytes afterwards ----------------------------------

class _Inert:
  """Refuses pickle's BUILD, so that a file cannot rewrite the objects it is given."""

  def __setstate__(self, state):
    raise TorchFileError(f'unexpected state for {type(self).__name__.lstrip("_")}; not a torch.save file')


@dataclasses.dataclass(frozen=True)
class _StorageType(_Inert):
  name: str  # e.g. torch.FloatStorage
  dtype: np.dtype | None  # None: untyped (bytes)


@dataclasses.dataclass(frozen=True)
class _Dtype(_Inert):
  name: str  # e.g. torch.float32
  numpy: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage(_Inert):
  """A storage the pickle refers to: `numel` elements of `dtype` from element `start` of root `key`;
  untyped storages are bytes (uint8) that the tensor reads as its own dtype."""
  key: str
  dtype: np.dtype
  numel: int
  start: int = 0
  typed: bool = True


@dataclasses.dataclass
class _Tensor:
  """A tensor as the pickle describes it; `dtype` differs from the storage's for untyped storages."""
  dtype: np.dtype | None = None
  storage: Any = None
  offset: Any = 0
  size: Any = ()
  stride: Any = ()

  def __setstate__(self, state):  # pre-0.4 files: torch.FloatTensor() then BUILD (storage, offset, size, stride)
    if self.storage is not None or not isinstance(state, tuple) or len(state) != 4:
      raise TorchFileError(f'unexpected tensor state {type(state).__name__}; not a torch.save file')
    self.storage, self.offset, self.size, self.stride = state


class _Call(_Inert):
  """A callable the pickle may reduce with, but not rewrite."""
  __slots__ = ('_fn',)

  def __init__(self, fn):
    self._fn = fn

  def __call__(self, *args):
    return self._fn(*args)


# torch's rebuild functions, by their names and signatures: they only record.
def _rebuild_tensor(storage, storage_offset, size, stride):
  return _Tensor(None, storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _Tensor(None, storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _Dtype):
    raise TorchFileError(f'a tensor of dtype {dtype!r}; not a torch.save file')
  return _Tensor(dtype.numpy, storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  del requires_grad, backward_hooks
  return data


# What whole-module pickles need besides their classes.
def _parameter(data, requires_grad=True):  # torch 0.4: Parameter(tensor, requires_grad)
  del requires_grad
  if not isinstance(data, _Tensor):
    raise TorchFileError(f'a parameter holding a {type(data).__name__}; not a torch.save file')
  return data


def _device(kind, index=None) -> str:  # torch.device('cuda', 0) -> 'cuda:0'
  if not isinstance(kind, str) or not (index is None or (isinstance(index, int) and not isinstance(index, bool))):
    raise TorchFileError(f'a device {kind!r}, {index!r}; not a torch.save file')
  return kind if index is None else f'{kind}:{index}'


def _legacy_backend() -> None:  # torch kept this as a no-op for old pickles
  return None


def _stand_in(name: str) -> type:
  return type(name.rsplit('.', 1)[1], (PickledModule,), {'pickled_name': name, '__module__': __name__})


def _fresh_globals(modules: ModuleClasses | None = None) -> dict[str, Any]:
  """The allowlist: full name -> the object it resolves to, made anew for every file."""
  allowed: dict[str, Any] = {'collections.OrderedDict': collections.OrderedDict}
  for stem, dtype in STORAGE_DTYPES.items():
    for module in ('torch', 'torch.cuda'):
      allowed[f'{module}.{stem}Storage'] = _StorageType(f'{module}.{stem}Storage', dtype)
      if stem in TENSOR_STEMS:
        allowed[f'{module}.{stem}Tensor'] = _Call(lambda dtype=dtype: _Tensor(dtype))
  allowed[UNTYPED_STORAGE] = _StorageType(UNTYPED_STORAGE, None)
  for name, dtype in TORCH_DTYPES.items():
    allowed[f'torch.{name}'] = _Dtype(f'torch.{name}', dtype)
  for fn in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
    allowed[f'torch._utils.{fn.__name__}'] = _Call(fn)
  if modules is not None:
    allowed.update({'builtins.set': set, 'torch.device': _Call(_device),
                    'torch.nn.parameter.Parameter': _Call(_parameter), LEGACY_BACKEND: _Call(_legacy_backend)})
    allowed.update({name: _stand_in(name) for name in modules.names})
  return allowed


def allowed_globals(modules: ModuleClasses | None = None) -> frozenset[str]:
  """The full names a file may use: a state dict's, or with `modules` also those whole modules'."""
  return frozenset(_fresh_globals(modules))


class _Unpickler(pickle.Unpickler):
  """Resolves only the allowlist's names, each to an object made for this file alone; any other name
  raises UnsafeTorchFileError before it is imported. Storages come from `storage_for` (persistent id ->
  _Storage; None: the pickle may hold none); module persistent ids must name this file's stand-ins."""

  def __init__(self, file, path: str, modules: ModuleClasses | None = None, storage_for=None):
    super().__init__(file, encoding='utf-8')
    self._path = path
    self._modules = modules
    self._allowed = _fresh_globals(modules)
    self._storage_for = storage_for

  def find_class(self, module, name):
    full = map_global(module, name)
    if full not in self._allowed:
      raise _unsafe(self._path, [full], self._modules)
    return self._allowed[full]

  def persistent_load(self, pid):
    if isinstance(pid, tuple) and pid and pid[0] in ('module', b'module'):  # ('module', class, file, source)
      cls = pid[1] if len(pid) == 4 else None
      if self._modules is None or not (isinstance(cls, type) and issubclass(cls, PickledModule)):
        raise TorchFileError(f'{self._path} holds a whole pickled model (module persistent id), not a state dict '
                             "of tensors; load it in PyTorch and save torch.save(model.state_dict(), 'weights.pth')")
      return cls
    if self._storage_for is None:
      raise TorchFileError(f'{self._path}: a storage reference where none belongs; not a torch.save file')
    return self._storage_for(pid)


def _storage_pid(pid, path: str) -> tuple[np.dtype | None, str, int, Any]:
  """(dtype (None: untyped bytes), root key, root element count, legacy view (key, offset, size) or None)."""
  if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ('storage', b'storage'):
    kind = pid[0] if isinstance(pid, tuple) and pid else pid
    raise TorchFileError(f'{path}: a persistent id of kind {repr(kind)[:60]}; not a torch.save file')
  storage_type, key, _, numel = pid[1:5]
  if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0 or isinstance(numel, bool):
    raise TorchFileError(f'{path}: a storage of type {storage_type!r} and size {numel!r}; not a torch.save file')
  return storage_type.dtype, str(key), numel, pid[5] if len(pid) == 6 else None


# ---- Materialising tensors --------------------------------------------------------------------------

def _materialise(name: str, tensor: _Tensor, roots: dict[str, np.ndarray], path: str) -> np.ndarray:
  """The tensor's values: a contiguous copy of its strided view into its storage, bounds checked."""
  storage = tensor.storage
  if not isinstance(storage, _Storage):
    raise TorchFileError(f'{path}: tensor {name!r} has no storage; not a torch.save file')
  size, stride, offset = tensor.size, tensor.stride, tensor.offset
  ints = lambda t: isinstance(t, tuple) and all(isinstance(v, int) and v >= 0 for v in t)
  if not (ints(size) and ints(stride) and len(size) == len(stride) and isinstance(offset, int) and offset >= 0):
    raise TorchFileError(f'{path}: tensor {name!r} has size {size!r}, stride {stride!r}, offset {offset!r}; '
                         'not a torch.save file')
  flat = roots[storage.key][storage.start:storage.start + storage.numel]
  dtype = tensor.dtype or storage.dtype
  if not storage.typed:  # bytes, read as the tensor's dtype
    if flat.size % dtype.itemsize:
      raise TorchFileError(f'{path}: tensor {name!r}: {flat.size} bytes are not a whole number of {dtype} values')
    flat = flat.view(dtype)
  elif dtype != storage.dtype:
    raise TorchFileError(f'{path}: tensor {name!r} is {dtype} but its storage holds {storage.dtype}; '
                         'not a torch.save file')
  if 0 in size:
    return np.zeros(size, dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise TorchFileError(f'{path} is damaged: tensor {name!r} (size {size}, stride {stride}, offset {offset}) '
                         f'reaches element {last} of a storage of {flat.size}')
  view = np.lib.stride_tricks.as_strided(flat[offset:], size, tuple(s * dtype.itemsize for s in stride),
                                         writeable=False)
  return np.array(view, copy=True, order='C')


_MODULE_GROUPS = ('_modules', '_parameters', '_buffers')  # left out of the names in messages


def _with_arrays(obj: Any, roots: dict[str, np.ndarray], path: str) -> Any:
  """`obj` with every tensor record replaced by its numpy array (dicts, lists and module states in place)."""
  arrays: dict[int, np.ndarray] = {}
  done: dict[int, Any] = {}

  def walk(node, name, depth):
    if isinstance(node, _Tensor):
      if id(node) not in arrays:
        arrays[id(node)] = _materialise(name or '<root>', node, roots, path)
      return arrays[id(node)]
    if not isinstance(node, (dict, list, tuple, PickledModule)):
      return node
    if id(node) in done:  # shared or cyclic
      return done[id(node)]
    if depth > _MAX_DEPTH:
      raise TorchFileError(f'{path} nests containers more than {_MAX_DEPTH} deep; not a torch.save file')
    child = lambda key: name if key in _MODULE_GROUPS else f'{name}.{key}' if name else key
    if isinstance(node, tuple):
      done[id(node)] = node  # a tuple holding itself keeps its records
      done[id(node)] = tuple(walk(v, child(i), depth + 1) for i, v in enumerate(node))
      return done[id(node)]
    done[id(node)] = node
    if isinstance(node, PickledModule):
      if node.state is not None:
        walk(node.state, name, depth + 1)
    elif isinstance(node, dict):
      for key, value in node.items():  # replaces values only: same keys, same order
        node[key] = walk(value, child(str(key)), depth + 1)
    else:
      node[:] = [walk(v, child(str(i)), depth + 1) for i, v in enumerate(node)]
    return node

  return walk(obj, '', 0)


def _unpickle(unpickler: _Unpickler, path: str) -> Any:
  try:
    return unpickler.load()
  except TorchFileError as e:  # from the allowlisted objects, which do not know the path
    if path in str(e):
      raise
    raise TorchFileError(f'{path}: {e}') from None
  except Exception as e:  # pickle raises many types on damaged data
    raise TorchFileError(f'{path} is damaged or truncated ({type(e).__name__}: {e}); is the download complete?'
                         ) from None


def _scan(data, path: str, modules: ModuleClasses | None) -> None:
  """Refuses a pickle naming globals outside the allowlist (all of them in one message), unpickling nothing."""
  try:
    names = pickle_globals(data)
  except Exception as e:  # pickletools raises ValueError and friends on damaged data
    raise TorchFileError(f'{path} is damaged or truncated ({type(e).__name__}: {e}); is the download complete?'
                         ) from None
  allowed = allowed_globals(modules)
  bad = [n for n in names if n not in allowed]
  if bad:
    raise _unsafe(path, bad, modules)


# ---- Zip format (PyTorch >= 1.6) ---------------------------------------------------------------------

def _read_zip(path: str, modules: ModuleClasses | None) -> Any:
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if any(n.endswith('constants.pkl') or '/code/' in n for n in names):
        raise TorchFileError(f'{path} is a TorchScript archive (torch.jit.save), not a torch.save file; '
                             "save the model's weights with torch.save(model.state_dict(), 'weights.pth')")
      pickles = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
      if len(pickles) != 1:
        raise TorchFileError(f'{path} is a zip archive but not a PyTorch checkpoint (no single data.pkl inside)')
      prefix = pickles[0][:-len('data.pkl')]
      if prefix + 'byteorder' in names and archive.read(prefix + 'byteorder').strip() != b'little':
        raise TorchFileError(f'{path} was saved big-endian; re-save it on a little-endian machine')
      data = archive.read(pickles[0])
      _scan(data, path, modules)
      roots: dict[str, np.ndarray] = {}

      def storage_for(pid) -> _Storage:
        dtype, key, numel, _ = _storage_pid(pid, path)
        element = dtype or np.dtype(np.uint8)
        if key not in roots:
          entry, nbytes = f'{prefix}data/{key}', numel * element.itemsize
          found = archive.getinfo(entry).file_size if entry in names else 'no'
          if found != nbytes:
            raise TorchFileError(f'{path} is damaged: storage {key} needs {nbytes} bytes in {entry}, found {found}')
          roots[key] = np.frombuffer(archive.read(entry), element)
        if roots[key].dtype != element:
          raise TorchFileError(f'{path} is damaged: storage {key} is read as both {roots[key].dtype} and {element}')
        return _Storage(key, element, numel, typed=dtype is not None)

      obj = _unpickle(_Unpickler(io.BytesIO(data), path, modules, storage_for), path)
  except zipfile.BadZipFile as e:
    raise TorchFileError(f'{path} is a damaged zip archive ({e}); is the download complete?') from None
  return _with_arrays(obj, roots, path)


# ---- Legacy format (PyTorch < 1.6) -------------------------------------------------------------------

def _read_legacy_header(f, path: str) -> None:
  """Reads a legacy file's magic number, protocol and system-info pickles, leaving `f` at the main pickle."""
  try:
    magic = _Unpickler(f, path).load()
  except Exception:  # any pickle but torch's: refused below
    magic = None
  if magic != LEGACY_MAGIC:
    raise TorchFileError(f'{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a '
                         'legacy torch.save pickle)')
  protocol = _unpickle(_Unpickler(f, path), path)
  sys_info = _unpickle(_Unpickler(f, path), path)
  if protocol != LEGACY_PROTOCOL:
    raise TorchFileError(f'{path}: unsupported legacy checkpoint protocol {protocol!r}')
  if isinstance(sys_info, dict) and sys_info.get('little_endian') is False:
    raise TorchFileError(f'{path} was saved on a big-endian machine; re-save it on a little-endian one')


def _read_exactly(f, n: int, path: str) -> bytes:
  """n bytes from f, or a TorchFileError saying the file is truncated."""
  data = f.read(n)
  if len(data) != n:
    raise TorchFileError(f'{path} is truncated: expected {n} more bytes of tensor data, found {len(data)}; '
                         'is the download complete?')
  return data


def _read_legacy(path: str, modules: ModuleClasses | None) -> Any:
  file_size = os.path.getsize(path)
  with open(path, 'rb') as f:
    _read_legacy_header(f, path)
    start = f.tell()
    roots: dict[str, tuple[np.dtype, int]] = {}  # root key -> (dtype, element count), bytes read afterwards

    def storage_for(pid) -> _Storage:
      dtype, key, numel, view = _storage_pid(pid, path)
      element = dtype or np.dtype(np.uint8)
      if numel * element.itemsize > file_size:
        raise TorchFileError(f'{path} is damaged or truncated: a storage claims {numel * element.itemsize} bytes, '
                             f'more than the whole file ({file_size}); is the download complete?')
      if roots.setdefault(key, (element, numel)) != (element, numel):
        raise TorchFileError(f'{path} is damaged: storage {key} is described in two ways')
      if view is None:
        return _Storage(key, element, numel, typed=dtype is not None)
      _, view_offset, view_size = view  # pre-1.0 storage views: (view key, offset, size) in elements
      if not (isinstance(view_offset, int) and isinstance(view_size, int) and 0 <= view_offset
              and view_offset + view_size <= numel and view_size >= 0):
        raise TorchFileError(f'{path} is damaged: a storage view {view!r} outside its storage of {numel}')
      return _Storage(key, element, view_size, view_offset, typed=dtype is not None)

    _scan(f, path, modules)
    f.seek(start)
    obj = _unpickle(_Unpickler(f, path, modules, storage_for), path)
    keys = _unpickle(_Unpickler(f, path), path)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(roots):
      raise TorchFileError(f'{path} is damaged: its storage list does not match the tensors')
    data = {}
    for key in map(str, keys):  # each: int64 element count, then the bytes
      dtype, numel = roots[key]
      count = struct.unpack('<q', _read_exactly(f, 8, path))[0]
      if count != numel:
        raise TorchFileError(f'{path} is damaged: storage {key} holds {count} elements, its tensors need {numel}')
      data[key] = np.frombuffer(_read_exactly(f, numel * dtype.itemsize, path), dtype)
  return _with_arrays(obj, data, path)


# ---- Entry points ------------------------------------------------------------------------------------

def file_format(path: str) -> str:
  """'zip' or 'legacy' for a torch.save file; a TorchFileError for anything else (missing, empty, cut ...)."""
  if not os.path.exists(path):
    raise TorchFileError(f'{path} does not exist; expected a PyTorch checkpoint file (.pt/.pth)')
  if os.path.isdir(path):
    raise TorchFileError(f'{path} is a directory; expected a PyTorch checkpoint file (.pt/.pth)')
  try:
    with open(path, 'rb') as f:
      head = f.read(4)
  except OSError as e:
    raise TorchFileError(f'cannot read {path}: {e.strerror}') from None
  if not head:
    raise TorchFileError(f'{path} is empty; expected a PyTorch checkpoint file')
  if head == b'PK\x03\x04':
    if not zipfile.is_zipfile(path):
      raise TorchFileError(f'{path} is truncated or damaged: it starts like a torch.save zip archive but has no '
                           'zip directory at its end; is the download complete?')
    return 'zip'
  if head[:1] == b'\x80':  # a pickle's PROTO opcode: the legacy format
    return 'legacy'
  raise TorchFileError(f'{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a '
                       'legacy torch.save pickle)')


def read_object(path: str, modules: ModuleClasses | None = None) -> tuple[Any, str]:
  """(the object a torch.save file holds, 'zip' | 'legacy'), read safely.

  Tensors come back as numpy arrays (torch's shapes and dtypes; bfloat16 / float8 as ml_dtypes types),
  containers as dicts (OrderedDicts), lists, tuples and sets, and whole torch.nn modules, when their
  classes are among `modules.names`, as PickledModule stand-ins (see `module_state_dict`).
  Raises TorchFileError (UnsafeTorchFileError for pickles needing other globals) naming what was found.
  `path` may be gs://... (read from a local copy, kpjax.io.paths).
  """
  if paths.is_remote(path):
    with paths.local_copy(path) as local:
      return read_object(local, modules)
  path = os.path.expanduser(path)
  fmt = file_format(path)
  return (_read_zip if fmt == 'zip' else _read_legacy)(path, modules), fmt


def _named_arrays(obj: Any, what: str) -> dict[str, np.ndarray]:
  if not isinstance(obj, dict):
    raise TorchFileError(f'{what} is a {type(obj).__name__}, not a dict of tensors')
  for key, value in obj.items():
    if value is not None and not isinstance(value, np.ndarray):
      raise TorchFileError(f'{what}[{key!r}] is a {type(value).__name__}, not a tensor')
  return obj


def module_state_dict(module: PickledModule) -> dict[str, np.ndarray]:
  """What `module.state_dict()` would give, by walking the pickled attribute dicts (nothing is called).

  Its parameters, then its persistent buffers (those not in `_non_persistent_buffers_set`), then each
  submodule's under `<name>.`, in the pickled order; None entries are left out, as torch does.
  """
  out: dict[str, np.ndarray] = {}

  def walk(node: PickledModule, prefix: str, ancestors: tuple[int, ...]):
    where = f'the pickled {node.pickled_name} at {prefix[:-1] or "<root>"}'
    if len(ancestors) > _MAX_DEPTH or id(node) in ancestors:
      raise TorchFileError(f'{where} is nested in itself or absurdly deep; not a torch.save file')
    if node.state is None:
      raise TorchFileError(f'{where} has no attribute dict; not a torch.save file')
    skip = node.state.get('_non_persistent_buffers_set') or set()
    for group in ('_parameters', '_buffers'):
      for name, value in _named_arrays(node.state.get(group) or {}, f'{where}: {group}').items():
        if value is not None and not (group == '_buffers' and name in skip):
          out[prefix + str(name)] = value
    children = node.state.get('_modules') or {}
    if not isinstance(children, dict):
      raise TorchFileError(f'{where}: _modules is a {type(children).__name__}, not a dict')
    for name, child in children.items():
      if child is None:
        continue
      if not isinstance(child, PickledModule):
        raise TorchFileError(f'{where}: submodule {name!r} is a {type(child).__name__}, not a module')
      walk(child, f'{prefix}{name}.', ancestors + (id(node),))

  walk(module, '', ())
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: numpy array} from a torch.save'd state dict (zip or legacy format), in file order.

  Only a state dict's globals are allowed (no whole modules). Arrays keep torch's shapes (conv weights
  OIHW) and dtypes. Raises TorchFileError (UnsafeTorchFileError for other globals) naming what was found.
  `path` may be gs://... (read from a local copy, kpjax.io.paths).
  """
  if paths.is_remote(path):
    with paths.local_copy(path) as local:
      return read_state_dict(local)
  path = os.path.expanduser(path)
  obj, _ = read_object(path)
  if not isinstance(obj, dict):
    what = 'a single tensor' if isinstance(obj, np.ndarray) else f'a {type(obj).__name__}'
    raise TorchFileError(f'{path} holds {what}; expected a state dict (parameter name -> tensor)')
  for key, value in obj.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      what = 'a dict' if isinstance(value, dict) else type(value).__name__
      raise TorchFileError(f'{path} is not a plain state dict: its entry {key!r} is {what}, not a tensor '
                           "(a training checkpoint? save just torch.save(model.state_dict(), 'weights.pth'))")
  if not obj:
    raise TorchFileError(f'{path} holds an empty dict; expected a state dict (parameter name -> tensor)')
  return dict(obj)
