"""FashionAI normalised error of a submission file, or of a model over a dataset split.

  python -m kpjax.evaluate --annotations GT.csv --predictions P.csv [--json OUT]
  python -m kpjax.evaluate --config configs/trousers.py --checkpoint DIR [--split validation] [--json OUT]

Prints NE (and PCK) overall and per category with the number of scored keypoints; `--json` writes
{"ne": ..., "ne/<category>": ..., "count": ..., ...} (NaN as null). Every annotated image needs exactly
one prediction of the same category, and every predicted image an annotation: anything else is an
error naming the image. Exit status 0, or 2 on an error (with nothing written; kpjax.cli).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Sequence

import numpy as np

from kpjax import atomic
from kpjax import cli
from kpjax import keypoints as kp


class EvaluationError(ValueError):
  """Inputs that cannot be scored; the message names the image or file."""


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
  from kpjax import metrics  # pylint: disable=g-import-not-at-top
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

  for name, sfx in [(c, f'/{c}') for c in kp.CATEGORIES if f'count/{c}' in m] + [('overall', '')]:
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
  """Scores a submission CSV against an annotation CSV; returns (metrics, image ids not scored)."""
  from kpjax import metrics  # pylint: disable=g-import-not-at-top
  gt = _read_table(annotations, 'annotations')
  pred = _read_table(predictions, 'predictions')
  match_predictions(gt, pred)
  ids = list(gt)
  cats = [gt[i][0] for i in ids]
  gt_xy = np.stack([gt[i][1] for i in ids])
  vis = np.stack([gt[i][2] for i in ids])
  pred_xy = np.stack([np.where((pred[i][2] >= 0)[:, None], pred[i][1], np.nan) for i in ids])
  scores = score_arrays(ids, pred_xy, gt_xy, vis, cats)
  _, ok = metrics.normalization_distances(gt_xy, vis, cats)
  return scores, [i for i, good in zip(ids, ok) if not good]


def _read_table(path: str, what: str) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
  """{image_id: (category, (24, 2) pixels, (24,) visibility)} of a FashionAI CSV; repeats are errors."""
  from kpjax.data import csv_io  # pylint: disable=g-import-not-at-top
  table: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
  for image_id, category, xy, vis in csv_io.read_rows(path):
    if image_id in table:
      raise EvaluationError(f'image {image_id} appears more than once in the {what} {path}')
    table[image_id] = (category, np.asarray(xy, np.float64), np.asarray(vis, np.int64))
  if not table:
    raise EvaluationError(f'the {what} {path} hold no images')
  return table


def evaluate_model(config, checkpoint_path: str, split: str | None = None, batch_size: int | None = None,
                   flip: bool = False, max_images: int = 0, step: int | None = None) -> tuple[dict, list[str]]:
  """Runs a checkpoint over `split` (default config.data.eval_split) of the config's dataset, in
  batches of `batch_size` (default config.eval_batch_size); returns (metrics, image ids not scored).

  The config is validated here (kpjax.config_check) and must describe the checkpoint's model.
  """
  from kpjax import config_check  # pylint: disable=g-import-not-at-top
  from kpjax import inference  # pylint: disable=g-import-not-at-top
  from kpjax import metrics  # pylint: disable=g-import-not-at-top
  from kpjax import parallel  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config_check.check_config(config, training=False)
  if batch_size is not None and batch_size < 1:
    raise EvaluationError(f'--batch-size must be at least 1; got {batch_size}')
  if max_images < 0:
    raise EvaluationError(f'--max-images must be >= 0 (0 = all); got {max_images}')
  model, variables, spec, _ = inference.load_predictor(checkpoint_path, config, step=step)
  # A training workdir holds the synthetic data it trained on (config.data.synthetic_dir = '').
  workdir = checkpoint_path if os.path.isdir(os.path.join(checkpoint_path, 'checkpoints')) else None
  source = pipeline.get_source(config.data, split or config.data.eval_split, workdir=workdir)
  mesh = parallel.make_mesh()  # every device takes its share of each batch
  batches = pipeline.eval_batches(
      source, spec, config.data, batch_size=parallel.local_batch_size(batch_size or int(config.eval_batch_size), mesh),
      process_index=jax.process_index(), process_count=jax.process_count(), max_images=max_images)
  predict_fn = inference.make_predict_fn(model, flip=flip, category=spec.category, mesh=mesh)
  scores, preds = inference.evaluate_batches(predict_fn, parallel.replicate(variables, mesh), batches, spec, mesh)
  _, ok = metrics.normalization_distances(preds['keypoints'], preds['visibility'], preds['category'])
  return scores, [str(i) for i in preds['image_id'][~ok]]


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog='python -m kpjax.evaluate', description=__doc__.split('\n\n')[0])
  files = parser.add_argument_group('score a submission file')
  files.add_argument('--annotations', metavar='GT.csv', help='ground truth in the FashionAI layout')
  files.add_argument('--predictions', metavar='P.csv', help='a submission (kpjax.predict writes one)')
  model = parser.add_argument_group('score a model on a dataset split')
  parser.add_config_flag(required=False)
  model.add_argument('--checkpoint', help='an exported model directory or a training workdir')
  model.add_argument('--split', default=None, help="dataset split (default: the config's data.eval_split)")
  model.add_argument('--batch-size', type=int, default=None, help="default: the config's eval_batch_size")
  model.add_argument('--flip', action='store_true', help='flip test-time augmentation')
  model.add_argument('--max-images', type=int, default=0, help='score the first N images only (0 = all)')
  model.add_argument('--step', type=int, help='the checkpoint step of a training workdir (default: latest)')
  parser.add_argument('--json', metavar='OUT', help='also write the metrics to this JSON file')
  return parser


def parse_args(argv):
  """The parsed flags (`args.config` loaded), or exit status 2 with one `error:` line."""
  parser = _parser()
  args = cli.parse(parser, argv)
  by_file = args.annotations or args.predictions
  by_model = args.config or args.checkpoint
  if by_file and by_model:
    parser.error('score either files (--annotations, --predictions) or a model (--config, --checkpoint), not both')
  if by_file and not (args.annotations and args.predictions):
    parser.error('scoring a file needs both --annotations and --predictions')
  if by_model and not (args.config and args.checkpoint):
    parser.error('scoring a model needs both --config and --checkpoint')
  if not (by_file or by_model):
    parser.error('give --annotations and --predictions, or --config and --checkpoint')
  return args


def run(args) -> int:
  if args.annotations:
    scores, skipped = evaluate_files(args.annotations, args.predictions)
  else:
    scores, skipped = evaluate_model(args.config, args.checkpoint, args.split, args.batch_size, args.flip,
                                     args.max_images, args.step)
  if scores['count'] == 0:
    raise EvaluationError('nothing to score: no visible keypoint in an image whose normalisation distance is known')
  for i in skipped[:10]:
    print(f'warning: image {i} not scored: its normalisation keypoints are absent or coincide', file=sys.stderr)
  if len(skipped) > 10:
    print(f'warning: ... and {len(skipped) - 10} more images not scored', file=sys.stderr)
  print(format_table(scores))
  if args.json:
    write_json(scores, args.json)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(run, parse_args(argv))


if __name__ == '__main__':
  sys.exit(main())
