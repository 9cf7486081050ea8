"""FashionAI's normalised error (NE) and PCK: the one implementation, shared by training and the CLIs.

For every image the normalisation distance is the ground-truth distance between its category's
normalisation pair (armpit_left-armpit_right for blouse, dress, outwear; waistband_left-waistband_right
for skirt, trousers; `kpjax.data.keypoints.NORMALIZATION_PAIR`). Every *visible* (v = 1) ground-truth
keypoint of the image's category contributes `|pred - gt| / distance`; NE is the mean of these over
all contributing keypoints of all images (overall, and per category over that category's images).
PCK@t is the fraction of the same keypoints whose normalised error is at most t.

Any keypoint set's categories may name such a pair (kpjax.data.keypoint_sets): every function takes
the set (FashionAI's by default) and arrays of its K keypoints instead of the 24.

An image whose normalisation keypoints are absent (v = -1) or coincide (distance 0), or whose category
has no pair, cannot be normalised: it contributes nothing and is counted under `skipped`
(`normalization_distances` says which), never divided by zero. All arrays are numpy; nothing here needs JAX.
"""

from __future__ import annotations

from typing import Sequence

import functools

import numpy as np

from kpjax.data import keypoint_sets
from kpjax.data import keypoints as kp

DEFAULT_PCK_THRESHOLDS: tuple[float, ...] = (0.1, 0.2)
_FASHIONAI = kp.FASHIONAI


@functools.lru_cache(maxsize=16)
def _tables(kset: keypoint_sets.KeypointSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(C, K) bool: which keypoints belong to each category; (C, 2) int: each one's normalisation pair (0, 0
  where it has none); (C,) bool: whether it has one."""
  masks = np.stack([kset.category_mask(c) for c in kset.category_names])
  pairs = [kset.normalization_indices(c) for c in kset.category_names]
  has = np.array([p is not None for p in pairs])
  return masks, np.array([p or (0, 0) for p in pairs], dtype=np.int64), has


def category_indices(categories, keypoint_set: keypoint_sets.KeypointSet = _FASHIONAI) -> np.ndarray:
  """Categories as ints (N,) into the set's categories (`kp.CATEGORIES`), from ints or names; ValueError on others."""
  names = keypoint_set.category_names
  arr = np.asarray(categories)
  if arr.ndim != 1:
    raise ValueError(f'categories must be a 1-D sequence (N,); got shape {arr.shape}')
  if arr.size == 0:
    return np.zeros((0,), np.int64)
  if arr.dtype.kind in 'iu':
    bad = (arr < 0) | (arr >= len(names))
    if bad.any():
      raise ValueError(f'category index {int(arr[bad][0])} out of range; expected 0..{len(names) - 1} '
                       f'({", ".join(names)})')
    return arr.astype(np.int64)
  return np.array([keypoint_set.category_index(str(c)) for c in arr], dtype=np.int64)


def _check_shapes(pred: np.ndarray, gt: np.ndarray, visibility: np.ndarray, cats: np.ndarray, k: int) -> None:
  n = cats.shape[0]
  want = (n, k, 2)
  if gt.shape != want:
    raise ValueError(f'ground-truth keypoints must be (N, {k}, 2) with N = {n} images; got {gt.shape}')
  if pred is not None and pred.shape != want:
    raise ValueError(f'predicted keypoints must be (N, {k}, 2) with N = {n} images; got {pred.shape}')
  if visibility.shape != want[:2]:
    raise ValueError(f'visibility must be (N, {k}) with N = {n} images; got {visibility.shape}')


def normalization_distances(gt, visibility, categories,
                            keypoint_set: keypoint_sets.KeypointSet = _FASHIONAI) -> tuple[np.ndarray, np.ndarray]:
  """Each image's normalisation distance in pixels and whether it is usable.

  Args:
    gt: (N, K, 2) ground-truth pixels (x, y) (K = 24 for FashionAI).
    visibility: (N, K) in {1, 0, -1}.
    categories: (N,) ints into the set's categories (`kp.CATEGORIES`) or names.
    keypoint_set: the set the arrays hold.

  Returns:
    distance (N,) float64 (NaN where unusable) and ok (N,) bool: the category has a normalisation pair,
    both its keypoints are annotated (v >= 0) and apart (distance > 0).
  """
  gt = np.asarray(gt, np.float64)
  visibility = np.asarray(visibility)
  cats = category_indices(categories, keypoint_set)
  _check_shapes(None, gt, visibility, cats, keypoint_set.num_keypoints)
  _, pairs, has = _tables(keypoint_set)
  pair = pairs[cats]  # (N, 2)
  rows = np.arange(cats.shape[0])[:, None]
  ends = gt[rows, pair]  # (N, 2, 2)
  annotated = (visibility[rows, pair] >= 0).all(-1) & has[cats]
  distance = np.linalg.norm(ends[:, 0] - ends[:, 1], axis=-1)
  ok = annotated & np.isfinite(distance) & (distance > 0)
  return np.where(ok, distance, np.nan), ok


