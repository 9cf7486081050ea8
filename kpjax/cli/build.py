"""`python -m kpjax.data.build`: the FashionAI files, or COCO keypoint annotations, as a TFDS dataset.

  python -m kpjax.data.build --manual-dir DIR --data-dir D
  python -m kpjax.data.build --format coco --annotations TRAIN.json [--validation VAL.json] --images DIR
      --name NAME --data-dir D [--sigmas S | FILE.json] [--flip-pairs A:B,C:D] [--normalize A:B]
      [--keypoint-set SET.json]
"""

from __future__ import annotations

import sys
from typing import Sequence

from kpjax.cli import common
from kpjax.data import build
from kpjax.data import keypoint_sets
from kpjax.errors import BuildError

FORMATS = ('fashionai', 'coco')


def _pairs(text: str | None, flag: str) -> list[tuple[str, str]] | None:
  """'a:b,c:d' -> [(a, b), (c, d)]; 'none' -> [] (no flips); None -> None."""
  if text is None:
    return None
  if text.strip().lower() == 'none':
    return []
  pairs = []
  for part in text.split(','):
    names = [n.strip() for n in part.split(':')]
    if len(names) != 2 or not all(names):
      raise BuildError(f'{flag} {text!r}: expected keypoint name pairs LEFT:RIGHT separated by commas')
    pairs.append((names[0], names[1]))
  return pairs


def _keypoint_set(path: str | None):
  """The set a --keypoint-set JSON file defines (keypoint_sets.KeypointSet.to_json's form), or None."""
  if path is None:
    return None
  from kpjax.data import coco  # pylint: disable=g-import-not-at-top
  return keypoint_sets.KeypointSet.from_json(coco.load_json(path, 'a keypoint set (docs/keypoint-sets.md)', BuildError),
                                             where=path)


def _report(summary) -> None:
  for message in summary.skipped:
    print(f'skipped: {message}', file=sys.stderr)
  if summary.skipped:
    print(f'skipped {len(summary.skipped)} bad rows/images/annotations', file=sys.stderr)
  left_out = ', '.join(f'{n} {what.replace("_", " ")}' for what, n in sorted(summary.left_out.items()))
  if left_out:
    print(f'left out (not trained on): {left_out} objects', file=sys.stderr)
  counts = ', '.join(f'{k} {v}' for k, v in sorted(summary.num_examples.items()))
  print(f'wrote {summary.dataset_dir} ({counts})')


def _build(args) -> int:
  progress = sys.stderr.isatty()
  if args.format == 'coco':
    pairs = _pairs(args.normalize, '--normalize')
    if pairs is not None and len(pairs) != 1:
      raise BuildError(f'--normalize {args.normalize!r}: expected one keypoint pair A:B')
    summary = build.build_coco_dataset(
        args.annotations, args.images, args.name, args.data_dir, validation=args.validation,
        validation_fraction=args.validation_fraction, skip_bad=args.skip_bad,
        sigmas=keypoint_sets.parse_sigmas(args.sigmas), flip_pairs=_pairs(args.flip_pairs, '--flip-pairs'),
        normalization=pairs[0] if pairs else None, keypoint_set=_keypoint_set(args.keypoint_set),
        overwrite=args.overwrite, num_threads=args.num_threads, progress=progress)
    _report(summary)
    return 0
  try:
    summary = build.build_dataset(args.manual_dir, args.data_dir, skip_bad=args.skip_bad,
                            validation_fraction=args.validation_fraction, overwrite=args.overwrite,
                            num_threads=args.num_threads, progress=progress)
  except BuildError as e:
    bad_row = ': row ' in str(e) and not args.skip_bad
    raise BuildError(f'{e}' + (' (pass --skip-bad to skip bad rows and images, listing them)' if bad_row else '')) from None
  _report(summary)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.ArgumentParser(prog='python -m kpjax.data.build', description=build.__doc__.split('\n\n')[0])
  parser.add_argument('--format', default='fashionai', choices=FORMATS,
                      help='fashionai (default: the FashionAI archives in --manual-dir) or coco (--annotations ...)')
  parser.add_argument('--manual-dir',
                      help='the unpacked FashionAI archives (train/Annotations/train.csv, train/Images/...)')
  coco = parser.add_argument_group('--format coco (kpjax.data.build.coco)')
  coco.add_argument('--annotations', metavar='TRAIN.json', help='COCO keypoint annotations: the train split')
  coco.add_argument('--validation', metavar='VAL.json',
                    help='COCO keypoint annotations of the validation split (default: --validation-fraction of '
                         'the training images)')
  coco.add_argument('--images', metavar='DIR', help="the folder the files' image file_name are relative to")
  coco.add_argument('--name', help='the TFDS dataset name to write (config.data.tfds_name then names it)')
  coco.add_argument('--sigmas', metavar='S|FILE.json',
                    help="OKS sigmas: one number for every keypoint, or a JSON file {category: [sigma per keypoint]} "
                         f"(default: COCO's for COCO's person keypoints, else {keypoint_sets.DEFAULT_SIGMA})")
  coco.add_argument('--flip-pairs', metavar='A:B,...',
                    help="the keypoints a horizontal flip swaps (default: names with left/right, e.g. "
                         "left_eye:right_eye; 'none' for none)")
  coco.add_argument('--normalize', metavar='A:B', help='a keypoint pair whose distance normalises NE (optional)')
  coco.add_argument('--keypoint-set', metavar='SET.json',
                    help='the whole keypoint set, written by hand (docs/keypoint-sets.md): flip pairs, sigmas, '
                         'skeletons and normalising pairs per category, instead of the three flags above')
  parser.add_argument('--data-dir', required=True, help='TFDS data directory to write the dataset into')
  parser.add_argument('--skip-bad', action='store_true',
                      help='skip (and list) bad rows, annotations and images instead of stopping at the first')
  parser.add_argument('--validation-fraction', type=float, default=0.1,
                      help='share of the labelled images held out as the validation split (default 0.1; with '
                           '--format coco only without --validation)')
  parser.add_argument('--overwrite', action='store_true', help='replace a dataset already built in --data-dir')
  parser.add_argument('--num-threads', type=int, default=8, help='threads reading and checking images')
  args = common.parse(parser, argv)
  if args.format == 'coco':
    missing = [f for f, v in (('--annotations', args.annotations), ('--images', args.images), ('--name', args.name))
               if not v]
    if missing:
      parser.error(f'--format coco needs {", ".join(missing)}')
    if args.manual_dir:
      parser.error('--manual-dir is for the FashionAI files; --format coco reads --annotations and --images')
  else:
    if not args.manual_dir:
      parser.error('the following arguments are required: --manual-dir (or --format coco with --annotations)')
    given = [f for f, v in (('--annotations', args.annotations), ('--validation', args.validation),
                            ('--images', args.images), ('--name', args.name), ('--sigmas', args.sigmas),
                            ('--flip-pairs', args.flip_pairs), ('--normalize', args.normalize),
                            ('--keypoint-set', args.keypoint_set)) if v]
    if given:
      parser.error(f'{", ".join(given)} need --format coco')
  return common.run(_build, args)
