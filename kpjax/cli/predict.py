"""`python -m kpjax.predict`: keypoints for any images: a FashionAI submission CSV or COCO results (and drawings).

  python -m kpjax.predict --config configs/trousers.py --checkpoint DIR --images test/Images/trousers \\
      --out preds.csv [--json keypoints.json] [--draw DIR] [--flip] [--batch-size 16] [--decimals N]
  python -m kpjax.predict --config configs/all.py --checkpoint DIR --images test/Images \\
      --categories test/test.csv --out preds.csv
  python -m kpjax.predict --checkpoint W --images DIR --out PRED.json [--boxes BOXES.json]   (COCO-format models)

A model trained on FashionAI writes the CSV; one trained on COCO-format data writes COCO keypoint results,
one per box of --boxes (or per image without it; kpjax.inference.coco_prediction). The library is
kpjax.inference.prediction. An unreadable image is reported and skipped; the exit status
is then 1 (0 when all went well, 2 on a usage error, with no output written; kpjax.cli.common).
"""

from __future__ import annotations

from typing import Sequence

from kpjax.cli import common
from kpjax.inference import prediction


def parse_args(argv: Sequence[str] | None):
  """The parsed flags (`args.config` loaded or None), or exit status 2 with one `error:` line."""
  parser = common.ArgumentParser(prog='python -m kpjax.predict', description=__doc__.split('\n\n')[0])
  parser.add_config_flag(required=False, help_text='the config the model was trained/converted with '
                         '(configs/X.py; optional: the checkpoint describes its model); --config.FIELD=VALUE '
                         'overrides its fields')
  parser.add_argument('--checkpoint', required=True,
                      help='a model directory (e.g. a converted one) or a training workdir')
  parser.add_argument('--images', nargs='+', required=True, metavar='PATH',
                      help='image files, folders (searched recursively) or glob patterns')
  parser.add_argument('--out', required=True, help='the submission CSV (COCO-format models: the results JSON) to write')
  parser.add_argument('--boxes', metavar='BOXES.json',
                      help='COCO annotations or detections ({"images", "annotations": [{image_id, category_id, bbox'
                           '[, score]}]}): one prediction per box, of the images it lists under --images DIR')
  parser.add_argument('--json', metavar='OUT.json',
                      help="also write every image's keypoints as JSON: unrounded pixels and each keypoint's "
                           'confidence in [0, 1] (the answers kpjax.serve gives; docs/serving.md)')
  parser.add_argument('--draw', metavar='DIR', help='also write one PNG per image with its keypoints drawn')
  parser.add_argument('--flip', action='store_true',
                      help='average with the horizontally flipped image (left/right swapped back)')
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--decimals', type=int, default=0, metavar='N',
                      help='digits after the point in the CSV coordinates (default 0: whole pixels, the '
                           "challenge's format; rounding costs ~0.38 px per keypoint on average)")
  parser.add_argument('--category', help="every image's garment category (for a model of category 'all')")
  parser.add_argument('--categories', metavar='CSV',
                      help="image_id,image_category rows (the official test.csv): each image's category for a "
                           "model of category 'all'; a per-category model keeps only its own images")
  parser.add_argument('--step', type=int, help='the checkpoint step of a training workdir (default: latest)')
  args = common.parse(parser, argv)
  if args.batch_size < 1:
    parser.error('--batch-size must be at least 1')
  if args.decimals < 0:
    parser.error('--decimals must be 0 or more')
  if args.category and args.categories:
    parser.error('pass --category or --categories, not both')
  if args.boxes and (args.category or args.categories):
    parser.error('--boxes gives each object its category; drop --category/--categories')
  if args.boxes and args.json:
    parser.error('--json is for FashionAI models; the COCO results --boxes writes already hold every keypoint\'s '
                 'score')
  return args


def run(args) -> int:
  if args.config is not None:
    from kpjax.train import config_check  # pylint: disable=g-import-not-at-top
    config_check.check_config(args.config, training=False)
  if args.boxes:
    from kpjax.inference import coco_prediction  # pylint: disable=g-import-not-at-top
    summary = coco_prediction.predict_coco(args.checkpoint, args.images, args.out, boxes=args.boxes,
                                           config=args.config, flip=args.flip, batch_size=args.batch_size,
                                           draw=args.draw, step=args.step)
  else:
    summary = prediction.predict_files(args.checkpoint, args.images, args.out, config=args.config, flip=args.flip,
                                       batch_size=args.batch_size, decimals=args.decimals, category=args.category,
                                       categories_csv=args.categories, draw=args.draw, step=args.step,
                                       json_out=args.json)
  return common.RUN_FAILED if summary.problems else common.OK


def main(argv: Sequence[str] | None = None) -> int:
  return common.run(run, parse_args(argv))
