"""COCO's keypoint metric: OKS-based AP, AP50, AP75, AP (medium, large) and AR, as pycocotools computes them.

`keypoint_ap` is `COCOeval(iouType='keypoints')` (evaluate, accumulate, summarize) re-done in numpy,
step for step, so that the numbers are pycocotools' (the tests compare them on the same files):

* OKS between a detection d and a ground-truth object g with area s and per-keypoint sigmas k:
  mean over g's labelled keypoints (v > 0) of exp(-|d - g|^2 / (2 s (2 k)^2)); for an object with no
  labelled keypoint, the distance to the box twice g's size around it, over all keypoints.
* Per image and category: detections by score (highest first, ties in file order; at most 20),
  each matched greedily to the unmatched object of highest OKS above each threshold .50:.05:.95;
  crowd objects (and objects with num_keypoints 0) are "ignore" regions that absorb detections, as are
  objects outside the area range (all; medium 32^2..96^2; large above 96^2), and unmatched detections
  whose own area (their keypoints' extent) lies outside the range are not counted.
* Precision at 101 recall points (interpolated: the best precision at any higher recall), averaged
  over thresholds and recall points: AP; recall at the end of the list averaged over thresholds: AR.
  A figure with no ground truth to score is -1, as pycocotools reports it.

Several categories, each with its own keypoints and sigmas, are each scored alone and every figure is
the mean over the categories that have one (not -1): exactly what COCOeval's averaging over categories
gives when they share keypoints and sigmas, and defined when they do not. numpy only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# pycocotools' keypoint parameters (cocoeval.Params.setKpParams), computed the same way.
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETECTIONS = 20
AREA_RANGES = {'all': (0 ** 2, 1e5 ** 2), 'medium': (32 ** 2, 96 ** 2), 'large': (96 ** 2, 1e5 ** 2)}
# The figures reported (pycocotools' stats[0:10] for keypoints): key -> (AP or AR, threshold, area range).
SUMMARY = {'ap': (True, None, 'all'), 'ap50': (True, .5, 'all'), 'ap75': (True, .75, 'all'),
           'ap_m': (True, None, 'medium'), 'ap_l': (True, None, 'large'), 'ar': (False, None, 'all'),
           'ar50': (False, .5, 'all'), 'ar75': (False, .75, 'all'), 'ar_m': (False, None, 'medium'),
           'ar_l': (False, None, 'large')}


@dataclasses.dataclass
class GroundTruth:
  """A category's ground-truth objects, in file order: G objects of K keypoints.

  image_ids, ids: (G,) int; keypoints: (G, K, 3) x, y, v (v > 0 labelled); bbox: (G, 4) x, y, w, h;
  area: (G,); iscrowd: (G,) bool; num_keypoints: (G,) int (0 makes the object an ignore region, as
  the file's `num_keypoints` does in pycocotools).
  """
  image_ids: np.ndarray
  ids: np.ndarray
  keypoints: np.ndarray
  bbox: np.ndarray
  area: np.ndarray
  iscrowd: np.ndarray
  num_keypoints: np.ndarray


@dataclasses.dataclass
class Detections:
  """A category's detections, in file order: image_ids (D,), keypoints (D, K, 2+) x, y (a third column, the
  keypoint scores, is not used), scores (D,)."""
  image_ids: np.ndarray
  keypoints: np.ndarray
  scores: np.ndarray


@dataclasses.dataclass
class Category:
  """One category to score: its name, its OKS sigmas (K,), its objects and detections."""
  name: str
  sigmas: np.ndarray
  ground_truth: GroundTruth
  detections: Detections


def oks(gt_keypoints, gt_bbox, gt_area, dt_keypoints, sigmas) -> np.ndarray:
  """(D, G) OKS of D detections (D, K, 2+) against G objects (G, K, 3), (G, 4), (G,) with sigmas (K,)."""
  g = np.asarray(gt_keypoints, np.float64)
  d = np.asarray(dt_keypoints, np.float64)
  variances = (np.asarray(sigmas, np.float64) * 2) ** 2
  out = np.zeros((d.shape[0], g.shape[0]))
  xd, yd = d[:, :, 0], d[:, :, 1]
  zero = np.zeros_like(xd)
  for j in range(g.shape[0]):
    xg, yg, vg = g[j, :, 0], g[j, :, 1], g[j, :, 2]
    labelled = vg > 0
    if np.count_nonzero(labelled) > 0:
      dx, dy = xd - xg, yd - yg
    else:  # the distance to the box twice the object's size around it
      x, y, w, h = gt_bbox[j]
      dx = np.maximum(zero, (x - w) - xd) + np.maximum(zero, xd - (x + w * 2))
      dy = np.maximum(zero, (y - h) - yd) + np.maximum(zero, yd - (y + h * 2))
    e = (dx ** 2 + dy ** 2) / variances / (gt_area[j] + np.spacing(1)) / 2
    if np.count_nonzero(labelled) > 0:
      e = e[:, labelled]
    out[:, j] = np.sum(np.exp(-e), axis=1) / e.shape[1]
  return out


def _match_image(ious, gt_ignore, gt_crowd, gt_ids, dt_areas, area_range):
  """pycocotools' evaluateImg for one image, category and area range: (dt matches (T, D) as matched object
  ids, 0 = none; dt ignore (T, D) bool), with objects already sorted ignore-last and detections by score."""
  t_count, d_count, g_count = len(IOU_THRESHOLDS), len(dt_areas), len(gt_ignore)
  gtm = np.zeros((t_count, g_count))
  dtm = np.zeros((t_count, d_count))
  dt_ignore = np.zeros((t_count, d_count))
  if len(ious):
    for t_index, t in enumerate(IOU_THRESHOLDS):
      for d_index in range(d_count):
        best = min([t, 1 - 1e-10])
        m = -1
        for g_index in range(g_count):
          if gtm[t_index, g_index] > 0 and not gt_crowd[g_index]:
            continue  # matched already, and not a crowd
          if m > -1 and gt_ignore[m] == 0 and gt_ignore[g_index] == 1:
            break  # matched a regular object, and the rest are ignore regions
          if ious[d_index, g_index] < best:
            continue
          best = ious[d_index, g_index]
          m = g_index
        if m == -1:
          continue
        dt_ignore[t_index, d_index] = gt_ignore[m]
        dtm[t_index, d_index] = gt_ids[m]
        gtm[t_index, m] = d_index + 1  # any id > 0 marks the object matched
  outside = np.array([a < area_range[0] or a > area_range[1] for a in dt_areas]).reshape((1, d_count))
  dt_ignore = np.logical_or(dt_ignore, np.logical_and(dtm == 0, np.repeat(outside, t_count, 0)))
  return dtm, dt_ignore


def _detection_areas(keypoints: np.ndarray) -> np.ndarray:
  """(D,): the area of each detection's keypoint extent (what pycocotools' loadRes gives results)."""
  if keypoints.shape[0] == 0:
    return np.zeros((0,))
  x, y = keypoints[:, :, 0], keypoints[:, :, 1]
  return (x.max(1) - x.min(1)) * (y.max(1) - y.min(1))


def evaluate_category(category: Category, image_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Precision (T, R, A) and recall (T, A) of one category over the images `image_ids` (every image of the
  ground-truth file, ascending: pycocotools' imgIds), -1 where an area range has no object to score."""
  gt, dt = category.ground_truth, category.detections
  ignore = np.asarray(gt.iscrowd, bool) | (np.asarray(gt.num_keypoints) == 0)
  dt_area = _detection_areas(np.asarray(dt.keypoints, np.float64))
  gt_by_image: dict[int, list[int]] = {}
  dt_by_image: dict[int, list[int]] = {}
  for i, image in enumerate(np.asarray(gt.image_ids).tolist()):
    gt_by_image.setdefault(image, []).append(i)
  for i, image in enumerate(np.asarray(dt.image_ids).tolist()):
    dt_by_image.setdefault(image, []).append(i)
  # Per image: detections by score (stable), at most MAX_DETECTIONS, and their OKS with every object.
  per_image = []
  for image in image_ids:
    g = np.array(gt_by_image.get(image, []), np.int64)
    d = np.array(dt_by_image.get(image, []), np.int64)
    if len(d):
      d = d[np.argsort([-dt.scores[i] for i in d], kind='mergesort')][:MAX_DETECTIONS]
    ious = (oks(gt.keypoints[g], gt.bbox[g], gt.area[g], dt.keypoints[d], category.sigmas)
            if len(g) and len(d) else np.zeros((0,)))
    per_image.append((g, d, ious))
  t_count, r_count = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
  precision = -np.ones((t_count, r_count, len(AREA_RANGES)))
  recall = -np.ones((t_count, len(AREA_RANGES)))
  for a_index, area_range in enumerate(AREA_RANGES.values()):
    scores, matches, dt_ignores, gt_ignores = [], [], [], []
    for g, d, ious in per_image:
      if not len(g) and not len(d):
        continue
      g_ignore = (ignore[g] | (gt.area[g] < area_range[0]) | (gt.area[g] > area_range[1])).astype(np.int64)
      order = np.argsort(g_ignore, kind='mergesort')
      g_sorted = g[order]
      image_ious = ious[:, order] if len(ious) else ious
      dtm, dt_ignore = _match_image(image_ious, g_ignore[order], np.asarray(gt.iscrowd, bool)[g_sorted],
                                    np.asarray(gt.ids)[g_sorted], dt_area[d], area_range)
      scores.append(np.asarray(dt.scores, np.float64)[d])
      matches.append(dtm)
      dt_ignores.append(dt_ignore)
      gt_ignores.append(g_ignore[order])
    if not scores:
      continue
    precision[:, :, a_index], recall[:, a_index] = _accumulate(scores, matches, dt_ignores, gt_ignores)
  return precision, recall


