"""kpjax.io.torch_file: torch.save'd state dicts (and whole modules where their classes are allowed) read
without torch, bit-exact against torch itself, in both file formats, and every other kind of file refused
with a message naming what was found."""

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from kpjax.io import torch_file
from test_convert import Payload  # runs `touch marker` when an unrestricted loader unpickles it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = {'zip': {}, 'legacy': {'_use_new_zipfile_serialization': False}}


def _bits(t: torch.Tensor) -> np.ndarray:
  """The tensor's values as raw bytes in C order (bit-exact comparisons, any dtype)."""
  return t.detach().contiguous().view(-1).view(torch.uint8).numpy()


def _check_equal(got: dict, want: dict) -> None:
  assert list(got) == list(want)
  for key, t in want.items():
    assert got[key].shape == tuple(t.shape) and got[key].flags['C_CONTIGUOUS'], key
    assert got[key].dtype.itemsize == t.element_size(), key
    np.testing.assert_array_equal(got[key].reshape(-1).view(np.uint8), _bits(t), err_msg=key)


def _state_dict() -> dict:
  g = torch.Generator().manual_seed(0)
  big = torch.randn(6, 10, generator=g)
  conv = torch.nn.Conv2d(3, 4, 3)
  state = collections.OrderedDict(conv.state_dict())  # carries torch's _metadata attribute
  state.update({
      'big': big,
      'slice': big[1:5, 2:7],  # non-contiguous, offset into big's storage
      'transposed': big.t(),
      'tail': big.view(-1)[17:],  # offset, contiguous
      'expanded': torch.randn(1, 3, generator=g).expand(4, 3),  # stride 0
      'half': torch.randn(5, 2, generator=g).half(),
      'half_view': torch.randn(8, generator=g).half()[::3],
      'bfloat16': torch.randn(3, generator=g).bfloat16(),
      'double': torch.randn(2, 2, generator=g).double(),
      'long': torch.arange(-3, 3),
      'bool': torch.tensor([True, False, True]),
      'scalar': torch.tensor(2.5),
      'empty': torch.zeros(0, 4),
      'param': torch.nn.Parameter(torch.randn(2, generator=g)),
  })
  return state


@pytest.mark.parametrize('fmt', FORMATS)
def test_state_dicts_read_bit_exactly(tmp_path, fmt):
  state = _state_dict()
  torch.save(state, tmp_path / 'w.pth', **FORMATS[fmt])
  assert zipfile.is_zipfile(tmp_path / 'w.pth') == (fmt == 'zip')
  got = torch_file.read_state_dict(str(tmp_path / 'w.pth'))
  _check_equal(got, state)
  assert got['half'].dtype == np.float16 and got['long'].dtype == np.int64 and got['bool'].dtype == np.bool_
  assert got['big'].dtype == np.float32 and got['scalar'].shape == () and got['empty'].shape == (0, 4)


def test_dtypes_saved_on_untyped_storages(tmp_path):
  """Newer dtypes (uint16, float8) are pickled with _rebuild_tensor_v3 on byte storages."""
  state = {'u16': torch.arange(7, dtype=torch.int32).to(torch.uint16)[2:],
           'f8': torch.randn(4, 3).to(torch.float8_e4m3fn).t(), 'f32': torch.randn(3)}
  torch.save(state, tmp_path / 'w.pt')
  _check_equal(torch_file.read_state_dict(str(tmp_path / 'w.pt')), state)


class _OldStorage:
  """A storage as torch < 1.0 pickled it: ('storage', type, root key, location, root size, view)."""

  def __init__(self, key, numel, view=None):
    self.key, self.numel, self.view = key, numel, view


class _OldTensor:
  """A tensor as torch < 0.4 pickled it: torch.FloatTensor() then BUILD (storage, offset, size, stride)."""

  def __init__(self, storage, offset, size, stride, v1=False):
    self.state, self.v1 = (storage, offset, size, stride), v1

  def __reduce__(self):
    if self.v1:  # torch 0.3: torch._utils._rebuild_tensor(storage, offset, size, stride)
      return torch._utils._rebuild_tensor, self.state
    return torch.FloatTensor, (), self.state


class _OldPickler(pickle.Pickler):

  def persistent_id(self, obj):
    if isinstance(obj, _OldStorage):
      return ('storage', torch.FloatStorage, obj.key, 'cpu', obj.numel, obj.view)
    return None


