"""COCO's keypoint AP of a results file against a COCO annotation file (`python -m kpjax.evaluate
--coco-annotations GT.json --predictions PRED.json [--sigmas S | FILE.json]`, kpjax.cli.evaluate).

Every keypoint category of the ground truth is scored on its own, with its own keypoints and sigmas
(`--sigmas`: one number for every keypoint, or a JSON file {category name: [one per keypoint]}; default
kpjax.data.keypoint_sets.default_sigmas: COCO's 17 for COCO's person keypoints, else DEFAULT_SIGMA), by
kpjax.metrics.oks (pycocotools' COCOeval(iouType='keypoints') re-done in numpy); the overall figures are
the means over the categories, as COCOeval averages them. A result for an image or category the ground
truth lacks, or with another number of keypoints, is an EvaluationError naming it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from kpjax.data import coco
from kpjax.data import keypoint_sets
from kpjax.errors import EvaluationError, KeypointSetError
from kpjax.metrics import oks

TABLE = (('AP', 'ap'), ('AP50', 'ap50'), ('AP75', 'ap75'), ('AP_M', 'ap_m'), ('AP_L', 'ap_l'), ('AR', 'ar'))


def _ground_truth(annotations: Sequence[coco.Annotation]) -> oks.GroundTruth:
  k = annotations[0].keypoints.shape[0] if annotations else 0
  return oks.GroundTruth(
      image_ids=np.array([a.image_id for a in annotations], np.int64),
      ids=np.array([a.id for a in annotations], np.int64),
      keypoints=np.stack([a.keypoints for a in annotations]) if annotations else np.zeros((0, k, 3)),
      bbox=np.stack([a.bbox for a in annotations]) if annotations else np.zeros((0, 4)),
      area=np.array([a.area for a in annotations], np.float64),
      iscrowd=np.array([a.iscrowd for a in annotations], bool),
      num_keypoints=np.array([a.num_keypoints for a in annotations], np.int64))


def _detections(results: Sequence[coco.Result], k: int) -> oks.Detections:
  return oks.Detections(
      image_ids=np.array([r.image_id for r in results], np.int64),
      keypoints=np.stack([r.keypoints for r in results]) if results else np.zeros((0, k, 3)),
      scores=np.array([r.score for r in results], np.float64))


def evaluate_coco_files(annotations: str, predictions: str,
                        sigmas: float | Mapping[str, Sequence[float]] | None = None) -> dict[str, float]:
  """COCO keypoint AP of `predictions` (results JSON) against `annotations` (COCO JSON); metrics.oks'
  keypoint_ap figures ('ap', 'ap50', 'ap75', 'ap_m', 'ap_l', 'ar', ... and '<key>/<category>')."""
  gt = coco.read_annotations(annotations, EvaluationError, check_boxes=False)
  results = coco.read_results(predictions, gt, EvaluationError)
  categories = []
  for cid, cat in sorted(gt.categories.items()):
    try:
      given = keypoint_sets.category_sigmas(sigmas, cat.name, cat.keypoints)
    except KeypointSetError as e:
      raise EvaluationError(str(e)) from None
    categories.append(oks.Category(
        cat.name, np.asarray(given or keypoint_sets.default_sigmas(cat.keypoints), np.float64),
        _ground_truth([a for a in gt.annotations if a.category_id == cid]),
        _detections([r for r in results if r.category_id == cid], len(cat.keypoints))))
  scores = oks.keypoint_ap(categories, list(gt.images))
  scores['images'] = len(gt.images)
  return scores


def category_names(scores: Mapping[str, float]) -> list[str]:
  """The categories with per-category figures in `scores`, in the order they were scored."""
  return [k.split('/', 1)[1] for k in scores if k.startswith('objects/')]


def format_table(scores: Mapping[str, float]) -> str:
  """A plain-text table of objects, detections and the AP/AR figures, per category and overall (-1: nothing
  of that size to score, as COCOeval reports it)."""
  header = ['category', 'objects', 'detections'] + [name for name, _ in TABLE]

  def num(v):
    return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'

  rows = [[name, str(scores[f'objects/{name}']), str(scores[f'detections/{name}'])]
          + [num(scores[f'{key}/{name}']) for _, key in TABLE] for name in category_names(scores)]
  rows.append(['overall', str(scores['objects']), str(scores['detections'])] + [num(scores[key]) for _, key in TABLE])
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  lines = ['  '.join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(r, widths)))
           for r in [header] + rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  lines.insert(len(lines) - 1, lines[1])
  return '\n'.join(lines)