def _accumulate(scores, matches, dt_ignores, gt_ignores):
  """pycocotools' accumulate for one category and area range: (precision (T, R), recall (T,)), -1 when
  there is no object to score."""
  t_count, r_count = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
  precision, recall = -np.ones((t_count, r_count)), -np.ones((t_count,))
  dt_scores = np.concatenate([s[:MAX_DETECTIONS] for s in scores])
  inds = np.argsort(-dt_scores, kind='mergesort')
  dtm = np.concatenate([m[:, :MAX_DETECTIONS] for m in matches], axis=1)[:, inds]
  dt_ignore = np.concatenate([i[:, :MAX_DETECTIONS] for i in dt_ignores], axis=1)[:, inds]
  gt_ignore = np.concatenate(gt_ignores)
  npig = np.count_nonzero(gt_ignore == 0)
  if npig == 0:
    return precision, recall
  tps = np.logical_and(dtm, np.logical_not(dt_ignore))
  fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ignore))
  tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
  fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
  for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum)):
    nd = len(tp)
    rc = tp / npig
    pr = (tp / (fp + tp + np.spacing(1))).tolist()
    recall[t] = rc[-1] if nd else 0
    for i in range(nd - 1, 0, -1):  # the best precision at any higher recall
      if pr[i] > pr[i - 1]:
        pr[i - 1] = pr[i]
    q = np.zeros((r_count,))
    at = np.searchsorted(rc, RECALL_THRESHOLDS, side='left')
    valid = at < nd  # recall points never reached keep precision 0
    q[valid] = np.asarray(pr)[at[valid]] if nd else 0.0
    precision[t] = q
  return precision, recall


