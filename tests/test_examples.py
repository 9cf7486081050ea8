"""examples/: each script runs as docs/ says and gives what kpjax gives.

examples/onnxruntime_predict.py is run on a freshly exported slim model (the models of test_export.py:
width 0.125, 2 stages, 7 trousers keypoints, 32x32, He-normal weights, so that keypoints spread over the
image) for each input/output convention: in a fresh process, where it must not import kpjax, its
`name x y` lines equal `kpjax.predict`'s CSV; in this one, its input equals the convention's `prepare`.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kpjax.cli import export as export_cli
from kpjax.data import fashionai_csv
from kpjax.data import keypoints as kp
from kpjax.inference import checkpoints
from kpjax.inference import prediction
from test_export import META, N, SIZE, TOLERANCE, he_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, 'examples', 'onnxruntime_predict.py')
PRINTED = 0.5e-3  # the example prints 3 decimals, and so does kpjax.predict --decimals 3: each rounds by half a unit
# The runner proves the example imports neither kpjax nor what only kpjax needs.
RUNNER = textwrap.dedent("""\
    import runpy, sys
    sys.argv = sys.argv[1:]
    try:
      runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as e:
      assert not e.code, e.code
    leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('kpjax', 'jax', 'flax', 'convert'))
    assert not leaked, leaked
    """)


@pytest.fixture(scope='module')
def variables():
  return he_variables(seed=1)


@pytest.fixture(scope='module')
def photo(tmp_path_factory):
  """(path, uint8 (H, W, 3) as decoded) of a JPEG wider than tall and over twice the input (box filter)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('photo') / 'photo.jpg'
  Image.fromarray(np.random.default_rng(3).integers(0, 256, (75, 101, 3), dtype=np.uint8)).save(path, quality=95)
  return str(path), np.asarray(Image.open(path).convert('RGB'))


def _model(variables, tmp_path, mode, targets):
  """A model directory of that convention and its ONNX export. 'kpdem' models see inputs in [0, 1/255]
  (the original's): their first conv is scaled by 255, so that their keypoints spread as the others'."""
  meta = dict(META, preprocessing=mode, **({'kpdem_targets': targets} if targets else {}))
  if mode == 'kpdem':
    variables = {'params': {**variables['params'], 'fcn': {**variables['params']['fcn']}}}
    first = variables['params']['fcn']['model1_0_0'] = dict(variables['params']['fcn']['model1_0_0'])
    first['conv1_1'] = dict(first['conv1_1'], kernel=first['conv1_1']['kernel'] * 255)
  model_dir = checkpoints.save_model(str(tmp_path / 'model'), variables, meta)
  onnx_file = str(tmp_path / 'model.onnx')
  assert export_cli.main(['--checkpoint', model_dir, '--format', 'onnx', '--out', onnx_file]) == 0
  return model_dir, onnx_file, checkpoints.check_metadata(meta).convention


@pytest.mark.parametrize('mode, targets', [('kpjax', None), ('kpdem', 'exact'), ('kpdem', 'truncated')])
def test_onnxruntime_example_prints_what_kpjax_predicts(variables, photo, tmp_path, mode, targets):
  pytest.importorskip('onnxruntime')
  model_dir, onnx_file, convention = _model(variables, tmp_path, mode, targets)
  path, image = photo
  height, width = image.shape[:2]

  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  run = subprocess.run([sys.executable, '-c', RUNNER, EXAMPLE, onnx_file, path], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  lines = [line.split() for line in run.stdout.splitlines()]
  assert [name for name, _, _ in lines] == list(kp.keypoint_names('trousers'))
  printed = np.array([[float(x), float(y)] for _, x, y in lines])

  csv_file = str(tmp_path / 'preds.csv')
  summary = prediction.predict_files(model_dir, [path], csv_file, decimals=3, log=lambda _: None)
  assert summary.predicted == 1
  (row,) = list(fashionai_csv.read_annotations(csv_file, submission=True))
  category, xy, visibility = row.category, row.keypoints, row.visibility
  mask = kp.category_mask(category)
  assert category == 'trousers' and (visibility[mask] == 1).all()
  want = xy[mask]
  # Both sides round to 3 decimals; the networks (onnxruntime, XLA) agree to TOLERANCE in model units,
  # which span at most max(W, H) photo pixels (kpjax: [-1, 1] over the letterbox; kpdem: [0, 1] of a side).
  np.testing.assert_allclose(printed, want, rtol=0, atol=2 * PRINTED + TOLERANCE * max(width, height))
  # Outputs of a 'kpdem' model below 0 are clipped to the photo's edge on both sides; the rest must make a
  # comparison worth having.
  inside = (want > 0) & (want < [width - 1, height - 1])
  assert inside.mean() > 1 / 3 and np.ptp(want[inside]) > 20, 'too few keypoints inside: the comparison is weak'

  example = runpy.run_path(EXAMPLE, run_name='example')  # its steps, one by one, against kpjax's
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  meta = example['read_metadata'](ort.InferenceSession(onnx_file, providers=['CPUExecutionProvider']))
  x, context = example['prepare'](Image.open(path).convert('RGB'), meta)
  want_x, affine = convention.prepare(image, SIZE)
  np.testing.assert_allclose(x, want_x, rtol=0, atol=1e-6)
  coords = np.random.default_rng(4).uniform(-1 if mode == 'kpjax' else 0, 1, (N, 2))
  np.testing.assert_allclose(example['to_pixels'](coords, meta, (width, height), context),
                             np.clip(convention.coords_to_original(coords, affine, SIZE), 0, [width - 1, height - 1]),
                             rtol=0, atol=1e-9 * width)


def test_onnxruntime_example_usage_line():
  run = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, timeout=120)
  assert run.returncode == 2 and run.stderr.startswith('usage: python examples/onnxruntime_predict.py')
