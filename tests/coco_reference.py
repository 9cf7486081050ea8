"""pycocotools' keypoint AP of a results file, as the reference kpjax.metrics.oks is tested against."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import coco as pycoco
from pycocotools import cocoeval

KEYS = ('ap', 'ap50', 'ap75', 'ap_m', 'ap_l', 'ar', 'ar50', 'ar75', 'ar_m', 'ar_l')  # COCOeval's stats[0:10]


def reference(gt_path: str, results_path: str, sigmas: dict[str, list[float]]) -> dict[str, float]:
  """pycocotools' figures: one COCOeval per category (its own sigmas), overall the mean over categories
  of those that are not -1 (what one COCOeval over categories of the same keypoints averages)."""
  out = {}
  with contextlib.redirect_stdout(io.StringIO()):
    gt = pycoco.COCO(gt_path)
    dt = gt.loadRes(results_path)
    for cid in sorted(gt.getCatIds()):
      name = gt.cats[cid]['name']
      e = cocoeval.COCOeval(gt, dt, 'keypoints')
      e.params.catIds = [cid]
      e.params.kpt_oks_sigmas = np.asarray(sigmas[name], np.float64)
      e.evaluate()
      e.accumulate()
      e.summarize()
      out.update({f'{k}/{name}': float(v) for k, v in zip(KEYS, e.stats)})
  names = [gt.cats[c]['name'] for c in sorted(gt.getCatIds())]
  for k in KEYS:
    values = [out[f'{k}/{n}'] for n in names if out[f'{k}/{n}'] > -1]
    out[k] = float(np.mean(values)) if values else -1.0
  return out
