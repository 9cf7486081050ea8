"""Training curves: the loss and the evaluation NE (COCO data: AP) of a run's metrics.jsonl, plotted (Agg)."""

from __future__ import annotations

import math
import os
from typing import Iterable

import numpy as np

from kpjax.io import atomic
from kpjax.train.log import read_metrics  # the one reader of metrics.jsonl, shared with resuming


def _series(records: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  pts = [(r['step'], r[key]) for r in records
         if 'step' in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  if not pts:
    return np.zeros(0), np.zeros(0)
  steps, values = np.array(pts, np.float64).T
  return steps, values


def plot_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike,
                loss_key: str = 'train/loss', ne_key: str = 'eval/ne') -> str:
  """Plots the training loss and the evaluation NE (overall and per category) against the step.

  Reads `metrics_path` (metrics.jsonl: {'step', 'train/loss', 'eval/ne', 'eval/ne/<category>', ...}
  a line) and writes a two-panel PNG to `out_png` atomically. `ne_key` may name another figure
  ('eval/ap' for COCO data). Raises ValueError when neither curve has a single point.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  records = read_metrics(metrics_path)
  loss = _series(records, loss_key)
  ne = {ne_key: _series(records, ne_key)}
  per_category = sorted({k for r in records for k in r if k.startswith(f'{ne_key}/')})
  for key in per_category:  # the categories present, in name order (FashionAI's: blouse .. trousers)
    s = _series(records, key)
    if s[0].size:
      ne[key] = s
  if not loss[0].size and not ne[ne_key][0].size:
    raise ValueError(f'{metrics_path} has no {loss_key!r} or {ne_key!r} values to plot')
  fig = Figure(figsize=(10, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax_loss, ax_ne = fig.subplots(1, 2)
  ax_loss.plot(*loss, color='tab:blue', lw=1)
  if loss[1].size and (loss[1] > 0).all() and loss[1].max() / loss[1].min() > 20:
    ax_loss.set_yscale('log')
  ax_loss.set(title=loss_key, xlabel='step')
  for key, (steps, values) in ne.items():
    if steps.size:
      ax_ne.plot(steps, values, marker='o', ms=3, lw=2 if key == ne_key else 1,
                 label=key.split('/')[-1] if key != ne_key else 'overall')
  what = ('normalised error, lower is better' if ne_key.endswith('/ne') else
          'keypoint AP, higher is better' if ne_key.endswith('/ap') else ne_key)
  ax_ne.set(title=f'{ne_key} ({what})', xlabel='step')
  if any(s.size for s, _ in ne.values()):
    ax_ne.legend(fontsize=8)
  for ax in (ax_loss, ax_ne):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  with atomic.staged_file(out_png) as tmp:
    fig.savefig(tmp, format='png')
  return os.fspath(out_png)
