"""Builds the TFDS dataset `fashionai_keypoints` (array_record) from the FashionAI files, without TensorFlow.

    python -m kpjax.data.build --manual-dir DIR --data-dir DIR [--skip-bad] [--validation-fraction F]

DIR (manual) holds the unpacked archives: train/Annotations/train.csv and train/Images/<category>/*.jpg,
optionally test/test.csv and test/Images (see kpjax.data.fashionai.MANUAL_DOWNLOAD_INSTRUCTIONS); a
synthetic set from `python -m kpjax.data.synthetic` has the same layout. The result,
<data-dir>/fashionai_keypoints/1.0.0, is read with `tfds.data_source('fashionai_keypoints',
data_dir=<data-dir>)` or `tfds.builder_from_directory` and grain.

Bad data (a malformed CSV row, an unknown category, a missing or undecodable image, a keypoint outside
its image) stops the build at the first case with a message naming the file, row and image, and leaves
nothing behind; with --skip-bad each bad row/image is skipped and listed. Labels are never guessed.
The dataset is written to a temporary directory inside --data-dir and moved into place only when complete;
with --overwrite the old dataset stays until then, and stays whole if the build or the move fails.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

from kpjax import atomic
from kpjax import cli
from kpjax.data.fashionai import BuildError, NAME, VERSION  # BuildError is re-exported here

__all__ = ['BuildError', 'BuildSummary', 'build_dataset', 'main']


@dataclasses.dataclass
class BuildSummary:
  """What a build wrote: the dataset directory, examples per split, and the skipped rows/images."""
  dataset_dir: str
  num_examples: dict[str, int]
  skipped: list[str]


def dataset_dir(data_dir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), NAME, VERSION)


def build_dataset(manual_dir: str, data_dir: str, *, skip_bad: bool = False, validation_fraction: float = 0.1,
                  overwrite: bool = False, num_threads: int = 8, progress: bool = False) -> BuildSummary:
  """Builds <data_dir>/fashionai_keypoints/1.0.0 from the FashionAI-layout files in `manual_dir`.

  Raises BuildError (a ValueError) naming the first bad file/row unless skip_bad, or when the dataset is
  already there and not `overwrite`. Nothing is left in data_dir when it fails. progress: tfds's
  progress bars (a global tfds setting).
  """
  from kpjax.data import fashionai  # pylint: disable=g-import-not-at-top  (imports tensorflow_datasets)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.display_progress_bar(progress)
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  final = dataset_dir(data_dir)
  atomic.check_target(final, replace=overwrite, flag='--overwrite', error=BuildError)
  fashionai.find_sources(manual_dir)  # a clear error before anything is created
  try:
    with atomic.staged_dir(final, replace=overwrite, flag='--overwrite', error=BuildError) as new, \
        atomic.scratch_dir(final) as work:
      builder = fashionai.FashionaiKeypoints(data_dir=work, file_format='array_record', skip_bad=skip_bad,
                                             validation_fraction=validation_fraction, num_threads=num_threads)
      config = tfds.download.DownloadConfig(manual_dir=manual_dir,
                                            compute_stats=tfds.download.ComputeStatsMode.SKIP)
      try:
        builder.download_and_prepare(download_dir=os.path.join(work, 'downloads'), download_config=config)
      except BuildError:
        raise
      except Exception as e:  # tfds may wrap our error; find it
        cause = e
        while cause is not None and not isinstance(cause, BuildError):
          cause = cause.__cause__ or cause.__context__
        if cause is None:
          raise
        raise BuildError(str(cause)) from None
      counts = {name: int(split.num_examples) for name, split in builder.info.splits.items()}
      os.rename(os.path.join(work, NAME, VERSION), new)  # tfds wrote <work>/<name>/<version>
    return BuildSummary(final, counts, list(builder.bad))
  finally:
    parent = os.path.dirname(final)
    if os.path.isdir(parent) and not os.listdir(parent):
      os.rmdir(parent)  # no empty fashionai_keypoints/ left by a failed build


def _build(args) -> int:
  try:
    summary = build_dataset(args.manual_dir, args.data_dir, skip_bad=args.skip_bad,
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
  parser = cli.ArgumentParser(prog='python -m kpjax.data.build', description=__doc__.split('\n\n')[0])
  parser.add_argument('--manual-dir', required=True,
                      help='the unpacked FashionAI archives (train/Annotations/train.csv, train/Images/...)')
  parser.add_argument('--data-dir', required=True, help='TFDS data directory to write the dataset into')
  parser.add_argument('--skip-bad', action='store_true',
                      help='skip (and list) bad rows and images instead of stopping at the first')
  parser.add_argument('--validation-fraction', type=float, default=0.1,
                      help='share of the labelled images held out as the validation split (default 0.1)')
  parser.add_argument('--overwrite', action='store_true', help='replace a dataset already built in --data-dir')
  parser.add_argument('--num-threads', type=int, default=8, help='threads reading and checking images')
  return cli.run(_build, cli.parse(parser, argv))


if __name__ == '__main__':
  sys.exit(main())
