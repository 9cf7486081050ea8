"""kpjax.export: ONNX and StableHLO files that compute what kpjax computes, carry their metadata, and
refuse bad requests without writing anything.

Models are slim (width 0.125, 2 stages, 7 trousers keypoints, 32x32 input) with He-normal weights
and a scaled heatmap conv, so that coordinates spread over the image instead of sitting at its centre
(freshly initialised networks give nearly flat heatmaps, which would make any comparison weak). The
test images have a flat region, as letterbox padding does, so pool/unpool windows hold ties.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import kpjax
from kpjax.inference import checkpoints as checkpoint
from kpjax.cli import export as export_cli
from kpjax.data import keypoints as kp
from kpjax.model import network as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, WIDTH, STAGES, SIZE = 7, 0.125, 2, 32
TOLERANCE = 1e-5  # absolute, on coords (normalised units) and heatmaps (probabilities)
META = {'category': 'trousers', 'n_locations': N, 'width': WIDTH, 'num_stages': STAGES, 'input_size': SIZE,
        'preprocessing': 'kpjax'}


def he_variables(seed: int, spread: float = 4.0):
  """Random variables (He-normal kernels, small biases; numpy, not flax's slow-to-compile init) with
  hm_conv scaled so that each heatmap's logits vary by ~`spread` over an image."""
  net = model_lib.CoordRegressionNetwork(N, width=WIDTH, num_stages=STAGES)
  template = jax.eval_shape(lambda: model_lib.init_variables(net, jax.random.key(0), 8))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if len(leaf.shape) == 1:
      return rng.normal(0, 0.05, leaf.shape).astype(np.float32)
    return (rng.normal(0, 1, leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))).astype(np.float32)

  variables = jax.tree_util.tree_map(draw, template)
  logits = net.apply(variables, images(1, seed), method=lambda m, x: m.hm_conv(m.fcn(x)))
  variables['params']['hm_conv']['kernel'] *= spread / float(np.std(logits))
  return variables


def images(batch: int, seed: int, scale: float = 1.0) -> np.ndarray:
  x = np.random.default_rng(100 + seed).normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)
  x[:, :, :SIZE // 4] = 0.25  # a flat band, like letterbox padding: ties in the 2x2 pool windows
  return x * np.float32(scale)


def kpjax_outputs(variables, x, metadata=META):
  """What kpjax computes: the network as the checkpoint's metadata builds it, run with `apply`."""
  coords, heatmaps = checkpoint.check_metadata(metadata).build().apply(variables, x)
  return np.asarray(coords), np.asarray(heatmaps)


def assert_close(got, want):
  for name, g, w in zip(('coords', 'heatmaps'), got, want):
    assert g.shape == w.shape, (name, g.shape, w.shape)
    np.testing.assert_allclose(g, w, rtol=0, atol=TOLERANCE, err_msg=name)
  assert np.ptp(want[0]) > 0.1, 'the keypoints bunch together: the comparison would be weak'


def run_cli(argv, capsys):
  """(exit status, stderr) of the CLI run in this process (argparse's usage errors exit by SystemExit)."""
  try:
    code = export_cli.main([str(a) for a in argv])
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code, captured.err


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """(checkpoint directory, variables) of a slim 'kpjax' trousers model."""
  variables = he_variables(seed=1)
  path = checkpoint.save_model(str(tmp_path_factory.mktemp('models') / 'trousers'), variables, META)
  return path, variables


@pytest.fixture(scope='module')
def onnx_file(model, tmp_path_factory):
  pytest.importorskip('onnx')
  out = tmp_path_factory.mktemp('onnx') / 'trousers.onnx'
  assert export_cli.main(['--checkpoint', model[0], '--format', 'onnx', '--out', str(out)]) == 0
  return str(out)


def test_onnx_runs_in_onnxruntime_like_kpjax_at_batch_1_and_3(model, onnx_file):
  ort = pytest.importorskip('onnxruntime')
  session = ort.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])
  (inp,) = session.get_inputs()
  assert inp.name == 'images' and inp.type == 'tensor(float)'
  assert inp.shape == ['batch', SIZE, SIZE, 3]  # one file, any batch
  assert [o.name for o in session.get_outputs()] == ['coords', 'heatmaps']
  for batch in (1, 3):
    x = images(batch, seed=batch)
    assert_close(session.run(None, {'images': x}), kpjax_outputs(model[1], x))


