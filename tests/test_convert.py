"""The PyTorch <-> Flax checkpoint converters: every accepted format, exactness, and every refusal.

Checkpoints are made here with convert/torch_model.py (random weights): the released files cannot be
downloaded. Whole-module pickles come from a subprocess in which a throwaway `keypoints_Net` module (and
a script's `__main__`, and an installed kpjax's `kpjax.convert.torch_model`) defines the classes; this
process cannot import them, as a user's cannot. The subprocess also records torch's own reading of each
file (torch.load with the classes at hand). Expected parameters come from tests/torch_reference.py, a
reading of the layout written separately from convert/layout.py.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kpjax.configs import base as base_config
from convert import flax_to_torch
from convert import layout
from convert import torch_loading
from convert import torch_model
from convert import torch_to_flax
from kpjax.errors import UnsafeTorchFileError
from kpjax.inference import checkpoints as checkpoint
from kpjax.io import torch_file
from kpjax.model import network as kpmodel
import torch_reference
from kpjax.cli import predict as predict_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, WIDTH, STAGES = 7, 0.125, 2  # a slim trousers network: every format test is cheap
QUIET = lambda message: None  # noqa: E731


def make_config(category='trousers', width=WIDTH, num_stages=STAGES):
  config = base_config.get_config()
  config.category = category
  config.model.width = width
  config.model.num_stages = num_stages
  return config


def assert_same_variables(got, want):
  got_flat = {p: np.asarray(v) for p, v in layout.flatten_variables(got)}
  want_flat = {p: np.asarray(v) for p, v in layout.flatten_variables(want)}
  assert sorted(got_flat) == sorted(want_flat)
  for path, value in want_flat.items():
    assert got_flat[path].dtype == np.float32, path
    np.testing.assert_array_equal(got_flat[path], value, err_msg=str(path))


@pytest.fixture(scope='module')
def net():
  return torch_reference.make_torch_model(N, width=WIDTH, num_stages=STAGES, seed=3, init='torch')


@pytest.fixture(scope='module')
def expected(net):
  return torch_reference.torch_state_dict_to_flax(net.state_dict())


# ---- Whole-module pickles, saved where their classes live --------------------------------------------

KEYPOINTS_NET = textwrap.dedent('''\
    """Throwaway stand-in for the original's network file (the released pickles name its classes)."""
    from convert import torch_model


    class KeyPointsModel(torch_model.KeyPointsModel):
      pass


    class CoordRegression(torch_model.CoordRegression):
      def __init__(self, n_locations, width=1.0, num_stages=6):
        super().__init__(n_locations, width=width, num_stages=num_stages)
        self.fcn = KeyPointsModel(width=width, num_stages=num_stages)
    ''')

SAVE_SCRIPT = textwrap.dedent('''\
    import importlib.util
    import sys
    import torch
    import torch.nn.backends.thnn
    import convert
    import keypoints_Net
    import kpjax
    from convert import torch_model

    if importlib.util.find_spec('kpjax.convert') is None:  # a checkout: make convert/ what an installed kpjax has,
      spec = importlib.util.spec_from_file_location(  # the package kpjax.convert (pyproject's package-dir)
          'kpjax.convert', convert.__file__, submodule_search_locations=list(convert.__path__))
      kpjax.convert = sys.modules['kpjax.convert'] = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(kpjax.convert)
    from kpjax.convert import torch_model as installed_model
    assert installed_model.CoordRegression.__module__ == 'kpjax.convert.torch_model'

    KeyPointsModel = type('KeyPointsModel', (torch_model.KeyPointsModel,), {})  # the __main__ twins


    class CoordRegression(torch_model.CoordRegression):
      def __init__(self, n_locations, width=1.0, num_stages=6):
        super().__init__(n_locations, width=width, num_stages=num_stages)
        self.fcn = KeyPointsModel(width=width, num_stages=num_stages)


    class Backend:  # torch 0.4/1.0 pickled each module's `_backend` as this call
      def __reduce__(self):
        return (torch.nn.backends.thnn._get_thnn_function_backend, ())


    def old_parameter(self, proto):  # torch 0.4.0 pickled a parameter as Parameter(tensor, requires_grad)
      return torch.nn.Parameter, (self.data, self.requires_grad)


    def save(obj, path, **kwargs):  # and torch's own reading of it, with the classes at hand
      torch.save(obj, path, **kwargs)
      torch.save(torch.load(path, weights_only=False).state_dict(), path[:-3] + '_torch.pt')


    reference, n, width, stages, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    weights = torch.load(reference, weights_only=True)
    for name, cls in (('keypoints_Net', keypoints_Net.CoordRegression), ('main', CoordRegression),
                      ('installed', installed_model.CoordRegression)):
      model = cls(n, width=width, num_stages=stages)
      model.load_state_dict(weights, strict=True)
      wrapped = torch.nn.DataParallel(model)
      # as saved on a GPU (on a CPU-only machine DataParallel leaves these out)
      wrapped.device_ids, wrapped.output_device, wrapped.src_device_obj = [0], 0, torch.device('cuda', 0)
      save(wrapped, f'{out}/{name}_zip.pt')
      for module in wrapped.modules():
        module.__dict__['_backend'] = Backend()
      torch.nn.Parameter.__reduce_ex__, new_parameter = old_parameter, torch.nn.Parameter.__reduce_ex__
      save(wrapped, f'{out}/{name}_legacy.pt', _use_new_zipfile_serialization=False)
      torch.nn.Parameter.__reduce_ex__ = new_parameter
    ''')
# file stem -> the module its classes were saved from
OWNERS = {'keypoints_Net': 'keypoints_Net', 'main': '__main__', 'installed': 'kpjax.convert.torch_model'}


@pytest.fixture(scope='module')
def released(net, tmp_path_factory):
  """{'<stem>_<zip|legacy>': whole-module pickle path} for every stem of OWNERS; '<stem>_<format>_torch' is
  torch's own reading of that file (torch.load with the classes importable), saved as a state_dict."""
  root = tmp_path_factory.mktemp('released')
  classes = root / 'classes'
  classes.mkdir()
  (classes / 'keypoints_Net.py').write_text(KEYPOINTS_NET)
  (classes / 'save_released.py').write_text(SAVE_SCRIPT)
  torch.save(net.state_dict(), root / 'reference.pt')
  env = dict(os.environ, PYTHONPATH=REPO)
  subprocess.run([sys.executable, str(classes / 'save_released.py'), str(root / 'reference.pt'), str(N), str(WIDTH),
                  str(STAGES), str(root)], check=True, env=env, cwd=str(classes), capture_output=True)
  return {f'{stem}_{fmt}{suffix}': str(root / f'{stem}_{fmt}{suffix}.pt')
          for stem in OWNERS for fmt in ('zip', 'legacy') for suffix in ('', '_torch')}


def test_released_classes_are_not_importable_here():
  assert importlib.util.find_spec('keypoints_Net') is None
  assert not hasattr(sys.modules['__main__'], 'CoordRegression')


def _check_whole_module(released, expected, stem, fmt):
  """The file reads as torch itself reads it (bit for bit) and converts exactly."""
  ckpt = torch_loading.load_torch_checkpoint(released[f'{stem}_{fmt}'])
  assert ckpt.container == f'whole module DataParallel({OWNERS[stem]}.CoordRegression)'
  assert (ckpt.file_format, ckpt.prefixes) == (fmt, ('module.',))
  by_torch = torch.load(released[f'{stem}_{fmt}_torch'], weights_only=True)
  assert list(ckpt.state_dict) == [k[len('module.'):] for k in by_torch]
  for key, value in by_torch.items():
    got = ckpt.state_dict[key[len('module.'):]]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == tuple(value.shape), key
    np.testing.assert_array_equal(got.view(np.int32), value.numpy().view(np.int32), err_msg=key)
  assert_same_variables(torch_to_flax.convert_state_dict(ckpt.state_dict), expected)


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
@pytest.mark.parametrize('stem', ['keypoints_Net', 'main'])
def test_whole_module_pickles(released, expected, stem, fmt):
  _check_whole_module(released, expected, stem, fmt)


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_whole_module_pickle_from_an_installed_kpjax(released, expected, fmt):
  """Defect 7c: installed, convert/ is the package kpjax.convert, so a pickle of this repository's network
  names kpjax.convert.torch_model.CoordRegression; it must read as the checkout's convert.torch_model does."""
  _check_whole_module(released, expected, 'installed', fmt)


def test_converting_needs_no_torch(released, tmp_path):
  """The converter reads a released-style whole-module pickle (legacy and zip) where `import torch` fails,
  and the model it writes holds torch's own reading of the file."""
  code = textwrap.dedent('''\
      import sys
      sys.modules['torch'] = None  # any `import torch` now fails
      from convert import torch_to_flax
      for source, out in zip(sys.argv[1::2], sys.argv[2::2]):
        status = torch_to_flax.main(['--config', 'configs/trousers.py', '--torch-checkpoint', source, '--out', out,
                                     '--config.model.width=0.125', '--config.model.num_stages=2'])
        assert status == 0, status
      verify = torch_to_flax.main(['--config', 'configs/trousers.py', '--torch-checkpoint', sys.argv[1], '--out',
                                   sys.argv[2] + '_verified', '--verify', '--config.model.width=0.125',
                                   '--config.model.num_stages=2'])
      assert verify == 2, verify  # --verify runs the torch network: one error line, nothing written
      assert sys.modules['torch'] is None
      ''')
  args = [a for fmt in ('legacy', 'zip') for a in (released[f'keypoints_Net_{fmt}'], str(tmp_path / fmt))]
  run = subprocess.run([sys.executable, '-c', code, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'PYTHONPATH': REPO})
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stderr.strip().splitlines()[-1].startswith('error: --verify runs the original torch network')
  assert sorted(os.listdir(tmp_path)) == ['legacy', 'zip']
  for fmt in ('legacy', 'zip'):
    by_torch = torch.load(released[f'keypoints_Net_{fmt}_torch'], weights_only=True)
    want = torch_reference.torch_state_dict_to_flax({k[len('module.'):]: v for k, v in by_torch.items()})
    variables, metadata = checkpoint.load_model(str(tmp_path / fmt))
    assert_same_variables(variables, want)
    assert metadata['source_format'] == f'whole module DataParallel(keypoints_Net.CoordRegression) ({fmt})'


def test_torch_load_is_not_how_kpjax_reads():
  """Why kpjax reads torch files itself rather than with torch.load: torch's safe mode (weights_only=True)
  cannot read legacy whole-module pickles, the released format, even with their classes allowed (it
  refuses their ('module', class, ...) persistent ids), and builds the real classes where it can; its
  unsafe mode runs whatever the file holds; and both need torch, which kpjax's reading does not."""
  model = torch.nn.DataParallel(torch_model.CoordRegression(N, width=WIDTH, num_stages=1))
  buffer = io.BytesIO()
  torch.save(model, buffer, _use_new_zipfile_serialization=False)
  with torch.serialization.safe_globals([torch.nn.DataParallel]):
    with pytest.raises(pickle.UnpicklingError, match='persistent_load of storage'):
      torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


# ---- state_dicts, wrapped or prefixed -------------------------------------------------------------

def _formats(net, root):
  """{description: path} of the same weights saved the ways PyTorch users save them."""
  state = net.state_dict()
  trained = copy.deepcopy(net)
  optimizer = torch.optim.RMSprop(trained.parameters(), lr=2.5e-4, alpha=0.9)
  trained(torch.zeros(1, 3, 8, 8))[0].sum().backward()
  optimizer.step()  # a real optimizer state (tensors, param_groups) to be ignored
  files = {
      'state_dict': (state, {}),
      'state_dict legacy format': (state, {'_use_new_zipfile_serialization': False}),
      'DataParallel state_dict': (torch.nn.DataParallel(net).state_dict(), {}),
      'torch.compile(DataParallel) state_dict': (torch.compile(torch.nn.DataParallel(net)).state_dict(), {}),
      'whole module, this repository': (torch.nn.DataParallel(net), {}),
  }
  for key in torch_loading.WRAPPER_KEYS:
    files[f'dict[{key}]'] = ({'epoch': 7, 'optimizer': optimizer.state_dict(), key: state, 'best_ne': 0.061}, {})
  files['dict[model] holding a whole module'] = ({'epoch': 1, 'model': torch.nn.DataParallel(net)}, {})
  paths = {}
  for i, (name, (obj, kwargs)) in enumerate(files.items()):
    paths[name] = str(root / f'{i}.pt')
    torch.save(obj, paths[name], **kwargs)
  return paths


def test_every_accepted_format(net, expected, tmp_path):
  for name, path in _formats(net, tmp_path).items():
    ckpt = torch_loading.load_torch_checkpoint(path)
    assert_same_variables(torch_to_flax.convert_state_dict(ckpt.state_dict, n_locations=N, width=WIDTH,
                                                           num_stages=STAGES), expected)
    if 'DataParallel' in name:
      assert 'module.' in ckpt.prefixes, name
    if 'compile' in name:
      assert '_orig_mod.' in ckpt.prefixes, name
    if name.startswith('dict['):
      assert ckpt.container.startswith(f"dict['{name[5:name.index(']')]}']"), (name, ckpt.container)


def test_gpu_saved_legacy_files_load_on_cpu(net, expected, tmp_path):
  """The released models were trained on GPUs: their storages are torch.cuda.FloatStorage at 'cuda:0'."""
  for obj in (net.state_dict(), torch.nn.DataParallel(net)):
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue().replace(b'ctorch\nFloatStorage\n', b'ctorch.cuda\nFloatStorage\n')
    data = data.replace(b'X\x03\x00\x00\x00cpu', b'X\x06\x00\x00\x00cuda:0')
    assert b'torch.cuda\nFloatStorage' in data and b'cuda:0' in data
    (tmp_path / 'gpu.pt').write_bytes(data)
    ckpt = torch_loading.load_torch_checkpoint(str(tmp_path / 'gpu.pt'))
    assert all(isinstance(v, np.ndarray) for v in ckpt.state_dict.values())
    assert_same_variables(torch_to_flax.convert_state_dict(ckpt.state_dict), expected)


def test_convert_state_dict_infers_the_architecture(net, expected):
  for prefix in ('', 'module.', '_orig_mod.module.'):
    sd = {prefix + k: v for k, v in net.state_dict().items()}
    assert_same_variables(torch_to_flax.convert_state_dict(sd), expected)
  found = layout.infer_architecture({k: tuple(v.shape) for k, v in net.state_dict().items()})
  assert found == layout.Architecture(N, WIDTH, STAGES)
  # numpy arrays work as well as tensors, and float64 is cast to float32
  sd64 = {k: v.double().numpy() for k, v in net.state_dict().items()}
  assert_same_variables(torch_to_flax.convert_state_dict(sd64), expected)


def test_half_precision_checkpoints_are_cast_as_torch_casts(net, tmp_path):
  """float16 / bfloat16 files read as numpy (bfloat16 an ml_dtypes type) and widen to float32 exactly."""
  for dtype in (torch.float16, torch.bfloat16):
    state = {k: v.to(dtype) for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / 'half.pt')
    ckpt = torch_loading.load_torch_checkpoint(str(tmp_path / 'half.pt'))
    assert_same_variables(torch_to_flax.convert_state_dict(ckpt.state_dict),
                          torch_reference.torch_state_dict_to_flax({k: v.float() for k, v in state.items()}))


def test_width_is_pinned_by_the_widest_layer():
  """A width whose channel counts do not scale exactly (0.3: 19, 38, 77, 154) is still recognised."""
  sd = torch_reference.make_torch_model(4, width=0.3, num_stages=1, init='torch').state_dict()
  variables = torch_to_flax.convert_state_dict(sd)
  arch = layout.flax_architecture(variables)
  assert (arch.n_locations, arch.num_stages) == (4, 1) and layout.same_shapes(arch, layout.Architecture(4, 0.3, 1))
  torch_to_flax.convert_state_dict(sd, n_locations=4, width=0.3, num_stages=1)


# ---- Exactness -----------------------------------------------------------------------------------

def test_round_trip_is_bit_identical(net, tmp_path):
  source = tmp_path / 'trousers.pt'
  torch.save(torch.nn.DataParallel(net), source)  # a whole-module pickle, as released
  config = make_config()
  out, metadata = torch_to_flax.convert_checkpoint(config, str(source), str(tmp_path / 'flax'), config_name='cfg',
                                                   log=QUIET)
  assert metadata['preprocessing'] == 'kpdem' and metadata['input_size'] == 64
  assert metadata['kpdem_targets'] == 'truncated'  # the released models' dataset code truncated the targets
  assert metadata['n_locations'] == N and metadata['width'] == WIDTH and metadata['num_stages'] == STAGES
  assert metadata['source'] == 'trousers.pt' and metadata['sha256'] == torch_loading.sha256_file(str(source))
  variables, loaded_metadata = checkpoint.load_model(out)
  assert loaded_metadata == metadata
  assert checkpoint.check_metadata(loaded_metadata).build().width == WIDTH

  for kwargs in ({}, {'dataparallel_prefix': True, 'legacy_format': True}):
    back = str(tmp_path / f'back{len(kwargs)}.pth')
    flax_to_torch.convert_checkpoint(config, out, back, config_name='cfg', log=QUIET, **kwargs)
    assert not zipfile.is_zipfile(back) if kwargs else zipfile.is_zipfile(back)
    state = torch.load(back, weights_only=True)
    prefix = 'module.' if kwargs else ''
    original = net.state_dict()
    assert list(state) == [prefix + k for k in original]
    for key, value in original.items():
      got = state[prefix + key]
      assert got.dtype == value.dtype and got.shape == value.shape and got.is_contiguous()
      assert torch.equal(got.view(torch.int32), value.view(torch.int32)), key  # bit for bit
    fresh = torch_reference.torch_model.CoordRegression(N, width=WIDTH, num_stages=STAGES)
    fresh.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)


def test_full_width_outputs_equal_torch():
  """The original network (width 1, six stages, 36.9 M parameters) on one small image: within 1e-5."""
  torch_net = torch_reference.make_torch_model(13, width=1.0, num_stages=6, seed=11, init='he')
  with torch.no_grad():
    torch_net.hm_conv.weight.mul_(10.0)  # peaked heatmaps and spread-out coordinates, not near-uniform ones
  variables = torch_to_flax.convert_state_dict(torch_net.state_dict(), n_locations=13, width=1.0, num_stages=6)
  image = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)
  t_coords, t_heatmaps = torch_reference.torch_forward(torch_net, image)
  f_coords, f_heatmaps = kpmodel.CoordRegressionNetwork(13).apply(variables, jnp.asarray(image))
  coord_diff = np.abs(np.asarray(f_coords) - t_coords).max()
  heatmap_diff = np.abs(np.asarray(f_heatmaps) - t_heatmaps).max()
  print(f'full width: max |coords diff| {coord_diff:.3g}, max |heatmap diff| {heatmap_diff:.3g}, '
        f'coords spread {t_coords.std():.3g}, heatmap max {t_heatmaps.max():.3g}')
  assert t_coords.std() > 0.2 and t_heatmaps.max(axis=(2, 3)).min() > 10 / (16 * 16)  # outputs far from trivial
  assert coord_diff <= 1e-5 and heatmap_diff <= 1e-5


def test_verify_compares_both_networks(net, tmp_path):
  torch.save(net.state_dict(), tmp_path / 'w.pt')
  lines = []
  torch_to_flax.convert_checkpoint(make_config(), str(tmp_path / 'w.pt'), str(tmp_path / 'out'), verify=True,
                                   input_size=32, log=lines.append)
  verify = [line for line in lines if line.startswith('verify:')]
  assert len(verify) == 1 and 'coordinate difference' in verify[0] and 'heatmap difference' in verify[0]
  diffs = torch_to_flax.compare_with_torch(net.state_dict(), checkpoint.load_model(str(tmp_path / 'out'))[0],
                                           layout.Architecture(N, WIDTH, STAGES), 32, 'kpdem')
  assert diffs['coords'] <= 1e-6 and diffs['heatmaps'] <= 1e-6


# ---- Refusals: one clear message, nothing left behind -------------------------------------------------

def _convert_fails(tmp_path, source, match, config=None, **kwargs):
  out_parent = tmp_path / 'models'
  with pytest.raises(ValueError, match=match) as info:
    torch_to_flax.convert_checkpoint(config or make_config(), str(source), str(out_parent / 'out'),
                                     config_name='configs/x.py', log=QUIET, **kwargs)
  assert not out_parent.exists() or not os.listdir(out_parent), os.listdir(out_parent)
  return str(info.value)


def test_bad_files_are_refused_clearly(net, tmp_path):
  good = tmp_path / 'good.pt'
  torch.save(net.state_dict(), good)
  legacy = tmp_path / 'legacy.pt'
  torch.save(torch.nn.DataParallel(net), legacy, _use_new_zipfile_serialization=False)
  cases = {}
  data, legacy_data = good.read_bytes(), legacy.read_bytes()
  cases['truncated.pt'] = (data[:len(data) // 2], 'truncated or damaged')
  cases['truncated_legacy.pt'] = (legacy_data[:len(legacy_data) - 1000], 'truncated')
  cases['cut_legacy_pickle.pt'] = (legacy_data[:300], 'damaged or truncated')
  cases['empty.pt'] = (b'', 'is empty')
  cases['notes.pt'] = (b'these are not weights\n', 'not a PyTorch checkpoint')
  cases['image.pt'] = (b'\x89PNG\r\n\x1a\n' + bytes(100), 'not a PyTorch checkpoint')
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  cases['other.zip'] = (buffer.getvalue(), 'not a PyTorch checkpoint')
  scripted = io.BytesIO()
  torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 1)), scripted)
  cases['scripted.pt'] = (scripted.getvalue(), 'TorchScript')
  for name, (content, match) in cases.items():
    (tmp_path / name).write_bytes(content)
    _convert_fails(tmp_path, tmp_path / name, match)
  _convert_fails(tmp_path, tmp_path / 'missing.pt', 'does not exist')
  _convert_fails(tmp_path, tmp_path, 'is a directory')
  torch.save({'epoch': 3, 'lr': 0.1}, tmp_path / 'no_weights.pt')
  _convert_fails(tmp_path, tmp_path / 'no_weights.pt', "dict without model weights .*'epoch'")
  torch.save([1, 2], tmp_path / 'list.pt')
  _convert_fails(tmp_path, tmp_path / 'list.pt', 'holds a list')


def test_existing_output_needs_force(net, tmp_path):
  torch.save(net.state_dict(), tmp_path / 'w.pt')
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep').write_text('old')
  with pytest.raises(checkpoint.CheckpointError, match='already exists.*--force'):
    torch_to_flax.convert_checkpoint(make_config(), str(tmp_path / 'w.pt'), str(out), log=QUIET)
  assert (out / 'keep').read_text() == 'old'
  torch_to_flax.convert_checkpoint(make_config(), str(tmp_path / 'w.pt'), str(out), force=True, log=QUIET)
  assert not (out / 'keep').exists() and checkpoint.load_model(str(out))[1]['n_locations'] == N
  assert sorted(os.listdir(tmp_path)) == ['out', 'w.pt']  # no staging directories left


def test_architecture_mismatches_name_tensor_shapes_and_fix(net, tmp_path):
  torch.save(net.state_dict(), tmp_path / 'trousers.pt')
  message = _convert_fails(tmp_path, tmp_path / 'trousers.pt', 'hm_conv.weight', config=make_config('skirt'))
  assert '(7, 24, 1, 1)' in message and '(4, 24, 1, 1)' in message and '--config configs/trousers.py' in message

  outwear15 = torch_reference.make_torch_model(15, width=WIDTH, num_stages=STAGES, init='torch')
  torch.save(outwear15.state_dict(), tmp_path / 'outwear.pt')
  message = _convert_fails(tmp_path, tmp_path / 'outwear.pt', 'hm_conv.weight', config=make_config('outwear'))
  assert '(15, 24, 1, 1)' in message and '(14, 24, 1, 1)' in message
  assert 'dress' in message and 'FashionAI data has 14 outwear keypoints' in message

  message = _convert_fails(tmp_path, tmp_path / 'trousers.pt', 'width', config=make_config(width=1.0))
  assert 'fcn.model1_0_3.conv4_1.weight' in message and '(64, 32, 3, 3)' in message
  assert '(512, 256, 3, 3)' in message and '--config.model.width=0.125' in message
  message = _convert_fails(tmp_path, tmp_path / 'trousers.pt', 'stages', config=make_config(num_stages=6))
  assert '--config.model.num_stages=2' in message


def test_strictness_lists_missing_unexpected_and_misshapen(net, tmp_path):
  state = dict(net.state_dict())
  del state['fcn.model2.Mconv3_stage2.bias']
  state['fcn.model2.extra.weight'] = torch.zeros(3)
  state['fcn.model1_0_2.conv3_2.weight'] = torch.zeros(32, 32, 1, 1)
  torch.save(state, tmp_path / 'odd.pt')
  message = _convert_fails(tmp_path, tmp_path / 'odd.pt', 'missing keys')
  assert 'fcn.model2.Mconv3_stage2.bias' in message and 'unexpected keys (1): fcn.model2.extra.weight' in message
  assert 'fcn.model1_0_2.conv3_2.weight: (32, 32, 1, 1) in the checkpoint, (32, 32, 3, 3) expected' in message
  state = dict(net.state_dict())
  state['hm_conv.weight'] = state['hm_conv.weight'].to(torch.int32)
  torch.save(state, tmp_path / 'ints.pt')
  _convert_fails(tmp_path, tmp_path / 'ints.pt', 'hm_conv.weight has dtype int32; KPDEM parameters are floating')
  with pytest.raises(torch_to_flax.ConversionError, match='no hm_conv.weight'):
    torch_to_flax.convert_state_dict({'conv.weight': torch.zeros(1, 1, 1, 1)})


def test_bad_conversion_settings(net, tmp_path):
  torch.save(net.state_dict(), tmp_path / 'w.pt')
  _convert_fails(tmp_path, tmp_path / 'w.pt', 'a positive even number of pixels', input_size=61)
  _convert_fails(tmp_path, tmp_path / 'w.pt', 'preprocessing', preprocessing='imagenet')
  _convert_fails(tmp_path, tmp_path / 'w.pt', "kpdem-targets = 'floor': expected one of truncated, exact",
                 kpdem_targets='floor')
  _convert_fails(tmp_path, tmp_path / 'w.pt', "category = 'hats': expected one of blouse", config=make_config('hats'))


# ---- Malicious pickles are refused and never run ---------------------------------------------------

class Payload:
  """Runs a shell command when unpickled by an unrestricted loader."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


class ExecPayload(Payload):

  def __reduce__(self):
    return (exec, (f'open({self.marker!r}, "w").close()',))


def test_malicious_pickles_are_refused_and_do_not_run(net, tmp_path, monkeypatch):
  marker = tmp_path / 'PWNED'
  cases = {
      'system_zip.pt': ({'state_dict': net.state_dict(), 'extra': Payload(marker)}, {}, 'posix.system'),
      'system_legacy.pt': ({'state_dict': net.state_dict(), 'extra': Payload(marker)},
                           {'_use_new_zipfile_serialization': False}, 'posix.system'),
      'exec_zip.pt': (ExecPayload(marker), {}, 'builtins.exec'),
      'exec_legacy.pt': (ExecPayload(marker), {'_use_new_zipfile_serialization': False}, 'builtins.exec'),
      'module_zip.pt': ({'model': torch.nn.DataParallel(net), 'extra': Payload(marker)}, {}, 'posix.system'),
  }
  for name, (obj, kwargs, global_name) in cases.items():
    torch.save(obj, tmp_path / name, **kwargs)
    message = _convert_fails(tmp_path, tmp_path / name, 'refusing to read')
    assert global_name in message and 'Nothing from the file was run' in message, message
  # behind the up-front scan, the unpickler refuses on its own as well
  with monkeypatch.context() as patch:
    patch.setattr(torch_file, '_scan', lambda *args: None)
    for name, (_, _, global_name) in cases.items():
      with pytest.raises(UnsafeTorchFileError, match=global_name):
        torch_loading.load_torch_checkpoint(str(tmp_path / name))
  assert not marker.exists()


def _torch_nn_classes() -> dict[str, type]:
  """Every torch.nn.Module subclass torch.nn exports, under the full name a pickle gives it."""
  return {f'{c.__module__}.{c.__qualname__}': c for c in vars(torch.nn).values()
          if isinstance(c, type) and issubclass(c, torch.nn.Module)}


def test_any_other_torch_nn_class_is_refused_naming_it(net, tmp_path):
  """The allowlist opens nothing beyond KPDEM's layers: any other torch.nn class is refused, named."""
  others = {name: cls for name, cls in _torch_nn_classes().items() if name not in torch_loading.MODULE_CLASSES}
  assert len(others) > 100 and 'torch.nn.modules.batchnorm.BatchNorm2d' in others
  torch.save({'model': torch.nn.DataParallel(net), 'layers': list(others.values())}, tmp_path / 'others.pt')
  with pytest.raises(UnsafeTorchFileError) as info:
    torch_loading.load_torch_checkpoint(str(tmp_path / 'others.pt'))
  assert info.value.names == sorted(others)
  model = torch_reference.torch_model.CoordRegression(N, width=WIDTH, num_stages=1)
  model.fcn.norm = torch.nn.BatchNorm2d(3)  # a layer no KPDEM model has, in a model as the converter sees it
  for kwargs in ({}, {'_use_new_zipfile_serialization': False}):
    torch.save(torch.nn.DataParallel(model), tmp_path / 'norm.pt', **kwargs)
    message = _convert_fails(tmp_path, tmp_path / 'norm.pt', 'refusing to read')
    assert 'needs torch.nn.modules.batchnorm.BatchNorm2d, which is not allowed' in message


def _globals_of(path: str) -> list[str]:
  """The globals a torch.save file's main pickle names (this test's own files: the header pickles are plain)."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      return torch_file.pickle_globals(archive.read(next(n for n in archive.namelist() if n.endswith('data.pkl'))))
  with open(path, 'rb') as f:
    for _ in range(3):  # magic number, protocol, system info
      pickle.load(f)
    return torch_file.pickle_globals(f)


def test_allowlist_is_what_torch_itself_needs(released, net, tmp_path):
  """No surface beyond torch's own: every global the KPDEM reading allows is in torch's weights_only
  allowlist (what torch.load(weights_only=True) resolves; a reference for this test only), or a class a
  KPDEM network is made of, or torch 0.4/1.0's `_backend` call; and each name a whole module adds to a
  state dict's allowlist is used by some real whole-module file."""
  from torch import _weights_only_unpickler  # pylint: disable=g-import-not-at-top
  torch_safe = set(_weights_only_unpickler._get_allowed_globals())
  model = torch.nn.DataParallel(torch_model.CoordRegression(N, width=WIDTH, num_stages=2))
  classes = {f'{type(m).__module__}.{type(m).__qualname__}' for m in model.modules()}
  network = {name.rsplit('.', 1)[1] for name in classes if name.startswith('convert.')}
  assert network == {'CoordRegression', 'KeyPointsModel'}
  owners = ('keypoints_Net', '__main__', 'convert.torch_model', 'kpjax.convert.torch_model')
  assert set(torch_loading.MODULE_CLASSES) == ({n for n in classes if n.startswith('torch.nn.')}
                                                | {f'{owner}.{cls}' for owner in owners for cls in network})
  allowed = torch_file.allowed_globals(torch_loading.KPDEM_MODULES)
  assert allowed - torch_safe - set(torch_loading.MODULE_CLASSES) == {torch_file.LEGACY_BACKEND}
  assert torch_file.allowed_globals() <= torch_safe  # a state dict's reading (config.init_backbone)
  torch.save(torch.nn.DataParallel(net), tmp_path / 'repo.pt')
  used = set(_globals_of(str(tmp_path / 'repo.pt')))
  for key, path in released.items():
    if not key.endswith('_torch'):
      used.update(_globals_of(path))
  assert allowed - torch_file.allowed_globals() <= used


# ---- flax_to_torch checks -------------------------------------------------------------------------

def test_flax_to_torch_refuses_a_config_that_disagrees(net, tmp_path):
  torch.save(net.state_dict(), tmp_path / 'w.pt')
  model_dir, _ = torch_to_flax.convert_checkpoint(make_config(), str(tmp_path / 'w.pt'), str(tmp_path / 'm'),
                                                  log=QUIET)
  for config, match in ((make_config('skirt'), "category.*'trousers'"), (make_config(width=0.25), 'width=0.125'),
                        (make_config(num_stages=3), 'num_stages=2')):
    with pytest.raises(flax_to_torch.ConversionError, match=match):
      flax_to_torch.convert_checkpoint(config, model_dir, str(tmp_path / 'back.pth'), log=QUIET)
  with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
    flax_to_torch.convert_checkpoint(make_config(), str(tmp_path / 'nope'), str(tmp_path / 'back.pth'), log=QUIET)
  (tmp_path / 'taken.pth').write_text('x')
  with pytest.raises(flax_to_torch.ConversionError, match='already exists'):
    flax_to_torch.convert_checkpoint(make_config(), model_dir, str(tmp_path / 'taken.pth'), log=QUIET)
  assert sorted(os.listdir(tmp_path)) == ['m', 'taken.pth', 'w.pt']
  variables = checkpoint.load_model(model_dir)[0]
  variables['params']['hm_conv']['extra'] = np.zeros(2, np.float32)
  with pytest.raises(flax_to_torch.ConversionError, match='unexpected keys.*params/hm_conv/extra'):
    flax_to_torch.variables_to_state_dict(variables)


# ---- The command lines: exit status and one line on stderr ---------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, capture_output=True, text=True)


def test_cli_round_trip_and_errors(net, tmp_path):
  torch.save(torch.nn.DataParallel(net), tmp_path / 'trousers.pt', _use_new_zipfile_serialization=False)
  slim = ['--config.model.width=0.125', '--config.model.num_stages=2']
  run = _cli('convert.torch_to_flax', '--config', 'configs/trousers.py', '--torch-checkpoint',
             str(tmp_path / 'trousers.pt'), '--out', str(tmp_path / 'flax'), '--verify', '--kpdem-targets', 'exact',
             *slim)
  assert run.returncode == 0, run.stderr
  assert 'largest coordinate difference' in run.stdout and 'wrote' in run.stdout
  assert checkpoint.load_model(str(tmp_path / 'flax'))[1]['kpdem_targets'] == 'exact'
  run = _cli('convert.flax_to_torch', '--config', 'configs/trousers.py', '--checkpoint', str(tmp_path / 'flax'),
             '--out', str(tmp_path / 'back.pth'), *slim)
  assert run.returncode == 0, run.stderr
  back = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())

  marker = tmp_path / 'PWNED'
  torch.save({'model': net.state_dict(), 'x': Payload(marker)}, tmp_path / 'evil.pt')
  run = _cli('convert.torch_to_flax', '--config', 'configs/trousers.py', '--torch-checkpoint',
             str(tmp_path / 'evil.pt'), '--out', str(tmp_path / 'evil'), *slim)
  assert run.returncode != 0 and run.stderr.startswith('error: refusing') and 'posix.system' in run.stderr
  assert 'Traceback' not in run.stderr and not marker.exists() and not (tmp_path / 'evil').exists()
  run = _cli('convert.torch_to_flax', '--config', 'configs/skirt.py', '--torch-checkpoint',
             str(tmp_path / 'trousers.pt'), '--out', str(tmp_path / 'skirt'), *slim)
  assert run.returncode != 0 and run.stderr.startswith('error: hm_conv.weight has shape (7, 24, 1, 1)')
  assert 'Traceback' not in run.stderr and len(run.stderr.strip().splitlines()) == 1
  run = _cli('convert.torch_to_flax', '--config', 'configs/nope.py', '--torch-checkpoint', 'x.pt', '--out', 'y')
  assert run.returncode != 0 and run.stderr.startswith('error:') and 'Traceback' not in run.stderr
  assert sorted(os.listdir(tmp_path)) == ['back.pth', 'evil.pt', 'flax', 'trousers.pt']


def test_jax_arrays_convert_to_torch_too(net):
  variables = jax.tree_util.tree_map(jnp.asarray, torch_reference.torch_state_dict_to_flax(net.state_dict()))
  state = flax_to_torch.variables_to_state_dict(variables)
  assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


# ---- A converted model answers as the original did ------------------------------------------------

def _original_pixels(model, path, size=64, **resize_kwargs):
  """The published script's way: skimage reads RGB, resizes to size x size, / 255 once more; the network's
  [0, 1] outputs are target = pixel * size / W / size, so pixel = coords * size * W / size."""
  from skimage import io as skio  # pylint: disable=g-import-not-at-top
  from skimage import transform  # pylint: disable=g-import-not-at-top
  image = skio.imread(path)
  h, w = image.shape[:2]
  x = transform.resize(image, (size, size), **resize_kwargs) / 255
  with torch.no_grad():
    coords, _ = model(torch.from_numpy(x).float().permute(2, 0, 1)[None].contiguous())
  return coords.numpy()[0] * size * np.array([w / size, h / size])


@pytest.fixture(scope='module')
def converted_released(tmp_path_factory):
  """(torch model, converted model dir, [image paths]): a whole-module pickle converted with the defaults."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('kpdem')
  model = torch_reference.make_torch_model(N, width=WIDTH, num_stages=STAGES, seed=5, init='he')
  with torch.no_grad():
    model.fcn.model1_0_0.conv1_1.weight.mul_(255.0)  # inputs are in [0, 1/255]: let the image, not biases, decide
    model.hm_conv.weight.mul_(10.0)
  torch.save(torch.nn.DataParallel(model), root / 'trousers.pt', _use_new_zipfile_serialization=False)
  model_dir, _ = torch_to_flax.convert_checkpoint(make_config(), str(root / 'trousers.pt'), str(root / 'model'),
                                                  log=QUIET)
  rng = np.random.default_rng(1)
  paths = []
  (root / 'Images' / 'trousers').mkdir(parents=True)
  for i, (h, w) in enumerate([(150, 97), (40, 56), (512, 512)]):  # down-, up-sampled, the FashionAI size
    smooth = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.clip(np.asarray(smooth, np.int16) + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    paths.append(str(root / 'Images' / 'trousers' / f'{i}.png'))
    Image.fromarray(noisy).save(paths[-1])
  return model, model_dir, paths


def test_converted_model_gives_the_original_pixels(converted_released):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from kpjax.data import kpdem
  model, model_dir, paths = converted_released
  variables, metadata = checkpoint.load_model(model_dir)
  assert (metadata['preprocessing'], metadata['input_size']) == ('kpdem', 64)
  flax_net = checkpoint.check_metadata(metadata).build()
  for path in paths:
    want = _original_pixels(model, path)
    image = np.asarray(Image.open(path).convert('RGB'))
    prepared, affine = kpdem.prepare_image(image, metadata['input_size'])
    coords = np.asarray(flax_net.apply(variables, prepared[None])[0])[0]
    input_px = kpdem.coords_to_input_pixels(coords, metadata['input_size'])
    got = (input_px - affine[:, 2]) / np.diag(affine[:, :2])
    assert np.abs(got - want).max() < 1e-3, (path, np.abs(got - want).max())
    # the comparison has teeth: skimage without anti-aliasing (its pre-0.15 default) moves the answers
    if Image.open(path).size[0] > 64:
      assert np.abs(_original_pixels(model, path, anti_aliasing=False) - want).max() > 0.1


def test_predict_on_converted_model_gives_the_original_pixels(converted_released, tmp_path):
  """kpjax.predict on a converted model: the original network's outputs, read as the centres of the
  original's truncated target cells (the converter's default, kpjax.data.kpdem.coords_to_original)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from kpjax.data import keypoints
  from kpjax.data import kpdem
  from kpjax.inference import prediction as predict
  model, model_dir, paths = converted_released
  out = tmp_path / 'preds.csv'
  assert predict_cli.main(['--checkpoint', model_dir, '--images', *paths, '--out', str(out)]) == 0
  rows = [line.split(',') for line in out.read_text().strip().splitlines()[1:]]
  assert len(rows) == len(paths)
  columns = 2 + keypoints.keypoint_indices('trousers')
  checked = 0
  for path in paths:
    row = next(r for r in rows if path.endswith(r[0]))
    got = np.array([[int(v) for v in row[c].split('_')[:2]] for c in columns])
    w, h = Image.open(path).size
    original_coords = _original_pixels(model, path) / [w, h]  # the original network's [0, 1] outputs
    want = kpdem.coords_to_original(original_coords, h, w, 64, 'truncated')
    rounded = np.stack([np.clip(np.rint(want[:, 0]), 0, w - 1), np.clip(np.rint(want[:, 1]), 0, h - 1)], -1)
    near_half = np.abs(np.abs(want - np.floor(want)) - 0.5) < 1e-3  # float32 may round either way there
    assert np.all((got == rounded) | near_half), (path, got, want)
    checked += int(((want > 0.5) & (want < [w - 1.5, h - 1.5])).sum())  # coordinates inside the image, not clipped
  assert checked >= 6  # enough of them for the comparison to mean something
