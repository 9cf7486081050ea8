"""kpjax.data.synthetic: the FashionAI layout, exact labels, determinism, and the garments' geometry."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from kpjax.data import keypoints as kp
from kpjax.data import fashionai_csv as csv_io
from kpjax.data import geometry as preprocess
from kpjax.data import synthetic
from kpjax.data import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp('syn') / 'set'), 40, seed=3, num_test=6)


def _digest(root: str) -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def test_layout_and_csv_round_trip(small_set):
  rows = list(csv_io.read_annotations(os.path.join(small_set, 'train', 'Annotations', 'train.csv')))
  assert len(rows) == 40
  assert len({r.image_id for r in rows}) == 40
  seen_vis = set()
  for r in rows:
    category, name = r.image_id.split('/')[1:]
    assert r.image_id.startswith('Images/') and category == r.category and name.endswith('.jpg')
    # Exactly the category's keypoints are labelled (1 or 0) or absent (-1); no others.
    mask = kp.category_mask(r.category)
    assert np.all(r.visibility[~mask] == -1)
    seen_vis.update(r.visibility[mask].tolist())
    path = os.path.join(small_set, 'train', r.image_id)
    with open(path, 'rb') as f:
      image = images.decode_image(f.read(), path)
    h, w = image.shape[:2]
    assert synthetic.MIN_SIDE <= min(h, w) and max(h, w) <= synthetic.MAX_SIDE
    labelled = r.visibility >= 0
    assert np.all((r.keypoints[labelled] >= 0) & (r.keypoints[labelled] <= [w - 1, h - 1]))
    # The normalisation pair is always visible, so every image can be scored.
    a, b = kp.normalization_indices(r.category)
    assert r.visibility[a] == 1 and r.visibility[b] == 1
  assert {r.category for r in rows} == set(kp.CATEGORIES)
  assert seen_vis == {1, 0, -1}
  sizes = set()
  for r in rows:
    from PIL import Image
    with Image.open(os.path.join(small_set, 'train', r.image_id)) as im:
      sizes.add(im.size)
  assert len(sizes) > 5 and any(w != h for w, h in sizes)


def test_test_split_has_no_labels(small_set):
  cats = csv_io.read_categories(os.path.join(small_set, 'test', 'test.csv'))
  assert len(cats) == 6
  with open(os.path.join(small_set, 'test', 'test.csv')) as f:
    assert f.readline().strip() == 'image_id,image_category'
    assert all(line.count(',') == 1 for line in f)
  for image_id, category in cats.items():
    assert image_id.startswith(f'Images/{category}/')
    assert os.path.isfile(os.path.join(small_set, 'test', image_id))


def test_deterministic_for_a_seed(small_set, tmp_path):
  again = synthetic.generate(str(tmp_path / 'again'), 40, seed=3, num_test=6)
  assert _digest(again) == _digest(small_set)
  other = synthetic.generate(str(tmp_path / 'other'), 40, seed=4, num_test=6)
  a, b = _digest(small_set), _digest(other)
  assert a['train/Annotations/train.csv'] != b['train/Annotations/train.csv']
  assert not set(a.values()) & set(b.values()) - {a['test/test.csv']}


def test_refuses_a_non_empty_out_dir(tmp_path):
  (tmp_path / 'x').mkdir()
  (tmp_path / 'x' / 'keep.txt').write_text('mine')
  with pytest.raises(ValueError, match='not empty'):
    synthetic.generate(str(tmp_path / 'x'), 2, seed=0)
  assert os.listdir(tmp_path / 'x') == ['keep.txt']


def _points(g, names):
  return {n: g.points[n] for n in names}


@pytest.mark.parametrize('category', kp.CATEGORIES)
def test_symmetric_garments_mirror_and_left_is_image_right(category):
  rng = np.random.default_rng(0)
  for _ in range(20):
    g = synthetic.garment_shape(category, rng, symmetric=True)
    for name, p in g.points.items():
      twin = kp._mirror_name(name)  # pylint: disable=protected-access
      assert twin in g.points, (name, twin)
      np.testing.assert_allclose(g.points[twin], [-p[0], p[1]], atol=1e-9)
      if '_left' in name:
        assert p[0] > 0  # the garment's left is +x: the image's right when it faces the viewer
      elif '_right' not in name:
        assert abs(p[0]) < 1e-9  # centre points on the axis
    assert set(g.points) <= set(kp.CATEGORY_KEYPOINTS[category])


def test_rendered_flip_maps_left_onto_right():
  """An unrotated symmetric garment centred in the image: a flip maps each left keypoint onto its twin."""
  rng = np.random.default_rng(1)
  for category in kp.CATEGORIES:
    for _ in range(5):
      ex = synthetic.render(category, rng, width=200, height=200, symmetric=True, rotation_deg=0.0,
                            clutter=False)
      idx = kp.keypoint_indices(category)
      perm = kp.flip_permutation(category)
      pts, vis = ex.keypoints[idx], ex.visibility[idx]
      ok = (vis >= 0) & (vis[perm] >= 0)
      # Flipped x of the left keypoint == x of the right twin, up to the garment's offset from the centre.
      flipped = pts.copy()
      flipped[:, 0] = -flipped[:, 0]
      diff = flipped[perm][ok] - pts[ok]
      np.testing.assert_allclose(diff - diff.mean(0), 0, atol=1e-3)
      np.testing.assert_allclose(diff[:, 1], 0, atol=1e-3)


def test_keypoints_lie_on_the_drawn_garment():
  rng = np.random.default_rng(2)
  for i in range(25):
    category = kp.CATEGORIES[i % 5]
    ex = synthetic.render(category, rng)
    h, w = ex.mask.shape
    for j in np.flatnonzero(ex.visibility >= 0):
      x, y = np.round(ex.keypoints[j]).astype(int)
      window = ex.mask[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
      assert window.any(), (category, kp.KEYPOINT_NAMES[j], x, y, w, h)


def test_trousers_geometry():
  rng = np.random.default_rng(3)
  col = {n: kp.KEYPOINT_NAMES.index(n) for n in kp.CATEGORY_KEYPOINTS['trousers']}
  for _ in range(30):
    ex = synthetic.render('trousers', rng, width=256, height=256, rotation_deg=0.0, clutter=False)
    p = ex.keypoints
    # Crotch between the inner bottoms and above every bottom; the waistband above the crotch.
    assert p[col['bottom_right_in'], 0] < p[col['crotch'], 0] < p[col['bottom_left_in'], 0]
    assert p[col['crotch'], 1] < min(p[col[n], 1] for n in col if n.startswith('bottom'))
    assert max(p[col['waistband_left'], 1], p[col['waistband_right'], 1]) < p[col['crotch'], 1]
    # Outer bottoms outside the inner ones; garment's left on the image's right.
    assert p[col['bottom_left_out'], 0] > p[col['bottom_left_in'], 0]
    assert p[col['bottom_right_out'], 0] < p[col['bottom_right_in'], 0]
    assert p[col['waistband_left'], 0] > p[col['waistband_right'], 0]


def test_tops_geometry():
  rng = np.random.default_rng(4)
  for category in ('blouse', 'dress', 'outwear'):
    names = kp.CATEGORY_KEYPOINTS[category]
    for _ in range(10):
      g = synthetic.garment_shape(category, rng)
      p = g.points
      for side in ('left', 'right'):
        assert p[f'neckline_{side}'][1] < p[f'shoulder_{side}'][1] < p[f'armpit_{side}'][1]
        hem = p[f'top_hem_{side}'] if f'top_hem_{side}' in names else p[f'hemline_{side}']
        assert p[f'armpit_{side}'][1] < hem[1]
        if f'waistline_{side}' in names:
          assert p[f'armpit_{side}'][1] < p[f'waistline_{side}'][1] < hem[1]
      if 'center_front' in names:
        assert p['neckline_left'][1] < p['center_front'][1] and abs(p['center_front'][0]) < 1e-9


def test_cli(tmp_path):
  out = tmp_path / 'cli'
  res = subprocess.run([sys.executable, '-m', 'kpjax.data.synthetic', '--out', str(out), '--num-images', '5',
                        '--seed', '7'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert len(list(csv_io.read_annotations(str(out / 'train' / 'Annotations' / 'train.csv')))) == 5
  res = subprocess.run([sys.executable, '-m', 'kpjax.data.synthetic', '--out', str(out), '--num-images', '5'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and res.stderr.startswith('error: ') and 'Traceback' not in res.stderr
