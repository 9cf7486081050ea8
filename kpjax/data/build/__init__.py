"""Building the TFDS dataset `fashionai_keypoints` (array_record) from the FashionAI files, without TensorFlow.

    python -m kpjax.data.build --manual-dir DIR --data-dir DIR [--skip-bad] [--validation-fraction F]   (kpjax.cli.build)

DIR (manual) holds the unpacked archives: train/Annotations/train.csv and train/Images/<category>/*.jpg,
optionally test/test.csv and test/Images (see kpjax.data.build.fashionai.MANUAL_DOWNLOAD_INSTRUCTIONS); a
synthetic set from `python -m kpjax.data.synthetic` has the same layout. The result,
<data-dir>/fashionai_keypoints/1.0.0, is read with `tfds.data_source('fashionai_keypoints',
data_dir=<data-dir>)` or `tfds.builder_from_directory` and grain. Its metadata.json also holds each split's
category index (kpjax.data.sources.CATEGORY_INDEX_KEY), so that a per-category model's start-up reads no record.

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

from kpjax.data import sources
from kpjax.data.build.fashionai import NAME, VERSION
from kpjax.errors import BuildError
from kpjax.io import atomic

__all__ = ['BuildSummary', 'build_dataset', 'dataset_dir']


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
  from kpjax.data.build import fashionai  # pylint: disable=g-import-not-at-top  (imports tensorflow_datasets)
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
      sources.write_category_index(builder)  # training reads it instead of every record
      os.rename(os.path.join(work, NAME, VERSION), new)  # tfds wrote <work>/<name>/<version>
    return BuildSummary(final, counts, list(builder.bad))
  finally:
    parent = os.path.dirname(final)
    if os.path.isdir(parent) and not os.listdir(parent):
      os.rmdir(parent)  # no empty fashionai_keypoints/ left by a failed build