def test_onnx_metadata(onnx_file):
  onnx = pytest.importorskip('onnx')
  proto = onnx.load(onnx_file)
  props = {p.key: p.value for p in proto.metadata_props}
  assert props['category'] == 'trousers'
  assert json.loads(props['keypoints']) == list(kp.keypoint_names('trousers'))
  assert props['input_size'] == str(SIZE) and props['batch'] == 'dynamic'
  assert props['preprocessing'] == 'kpjax' and 'letterbox' in props['preprocessing_description']
  assert props['kpjax_version'] == kpjax.__version__
  assert {n.op_type for n in proto.graph.node} <= {'Transpose', 'Conv', 'Relu', 'MaxPool', 'MaxUnpool', 'Concat',
                                                   'Reshape', 'Softmax', 'ReduceSum', 'MatMul'}


def test_onnx_pool_unpool_keeps_the_first_maximum_of_ties_as_kpjax_does():
  """MaxPool(indices) + MaxUnpool in onnxruntime equals kpjax.model.pool_unpool exactly, ties included."""
  ort = pytest.importorskip('onnxruntime')
  onnx = pytest.importorskip('onnx')
  from kpjax.export import onnx_graph as export_onnx
  from kpjax.model import pool_unpool
  g = export_onnx._Graph()  # pylint: disable=protected-access
  y = g.pool_unpool('x', 'p')
  shape = ['batch', 4, 8, 8]
  proto = onnx.helper.make_model(
      onnx.helper.make_graph(g.nodes, 'pool_unpool', [onnx.helper.make_tensor_value_info('x', 1, shape)],
                             [onnx.helper.make_tensor_value_info(y, 1, shape)]),
      opset_imports=[onnx.helper.make_opsetid('', export_onnx.OPSET)], ir_version=export_onnx.IR_VERSION)
  session = ort.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider'])
  x = np.random.default_rng(0).integers(0, 3, (3, 4, 8, 8)).astype(np.float32)  # ~half the windows tie
  x[0, 0] = 1.0  # every window a four-way tie
  want = np.asarray(pool_unpool(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
  np.testing.assert_array_equal(session.run(None, {'x': x})[0], want)
  assert (want[0, 0, 0::2, 0::2] == 1).all() and (want[0, 0, 1::2] == 0).all()


STABLEHLO_RUNNER = textwrap.dedent('''\
    """Runs an exported KPDEM with jax alone: no kpjax, no flax."""
    import sys
    import jax
    import numpy as np

    model_file, inputs, outputs = sys.argv[1:]
    with open(model_file, 'rb') as f:
      exported = jax.export.deserialize(f.read())
    arrays = dict(np.load(inputs))
    results = {}
    for name, x in arrays.items():
      coords, heatmaps = exported.call(x)
      results[name + '/coords'], results[name + '/heatmaps'] = np.asarray(coords), np.asarray(heatmaps)
    np.savez(outputs, **results)
    leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('kpjax', 'flax', 'convert'))
    assert not leaked, leaked
''')


def test_stablehlo_runs_in_a_fresh_process_without_kpjax(model, tmp_path, capsys):
  out = tmp_path / 'trousers.stablehlo'
  code, err = run_cli(['--checkpoint', model[0], '--format', 'stablehlo', '--out', out], capsys)
  assert code == 0, err
  (tmp_path / 'runner.py').write_text(STABLEHLO_RUNNER)
  batches = {f'b{b}': images(b, seed=10 + b) for b in (1, 3)}
  np.savez(tmp_path / 'inputs.npz', **batches)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run([sys.executable, 'runner.py', out, 'inputs.npz', 'outputs.npz'], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  got = np.load(tmp_path / 'outputs.npz')
  for name, x in batches.items():
    assert_close((got[name + '/coords'], got[name + '/heatmaps']), kpjax_outputs(model[1], x))
  info = json.loads((tmp_path / 'trousers.stablehlo.json').read_text())
  assert info['format'] == 'stablehlo' and info['category'] == 'trousers' and info['batch'] == 'dynamic'
  assert info['keypoints'] == list(kp.keypoint_names('trousers')) and info['input_size'] == SIZE
  assert info['preprocessing'] == 'kpjax' and info['kpjax_version'] == kpjax.__version__


def test_fixed_batch_input_size_and_a_matching_config(model, tmp_path, capsys):
  """--batch 2 and --input-size 16 fix the input shape; a config agreeing with the metadata is accepted."""
  out = tmp_path / 'b2.stablehlo'
  code, err = run_cli(['--checkpoint', model[0], '--format', 'stablehlo', '--out', out, '--batch', '2',
                       '--input-size', 16, '--config', os.path.join(ROOT, 'configs/trousers.py'),
                       f'--config.input_size={SIZE}', f'--config.model.width={WIDTH}',
                       f'--config.model.num_stages={STAGES}'], capsys)
  assert code == 0, err
  exported = jax.export.deserialize(out.read_bytes())
  assert exported.in_avals[0].shape == (2, 16, 16, 3)
  assert [a.shape for a in exported.out_avals] == [(2, N, 2), (2, N, 16, 16)]
  info = json.loads((tmp_path / 'b2.stablehlo.json').read_text())
  assert info['batch'] == 2 and info['input_size'] == 16 and info['checkpoint_input_size'] == SIZE
  assert '16x16' in info['preprocessing_description']
  onnx = pytest.importorskip('onnx')
  out = tmp_path / 'b2.onnx'
  assert run_cli(['--checkpoint', model[0], '--format', 'onnx', '--out', out, '--batch', '2'], capsys)[0] == 0
  dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
  assert [d.dim_value for d in dims] == [2, SIZE, SIZE, 3]


def test_converted_kpdem_model_exports(tmp_path, capsys):
  """A torch KPDEM state dict through convert.torch_to_flax, then both formats: each agrees with the
  torch network itself and with kpjax, on inputs in the original's [0, 1/255] range."""
  import torch  # pylint: disable=g-import-not-at-top

  from kpjax.configs import base
  from convert import torch_to_flax  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  net = torch_reference.make_torch_model(N, width=WIDTH, num_stages=STAGES, seed=5, init='he', hm_gain=10)
  torch.save(net.state_dict(), tmp_path / 'trousers.pth')
  config = base.get_config()
  config.category, config.model.width, config.model.num_stages = 'trousers', WIDTH, STAGES
  converted, metadata = torch_to_flax.convert_checkpoint(config, str(tmp_path / 'trousers.pth'),
                                                         str(tmp_path / 'converted'), input_size=SIZE,
                                                         preprocessing='kpdem', log=lambda _: None)
  assert metadata['preprocessing'] == 'kpdem'
  variables, _ = checkpoint.load_model(converted)
  x = images(3, seed=7, scale=1 / 255)
  want = kpjax_outputs(variables, x, metadata)
  np.testing.assert_allclose(torch_reference.torch_forward(net, x)[0], want[0], atol=TOLERANCE)

  out = tmp_path / 'kpdem.stablehlo'
  code, err = run_cli(['--checkpoint', converted, '--format', 'stablehlo', '--out', out], capsys)
  assert code == 0, err
  assert_close([np.asarray(a) for a in jax.export.deserialize(out.read_bytes()).call(x)], want)
  info = json.loads((tmp_path / 'kpdem.stablehlo.json').read_text())
  assert info['preprocessing'] == 'kpdem' and 'skimage' in info['preprocessing_description']
  assert info['source'] == 'trousers.pth' and len(info['sha256']) == 64

  ort = pytest.importorskip('onnxruntime')
  out = tmp_path / 'kpdem.onnx'
  code, err = run_cli(['--checkpoint', converted, '--format', 'onnx', '--out', out], capsys)
  assert code == 0, err
  session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
  assert_close(session.run(None, {'images': x}), want)
  props = {p.key: p.value for p in pytest.importorskip('onnx').load(str(out)).metadata_props}
  assert props['preprocessing'] == 'kpdem' and props['source'] == 'trousers.pth'


def test_truncated_kpdem_model_exports_only_at_its_own_input_size(model, tmp_path, capsys):
  """A 'truncated' kpdem model's outputs are cells of its own S0-pixel grid (its targets were
  floor(x * S0 / W) / S0): another --input-size is refused, with nothing written; 'exact' ones may change it."""
  truncated = checkpoint.save_model(str(tmp_path / 'truncated'), model[1],
                                    dict(META, preprocessing='kpdem', kpdem_targets='truncated'))
  out = tmp_path / 'out' / 'm.stablehlo'
  out.parent.mkdir()
  code, err = run_cli(['--checkpoint', truncated, '--format', 'stablehlo', '--out', out, '--input-size', 16], capsys)
  assert code == 2 and err.startswith('error: --input-size 16: ') and err.count('\n') == 1, err
  assert f'trained at {SIZE}x{SIZE}' in err and "'truncated'" in err and 'leave out --input-size' in err
  assert list(out.parent.iterdir()) == []
  exact = checkpoint.save_model(str(tmp_path / 'exact'), model[1],
                                dict(META, preprocessing='kpdem', kpdem_targets='exact'))
  code, err = run_cli(['--checkpoint', exact, '--format', 'stablehlo', '--out', out, '--input-size', 16], capsys)
  assert code == 0, err
  info = json.loads((tmp_path / 'out' / 'm.stablehlo.json').read_text())
  assert (info['input_size'], info['checkpoint_input_size'], info['kpdem_targets']) == (16, SIZE, 'exact')


def _bad_requests(model_dir, out):
  missing = os.path.join(os.path.dirname(model_dir), 'no-such-model')
  return {
      'missing checkpoint': (['--checkpoint', missing, '--format', 'stablehlo', '--out', out], 'no-such-model'),
      'unknown format': (['--checkpoint', model_dir, '--format', 'tflite', '--out', out], 'tflite'),
      'batch 0': (['--checkpoint', model_dir, '--format', 'stablehlo', '--out', out, '--batch', '0'], '--batch'),
      'batch -1': (['--checkpoint', model_dir, '--format', 'stablehlo', '--out', out, '--batch=-1'], '--batch'),
      'batch text': (['--checkpoint', model_dir, '--format', 'onnx', '--out', out, '--batch', 'many'], '--batch'),
      'batch float': (['--checkpoint', model_dir, '--format', 'stablehlo', '--out', out, '--batch', '1.5'], '--batch'),
      'input size': (['--checkpoint', model_dir, '--format', 'stablehlo', '--out', out, '--input-size', '31'],
                     'a positive even number of pixels'),
      'config disagrees': (['--checkpoint', model_dir, '--format', 'stablehlo', '--out', out, '--config',
                            os.path.join(ROOT, 'configs/skirt.py')], "category = 'skirt'"),
      'no format': (['--checkpoint', model_dir, '--out', out], '--format'),
  }


@pytest.mark.parametrize('case', list(_bad_requests('m', 'o')))
def test_bad_requests_are_one_error_line_and_write_nothing(model, tmp_path, capsys, case):
  argv, needle = _bad_requests(model[0], str(tmp_path / 'out.file'))[case]
  code, err = run_cli(argv, capsys)
  assert code == 2
  assert err.startswith('error: ') and err.count('\n') == 1 and needle in err, err
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('existing', ['m.stablehlo', 'm.stablehlo.json'])
def test_existing_output_needs_force(model, tmp_path, capsys, existing):
  (tmp_path / existing).write_bytes(b'keep me')
  before = sorted(os.listdir(tmp_path))
  code, err = run_cli(['--checkpoint', model[0], '--format', 'stablehlo', '--out', tmp_path / 'm.stablehlo'], capsys)
  assert code == 2 and err.startswith('error: ') and 'already exists' in err and '--force' in err
  assert sorted(os.listdir(tmp_path)) == before and (tmp_path / existing).read_bytes() == b'keep me'
  code, err = run_cli(['--checkpoint', model[0], '--format', 'stablehlo', '--out', tmp_path / 'm.stablehlo',
                       '--force'], capsys)
  assert code == 0, err
  assert sorted(os.listdir(tmp_path)) == ['m.stablehlo', 'm.stablehlo.json']
  assert json.loads((tmp_path / 'm.stablehlo.json').read_text())['category'] == 'trousers'


def test_parameters_that_disagree_with_the_metadata_are_an_error(model, tmp_path, capsys):
  wrong = checkpoint.save_model(str(tmp_path / 'wrong'), model[1], dict(META, num_stages=1))
  code, err = run_cli(['--checkpoint', wrong, '--format', 'stablehlo', '--out', tmp_path / 'm.stablehlo'], capsys)
  assert code == 2 and err.startswith('error: ') and 'model2' in err and 'not a parameter' in err, err
  assert sorted(os.listdir(tmp_path)) == ['wrong']


def test_without_the_export_extra_onnx_names_it(model, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, 'onnx', None)  # `import onnx` now raises ImportError
  monkeypatch.delitem(sys.modules, 'kpjax.export.onnx_graph', raising=False)
  monkeypatch.delattr(kpjax.export, 'onnx_graph', raising=False)
  code, err = run_cli(['--checkpoint', model[0], '--format', 'onnx', '--out', tmp_path / 'm.onnx'], capsys)
  assert code == 2 and err.startswith('error: ') and "pip install 'kpjax[export]'" in err
  assert list(tmp_path.iterdir()) == []


def test_cli_process_reports_without_traceback(tmp_path):
  out = tmp_path / 'm.stablehlo'
  proc = subprocess.run([sys.executable, '-m', 'kpjax.export', '--checkpoint', str(tmp_path / 'nothing'),
                         '--format', 'stablehlo', '--out', str(out)], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.startswith('error: ') and 'nothing' in proc.stderr and not out.exists()
