"""kpjax.predict and kpjax.inference: submissions in original pixels, flips, and failure handling.

The strong check uses a hand-built checkpoint whose answer is known without trusting any kpjax
mapping: every conv is a centre-tap pass-through of three colour detectors, so each keypoint's
heatmap peaks on one coloured blob drawn into the image, and the CSV must give the blob centres in
the original pixels (non-square images included).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from kpjax.inference import checkpoints as checkpoint
from kpjax.inference import evaluation as evaluate
from kpjax.inference import predictor as inference
from kpjax.data import keypoints as kp
from kpjax.metrics import normalized_error as metrics
from kpjax.model import network as model_lib
from kpjax.inference import prediction as predict
from kpjax.data import conventions
from kpjax.data import geometry as preprocess
from kpjax.data.spec import ModelSpec
from kpjax.data import images
from kpjax.cli import evaluate as evaluate_cli
from kpjax.cli import predict as predict_cli
from kpjax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # network input side
SLIM = ['--config.model.width=0.125', '--config.model.num_stages=1']  # the checkpoints' network, for --config
COLOURS = np.array([[230, 20, 20], [20, 200, 20], [20, 20, 230]], np.float64)  # red, green, blue
BACKGROUND = np.array([128, 128, 128], np.float64)


def _save(tmp_path, name, variables, category, preprocessing='kpjax', n=None):
  meta = {'category': category, 'n_locations': n or kp.num_keypoints(category), 'width': 0.125, 'num_stages': 1,
          'input_size': SIZE, 'preprocessing': preprocessing}
  return checkpoint.save_model(str(tmp_path / name), variables, meta)


def colour_detector_variables(detectors: tuple[int, ...], gain: float = 40.0):
  """Variables of a width-0.125, 1-stage network whose keypoint j is the blob of colour detectors[j].

  conv1_1 computes relu(c_k - (c_other1 + c_other2) / 2 - 1) for colour k on the normalised input;
  every later conv copies channels 0..2 through its centre tap (pool_unpool keeps the peaks, as
  they are window maxima); hm_conv scales detector detectors[j] by `gain` for keypoint j, so the
  flat softmax concentrates on the strongest pixel of that colour.
  """
  net = model_lib.CoordRegressionNetwork(len(detectors), width=0.125, num_stages=1)
  template = jax.eval_shape(lambda: model_lib.init_variables(net, jax.random.key(0), SIZE))  # shapes only

  def build(path, leaf_array):
    names = [p.key for p in path]
    shape = leaf_array.shape
    value = np.zeros(shape, np.float32)
    layer, leaf = names[-2], names[-1]
    if layer == 'hm_conv':
      for j, k in enumerate(detectors):
        value[0, 0, k, j] = gain
    elif layer == 'conv1_1' and leaf == 'kernel':
      c = shape[0] // 2
      for k in range(3):
        value[c, c, :, k] = -0.5
        value[c, c, k, k] = 1.0
    elif layer == 'conv1_1':
      value[:3] = -1.0
    elif leaf == 'kernel':
      c = shape[0] // 2
      for k in range(3):
        value[c, c, k, k] = 1.0
    return value

  return jax.tree_util.tree_map_with_path(build, template)


def blob_image(height, width, centres, sigma):
  """Grey image with a Gaussian blob of COLOURS[k] at centres[k] = (x, y) (a unique colour maximum)."""
  yy, xx = np.mgrid[:height, :width]
  image = np.broadcast_to(BACKGROUND, (height, width, 3)).copy()
  for k, (x, y) in enumerate(centres):
    w = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))[..., None]
    image = image * (1 - w) + COLOURS[k] * w
  return np.clip(image.round(), 0, 255).astype(np.uint8)


def _write(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


def _read_csv(path):
  """{image_id: (category, (24, 2) float with NaN for -1 cells)}, read here independently of csv_io."""
  out = {}
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0][:2] == ['image_id', 'image_category'] and rows[0][2:] == list(kp.KEYPOINT_NAMES)
  for row in rows[1:]:
    assert len(row) == 26
    xy = np.full((24, 2), np.nan)
    for j, cell in enumerate(row[2:]):
      x, y, v = (int(t) for t in cell.split('_'))
      assert v in (1, -1) and (v == -1) == (x == -1 == y)
      if v == 1:
        xy[j] = x, y
    assert row[0] not in out
    out[row[0]] = (row[1], xy)
  return out


# (height, width, blob centres (x, y) for red, green, blue): landscape, portrait, square, odd sizes.
BLOB_CASES = [
    (120, 200, [(30, 25), (170, 40), (100, 100)]),
    (161, 90, [(70, 20), (15, 80), (50, 140)]),
    (64, 64, [(10, 50), (40, 12), (55, 55)]),
    (333, 517, [(480, 300), (40, 30), (260, 170)]),
]


@pytest.fixture(scope='module')
def blob_images(tmp_path_factory):
  root = tmp_path_factory.mktemp('blobs')
  paths = []
  for n, (h, w, centres) in enumerate(BLOB_CASES):
    path = str(root / 'Images' / 'skirt' / f'blob{n}.png')
    _write(path, blob_image(h, w, centres, sigma=max(h, w) / SIZE * 1.5))
    paths.append(path)
  return root, paths


def _run(argv, capsys):
  code = predict_cli.main(argv)
  return code, capsys.readouterr().err


def test_blob_round_trip_in_original_pixels(tmp_path, blob_images, capsys):
  root, _ = blob_images
  # skirt keypoints: waistband_left <- red, waistband_right <- green, hemline_left <- blue, hemline_right <- red.
  ckpt = _save(tmp_path, 'blob', colour_detector_variables((0, 1, 2, 0)), 'skirt')
  out = tmp_path / 'preds.csv'
  code, err = _run(['--config', os.path.join(ROOT, 'configs/skirt.py'), f'--config.input_size={SIZE}', *SLIM,
                    '--checkpoint', ckpt, '--images', str(root / 'Images'), '--out', str(out), '--batch-size', '3'],
                   capsys)
  assert code == 0, err
  rows = _read_csv(out)
  assert sorted(rows) == [f'Images/skirt/blob{n}.png' for n in range(len(BLOB_CASES))]
  for n, (h, w, centres) in enumerate(BLOB_CASES):
    category, xy = rows[f'Images/skirt/blob{n}.png']
    assert category == 'skirt'
    assert np.isnan(xy[~kp.category_mask('skirt')]).all()
    want = np.array([centres[0], centres[1], centres[2], centres[0]], np.float64)
    got = xy[kp.keypoint_indices('skirt')]
    tol = 0.75 * max(h, w) / SIZE + 0.5  # under one input pixel, plus the CSV's rounding
    np.testing.assert_allclose(got, want, atol=tol, err_msg=f'image {n} ({w}x{h})')


def _read_float_cells(path):
  """{image_id: (24, 2) float, NaN for -1 cells} and the raw cells, read here independently of csv_io."""
  with open(path, newline='') as f:
    rows = list(csv.reader(f))[1:]
  out = {}
  for row in rows:
    xy = np.full((24, 2), np.nan)
    for j, cell in enumerate(row[2:]):
      x, y, v = cell.split('_')
      if v == '1':
        xy[j] = float(x), float(y)
    out[row[0]] = (xy, row[2:])
  return out


def test_decimals_round_trip_through_evaluate(tmp_path, blob_images, capsys):
  """--decimals 3 writes the predictions to 1/1000 px (integers by default), and kpjax.evaluate reads
  both back: the NE of the decimal file is the unrounded predictions' NE, the integer file's the rounded's."""
  root, paths = blob_images
  ckpt = _save(tmp_path, 'blob', colour_detector_variables((0, 1, 2, 0)), 'skirt')
  files = {}
  for decimals in (0, 3):
    files[decimals] = tmp_path / f'preds{decimals}.csv'
    argv = ['--checkpoint', ckpt, '--images', str(root / 'Images'), '--out', str(files[decimals])]
    code, err = _run(argv + (['--decimals', str(decimals)] if decimals else []), capsys)
    assert code == 0, err
  model, variables, spec, _ = inference.load_predictor(ckpt)
  fn = inference.make_predict_fn(model)
  ids, exact, gt = [], [], []
  for n, (path, (h, w, centres)) in enumerate(zip(paths, BLOB_CASES)):
    image = images.decode_image(open(path, 'rb').read(), path)
    x, affine = spec.convention.prepare(image, SIZE)
    pixels = inference.to_24(inference.to_original(fn(variables, x[None]), affine[None], spec), 'skirt')[0]
    exact.append(np.clip(pixels, 0, [w - 1, h - 1]))
    ids.append(f'Images/skirt/blob{n}.png')
    gt.append(inference.to_24(np.array([[centres[0], centres[1], centres[2], centres[0]]]) + 0.25, 'skirt')[0])
  exact, gt = np.stack(exact), np.stack(gt)
  mask = kp.category_mask('skirt')
  written = {d: _read_float_cells(files[d]) for d in files}
  for i, iid in enumerate(ids):
    xy3, cells3 = written[3][iid]
    xy0, cells0 = written[0][iid]
    assert all(len(c.split('_')[0].split('.')[1]) == 3 for c in np.array(cells3)[mask])
    assert all('.' not in c for c in cells0)
    np.testing.assert_allclose(xy3[mask], exact[i][mask], rtol=0, atol=0.0005 + 1e-9)
    np.testing.assert_array_equal(xy0[mask], np.rint(exact[i][mask]))
  annotations = tmp_path / 'gt.csv'
  visibility = np.tile(np.where(mask, 1, -1), (len(ids), 1))
  annotations.write_text(format_rows(ids, gt, visibility, decimals=2))
  cats = ['skirt'] * len(ids)
  for decimals, pred in ((3, exact), (0, np.rint(exact))):
    want = metrics.normalized_error(pred, gt, visibility, cats)['ne']
    got = evaluate.evaluate_files(str(annotations), str(files[decimals]))[0]['ne']
    assert got == pytest.approx(want, abs=1e-5)
    assert evaluate_cli.main(['--annotations', str(annotations), '--predictions', str(files[decimals])]) == 0
  capsys.readouterr()