def _write_old_legacy(path, obj, storages: dict[str, np.ndarray]) -> None:
  """A legacy torch.save file written by hand, with the tensor encodings of torch 0.1 - 0.3."""
  with open(path, 'wb') as f:
    for header in (torch_file.LEGACY_MAGIC, torch_file.LEGACY_PROTOCOL,
                   {'protocol_version': 1001, 'little_endian': True, 'type_sizes': {'short': 2, 'int': 4, 'long': 8}}):
      pickle.dump(header, f, protocol=2)
    _OldPickler(f, protocol=2).dump(obj)
    pickle.dump(list(storages), f, protocol=2)
    for data in storages.values():
      f.write(struct.pack('<q', data.size) + data.astype('<f4').tobytes())


def test_old_legacy_encodings_and_storage_views(tmp_path):
  root = np.arange(40, dtype=np.float32) * 0.5
  whole = _OldStorage('7', 40)
  view = _OldStorage('7', 40, view=('8', 10, 20))  # elements 10..29 of the root
  state = collections.OrderedDict([
      ('a', _OldTensor(whole, 2, (3, 4), (4, 1))),
      ('b', _OldTensor(view, 1, (2, 3), (1, 5))),  # non-contiguous, relative to the view
      ('c', _OldTensor(whole, 0, (5,), (8,), v1=True)),
  ])
  _write_old_legacy(tmp_path / 'old.pth', state, {'7': root})
  got = torch_file.read_state_dict(str(tmp_path / 'old.pth'))
  np.testing.assert_array_equal(got['a'], root[2:14].reshape(3, 4))
  np.testing.assert_array_equal(got['b'], np.lib.stride_tricks.as_strided(root[11:], (2, 3), (4, 20)))
  np.testing.assert_array_equal(got['c'], root[0:40:8])
  bad = collections.OrderedDict([('w', _OldTensor(whole, 30, (3, 4), (4, 1)))])  # reaches element 41 of 40
  _write_old_legacy(tmp_path / 'bad.pth', bad, {'7': root})
  with pytest.raises(torch_file.TorchFileError, match=r"damaged: tensor 'w' .* reaches element 41 of a storage of 40"):
    torch_file.read_state_dict(str(tmp_path / 'bad.pth'))


def test_pickled_code_and_whole_models_are_refused_before_anything_runs(tmp_path):
  marker = tmp_path / 'PWNED'
  conv = torch.nn.Conv2d(3, 4, 1)
  for fmt, kwargs in FORMATS.items():
    torch.save({'w': torch.ones(2), 'x': Payload(marker)}, tmp_path / f'{fmt}.pt', **kwargs)
    with pytest.raises(torch_file.UnsafeTorchFileError, match='posix.system.*Nothing from the file was run'):
      torch_file.read_state_dict(str(tmp_path / f'{fmt}.pt'))
    torch.save(conv, tmp_path / f'module_{fmt}.pt', **kwargs)
    with pytest.raises(torch_file.UnsafeTorchFileError, match=r'torch\.nn\.modules\.conv\.Conv2d') as info:
      torch_file.read_state_dict(str(tmp_path / f'module_{fmt}.pt'))
    assert 'model.state_dict()' in str(info.value)
  # behind the up-front scan, the unpickler refuses on its own
  with pytest.raises(torch_file.UnsafeTorchFileError, match='posix.system'):
    torch_file._Unpickler(io.BytesIO(pickle.dumps(Payload(marker), protocol=4)), 'x').load()
  assert not marker.exists()
  # the allowed objects cannot be rewritten by the file (pickle's BUILD on a storage type and a rebuild function)
  for name in (b'torch\nFloatStorage', b'torch._utils\n_rebuild_tensor_v2'):
    with pytest.raises(torch_file.TorchFileError, match='unexpected state'):
      torch_file._Unpickler(io.BytesIO(b'\x80\x02c' + name + b"\n}X\x05\x00\x00\x00dtypeK\x01sb."), 'x').load()


def _full_name(cls: type) -> str:
  return f'{cls.__module__}.{cls.__qualname__}'


