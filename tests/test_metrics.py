"""FashionAI NE and PCK against hand-computed cases and a plain-loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kpjax.data import keypoints as kp
from kpjax.metrics import normalized_error as metrics

K = kp.KEYPOINT_NAMES.index


def _empty(n):
  """n images with every keypoint absent: gt, pred (NaN), visibility -1."""
  return (np.zeros((n, 24, 2)), np.full((n, 24, 2), np.nan), np.full((n, 24), -1, np.int32))


def _set(gt, pred, vis, i, name, xy, pxy, v=1):
  gt[i, K(name)] = xy
  pred[i, K(name)] = pxy
  vis[i, K(name)] = v


def _skirt_blouse_trousers():
  gt, pred, vis = _empty(3)
  # Image 0, skirt: waistband 10 px apart.
  _set(gt, pred, vis, 0, 'waistband_left', (0, 0), (0, 0))  # error 0
  _set(gt, pred, vis, 0, 'waistband_right', (10, 0), (10, 2))  # 2 / 10
  _set(gt, pred, vis, 0, 'hemline_left', (0, 20), (3, 24))  # 5 / 10
  _set(gt, pred, vis, 0, 'hemline_right', (10, 20), (50, 50), v=0)  # occluded: ignored
  # Image 1, blouse: armpits 40 px apart (vertical, to exercise both axes).
  _set(gt, pred, vis, 1, 'armpit_left', (5, 0), (5, 4))  # 4 / 40
  _set(gt, pred, vis, 1, 'armpit_right', (5, 40), (5, 40))  # 0
  _set(gt, pred, vis, 1, 'neckline_left', (0, 0), (6, 8))  # 10 / 40
  _set(gt, pred, vis, 1, 'waistband_left', (0, 0), (99, 99))  # visible but not a blouse keypoint: ignored
  # Image 2, trousers: waistband 20 px apart, one visible keypoint besides.
  _set(gt, pred, vis, 2, 'waistband_left', (0, 0), (0, 0), v=0)  # occluded, still normalises
  _set(gt, pred, vis, 2, 'waistband_right', (12, 16), (12, 16), v=0)
  _set(gt, pred, vis, 2, 'crotch', (6, 30), (6, 34))  # 4 / 20
  return pred, gt, vis, np.array(['skirt', 'blouse', 'trousers'])


def test_hand_computed_case():
  pred, gt, vis, cats = _skirt_blouse_trousers()
  m = metrics.normalized_error(pred, gt, vis, cats)
  skirt = [0.0, 0.2, 0.5]
  blouse = [0.1, 0.0, 0.25]
  trousers = [0.2]
  assert m['count'] == 7 and m['images'] == 3 and m['skipped'] == 0
  assert m['ne'] == pytest.approx(np.mean(skirt + blouse + trousers))  # mean over keypoints, not categories
  assert m['ne/skirt'] == pytest.approx(np.mean(skirt))
  assert m['ne/blouse'] == pytest.approx(np.mean(blouse))
  assert m['ne/trousers'] == pytest.approx(0.2)
  assert (m['count/skirt'], m['count/blouse'], m['count/trousers']) == (3, 3, 1)
  assert 'ne/dress' not in m and 'count/outwear' not in m  # only categories present
  # PCK: errors 0, .2, .5, .1, 0, .25, .2 -> <= 0.1: 3 of 7; <= 0.2: 5 of 7 (0.2 counts).
  assert m['pck@0.1'] == pytest.approx(3 / 7)
  assert m['pck@0.2'] == pytest.approx(5 / 7)
  assert m['pck@0.2/blouse'] == pytest.approx(2 / 3)
  custom = metrics.normalized_error(pred, gt, vis, cats, pck_thresholds=(0.5,))
  assert custom['pck@0.5'] == 1.0 and 'pck@0.1' not in custom


def test_integer_categories_equal_names():
  pred, gt, vis, cats = _skirt_blouse_trousers()
  ints = np.array([kp.category_index(c) for c in cats])
  assert metrics.normalized_error(pred, gt, vis, ints) == metrics.normalized_error(pred, gt, vis, list(cats))


def test_each_category_normalisation_pair():
  """Every category normalises by its own pair: armpits or waistband, never the other."""
  for cat in kp.CATEGORIES:
    gt, pred, vis = _empty(1)
    a, b = kp.normalization_indices(cat)
    gt[0, a], gt[0, b] = (0, 0), (30, 40)  # distance 50
    vis[0, [a, b]] = 1
    pred[0, a], pred[0, b] = (0, 0), (30, 40)
    other = 'waistband' if cat in ('blouse', 'dress', 'outwear') else 'armpit'
    gt[0, K(f'{other}_left')], gt[0, K(f'{other}_right')] = (0, 0), (1, 0)  # decoy distance 1
    vis[0, [K(f'{other}_left'), K(f'{other}_right')]] = 0
    j = K(kp.CATEGORY_KEYPOINTS[cat][-1])  # never a normalisation keypoint
    assert j not in (a, b)
    gt[0, j], pred[0, j], vis[0, j] = (10, 10), (10, 20), 1  # 10 px off -> 10 / 50
    m = metrics.normalized_error(pred, gt, vis, [cat])
    assert m['ne'] == pytest.approx(0.2 / 3), cat
    assert m[f'ne/{cat}'] == m['ne']


def test_absent_or_degenerate_normalisation_is_skipped_not_divided():
  gt, pred, vis = _empty(3)
  for i in range(3):
    _set(gt, pred, vis, i, 'waistband_left', (0, 0), (1, 0))
    _set(gt, pred, vis, i, 'waistband_right', (10, 0), (10, 0))
  vis[1, K('waistband_right')] = -1  # absent normalisation keypoint
  gt[2, K('waistband_right')] = (0, 0)  # zero distance
  pred[2, K('waistband_right')] = (0, 0)
  with np.errstate(all='raise'):  # no division by zero anywhere
    m = metrics.normalized_error(pred, gt, vis, ['skirt'] * 3)
    dist, ok = metrics.normalization_distances(gt, vis, ['skirt'] * 3)
  assert ok.tolist() == [True, False, False]
  assert dist[0] == 10 and np.isnan(dist[1:]).all()
  assert m['skipped'] == 2 and m['skipped/skirt'] == 2 and m['images'] == 1
  assert m['count'] == 2 and m['ne'] == pytest.approx(0.05)


def test_nothing_scored_gives_nan_not_error():
  gt, pred, vis = _empty(1)
  m = metrics.normalized_error(pred, gt, vis, ['dress'])
  assert m['count'] == 0 and m['skipped'] == 1 and math.isnan(m['ne']) and math.isnan(m['pck@0.1'])
  m = metrics.normalized_error(np.zeros((0, 24, 2)), np.zeros((0, 24, 2)), np.zeros((0, 24)), [])
  assert m['count'] == 0 and math.isnan(m['ne'])


def test_missing_prediction_for_scored_keypoint_raises():
  pred, gt, vis, cats = _skirt_blouse_trousers()
  pred[1, K('neckline_left')] = np.nan
  with pytest.raises(ValueError, match='image 1.*neckline_left'):
    metrics.normalized_error(pred, gt, vis, cats)
  pred, gt, vis, cats = _skirt_blouse_trousers()
  pred[0, K('hemline_right')] = np.nan  # occluded: not scored, so a NaN there is fine
  assert metrics.normalized_error(pred, gt, vis, cats)['count'] == 7


def test_bad_inputs():
  pred, gt, vis, cats = _skirt_blouse_trousers()
  with pytest.raises(ValueError, match='predicted keypoints must be'):
    metrics.normalized_error(pred[:, :13], gt, vis, cats)
  with pytest.raises(ValueError, match='unknown garment category'):
    metrics.normalized_error(pred, gt, vis, ['skirt', 'blouse', 'hat'])
  with pytest.raises(ValueError, match='out of range'):
    metrics.normalized_error(pred, gt, vis, [0, 1, 7])
  with pytest.raises(ValueError, match='visibility must be'):
    metrics.normalized_error(pred, gt, vis[:2], cats)


def _loop_reference(pred, gt, vis, cats):
  """The definition, one keypoint at a time."""
  errs = {c: [] for c in kp.CATEGORIES}
  for i, cat in enumerate(cats):
    a, b = kp.normalization_indices(cat)
    if vis[i, a] < 0 or vis[i, b] < 0:
      continue
    norm = math.dist(gt[i, a], gt[i, b])
    if norm == 0:
      continue
    for name in kp.CATEGORY_KEYPOINTS[cat]:
      j = K(name)
      if vis[i, j] == 1:
        errs[cat].append(math.dist(pred[i, j], gt[i, j]) / norm)
  return errs


def test_matches_loop_reference_on_random_data():
  rng = np.random.default_rng(0)
  n = 200
  cats = rng.choice(kp.CATEGORIES, n)
  gt = rng.uniform(0, 512, (n, 24, 2)).round()
  pred = gt + rng.normal(0, 15, (n, 24, 2))
  vis = rng.choice([-1, 0, 1], (n, 24), p=[0.15, 0.25, 0.6])
  m = metrics.normalized_error(pred, gt, vis, cats, pck_thresholds=(0.05,))
  ref = _loop_reference(pred, gt, vis, cats)
  everything = sum(ref.values(), [])
  assert m['count'] == len(everything)
  assert m['ne'] == pytest.approx(np.mean(everything), rel=1e-12)
  assert m['pck@0.05'] == pytest.approx(np.mean(np.array(everything) <= 0.05))
  for cat, values in ref.items():
    assert m[f'count/{cat}'] == len(values)
    assert m[f'ne/{cat}'] == pytest.approx(np.mean(values), rel=1e-12)
  errors, scored = metrics.keypoint_errors(pred, gt, vis, cats)
  # Every scored keypoint's error is one the loop reference computed, and only those are scored.
  assert scored.sum() == len(everything)
  assert sorted(errors[scored]) == pytest.approx(sorted(everything), rel=1e-12)
  assert np.isnan(errors[~scored]).all()