def format_rows(ids, xy, visibility, decimals):
  """A FashionAI CSV written here with plain string formatting (x_y_v cells, `decimals` digits)."""
  lines = [','.join(('image_id', 'image_category') + kp.KEYPOINT_NAMES)]
  for iid, points, vis in zip(ids, xy, visibility):
    cells = [f'{x:.{decimals}f}_{y:.{decimals}f}_{v}' if v >= 0 else '-1_-1_-1' for (x, y), v in zip(points, vis)]
    lines.append(','.join([iid, 'skirt'] + cells))
  return '\n'.join(lines) + '\n'


def test_flip_maps_back_to_the_same_blob(tmp_path, blob_images):
  """With twins detecting the same colour, the flipped view must land on the same original pixels."""
  _, paths = blob_images
  ckpt = _save(tmp_path, 'twins', colour_detector_variables((0, 0, 2, 2)), 'skirt')
  model, variables, spec, _ = inference.load_predictor(ckpt)
  plain = inference.make_predict_fn(model)
  flipped = inference.make_predict_fn(model, flip=True, category='skirt')
  for path, (h, w, centres) in zip(paths, BLOB_CASES):
    image = images.decode_image(open(path, 'rb').read(), path)
    x, affine = spec.convention.prepare(image, SIZE)
    a = inference.to_original(plain(variables, x[None]), affine[None], spec)[0]
    both = np.asarray(flipped(variables, x[None]))
    assert both.shape == (1, 2, 4, 2)
    b = inference.to_original(both, affine[None], spec)[0]
    un = spec.convention.flipped_to_original(both[0, 1], affine, SIZE)
    want = np.array([centres[0], centres[0], centres[2], centres[2]], np.float64)
    tol = 0.75 * max(h, w) / SIZE
    np.testing.assert_allclose(a, want, atol=tol)
    np.testing.assert_allclose(un, want, atol=tol)  # the flipped view alone, mapped back
    np.testing.assert_allclose(b, want, atol=tol)