def summarize(precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
  """The SUMMARY figures of one category's (or several stacked on a last axis') precision and recall."""
  out = {}
  area_names = list(AREA_RANGES)
  for key, (is_ap, threshold, area) in SUMMARY.items():
    s = precision if is_ap else recall
    if threshold is not None:
      s = s[np.where(threshold == IOU_THRESHOLDS)[0]]
    s = s[:, :, area_names.index(area)] if is_ap else s[:, area_names.index(area)]
    out[key] = -1.0 if len(s[s > -1]) == 0 else float(np.mean(s[s > -1]))
  return out


def keypoint_ap(categories: Sequence[Category], image_ids: Sequence[int]) -> dict[str, float]:
  """COCO's keypoint AP/AR (SUMMARY's keys) overall and per category ('<key>/<name>'), plus 'objects'
  (objects scored: not crowd, with keypoints) and 'detections', overall and per category.

  Each category is scored alone with its own sigmas over `image_ids` (all the ground truth's images);
  an overall figure is the mean of the categories' that are not -1 (-1 when none is).
  """
  image_ids = sorted(set(int(i) for i in image_ids))
  out: dict[str, float] = {}
  per_category = []
  for c in categories:
    precision, recall = evaluate_category(c, image_ids)
    figures = summarize(precision, recall)
    per_category.append(figures)
    for key, value in figures.items():
      out[f'{key}/{c.name}'] = value
    gt = c.ground_truth
    out[f'objects/{c.name}'] = int(np.count_nonzero(~np.asarray(gt.iscrowd, bool) & (np.asarray(gt.num_keypoints) > 0)))
    out[f'detections/{c.name}'] = int(len(c.detections.scores))
  for key in SUMMARY:
    values = [f[key] for f in per_category if f[key] > -1]
    out[key] = float(np.mean(values)) if values else -1.0
  out['objects'] = sum(out[f'objects/{c.name}'] for c in categories)
  out['detections'] = sum(out[f'detections/{c.name}'] for c in categories)
  return out
