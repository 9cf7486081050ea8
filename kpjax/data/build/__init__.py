"""Building TFDS datasets (array_record) without TensorFlow: `fashionai_keypoints` from the FashionAI files, or
any keypoint set from COCO-format annotations (kpjax.data.build.coco).

    python -m kpjax.data.build --manual-dir DIR --data-dir DIR [--skip-bad] [--validation-fraction F]   (kpjax.cli.build)
    python -m kpjax.data.build --format coco --annotations TRAIN.json [--validation VAL.json] --images DIR
        --name NAME --data-dir DIR [--skip-bad] [--sigmas S | FILE.json]

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
Either directory may be gs://bucket/... (kpjax.io.paths): the dataset is then built in a local temporary
directory and uploaded, marked complete last (kpjax.io.atomic), and the FashionAI files are read from the
bucket.
"""

from __future__ import annotations

import dataclasses
import os

from kpjax.data import sources
from kpjax.data.build.fashionai import NAME, VERSION
from kpjax.errors import BuildError
from kpjax.io import atomic
from kpjax.io import paths

__all__ = ['BuildSummary', 'build_coco_dataset', 'build_dataset', 'dataset_dir']


@dataclasses.dataclass
class BuildSummary:
  """What a build wrote: the dataset directory, examples per split, the skipped rows/images/annotations, and
  counts of what was left out on purpose (a COCO build's crowd and zero-keypoint objects)."""
  dataset_dir: str
  num_examples: dict[str, int]
  skipped: list[str]
  left_out: dict[str, int] = dataclasses.field(default_factory=dict)


def dataset_dir(data_dir: str, name: str = NAME, version: str = VERSION) -> str:
  return paths.join(paths.resolve(data_dir), name, version)


def build_dataset(manual_dir: str, data_dir: str, *, skip_bad: bool = False, validation_fraction: float = 0.1,
                  overwrite: bool = False, num_threads: int = 8, progress: bool = False) -> BuildSummary:
  """Builds <data_dir>/fashionai_keypoints/1.0.0 from the FashionAI-layout files in `manual_dir`.

  Raises BuildError (a ValueError) naming the first bad file/row unless skip_bad, or when the dataset is
  already there and not `overwrite`. Nothing is left in data_dir when it fails. progress: tfds's
  progress bars (a global tfds setting).
  """
  from kpjax.data.build import fashionai  # pylint: disable=g-import-not-at-top  (imports tensorflow_datasets)

  manual_dir = os.fspath(paths.resolve(manual_dir))
  final = dataset_dir(data_dir)
  atomic.check_target(final, replace=overwrite, flag='--overwrite', error=BuildError)
  fashionai.find_sources(manual_dir)  # a clear error before anything is created

  def make(work):
    return fashionai.FashionaiKeypoints(data_dir=work, file_format='array_record', skip_bad=skip_bad,
                                        validation_fraction=validation_fraction, num_threads=num_threads)

  builder, counts = write_staged(final, NAME, VERSION, make, overwrite=overwrite, progress=progress,
                                 manual_dir=manual_dir)
  return BuildSummary(final, counts, list(builder.bad))


def write_staged(final: str, name: str, version: str, make_builder, *, overwrite: bool, progress: bool,
                 manual_dir: str | None = None):
  """Runs the tfds builder `make_builder(scratch data_dir)` makes and moves its dataset to `final` in one
  step: (builder, examples per split). Nothing is left at `final` (or an old dataset there is kept whole)
  when the builder or the move fails; a BuildError that tfds wrapped comes out as itself."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.display_progress_bar(progress)
  try:
    with atomic.staged_dir(final, replace=overwrite, flag='--overwrite', error=BuildError) as new, \
        atomic.scratch_dir(final) as work:
      builder = make_builder(work)
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
      counts = {split_name: int(split.num_examples) for split_name, split in builder.info.splits.items()}
      sources.write_category_index(builder)  # training reads it instead of every record
      os.rename(os.path.join(work, name, version), new)  # tfds wrote <work>/<name>/<version>
    return builder, counts
  finally:
    parent = os.path.dirname(final)
    if not paths.is_remote(parent) and os.path.isdir(parent) and not os.listdir(parent):
      os.rmdir(parent)  # no empty <name>/ left by a failed build (a bucket has no empty folders)


def build_coco_dataset(annotations: str, images_dir: str, name: str, data_dir: str, **kwargs) -> BuildSummary:
  """Builds <data_dir>/<name>/1.0.0 from a COCO keypoint file: see kpjax.data.build.coco.build."""
  from kpjax.data.build import coco  # pylint: disable=g-import-not-at-top  (imports tensorflow_datasets)
  return coco.build(annotations, images_dir, name, data_dir, **kwargs)