def test_whole_modules_read_where_their_classes_are_allowed(tmp_path):
  """With a ModuleClasses table, modules become stand-ins whose module_state_dict is torch's state_dict():
  parameters, persistent buffers (non-persistent ones and None entries left out), submodules in order."""
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4),
                              torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1)))
  model[1].register_buffer('scratch', torch.ones(2), persistent=False)
  model[2].register_buffer('unset', None)
  model(torch.randn(2, 3, 4, 4))  # BatchNorm's running statistics move
  classes = torch_file.ModuleClasses(frozenset(_full_name(type(m)) for m in model.modules()), 'these layers')
  for fmt, kwargs in FORMATS.items():
    torch.save({'model': model, 'epoch': 3}, tmp_path / f'{fmt}.pt', **kwargs)
    obj, found = torch_file.read_object(str(tmp_path / f'{fmt}.pt'), classes)
    assert found == fmt and obj['epoch'] == 3 and isinstance(obj['model'], torch_file.PickledModule)
    assert obj['model'].pickled_name == 'torch.nn.modules.container.Sequential'
    _check_equal(torch_file.module_state_dict(obj['model']), model.state_dict())
    assert 'scratch' in obj['model'].state['_modules']['1'].state['_buffers']  # pickled, but not state
    again, _ = torch_file.read_object(str(tmp_path / f'{fmt}.pt'), classes)
    assert type(again['model']) is not type(obj['model'])  # stand-in classes are made for each file
    with pytest.raises(torch_file.UnsafeTorchFileError, match=r'BatchNorm2d.*Conv2d.*Nothing from the file was run'):
      torch_file.read_object(str(tmp_path / f'{fmt}.pt'))  # no table: modules are refused
  # a stand-in takes one attribute dict, from its own BUILD, and nothing else
  rebuilt = b'\x80\x02ctorch.nn.modules.conv\nConv2d\n)\x81}b}b.'
  with pytest.raises(torch_file.TorchFileError, match='unexpected state dict for a pickled torch.nn.modules.conv'):
    torch_file._Unpickler(io.BytesIO(rebuilt), 'x', classes).load()
  with pytest.raises(torch_file.TorchFileError, match='unexpected state list'):
    torch_file._Unpickler(io.BytesIO(b'\x80\x02ctorch.nn.modules.conv\nConv2d\n)\x81]b.'), 'x', classes).load()


def test_bad_files_are_refused_clearly(tmp_path):
  state = {'w': torch.randn(256, 64)}
  torch.save(state, tmp_path / 'zip.pt')
  torch.save(state, tmp_path / 'legacy.pt', _use_new_zipfile_serialization=False)
  data, legacy = (tmp_path / 'zip.pt').read_bytes(), (tmp_path / 'legacy.pt').read_bytes()
  scripted = io.BytesIO()
  torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 1)), scripted)
  other_zip = io.BytesIO()
  with zipfile.ZipFile(other_zip, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  cases = {
      'cut_zip.pt': (data[:len(data) // 2], 'truncated or damaged.*no zip directory'),
      'cut_storage.pt': (legacy[:len(legacy) - 100], 'truncated: expected 65536 more bytes .* found 65436'),
      'cut_more.pt': (legacy[:len(legacy) // 2], 'claims 65536 bytes, more than the whole file'),
      'cut_pickle.pt': (legacy[:200], 'damaged or truncated'),
      'empty.pt': (b'', 'is empty'),
      'notes.pt': (b'these are not weights\n', 'not a PyTorch checkpoint'),
      'plain_pickle.pkl': (pickle.dumps({'w': [1, 2]}, protocol=2), 'not a PyTorch checkpoint'),
      'other.zip': (other_zip.getvalue(), 'zip archive but not a PyTorch checkpoint'),
      'scripted.pt': (scripted.getvalue(), 'TorchScript'),
  }
  for name, (content, match) in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(torch_file.TorchFileError, match=match):
      torch_file.read_state_dict(str(tmp_path / name))
  torch.save({'epoch': 3, 'state_dict': state}, tmp_path / 'training.pt')
  torch.save([torch.ones(1)], tmp_path / 'list.pt')
  torch.save(torch.ones(1), tmp_path / 'tensor.pt')
  for name, match in (('training.pt', "entry 'epoch' is int, not a tensor"), ('list.pt', 'holds a list'),
                      ('tensor.pt', 'holds a single tensor'), ('missing.pt', 'does not exist'), ('', 'is a directory')):
    with pytest.raises(torch_file.TorchFileError, match=match):
      torch_file.read_state_dict(str(tmp_path / name))


def test_kpjax_reads_torch_files_where_torch_is_missing(tmp_path):
  state = {'w': torch.randn(3, 2)}
  torch.save(state, tmp_path / 'w.pth', _use_new_zipfile_serialization=False)
  np.save(tmp_path / 'want.npy', state['w'].numpy())
  code = ('import sys; sys.modules["torch"] = None\n'  # any `import torch` now fails
          'import numpy as np\n'
          'from kpjax.io import torch_file\nfrom kpjax.model import vgg19\nfrom kpjax.train import loop\n'
          f'got = torch_file.read_state_dict({str(tmp_path / "w.pth")!r})["w"]\n'
          f'assert np.array_equal(got, np.load({str(tmp_path / "want.npy")!r}))\n'
          'print("ok")\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]
