"""`python -m kpjax.data.synthetic --out DIR --num-images N --seed S [--format coco]`: synthetic garments in the
FashionAI layout, or (--format coco) stick figures and arrows as COCO keypoint files (kpjax.data.synthetic.shapes)."""

from __future__ import annotations

import os
from typing import Sequence

from kpjax.cli import common
from kpjax.data import synthetic


def _generate(args) -> int:
  if args.format == 'coco':
    if args.num_test is not None:
      raise ValueError('--num-test is for the FashionAI layout; --format coco writes --num-validation images')
    from kpjax.data.synthetic import shapes  # pylint: disable=g-import-not-at-top
    out = shapes.generate_coco(args.out, args.num_images, args.seed, num_validation=args.num_validation)
    print(f'wrote {args.num_images} training images to {os.path.join(out, "images")} with '
          f'{os.path.join(out, "annotations", "train.json")} and validation.json')
    return 0
  if args.num_validation is not None:
    raise ValueError('--num-validation needs --format coco')
  out = synthetic.generate(args.out, args.num_images, args.seed, num_test=args.num_test)
  print(f'wrote {args.num_images} training images to {os.path.join(out, "train")} and the test split to '
        f'{os.path.join(out, "test")}')
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.ArgumentParser(
      prog='python -m kpjax.data.synthetic',
      description='Writes procedural garment images with keypoint labels in the FashionAI layout '
                  '(DIR/train/Annotations/train.csv, DIR/train/Images/<category>/*.jpg, DIR/test/...), or with '
                  '--format coco stick figures and arrows in COCO keypoint files (DIR/images/*.png, '
                  'DIR/annotations/train.json, validation.json).')
  parser.add_argument('--out', required=True, help='output directory (must not exist or be empty)')
  parser.add_argument('--format', default='fashionai', choices=('fashionai', 'coco'),
                      help='fashionai (garments, the default) or coco (figures and arrows, several per image)')
  parser.add_argument('--num-images', type=int, default=2000, help='labelled training images (default 2000)')
  parser.add_argument('--num-test', type=int, default=None, help='unlabelled test images (default num-images/10)')
  parser.add_argument('--num-validation', type=int, default=None,
                      help='--format coco: validation images (default num-images/4)')
  parser.add_argument('--seed', type=int, default=0, help='random seed: the same seed writes the same files')
  return common.run(_generate, common.parse(parser, argv))