def scored_mask(visibility, categories, keypoint_set: keypoint_sets.KeypointSet = _FASHIONAI) -> np.ndarray:
  """(N, K) bool: the keypoints NE scores before normalisation checks (visible and in the category)."""
  cats = category_indices(categories, keypoint_set)
  return (np.asarray(visibility) == 1) & _tables(keypoint_set)[0][cats]


def keypoint_errors(pred, gt, visibility, categories,
                    keypoint_set: keypoint_sets.KeypointSet = _FASHIONAI) -> tuple[np.ndarray, np.ndarray]:
  """Normalised error of every scored keypoint.

  Returns:
    errors (N, K) float64 (NaN where not scored) and scored (N, K) bool: visible, in the image's
    category, and in an image whose normalisation distance is usable.

  Raises:
    ValueError: on shape mismatches, or a non-finite prediction for a scored keypoint.
  """
  pred = np.asarray(pred, np.float64)
  gt = np.asarray(gt, np.float64)
  visibility = np.asarray(visibility)
  cats = category_indices(categories, keypoint_set)
  _check_shapes(pred, gt, visibility, cats, keypoint_set.num_keypoints)
  distance, ok = normalization_distances(gt, visibility, cats, keypoint_set)
  scored = scored_mask(visibility, cats, keypoint_set) & ok[:, None]
  bad = scored & ~np.isfinite(pred).all(-1)
  if bad.any():
    i, j = np.argwhere(bad)[0]
    raise ValueError(f'image {i} has no finite prediction for keypoint {keypoint_set.keypoints[j]}, which its '
                     f'ground truth marks visible ({int(bad.sum())} such keypoints in all)')
  dist = np.linalg.norm(np.where(scored[..., None], pred - gt, 0.0), axis=-1)
  errors = np.where(scored, dist / np.where(ok, distance, 1.0)[:, None], np.nan)
  return errors, scored


def _summary(errors: np.ndarray, scored: np.ndarray, thresholds: Sequence[float]) -> dict[str, float]:
  count = int(scored.sum())
  values = errors[scored]
  out = {'ne': float(values.mean()) if count else float('nan'), 'count': count}
  for t in thresholds:
    out[f'pck@{t:g}'] = float((values <= t).mean()) if count else float('nan')
  return out


def normalized_error(pred, gt, visibility, categories,
                     pck_thresholds: Sequence[float] = DEFAULT_PCK_THRESHOLDS,
                     keypoint_set: keypoint_sets.KeypointSet = _FASHIONAI) -> dict[str, float]:
  """FashionAI NE and PCK, overall and per category.

  Args:
    pred: (N, K, 2) predicted pixels (x, y) in the original images (K = 24 for FashionAI); entries
      outside an image's category are ignored (may be NaN).
    gt: (N, K, 2) ground-truth pixels.
    visibility: (N, K) ground-truth visibility in {1, 0, -1}; only 1 is scored.
    categories: (N,) each image's category (ints into the set's categories, `kp.CATEGORIES`, or names).
    pck_thresholds: t values for `pck@t`.
    keypoint_set: the set the arrays hold (FashionAI's by default).

  Returns:
    {'ne', 'count' (scored keypoints), 'images' (images normalised), 'skipped' (images that could not
    be normalised), 'pck@<t>'} and the same per category present in the input as '<key>/<category>'
    (e.g. 'ne/skirt', 'count/skirt'). NE/PCK are NaN where nothing was scored. Counts are ints. Images
    of a category without a normalising pair are neither scored nor counted.
  """
  cats = category_indices(categories, keypoint_set)
  errors, scored = keypoint_errors(pred, gt, visibility, cats, keypoint_set)
  _, ok = normalization_distances(gt, visibility, cats, keypoint_set)
  out: dict[str, float] = _summary(errors, scored, pck_thresholds)
  paired = _tables(keypoint_set)[2][cats]  # NE covers the categories that have a pair (FashionAI's: all)
  out['images'] = int(ok.sum())
  out['skipped'] = int((~ok & paired).sum())
  for ci in np.unique(cats[paired]):
    name = keypoint_set.category_names[ci]
    sel = cats == ci
    for key, value in _summary(errors[sel], scored[sel], pck_thresholds).items():
      out[f'{key}/{name}'] = value
    out[f'images/{name}'] = int(ok[sel].sum())
    out[f'skipped/{name}'] = int((~ok[sel]).sum())
  return out
