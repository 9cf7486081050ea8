"""FashionAI normalised error of a submission file against annotations, or of a model over a dataset split
(what `python -m kpjax.evaluate` runs, kpjax.cli.evaluate; a model of COCO-format data is also scored with
COCO's keypoint AP, and COCO files with kpjax.inference.coco_evaluation).

Every annotated image needs exactly one prediction of the same category, and every predicted image an
annotation: anything else is an EvaluationError naming the image. Scores are `metrics.normalized_error`'s.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

from kpjax.data import keypoints as kp
from kpjax.errors import EvaluationError
from kpjax.io import atomic


def _first(items: Sequence[str], what: str) -> str:
  more = f' (and {len(items) - 1} more)' if len(items) > 1 else ''
  return f'{what} {items[0]}{more}'


def match_predictions(gt_rows: dict, pred_rows: dict) -> None:
  """Raises EvaluationError unless the two tables cover the same images with the same categories."""
  missing = [i for i in gt_rows if i not in pred_rows]
  if missing:
    raise EvaluationError(_first(missing, 'no prediction for annotated image'))
  unknown = [i for i in pred_rows if i not in gt_rows]
  if unknown:
    raise EvaluationError(_first(unknown, 'prediction for an image the annotations do not have:'))
  wrong = [i for i in gt_rows if gt_rows[i][0] != pred_rows[i][0]]
  if wrong:
    i = wrong[0]
    raise EvaluationError(f'image {i} is a {gt_rows[i][0]} in the annotations but a {pred_rows[i][0]} in the '
                          f'predictions' + (f' (and {len(wrong) - 1} more mismatches)' if len(wrong) > 1 else ''))


def score_arrays(ids: Sequence[str], pred, gt, visibility, categories) -> dict:
  """`metrics.normalized_error`, with a missing prediction for a visible keypoint named by image id."""
  from kpjax.metrics import normalized_error as metrics  # pylint: disable=g-import-not-at-top
  pred = np.asarray(pred, np.float64)
  scored = metrics.scored_mask(visibility, categories)
  bad = scored & ~np.isfinite(pred).all(-1)
  if bad.any():
    i, j = np.argwhere(bad)[0]
    raise EvaluationError(f'image {ids[i]} has no prediction for {kp.KEYPOINT_NAMES[j]}, which the annotations mark '
                          f'visible' + (f' ({int(bad.sum())} such keypoints in all)' if bad.sum() > 1 else ''))
  return metrics.normalized_error(pred, gt, visibility, categories)


def format_table(m: dict) -> str:
  """A plain-text table of images, scored keypoints, NE and PCK, per category and overall."""
  pck = [k for k in m if k.startswith('pck@') and '/' not in k]
  header = ['category', 'images', 'keypoints', 'NE'] + [k.upper() for k in pck]
  rows = []

  def num(v):
    return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'

  present = [k.split('/', 1)[1] for k in m if k.startswith('count/')]  # in category order
  for name, sfx in [(c, f'/{c}') for c in present] + [('overall', '')]:
    images = m[f'images{sfx}'] + m[f'skipped{sfx}']
    rows.append([name, str(images), str(m[f'count{sfx}']), num(m[f'ne{sfx}'])] + [num(m[f'{k}{sfx}']) for k in pck])
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  lines = ['  '.join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(r, widths)))
           for r in [header] + rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  lines.insert(len(lines) - 1, lines[1])
  if m.get('skipped'):
    lines.append(f'({m["skipped"]} images not scored: their normalisation keypoints are absent or coincide)')
  return '\n'.join(lines)


def write_json(m: dict, path: str) -> None:
  """Writes the metrics as JSON (NaN as null) atomically."""
  clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
  with atomic.open_file(path) as f:
    json.dump(clean, f, indent=2)
    f.write('\n')


def evaluate_files(annotations: str, predictions: str) -> tuple[dict, list[str]]:
  """Scores a submission CSV against an annotation CSV; returns (metrics, image ids not scored).

  The submission's cells of keypoints outside an image's category (a 24-output model fills them) are
  ignored, as every FashionAI scorer ignores them: metrics['ignored_cells'] counts them.
  """
  from kpjax.metrics import normalized_error as metrics  # pylint: disable=g-import-not-at-top
  gt, _ = _read_table(annotations, 'annotations')
  pred, ignored = _read_table(predictions, 'predictions', submission=True)
  match_predictions(gt, pred)
  ids = list(gt)
  cats = [gt[i][0] for i in ids]
  gt_xy = np.stack([gt[i][1] for i in ids])
  vis = np.stack([gt[i][2] for i in ids])
  pred_xy = np.stack([np.where((pred[i][2] >= 0)[:, None], pred[i][1], np.nan) for i in ids])
  scores = score_arrays(ids, pred_xy, gt_xy, vis, cats)
  scores['ignored_cells'] = ignored
  _, ok = metrics.normalization_distances(gt_xy, vis, cats)
  return scores, [i for i, good in zip(ids, ok) if not good]


def _read_table(path: str, what: str, submission: bool = False
                ) -> tuple[dict[str, tuple[str, np.ndarray, np.ndarray]], int]:
  """({image_id: (category, (24, 2) pixels, (24,) visibility)}, cells ignored) of a FashionAI CSV (a
  submission's when `submission`: kpjax.data.fashionai_csv.parse_row); repeated images are errors."""
  from kpjax.data import fashionai_csv as csv_io  # pylint: disable=g-import-not-at-top
  table: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
  ignored = 0
  for a in csv_io.read_annotations(path, submission=submission):
    if a.image_id in table:
      raise EvaluationError(f'image {a.image_id} appears more than once in the {what} {path}')
    table[a.image_id] = (a.category, np.asarray(a.keypoints, np.float64), np.asarray(a.visibility, np.int64))
    ignored += len(a.ignored)
  if not table:
    raise EvaluationError(f'the {what} {path} hold no images')
  return table, ignored


def evaluate_model(config, checkpoint_path: str, split: str | None = None, batch_size: int | None = None,
                   flip: bool = False, max_images: int = 0, step: int | None = None) -> tuple[dict, list[str]]:
  """Runs a checkpoint over `split` (default config.data.eval_split) of the config's dataset, in
  batches of `batch_size` (default config.eval_batch_size); returns (metrics, image ids not scored by NE).
  Metrics are kpjax.inference.scoring.evaluate_batches': NE where the keypoint set defines it, COCO's
  keypoint AP for COCO-format data.

  The config (validated where it entered, kpjax.train.config_check) must describe the checkpoint's
  model. A training workdir's own synthetic data is found from the checkpoint's place in it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from kpjax.data import sources  # pylint: disable=g-import-not-at-top
  from kpjax.inference import checkpoints  # pylint: disable=g-import-not-at-top
  from kpjax.inference import devices  # pylint: disable=g-import-not-at-top
  from kpjax.inference import predictor  # pylint: disable=g-import-not-at-top
  from kpjax.inference import scoring  # pylint: disable=g-import-not-at-top
  from kpjax.metrics import normalized_error as metrics  # pylint: disable=g-import-not-at-top
  if batch_size is not None and batch_size < 1:
    raise EvaluationError(f'--batch-size must be at least 1; got {batch_size}')
  if max_images < 0:
    raise EvaluationError(f'--max-images must be >= 0 (0 = all); got {max_images}')
  model, variables, spec, _ = predictor.load_predictor(checkpoint_path, config, step=step)
  # A training workdir holds the synthetic data it trained on (config.data.synthetic_dir = '').
  workdir = checkpoints.locate(checkpoint_path, step).workdir
  source = sources.get_source(config.data, split or config.data.eval_split, workdir=workdir)
  kset = sources.source_keypoint_set(source)
  if kset != spec.keypoint_set:
    raise EvaluationError(f'{checkpoint_path} predicts the keypoint set {spec.keypoint_set.describe()} but '
                          f'{source!r} holds {kset.describe()}; point config.data at the data the model was trained on')
  mesh = devices.make_mesh()  # every device takes its share of each batch
  batches = pipeline.eval_batches(
      source, spec, config.data, batch_size=devices.local_batch_size(batch_size or int(config.eval_batch_size), mesh),
      process_index=jax.process_index(), process_count=jax.process_count(), max_images=max_images)
  predict_fn = predictor.make_predict_fn(model, flip=flip, category=spec.category, mesh=mesh, keypoint_set=kset,
                                         confidence=kset.scored_by_oks)
  scores, preds = scoring.evaluate_batches(predict_fn, devices.replicate(variables, mesh), batches, spec, mesh)
  if not kset.has_normalization:
    return scores, []
  _, ok = metrics.normalization_distances(preds['keypoints'], preds['visibility'], preds['category'], kset)
  paired = np.array([kset.categories[c].normalization is not None for c in preds['category']], bool)
  return scores, [str(i) for i in preds['image_id'][paired & ~ok]]  # (NE never scores a category without a pair)