def _init(net, seed):
  """Random variables drawn with numpy, LeCun-normal kernels and small biases (flax's own random
  initialisation takes seconds to compile on a CPU; only the shapes are taken from it)."""
  rng = np.random.default_rng(seed)
  template = jax.eval_shape(lambda: model_lib.init_variables(net, jax.random.key(0), SIZE))

  def draw(leaf):
    if len(leaf.shape) == 1:
      return rng.normal(0, 0.01, leaf.shape).astype(np.float32)
    return (rng.normal(0, 1, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)

  return jax.tree_util.tree_map(draw, template)


def _peaky(net, variables, spread=4.0):
  """Random variables with hm_conv scaled so that heatmap logits vary by ~`spread` over an image
  (freshly initialised ones hardly vary, which puts every keypoint at the image centre)."""
  probe = np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
  logits = jax.jit(lambda v, x: net.apply(v, x, method=lambda m, x: m.hm_conv(m.fcn(x))))(variables, probe)
  params = dict(variables['params'])
  params['hm_conv'] = {'kernel': np.asarray(params['hm_conv']['kernel']) * spread / float(np.std(logits))}
  return {'params': params}


def _symmetric_image(rng, height, width):
  half = rng.integers(0, 256, (height, (width + 1) // 2, 3), dtype=np.uint8)
  return np.concatenate([half, half[:, :width // 2][:, ::-1]], axis=1)


@pytest.mark.parametrize('preprocessing', ['kpjax', 'kpdem'])
def test_flip_tta_of_a_symmetric_image_is_symmetric(preprocessing):
  """A mirror-symmetric image: left/right twins mirror each other about x = (W - 1) / 2; centres sit on it."""
  rng = np.random.default_rng(0)
  category = 'dress'
  n = kp.num_keypoints(category)
  net = model_lib.CoordRegressionNetwork(n, width=0.125, num_stages=1)
  variables = _peaky(net, _init(net, 1))
  predict_fn = inference.make_predict_fn(net, flip=True, category=category)
  spec = ModelSpec(category, 0.125, 1, SIZE, conventions.get(preprocessing))
  perm = kp.flip_permutation(category)
  for h, w in [(96, 160), (121, 75), (64, 64)]:
    image = _symmetric_image(rng, h, w)
    np.testing.assert_array_equal(image, image[:, ::-1])
    x, affine = spec.convention.prepare(image, SIZE)
    xy = inference.to_original(predict_fn(variables, x[None]), affine[None], spec)[0]
    np.testing.assert_allclose(xy[:, 0] + xy[perm, 0], w - 1, atol=1e-3 * w, err_msg=f'{preprocessing} {w}x{h}')
    np.testing.assert_allclose(xy[:, 1], xy[perm, 1], atol=1e-3 * h)
    # Without the flip the random network is not symmetric: the check above is not vacuous.
    plain = inference.make_predict_fn(net)
    xy0 = inference.to_original(plain(variables, x[None]), affine[None], spec)[0]
    assert np.abs(xy0[:, 0] + xy0[perm, 0] - (w - 1)).max() > 1e-2 * w


def test_kpdem_unflip_is_the_original_image_mirror():
  """KPDEM's c = x / W: the flipped image's c' = (W - 1 - x) / W must come back to x exactly."""
  width, height = 512, 300
  affine = np.array([[SIZE / width, 0, 0], [0, SIZE / height, 0]])
  x = np.array([[0.0, 0.0], [17.0, 40.0], [511.0, 299.0]])
  flipped_c = np.stack([(width - 1 - x[:, 0]) / width, x[:, 1] / height], -1)
  exact = conventions.get('kpdem', kpdem_targets='exact')  # outputs read as x / W: the mirror alone
  np.testing.assert_allclose(exact.flipped_to_original(flipped_c, affine, SIZE), x, atol=1e-9)


def _random_checkpoint(tmp_path, category, preprocessing='kpjax'):
  net = model_lib.CoordRegressionNetwork(kp.num_keypoints(category), width=0.125, num_stages=1)
  variables = _peaky(net, _init(net, 2))
  return _save(tmp_path, f'random-{category}', variables, category, preprocessing), net, variables


def test_load_predictor_runs_the_configs_unpool(tmp_path):
  """config.model.unpool reaches the network a config loads: 'scatter' there, the fused 'mask' without a
  config; the same coordinates and heatmaps, bit for bit."""
  from kpjax.configs import base  # pylint: disable=g-import-not-at-top
  ckpt, _, _ = _random_checkpoint(tmp_path, 'skirt')
  config = base.get_config()
  config.category, config.input_size, config.model.width, config.model.num_stages = 'skirt', SIZE, 0.125, 1
  config.model.unpool = 'scatter'
  scatter_model, variables, _, _ = inference.load_predictor(ckpt, config)
  mask_model = inference.load_predictor(ckpt)[0]
  assert (scatter_model.unpool, mask_model.unpool) == ('scatter', 'mask')
  x = np.random.default_rng(4).random((2, SIZE, SIZE, 3), np.float32)
  for a, b in zip(jax.jit(scatter_model.apply)(variables, x), jax.jit(mask_model.apply)(variables, x)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_equals_the_model_called_by_hand(tmp_path, capsys):
  """An 'all' model, categories from a test.csv, a batch size that leaves a padded batch, a broken file."""
  rng = np.random.default_rng(3)
  ckpt, net, variables = _random_checkpoint(tmp_path, 'all')
  images = tmp_path / 'test' / 'Images'
  sizes = {'blouse/a.jpg': (80, 60), 'skirt/b.png': (50, 130), 'trousers/c.jpg': (100, 100),
           'dress/d.jpg': (33, 47), 'outwear/e.png': (120, 90)}
  for name, (h, w) in sizes.items():
    _write(str(images / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  (images / 'skirt' / 'broken.jpg').write_bytes(b'not a jpeg at all')
  test_csv = tmp_path / 'test' / 'test.csv'
  test_csv.write_text('image_id,image_category\n' + ''.join(
      f'Images/{n},{n.split("/")[0]}\n' for n in list(sizes) + ['skirt/broken.jpg']))
  out, draw = tmp_path / 'out' / 'preds.csv', tmp_path / 'drawings'
  code, err = _run(['--checkpoint', ckpt, '--images', str(images / '*' / '*.jpg'), str(images / '*/*.png'),
                    '--categories', str(test_csv), '--out', str(out), '--batch-size', '2', '--draw', str(draw)],
                   capsys)
  assert code == 1  # some image failed, the others were written
  assert 'broken.jpg' in err and err.count('error:') == 1
  rows = _read_csv(out)
  assert sorted(rows) == sorted(f'Images/{n}' for n in sizes)
  apply = jax.jit(net.apply)  # the network itself, not kpjax.inference
  for name in sizes:
    category, xy = rows[f'Images/{name}']
    assert category == name.split('/')[0]
    image = np.asarray(Image.open(images / name).convert('RGB'))
    x, affine = conventions.get('kpjax').prepare(image, SIZE)
    coords = np.asarray(apply(variables, x[None])[0])
    want = np.asarray(conventions.get('kpjax').coords_to_original(coords[0], affine, SIZE))
    want = np.clip(np.rint(want), 0, np.array([image.shape[1] - 1, image.shape[0] - 1]))
    mask = kp.category_mask(category)
    np.testing.assert_allclose(xy[mask], want[mask], atol=1.0)  # rounding at .5 may differ by a pixel
    assert np.isnan(xy[~mask]).all()
    with Image.open(draw / 'Images' / (os.path.splitext(name)[0] + '.png')) as im:
      im.load()
      assert im.format == 'PNG' and min(im.size) >= 384
  assert len(list(draw.rglob('*.png'))) == len(sizes)


def test_usage_errors_write_nothing(tmp_path, capsys):
  ckpt, _, _ = _random_checkpoint(tmp_path, 'all')
  img = tmp_path / 'x.png'
  _write(str(img), np.zeros((20, 30, 3), np.uint8))
  out = tmp_path / 'p.csv'
  code, err = _run(['--checkpoint', ckpt, '--images', str(img), '--out', str(out)], capsys)
  assert code == 2 and 'category' in err and '--category' in err and not out.exists()
  code, err = _run(['--checkpoint', ckpt, '--images', str(tmp_path / 'nothing*.jpg'), '--out', str(out),
                    '--category', 'skirt'], capsys)
  assert code == 2 and 'nothing*.jpg' in err and not out.exists()
  code, err = _run(['--config', os.path.join(ROOT, 'configs/skirt.py'), '--checkpoint', ckpt,
                    '--images', str(img), '--out', str(out)], capsys)
  assert code == 2 and "category = 'skirt'" in err and not out.exists()
  code, err = _run(['--checkpoint', str(tmp_path / 'missing'), '--images', str(img), '--out', str(out),
                    '--category', 'skirt'], capsys)
  assert code == 2 and 'missing' in err and not out.exists()
  with pytest.raises(SystemExit) as e:
    predict_cli.main(['--checkpoint', ckpt, '--images', str(img), '--out', str(out), '--decimals', '-1'])
  assert e.value.code == 2 and '--decimals must be 0 or more' in capsys.readouterr().err and not out.exists()
  code, err = _run(['--checkpoint', str(tmp_path / 'missing'), '--images', str(img), '--out', str(out),
                    '--category', 'skirt'], capsys)
  assert code == 2 and 'missing' in err and not out.exists()
  test_csv = tmp_path / 'test.csv'
  test_csv.write_text('image_id,image_category\nother.png,skirt\n')
  code, err = _run(['--checkpoint', ckpt, '--images', str(img), '--out', str(out), '--categories', str(test_csv)],
                   capsys)
  assert code == 2 and 'x.png' in err and not out.exists()
  assert list(tmp_path.glob('.p.csv*')) == []


def test_cli_process_reports_without_traceback(tmp_path):
  ckpt, _, _ = _random_checkpoint(tmp_path, 'trousers')
  img = tmp_path / 'Images' / 'trousers' / 'ok.png'
  _write(str(img), np.full((40, 70, 3), 200, np.uint8))
  bad = tmp_path / 'Images' / 'trousers' / 'bad.png'
  bad.write_bytes(b'\x89PNG garbage')
  out = tmp_path / 'p.csv'
  proc = subprocess.run([sys.executable, '-m', 'kpjax.predict', '--checkpoint', ckpt, '--images', str(img), str(bad),
                         '--out', str(out), '--flip'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' not in proc.stderr and 'bad.png' in proc.stderr
  rows = _read_csv(out)
  assert list(rows) == ['Images/trousers/ok.png']
  xy = rows['Images/trousers/ok.png'][1][kp.keypoint_indices('trousers')]
  assert ((xy >= 0) & (xy <= [69, 39])).all()


def test_image_ids_and_collection(tmp_path):
  assert predict.image_id('/data/test/Images/blouse/x.jpg') == 'Images/blouse/x.jpg'
  assert predict.image_id('/a/Images/b/Images/skirt/y.jpg') == 'Images/skirt/y.jpg'
  assert predict.image_id('/photos/trip/z.png', '/photos') == 'trip/z.png'
  assert predict.image_id('/photos/trip/z.png') == 'z.png'
  for rel in ('a/1.jpg', 'a/b/2.PNG', 'c/1.jpg', 'a/notes.txt', 'a/.hidden.jpg'):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'')
  items, problems = predict.collect_images([str(tmp_path / 'a'), str(tmp_path / 'a' / '1.jpg'),
                                            str(tmp_path / 'c' / '*.jpg'), str(tmp_path / 'nope')])
  assert [i for i, _ in items] == ['1.jpg', 'b/2.PNG']  # a/1.jpg once; c/1.jpg clashes with its id
  assert any('c/1.jpg' in p and 'same image id' in p for p in problems)
  assert any('nope' in p for p in problems)
  assert predict.drawing_path('/d', 'Images/skirt/x.jpg') == '/d/Images/skirt/x.png'
  assert predict.drawing_path('/d', '../up.jpg') == '/d/_/up.png'


def test_assign_categories(tmp_path):
  items = [('Images/skirt/a.jpg', '/x/a.jpg'), ('Images/blouse/b.jpg', '/x/b.jpg')]
  test_csv = tmp_path / 'test.csv'
  test_csv.write_text('image_id,image_category\nImages/skirt/a.jpg,skirt\nImages/blouse/b.jpg,blouse\n')
  # A per-category model: its own category; with a test.csv only the images listed with it.
  assert predict.assign_categories(items, 'skirt', None, None) == (
      [('Images/skirt/a.jpg', '/x/a.jpg', 'skirt'), ('Images/blouse/b.jpg', '/x/b.jpg', 'skirt')], 0)
  assert predict.assign_categories(items, 'skirt', None, str(test_csv)) == (
      [('Images/skirt/a.jpg', '/x/a.jpg', 'skirt')], 1)
  with pytest.raises(errors.PredictionError, match='disagrees with the skirt model'):
    predict.assign_categories(items, 'skirt', 'blouse', None)
  # An 'all' model: from the CSV, or one category for all.
  assert [c for *_, c in predict.assign_categories(items, 'all', None, str(test_csv))[0]] == ['skirt', 'blouse']
  assert [c for *_, c in predict.assign_categories(items, 'all', 'dress', None)[0]] == ['dress', 'dress']
  with pytest.raises(ValueError, match='unknown garment category'):
    predict.assign_categories(items, 'all', 'hat', None)
  test_csv.write_text('image_id,image_category\nImages/skirt/a.jpg,skirt\n')
  with pytest.raises(errors.PredictionError, match='no category for image Images/blouse/b.jpg'):
    predict.assign_categories(items, 'all', None, str(test_csv))


@pytest.mark.parametrize('flip', [False, True])
def test_json_keypoints_and_confidence_are_the_models(tmp_path, capsys, flip):
  """--json: unrounded pixels and confidences, equal to the network called by hand (heatmap confidence by
  kpjax.inference.confidence; with --flip the mirrored image's, keypoints swapped back, averaged); the CSV
  is the same file with or without it."""
  from kpjax.inference.confidence import keypoint_confidence  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  ckpt, net, variables = _random_checkpoint(tmp_path, 'dress')
  sizes = {'a.png': (70, 110), 'b.png': (95, 64)}
  for name, (h, w) in sizes.items():
    _write(str(tmp_path / 'Images' / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  out, out_plain, js = tmp_path / 'p.csv', tmp_path / 'plain.csv', tmp_path / 'p.json'
  argv = ['--checkpoint', ckpt, '--images', str(tmp_path / 'Images'), '--batch-size', '4']
  argv += ['--flip'] if flip else []
  code, err = _run(argv + ['--out', str(out), '--json', str(js)], capsys)
  assert code == 0, err
  assert str(js) in err
  assert _run(argv + ['--out', str(out_plain)], capsys)[0] == 0
  assert out.read_text() == out_plain.read_text()
  report = json.loads(js.read_text())
  assert report['flip'] is flip and report['checkpoint'] == ckpt
  assert [r['image_id'] for r in report['images']] == [f'Images/{n}' for n in sorted(sizes)]
  convention = conventions.get('kpjax')
  perm = kp.flip_permutation('dress')
  apply = jax.jit(net.apply)
  for record in report['images']:
    h, w = sizes[record['image_id'].split('/')[-1]]
    assert record['category'] == 'dress' and record['image'] == {'width': w, 'height': h}
    assert [k['name'] for k in record['keypoints']] == list(kp.keypoint_names('dress'))
    image = np.asarray(Image.open(tmp_path / record['image_id']).convert('RGB'))
    x, affine = convention.prepare(image, SIZE)
    coords, heatmaps = (np.asarray(a) for a in apply(variables, x[None]))
    want_xy = convention.coords_to_original(coords[0], affine, SIZE)
    want_conf = np.asarray(keypoint_confidence(heatmaps))[0]
    if flip:
      coords_f, heatmaps_f = (np.asarray(a) for a in apply(variables, x[None, :, ::-1]))
      mirrored = convention.coords_to_original(coords_f[0][perm] * [-1, 1], affine, SIZE)
      want_xy = 0.5 * (want_xy + mirrored)
      want_conf = 0.5 * (want_conf + np.asarray(keypoint_confidence(heatmaps_f))[0][perm])
    want_xy = np.clip(want_xy, 0, [w - 1, h - 1])
    got_xy = np.array([[k['x'], k['y']] for k in record['keypoints']])
    got_conf = np.array([k['confidence'] for k in record['keypoints']])
    # float32 sums in another batch shape than the hand-made batch of 1: ~1e-5 relative in the heatmap
    # logits, ~1e-3 px here; 0.01 px leaves a margin and stays 100x under a pixel.
    np.testing.assert_allclose(got_xy, want_xy, atol=0.01)
    np.testing.assert_allclose(got_conf, want_conf, atol=1e-4)
    assert ((got_conf >= 0) & (got_conf <= 1)).all()
