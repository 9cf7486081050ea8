"""Reading a torch.save'd state dict into numpy arrays without torch and without running anything from the file.

kpjax never imports torch, yet `config.init_backbone` reads torchvision's VGG19 weights, an old *legacy*
torch.save file (PyTorch >= 1.6 writes a zip archive instead). Both formats hold one pickle of the
saved object whose tensors refer, by key, to raw storage bytes kept outside the pickle:

- zip: `<name>/data.pkl` (the pickle) and `<name>/data/<key>` (each storage's bytes, little-endian
  unless `<name>/byteorder` says otherwise).
- legacy: five pickles in a row (magic number, protocol 1001, system info, the object, the list of
  storage keys), then for every key of that list an int64 element count (little-endian) and the
  storage's bytes.

Safety: the pickle is scanned first (`pickle_globals`) and refused, naming every global outside
the allowlist, before anything is unpickled; the scan is for the message, the guard is the
unpickler's `find_class`, which resolves only the names a state dict needs (collections.OrderedDict,
torch's tensor rebuild functions, storage types, tensor classes and dtypes) and resolves them to
inert objects made afresh for each file: tokens for types and dtypes, and functions that only record
(storage, offset, size, stride). Tensors become numpy arrays once the storages are read, each a
contiguous copy of its strided view (offset, sizes and strides checked against the storage first).
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

# torch storage / tensor class stem -> numpy dtype (torch.FloatStorage, torch.cuda.HalfTensor ...).
STORAGE_DTYPES: dict[str, np.dtype] = {
    'Double': np.dtype(np.float64), 'Float': np.dtype(np.float32), 'Half': np.dtype(np.float16),
    'BFloat16': np.dtype(ml_dtypes.bfloat16), 'Long': np.dtype(np.int64), 'Int': np.dtype(np.int32),
    'Short': np.dtype(np.int16), 'Char': np.dtype(np.int8), 'Byte': np.dtype(np.uint8), 'Bool': np.dtype(np.bool_),
    'ComplexFloat': np.dtype(np.complex64), 'ComplexDouble': np.dtype(np.complex128),
}
# torch dtype name -> numpy dtype (pickled as `torch.float32` ... beside untyped storages).
TORCH_DTYPES: dict[str, np.dtype] = {
    'float64': np.dtype(np.float64), 'float32': np.dtype(np.float32), 'float16': np.dtype(np.float16),
    'bfloat16': np.dtype(ml_dtypes.bfloat16), 'int64': np.dtype(np.int64), 'int32': np.dtype(np.int32),
    'int16': np.dtype(np.int16), 'int8': np.dtype(np.int8), 'uint8': np.dtype(np.uint8),
    'uint16': np.dtype(np.uint16), 'uint32': np.dtype(np.uint32), 'uint64': np.dtype(np.uint64),
    'bool': np.dtype(np.bool_), 'complex64': np.dtype(np.complex64), 'complex128': np.dtype(np.complex128),
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn), 'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
}
UNTYPED_STORAGES = ('torch.storage.UntypedStorage', 'torch.UntypedStorage')  # bytes; the tensor gives the dtype


# What a state dict's pickle may name, for the refusal's message.
ALLOWED_DESCRIPTION = ('a state dict holds only tensors (collections.OrderedDict, torch._utils._rebuild_tensor*, '
                       'storage types, dtypes)')


def _unsafe(path: str, names: Iterable[str]) -> UnsafeTorchFileError:
  return UnsafeTorchFileError(path, names, ALLOWED_DESCRIPTION)


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


def _fresh_globals() -> dict[str, Any]:
  """The allowlist: full name -> the object it resolves to, made anew for every file."""
  allowed: dict[str, Any] = {'collections.OrderedDict': collections.OrderedDict}
  for stem, dtype in STORAGE_DTYPES.items():
    for module in ('torch', 'torch.cuda'):
      allowed[f'{module}.{stem}Storage'] = _StorageType(f'{module}.{stem}Storage', dtype)
      allowed[f'{module}.{stem}Tensor'] = _Call(lambda dtype=dtype: _Tensor(dtype))
  for name in UNTYPED_STORAGES:
    allowed[name] = _StorageType(name, None)
  for name, dtype in TORCH_DTYPES.items():
    allowed[f'torch.{name}'] = _Dtype(f'torch.{name}', dtype)
  for fn in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
    allowed[f'torch._utils.{fn.__name__}'] = _Call(fn)
  return allowed


ALLOWED_GLOBALS = frozenset(_fresh_globals())


class RestrictedUnpickler(pickle.Unpickler):
  """pickle.Unpickler whose globals resolve only through `allowed` ({full name: object}); any other name
  raises `unsafe_error(path, [name])` before it is imported."""
  unsafe_error = staticmethod(_unsafe)

  def __init__(self, file, path: str, allowed: dict[str, Any]):
    super().__init__(file, encoding='utf-8')
    self._path = path
    self._allowed = allowed

  def find_class(self, module, name):
    full = map_global(module, name)
    if full not in self._allowed:
      raise self.unsafe_error(self._path, [full])
    return self._allowed[full]


class _Unpickler(RestrictedUnpickler):
  """Resolves only ALLOWED_GLOBALS, each to an object made for this file alone; storages via `storage_for`."""

  def __init__(self, file, path: str, storage_for=None):
    super().__init__(file, path, _fresh_globals())
    self._storage_for = storage_for  # persistent id -> _Storage; None: the pickle may hold none

  def persistent_load(self, pid):
    if self._storage_for is None:
      raise TorchFileError(f'{self._path}: a storage reference where none belongs; not a torch.save file')
    return self._storage_for(pid)


def _storage_pid(pid, path: str) -> tuple[np.dtype | None, str, int, Any]:
  """(dtype (None: untyped bytes), root key, root element count, legacy view (key, offset, size) or None)."""
  if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ('storage', b'storage'):
    kind = pid[0] if isinstance(pid, tuple) and pid else pid
    what = 'a whole pickled model (module persistent id)' if kind in ('module', b'module') else repr(kind)[:60]
    raise TorchFileError(f'{path} holds {what}, not a state dict of tensors; load it in PyTorch and save '
                         "torch.save(model.state_dict(), 'weights.pth')")
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


def _state_dict(obj: Any, roots: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
  """{name: array} from the unpickled object, which must be a mapping of names to tensors."""
  if not isinstance(obj, dict):
    what = 'a single tensor' if isinstance(obj, _Tensor) else f'a {type(obj).__name__}'
    raise TorchFileError(f'{path} holds {what}; expected a state dict (parameter name -> tensor)')
  out = {}
  for key, value in obj.items():
    if not isinstance(key, str) or not isinstance(value, _Tensor):
      what = 'a dict' if isinstance(value, dict) else type(value).__name__
      raise TorchFileError(f'{path} is not a plain state dict: its entry {key!r} is {what}, not a tensor '
                           "(a training checkpoint? save just torch.save(model.state_dict(), 'weights.pth'))")
    out[key] = _materialise(key, value, roots, path)
  if not out:
    raise TorchFileError(f'{path} holds an empty dict; expected a state dict (parameter name -> tensor)')
  return out


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


def _scan(data, path: str) -> None:
  """Refuses a pickle naming globals outside ALLOWED_GLOBALS (all of them in one message), unpickling nothing."""
  try:
    names = pickle_globals(data)
  except Exception as e:  # pickletools raises ValueError and friends on damaged data
    raise TorchFileError(f'{path} is damaged or truncated ({type(e).__name__}: {e}); is the download complete?'
                         ) from None
  bad = [n for n in names if n not in ALLOWED_GLOBALS]
  if bad:
    raise _unsafe(path, bad)


# ---- Zip format (PyTorch >= 1.6) ---------------------------------------------------------------------

def _read_zip(path: str) -> dict[str, np.ndarray]:
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if any(n.endswith('constants.pkl') or '/code/' in n for n in names):
        raise TorchFileError(f'{path} is a TorchScript archive (torch.jit.save), not a torch.save state dict; '
                             "save the model's weights with torch.save(model.state_dict(), 'weights.pth')")
      pickles = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
      if len(pickles) != 1:
        raise TorchFileError(f'{path} is a zip archive but not a torch.save file (no single data.pkl inside)')
      prefix = pickles[0][:-len('data.pkl')]
      if prefix + 'byteorder' in names and archive.read(prefix + 'byteorder').strip() != b'little':
        raise TorchFileError(f'{path} was saved big-endian; re-save it on a little-endian machine')
      data = archive.read(pickles[0])
      _scan(data, path)
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

      unpickler = _Unpickler(io.BytesIO(data), path, storage_for)
      obj = _unpickle(unpickler, path)
  except zipfile.BadZipFile as e:
    raise TorchFileError(f'{path} is a damaged zip archive ({e}); is the download complete?') from None
  return _state_dict(obj, roots, path)


# ---- Legacy format (PyTorch < 1.6) -------------------------------------------------------------------

def read_legacy_header(f, path: str) -> None:
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


def read_exactly(f, n: int, path: str) -> bytes:
  """n bytes from f, or a TorchFileError saying the file is truncated."""
  data = f.read(n)
  if len(data) != n:
    raise TorchFileError(f'{path} is truncated: expected {n} more bytes of tensor data, found {len(data)}; '
                         'is the download complete?')
  return data


def _read_legacy(path: str) -> dict[str, np.ndarray]:
  file_size = os.path.getsize(path)
  with open(path, 'rb') as f:
    read_legacy_header(f, path)
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

    _scan(f, path)
    f.seek(start)
    obj = _unpickle(_Unpickler(f, path, storage_for), path)
    keys = _unpickle(_Unpickler(f, path), path)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(roots):
      raise TorchFileError(f'{path} is damaged: its storage list does not match the tensors')
    data = {}
    for key in map(str, keys):  # each: int64 element count, then the bytes
      dtype, numel = roots[key]
      count = struct.unpack('<q', read_exactly(f, 8, path))[0]
      if count != numel:
        raise TorchFileError(f'{path} is damaged: storage {key} holds {count} elements, its tensors need {numel}')
      data[key] = np.frombuffer(read_exactly(f, numel * dtype.itemsize, path), dtype)
  return _state_dict(obj, data, path)


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


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: numpy array} from a torch.save'd state dict (zip or legacy format), in file order.

  Arrays keep torch's shapes (conv weights OIHW) and dtypes (bfloat16 / float8 as ml_dtypes types).
  Raises TorchFileError (UnsafeTorchFileError for pickles needing other globals) naming what was found.
  `path` may be gs://... (read from a local copy, kpjax.io.paths).
  """
  if paths.is_remote(path):
    with paths.local_copy(path) as local:
      return read_state_dict(local)
  path = os.path.expanduser(path)
  if file_format(path) == 'zip':
    return _read_zip(path)
  return _read_legacy(path)
