"""FashionAI's normalised error (NE) and PCK: the one implementation, shared by training and the CLIs.

For every image the normalisation distance is the ground-truth distance between its category's
normalisation pair (armpit_left-armpit_right for blouse, dress, outwear; waistband_left-waistband_right
for skirt, trousers; `kpjax.data.keypoints.NORMALIZATION_PAIR`). Every *visible* (v = 1) ground-truth
keypoint of the image's category contributes `|pred - gt| / distance`; NE is the mean of these over
all contributing keypoints of all images (overall, and per category over that category's images).
PCK@t is the fraction of the same keypoints whose normalised error is at most t.

An image whose normalisation keypoints are absent (v = -1) or coincide (distance 0) cannot be
normalised: it contributes nothing and is counted under `skipped` (`normalization_distances` says
which), never divided by zero. All arrays are numpy; nothing here needs JAX.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kpjax.data import keypoints as kp

DEFAULT_PCK_THRESHOLDS: tuple[float, ...] = (0.1, 0.2)

# (5, 24) bool: which CSV keypoints belong to each category; (5, 2) int: each one's normalisation pair.
_CATEGORY_MASKS = np.stack([kp.category_mask(c) for c in kp.CATEGORIES])
_NORM_PAIRS = np.array([kp.normalization_indices(c) for c in kp.CATEGORIES], dtype=np.int64)


def category_indices(categories) -> np.ndarray:
  """Categories as ints (N,) into `kp.CATEGORIES`, from ints or names; raises ValueError on others."""
  arr = np.asarray(categories)
  if arr.ndim != 1:
    raise ValueError(f'categories must be a 1-D sequence (N,); got shape {arr.shape}')
  if arr.size == 0:
    return np.zeros((0,), np.int64)
  if arr.dtype.kind in 'iu':
    bad = (arr < 0) | (arr >= len(kp.CATEGORIES))
    if bad.any():
      raise ValueError(f'category index {int(arr[bad][0])} out of range; expected 0..{len(kp.CATEGORIES) - 1} '
                       f'({", ".join(kp.CATEGORIES)})')
    return arr.astype(np.int64)
  return np.array([kp.category_index(str(c)) for c in arr], dtype=np.int64)


def _check_shapes(pred: np.ndarray, gt: np.ndarray, visibility: np.ndarray, cats: np.ndarray) -> None:
  n = cats.shape[0]
  want = (n, kp.NUM_KEYPOINTS, 2)
  if gt.shape != want:
    raise ValueError(f'ground-truth keypoints must be (N, {kp.NUM_KEYPOINTS}, 2) with N = {n} images; got {gt.shape}')
  if pred is not None and pred.shape != want:
    raise ValueError(f'predicted keypoints must be (N, {kp.NUM_KEYPOINTS}, 2) with N = {n} images; got {pred.shape}')
  if visibility.shape != want[:2]:
    raise ValueError(f'visibility must be (N, {kp.NUM_KEYPOINTS}) with N = {n} images; got {visibility.shape}')


def normalization_distances(gt, visibility, categories) -> tuple[np.ndarray, np.ndarray]:
  """Each image's normalisation distance in pixels and whether it is usable.

  Args:
    gt: (N, 24, 2) ground-truth pixels (x, y).
    visibility: (N, 24) in {1, 0, -1}.
    categories: (N,) ints into `kp.CATEGORIES` or names.

  Returns:
    distance (N,) float64 (NaN where unusable) and ok (N,) bool: both normalisation keypoints
    annotated (v >= 0) and apart (distance > 0).
  """
  gt = np.asarray(gt, np.float64)
  visibility = np.asarray(visibility)
  cats = category_indices(categories)
  _check_shapes(None, gt, visibility, cats)
  pair = _NORM_PAIRS[cats]  # (N, 2)
  rows = np.arange(cats.shape[0])[:, None]
  ends = gt[rows, pair]  # (N, 2, 2)
  annotated = (visibility[rows, pair] >= 0).all(-1)
  distance = np.linalg.norm(ends[:, 0] - ends[:, 1], axis=-1)
  ok = annotated & np.isfinite(distance) & (distance > 0)
  return np.where(ok, distance, np.nan), ok


def scored_mask(visibility, categories) -> np.ndarray:
  """(N, 24) bool: the keypoints NE scores before normalisation checks (visible and in the category)."""
  cats = category_indices(categories)
  return (np.asarray(visibility) == 1) & _CATEGORY_MASKS[cats]


def keypoint_errors(pred, gt, visibility, categories) -> tuple[np.ndarray, np.ndarray]:
  """Normalised error of every scored keypoint.

  Returns:
    errors (N, 24) float64 (NaN where not scored) and scored (N, 24) bool: visible, in the image's
    category, and in an image whose normalisation distance is usable.

  Raises:
    ValueError: on shape mismatches, or a non-finite prediction for a scored keypoint.
  """
  pred = np.asarray(pred, np.float64)
  gt = np.asarray(gt, np.float64)
  visibility = np.asarray(visibility)
  cats = category_indices(categories)
  _check_shapes(pred, gt, visibility, cats)
  distance, ok = normalization_distances(gt, visibility, cats)
  scored = scored_mask(visibility, cats) & ok[:, None]
  bad = scored & ~np.isfinite(pred).all(-1)
  if bad.any():
    i, j = np.argwhere(bad)[0]
    raise ValueError(f'image {i} has no finite prediction for keypoint {kp.KEYPOINT_NAMES[j]}, which its '
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
                     pck_thresholds: Sequence[float] = DEFAULT_PCK_THRESHOLDS) -> dict[str, float]:
  """FashionAI NE and PCK, overall and per category.

  Args:
    pred: (N, 24, 2) predicted pixels (x, y) in the original images; entries outside an image's
      category are ignored (may be NaN).
    gt: (N, 24, 2) ground-truth pixels.
    visibility: (N, 24) ground-truth visibility in {1, 0, -1}; only 1 is scored.
    categories: (N,) each image's category (ints into `kp.CATEGORIES`, or names).
    pck_thresholds: t values for `pck@t`.

  Returns:
    {'ne', 'count' (scored keypoints), 'images' (images normalised), 'skipped' (images that could not
    be normalised), 'pck@<t>'} and the same per category present in the input as '<key>/<category>'
    (e.g. 'ne/skirt', 'count/skirt'). NE/PCK are NaN where nothing was scored. Counts are ints.
  """
  cats = category_indices(categories)
  errors, scored = keypoint_errors(pred, gt, visibility, cats)
  _, ok = normalization_distances(gt, visibility, cats)
  out: dict[str, float] = _summary(errors, scored, pck_thresholds)
  out['images'] = int(ok.sum())
  out['skipped'] = int((~ok).sum())
  for ci in np.unique(cats):
    name = kp.CATEGORIES[ci]
    sel = cats == ci
    for key, value in _summary(errors[sel], scored[sel], pck_thresholds).items():
      out[f'{key}/{name}'] = value
    out[f'images/{name}'] = int(ok[sel].sum())
    out[f'skipped/{name}'] = int((~ok[sel]).sum())
  return out
