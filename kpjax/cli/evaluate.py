"""`python -m kpjax.evaluate`: FashionAI normalised error of a submission file, COCO's keypoint AP of a results
file, or either of a model over a split.

  python -m kpjax.evaluate --annotations GT.csv --predictions P.csv [--json OUT]
  python -m kpjax.evaluate --coco-annotations GT.json --predictions PRED.json [--sigmas S | FILE.json] [--json OUT]
  python -m kpjax.evaluate --config configs/trousers.py --checkpoint DIR [--split validation] [--json OUT]

Prints NE (and PCK) overall and per category with the number of scored keypoints; `--json` writes
{"ne": ..., "ne/<category>": ..., "count": ..., ...} (NaN as null). Every annotated image needs exactly
one prediction of the same category, and every predicted image an annotation: anything else is an
error naming the image. A submission's cells of keypoints outside an image's category (a 24-output
model fills them) are ignored, as FashionAI's scorers do, and counted ("ignored_cells"). COCO files (and
models trained on COCO-format data): AP, AP50, AP75, AP_M, AP_L and AR overall and per category
(kpjax.inference.coco_evaluation), `--json` keys ap, ap50, ap75, ap_m, ap_l, ar (and ar50, ar75, ar_m,
ar_l), '<key>/<category>', objects, detections. Exit status 0, or 2 on an error (with nothing written;
kpjax.cli.common).
"""

from __future__ import annotations

import sys
from typing import Sequence

from kpjax.cli import common
from kpjax.data import keypoint_sets
from kpjax.errors import EvaluationError
from kpjax.inference import coco_evaluation
from kpjax.inference import evaluation


def _parser() -> common.ArgumentParser:
  parser = common.ArgumentParser(prog='python -m kpjax.evaluate', description=__doc__.split('\n\n')[0])
  files = parser.add_argument_group('score a submission file')
  files.add_argument('--annotations', metavar='GT.csv', help='ground truth in the FashionAI layout')
  files.add_argument('--predictions', metavar='P.csv', help='a submission (kpjax.predict writes one), or COCO results')
  coco = parser.add_argument_group('score COCO keypoint results')
  coco.add_argument('--coco-annotations', metavar='GT.json', help='COCO keypoint ground truth (with --predictions '
                    'PRED.json: [{image_id, category_id, keypoints, score}])')
  coco.add_argument('--sigmas', metavar='S|FILE.json',
                    help="OKS sigmas: one number for every keypoint, or a JSON file {category: [sigma per keypoint]} "
                         f"(default: COCO's for COCO's person keypoints, else {keypoint_sets.DEFAULT_SIGMA})")
  model = parser.add_argument_group('score a model on a dataset split')
  parser.add_config_flag(required=False)
  model.add_argument('--checkpoint', help='a model directory (e.g. a converted one) or a training workdir')
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
  args = common.parse(parser, argv)
  by_file = args.annotations or args.predictions or args.coco_annotations
  by_model = args.config or args.checkpoint
  if by_file and by_model:
    parser.error('score either files (--annotations, --predictions) or a model (--config, --checkpoint), not both')
  if args.annotations and args.coco_annotations:
    parser.error('give --annotations (FashionAI CSV) or --coco-annotations (COCO JSON), not both')
  if args.sigmas is not None and not args.coco_annotations:
    parser.error('--sigmas needs --coco-annotations (a model is scored with its keypoint set\'s sigmas)')
  if args.coco_annotations and not args.predictions:
    parser.error('scoring COCO results needs both --coco-annotations and --predictions')
  if by_file and not args.coco_annotations and not (args.annotations and args.predictions):
    parser.error('scoring a file needs both --annotations and --predictions')
  if by_model and not (args.config and args.checkpoint):
    parser.error('scoring a model needs both --config and --checkpoint')
  if not (by_file or by_model):
    parser.error('give --annotations and --predictions, or --config and --checkpoint')
  return args


def run(args) -> int:
  if args.coco_annotations:
    scores, skipped = coco_evaluation.evaluate_coco_files(args.coco_annotations, args.predictions,
                                                          keypoint_sets.parse_sigmas(args.sigmas)), []
  elif args.annotations:
    scores, skipped = evaluation.evaluate_files(args.annotations, args.predictions)
  else:
    from kpjax.train import config_check  # pylint: disable=g-import-not-at-top
    config_check.check_config(args.config, training=False)
    scores, skipped = evaluation.evaluate_model(args.config, args.checkpoint, args.split, args.batch_size, args.flip,
                                                args.max_images, args.step)
  objects = 'objects' in scores  # COCO's AP
  if objects and scores['objects'] == 0:
    raise EvaluationError('nothing to score: the ground truth holds no object with labelled keypoints (crowds and '
                          'objects without keypoints are not scored)')
  if not objects and scores['count'] == 0:
    raise EvaluationError('nothing to score: no visible keypoint in an image whose normalisation distance is known')
  if scores.get('ignored_cells'):
    print(f'note: {scores["ignored_cells"]} predicted cells of keypoints outside their image\'s category were '
          'ignored (FashionAI scores only the visible keypoints each image is annotated with)', file=sys.stderr)
  for i in skipped[:10]:
    print(f'warning: image {i} not scored: its normalisation keypoints are absent or coincide', file=sys.stderr)
  if len(skipped) > 10:
    print(f'warning: ... and {len(skipped) - 10} more images not scored', file=sys.stderr)
  if scores.get('count'):
    print(evaluation.format_table(scores))
  if objects:
    print(coco_evaluation.format_table(scores))
  if args.json:
    evaluation.write_json(scores, args.json)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return common.run(run, parse_args(argv))

