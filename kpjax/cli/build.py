"""`python -m kpjax.data.build --manual-dir DIR --data-dir DIR`: the FashionAI files as a TFDS dataset."""

from __future__ import annotations

import sys
from typing import Sequence

from kpjax.cli import common
from kpjax.data import build
from kpjax.errors import BuildError


def _build(args) -> int:
  try:
    summary = build.build_dataset(args.manual_dir, args.data_dir, skip_bad=args.skip_bad,
                            validation_fraction=args.validation_fraction, overwrite=args.overwrite,
                            num_threads=args.num_threads, progress=sys.stderr.isatty())
  except BuildError as e:
    bad_row = ': row ' in str(e) and not args.skip_bad
    raise BuildError(f'{e}' + (' (pass --skip-bad to skip bad rows and images, listing them)' if bad_row else '')) from None
  for message in summary.skipped:
    print(f'skipped: {message}', file=sys.stderr)
  if summary.skipped:
    print(f'skipped {len(summary.skipped)} bad rows/images', file=sys.stderr)
  counts = ', '.join(f'{k} {v}' for k, v in sorted(summary.num_examples.items()))
  print(f'wrote {summary.dataset_dir} ({counts})')
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.ArgumentParser(prog='python -m kpjax.data.build', description=build.__doc__.split('\n\n')[0])
  parser.add_argument('--manual-dir', required=True,
                      help='the unpacked FashionAI archives (train/Annotations/train.csv, train/Images/...)')
  parser.add_argument('--data-dir', required=True, help='TFDS data directory to write the dataset into')
  parser.add_argument('--skip-bad', action='store_true',
                      help='skip (and list) bad rows and images instead of stopping at the first')
  parser.add_argument('--validation-fraction', type=float, default=0.1,
                      help='share of the labelled images held out as the validation split (default 0.1)')
  parser.add_argument('--overwrite', action='store_true', help='replace a dataset already built in --data-dir')
  parser.add_argument('--num-threads', type=int, default=8, help='threads reading and checking images')
  return common.run(_build, common.parse(parser, argv))

