"""Drawings and curve plots: the right things land on the right pixels, and the files are images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kpjax.data import keypoints as kp
from kpjax.inference import drawing as vis
from kpjax.train import curves

K = kp.KEYPOINT_NAMES.index


def test_skeleton_uses_only_each_categorys_keypoints():
  for cat in kp.CATEGORIES:
    names = set(kp.CATEGORY_KEYPOINTS[cat])
    edges = vis.SKELETON[cat]
    assert edges, cat
    for a, b in edges:
      assert a in names and b in names, (cat, a, b)
    # Every keypoint is on the outline, and the outline is left/right symmetric.
    assert {n for e in edges for n in e} == names, cat
    mirrored = {frozenset((vis._mirror(a), vis._mirror(b))) for a, b in edges}
    assert mirrored == {frozenset(e) for e in edges}, cat


def _close(pixel, color, tol=40):
  return np.abs(np.asarray(pixel, int) - np.asarray(color, int)).max() <= tol


def test_draw_keypoints_colours_sides_and_skips_absent():
  image = np.full((100, 160, 3), 128, np.uint8)  # non-square
  coords = np.full((24, 2), np.nan)
  coords[K('waistband_left')] = (30, 20)
  coords[K('waistband_right')] = (130, 20)
  coords[K('hemline_left')] = (20, 80)
  coords[K('hemline_right')] = (140, 80)
  visibility = np.full(24, 1)
  visibility[K('hemline_right')] = 0  # occluded: hollow ring
  out = vis.draw_keypoints(image, coords, 'skirt', visibility, labels=False, min_size=0)
  assert out.size == (160, 100) and out.mode == 'RGB'
  px = np.asarray(out)
  assert _close(px[20, 30], vis.LEFT_COLOR)
  assert _close(px[20, 130], vis.RIGHT_COLOR)
  assert _close(px[80, 20], vis.LEFT_COLOR)
  assert (np.abs(px[75:86, 134:147].astype(int) - vis.RIGHT_COLOR).max(-1) <= 40).any()  # the ring
  assert _close(px[50, 25], vis.LEFT_COLOR)  # skeleton: waistband_left -> hemline_left, both left
  assert _close(px[20, 80], vis.EDGE_CENTER_COLOR)  # waistband_left -> right crosses the centre
  assert _close(px[90, 80], (128, 128, 128), tol=0)  # far from everything

  # L-row input equals the 24-row input; a NaN point (and its edges) disappear.
  short = coords[kp.keypoint_indices('skirt')]
  again = vis.draw_keypoints(image, short, 'skirt', visibility[kp.keypoint_indices('skirt')],
                             labels=False, min_size=0)
  np.testing.assert_array_equal(np.asarray(again), px)
  alone = coords.copy()
  alone[[K('waistband_left'), K('waistband_right'), K('hemline_left')]] = np.nan
  ring = np.asarray(vis.draw_keypoints(image, alone, 'skirt', visibility, labels=False, min_size=0))
  assert _close(ring[80, 140], (128, 128, 128), tol=0)  # occluded: the ring's centre is untouched
  assert (np.abs(ring[75:86, 134:147].astype(int) - vis.RIGHT_COLOR).max(-1) <= 40).any()
  coords[K('hemline_left')] = np.nan
  gone = np.asarray(vis.draw_keypoints(image, coords, 'skirt', labels=False, min_size=0))
  assert _close(gone[80, 20], (128, 128, 128), tol=0) and _close(gone[50, 25], (128, 128, 128), tol=0)


def test_small_images_are_enlarged_with_their_keypoints():
  image = np.zeros((32, 64, 3), np.float32)  # floats in [0, 1] are accepted too
  coords = np.full((24, 2), np.nan)
  coords[K('crotch')] = (10, 20)
  out = vis.draw_keypoints(image, coords, 'trousers', labels=True, min_size=128)
  assert out.size == (256, 128)
  px = np.asarray(out)
  assert _close(px[round(20.5 * 4 - 0.5), round(10.5 * 4 - 0.5)], vis.CENTER_COLOR)


def test_labels_and_titles_draw_text():
  image = np.full((64, 64, 3), 128, np.uint8)
  coords = np.full((24, 2), np.nan)
  coords[K('crotch')] = (8, 8)
  plain = np.asarray(vis.draw_keypoints(image, coords, 'trousers', labels=False, min_size=256))
  named = np.asarray(vis.draw_keypoints(image, coords, 'trousers', labels=True, min_size=256, title='pred'))
  diff = np.abs(plain.astype(int) - named).max(-1) > 0
  assert diff[:, 60:].any() and diff[:30, :60].any()  # the name right of the point, the title top-left


def test_bad_inputs():
  with pytest.raises(ValueError, match='skirt has 4 keypoints'):
    vis.draw_keypoints(np.zeros((8, 8, 3)), np.zeros((7, 2)), 'skirt')
  with pytest.raises(ValueError, match='unknown garment category'):
    vis.draw_keypoints(np.zeros((8, 8, 3)), np.zeros((24, 2)), 'hat')
  with pytest.raises(ValueError, match='expected an image'):
    vis.draw_keypoints(np.zeros((8, 8, 5)), np.zeros((24, 2)), 'skirt')


def test_prediction_side_by_side_grid_and_files(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
  gt = rng.uniform(10, 80, (24, 2))
  pred = gt + rng.normal(0, 3, (24, 2))
  alone = vis.draw_prediction(image, pred, 'dress')
  both = vis.draw_prediction(image, pred, 'dress', gt, np.ones(24))
  assert both.height == alone.height and both.width == 2 * alone.width + 4
  also_all = vis.draw_prediction(image, pred, 'all')  # every keypoint, no skeleton
  assert also_all.size == alone.size
  path = vis.save_grid([both, alone, image], tmp_path / 'sub' / 'grid.png', columns=2, max_cell=300)
  with Image.open(path) as im:
    im.load()
    assert im.format == 'PNG' and im.mode == 'RGB'
    assert im.width == 2 * 300 + 4  # the widest tile shrunk to 300
  assert [p.name for p in (tmp_path / 'sub').iterdir()] == ['grid.png']  # no temp file left


def test_plot_curves(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [{'step': s, 'train/loss': 2.0 / s} for s in range(1, 101)]
  lines += [{'step': s, 'eval/ne': 0.5 / s ** 0.5, 'eval/ne/skirt': 0.4 / s ** 0.5, 'eval/ne/trousers': float('nan')}
            for s in (25, 50, 100)]
  text = '\n'.join(json.dumps(r) for r in lines) + '\n{"step": 101, "train/lo'  # a line still being written
  path.write_text(text)
  out = curves.plot_curves(path, tmp_path / 'curves.png')
  with Image.open(out) as im:
    im.load()
    assert im.format == 'PNG' and im.size == (1000, 400)
    px = np.asarray(im.convert('RGB'))
  assert (px < 250).any(-1).mean() > 0.02  # something was drawn
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('{"step": 1, "other": 3}\n')
  with pytest.raises(ValueError, match='no .train/loss. or .eval/ne. values'):
    curves.plot_curves(empty, tmp_path / 'none.png')
  assert not (tmp_path / 'none.png').exists()
  broken = tmp_path / 'broken.jsonl'
  broken.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match='broken.jsonl:2'):
    curves.plot_curves(broken, tmp_path / 'x.png')


def test_save_prediction_grid(tmp_path):
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 255, (60, 90, 3), dtype=np.uint8), rng.integers(0, 255, (100, 50, 3), dtype=np.uint8)]
  gts = [rng.uniform(5, 45, (24, 2)) for _ in images]
  preds = [g + 2 for g in gts]
  path = vis.save_prediction_grid(tmp_path / 'eval_000100.png', images, preds, [kp.category_index('skirt'), 'blouse'],
                                  gts, [np.ones(24), np.ones(24)], columns=2, min_size=128)
  with Image.open(path) as im:
    im.load()
    assert im.format == 'PNG' and im.width > 2 * 2 * 128 and im.height >= 128
