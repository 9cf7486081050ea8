"""The TFDS builder `fashionai_keypoints`: the FashionAI keypoint release as array_record files.

Built with `python -m kpjax.data.build` (kpjax.data.build.build_dataset) and read without TensorFlow:
    tfds.data_source('fashionai_keypoints', data_dir=DIR, split='train')  # or builder_from_directory
One record per image:
    image       bytes: the file exactly as released (JPEG), checked to decode
    image_id    str: the CSV's `Images/<category>/<name>.jpg`
    category    int32: index into kpjax.data.keypoints.CATEGORIES
    keypoints   float32 (24, 2): pixels (x, y) in CSV order (-1 where absent)
    visibility  int32 (24,): 1 visible, 0 occluded, -1 absent / not in the category
    height, width  int32: the decoded image's size
Splits: `train`; `validation`, a deterministic hold-out of the labelled images (an image goes there
when the hash of its image id falls below validation_fraction, so it never moves between builds);
`test` (the unlabelled test sets: keypoints and visibility all -1).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from kpjax.data import fashionai_csv as csv_io
from kpjax.data import images
from kpjax.data import keypoints as kp
from kpjax.errors import BuildError, ImageError
from kpjax.io import paths

NAME = kp.TFDS_NAME  # 'fashionai_keypoints'
_classproperty = tfds.core.utils.classproperty
VERSION = '1.0.0'

# Labelled sets, as the archives unpack (round 1: train/Annotations/train.csv; round 2 and the warm-up
# set: Annotations/annotations.csv). Every folder found is used; image paths are relative to it.
TRAIN_FOLDERS = ('train', 'r1_train', 'r2_train', 'train_warm_up', 'warm_up_train', 'wu_train',
                 'fashionAI_key_points_train_warm_up')
TRAIN_CSVS = ('Annotations/train.csv', 'Annotations/annotations.csv')
# Unlabelled test sets (image_id,image_category), images under <folder>/Images.
TEST_FOLDERS = ('test', 'test_a', 'test_b', 'r1_test_a', 'r1_test_b', 'r2_test_a', 'r2_test_b')
TEST_CSVS = ('test.csv',)

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the FashionAI keypoint archives (Alibaba Tianchi, "FashionAI Global Challenge - Key Points
Detection of Apparel", 2018) and unpack them into the manual directory, so that it holds

  <manual_dir>/train/Annotations/train.csv          (round 1; round 2 ships Annotations/annotations.csv)
  <manual_dir>/train/Images/<category>/<name>.jpg
  <manual_dir>/test/test.csv                          (optional: image_id,image_category)
  <manual_dir>/test/Images/<category>/<name>.jpg

Other labelled sets (the warm-up set, a second round) may sit beside `train` in any of the folders
{', '.join(TRAIN_FOLDERS)}, each with one of {', '.join(TRAIN_CSVS)} and its Images/; all are merged
into `train`/`validation`. Other test sets may use the folders {', '.join(TEST_FOLDERS)}. Then run
  python -m kpjax.data.build --manual-dir <manual_dir> --data-dir <data_dir>
"""


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to store: where its file is and its labels (keypoints None for a test image)."""
  key: str  # unique over the whole build: <folder>/<image_id>
  path: str
  image_id: str
  category: str
  keypoints: np.ndarray | None
  visibility: np.ndarray | None
  where: str  # '<csv>: row N' for messages


def validation_hash(image_id: str) -> float:
  """A number in [0, 1) fixed by the image id: the image is held out when it is < validation_fraction."""
  return int(hashlib.sha256(image_id.encode('utf-8')).hexdigest()[:12], 16) / float(1 << 48)


def find_sources(manual_dir: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """([(folder, train csv)], [(folder, test csv)]) present under manual_dir; BuildError when no labels."""
  if not paths.resolve(manual_dir).is_dir():
    raise BuildError(f'{manual_dir}: no such directory; expected the unpacked FashionAI archives '
                     '(train/Annotations/train.csv, train/Images/...)')
  train, test = [], []
  for folders, csvs, out in ((TRAIN_FOLDERS, TRAIN_CSVS, train), (TEST_FOLDERS, TEST_CSVS, test)):
    for folder in folders:
      for name in csvs:
        path = paths.join(manual_dir, folder, name)
        if paths.resolve(path).is_file():
          out.append((paths.join(manual_dir, folder), path))
          break
  if not train:
    raise BuildError(f'{manual_dir}: found no annotations; expected train/Annotations/train.csv (or '
                     f'annotations.csv) with the images in train/Images/<category>/. Layout:\n'
                     + MANUAL_DOWNLOAD_INSTRUCTIONS)
  return train, test


def read_items(manual_dir: str, bad: list[str] | None) -> tuple[list[Item], list[Item]]:
  """(labelled items, test items) from every CSV under manual_dir.

  bad: None = raise BuildError at the first malformed row; a list = describe bad rows there and skip
  them. Image files are not opened here (see check_image).
  """
  train_sources, test_sources = find_sources(manual_dir)
  labelled, test = [], []
  seen: dict[str, str] = {}

  def add(out, folder, image_id, where, category, keypoints=None, visibility=None):
    key = f'{os.path.basename(folder)}/{image_id}'
    if key in seen:
      msg = f'{where} ({image_id}): image listed twice (first at {seen[key]})'
      if bad is None:
        raise BuildError(msg)
      bad.append(msg)
      return
    seen[key] = where
    path = paths.join(folder, *image_id.split('/'))
    out.append(Item(key, path, image_id, category, keypoints, visibility, where))

  for folder, csv_path in train_sources:
    errors = None if bad is None else []
    try:
      for a in csv_io.iter_annotations(csv_path, errors):
        add(labelled, folder, a.image_id, f'{csv_path}: row {a.row}', a.category, a.keypoints, a.visibility)
    except csv_io.CsvFormatError as e:
      raise BuildError(str(e)) from None
    if errors:
      bad.extend(errors)
  for folder, csv_path in test_sources:
    try:
      categories = csv_io.read_categories(csv_path)
    except csv_io.CsvFormatError as e:
      raise BuildError(str(e)) from None
    for row, (image_id, category) in enumerate(categories.items(), start=2):
      add(test, folder, image_id, f'{csv_path}: row {row}', category)
  return labelled, test


def read_image(path: str, where: str) -> tuple[bytes, np.ndarray]:
  """(file bytes, decoded uint8 (H, W, 3)) of an image file; BuildError starting with `where` when it is
  missing, unreadable or does not decode."""
  try:
    data = paths.resolve(path).read_bytes()  # a local file or gs://...
  except FileNotFoundError:
    raise BuildError(f'{where}: image file {path} is missing') from None
  except OSError as e:
    raise BuildError(f'{where}: cannot read image file {path} ({e.strerror})') from None
  try:
    return data, images.decode_image(data, path)
  except ImageError as e:
    raise BuildError(f'{where}: {e}') from None


def check_image(item: Item) -> tuple[bytes, int, int]:
  """(file bytes, height, width) of an item; BuildError naming it when missing, corrupt or mislabelled."""
  where = f'{item.where} ({item.image_id})'
  data, image = read_image(item.path, where)
  h, w = image.shape[:2]
  if item.keypoints is not None:
    labelled = item.visibility >= 0
    xy = item.keypoints
    # Annotators click on the image, its border included: x in [0, width], y in [0, height].
    out = labelled & ((xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h))
    if out.any():
      j = int(np.flatnonzero(out)[0])
      raise BuildError(f'{where}: keypoint {kp.KEYPOINT_NAMES[j]} at ({xy[j, 0]:g}, {xy[j, 1]:g}) lies outside '
                       f'the {w}x{h} image')
  return data, h, w


def _record(item: Item, data: bytes, h: int, w: int) -> dict:
  if item.keypoints is None:
    keypoints = np.full((kp.NUM_KEYPOINTS, 2), -1, np.float32)
    visibility = np.full((kp.NUM_KEYPOINTS,), -1, np.int32)
  else:
    keypoints = item.keypoints.astype(np.float32)
    visibility = item.visibility.astype(np.int32)
  return {'image': data, 'image_id': item.image_id, 'category': kp.category_index(item.category),
          'keypoints': keypoints, 'visibility': visibility, 'height': h, 'width': w}


class FashionaiKeypoints(tfds.core.GeneratorBasedBuilder):
  """FashionAI clothing keypoints (blouse, dress, outwear, skirt, trousers; 24 keypoints)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Encoded images as released, 24 keypoints in CSV order, hashed validation split.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, skip_bad: bool = False, validation_fraction: float = 0.1, num_threads: int = 8,
               **kwargs):
    if not 0.0 <= validation_fraction < 1.0:
      raise BuildError(f'validation_fraction must be in [0, 1); got {validation_fraction}')
    self.skip_bad = bool(skip_bad)
    self.validation_fraction = float(validation_fraction)
    self.num_threads = max(1, int(num_threads))
    self.bad: list[str] = []  # what was skipped (skip_bad=True)
    super().__init__(**kwargs)

  @_classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-overridden-method
    # tfds locates a builder's checksums file next to its code; this one downloads nothing. Also avoids
    # tfds 4.9.10 touching the `importlib_resources` backport, which Python >= 3.9 does not install.
    return None

  # tfds prints where it writes; build.py writes to a temporary directory and reports the final place.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes, as released
            'image_id': tfds.features.Text(),
            'category': tfds.features.Scalar(dtype=np.int32),
            'keypoints': tfds.features.Tensor(shape=(kp.NUM_KEYPOINTS, 2), dtype=np.float32),
            'visibility': tfds.features.Tensor(shape=(kp.NUM_KEYPOINTS,), dtype=np.int32),
            'height': tfds.features.Scalar(dtype=np.int32),
            'width': tfds.features.Scalar(dtype=np.int32),
        }),
        homepage='https://tianchi.aliyun.com/competition/entrance/231648/information',
        metadata=tfds.core.MetadataDict(validation_fraction=self.validation_fraction,
                                        categories=list(kp.CATEGORIES), keypoints=list(kp.KEYPOINT_NAMES)),
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    labelled, test = read_items(manual_dir, self.bad if self.skip_bad else None)
    held_out = [validation_hash(it.image_id) < self.validation_fraction for it in labelled]
    splits = {'train': self._generate_examples([it for it, v in zip(labelled, held_out) if not v])}
    if any(held_out):
      splits['validation'] = self._generate_examples([it for it, v in zip(labelled, held_out) if v])
    if test:
      splits['test'] = self._generate_examples(test)
    return splits

  def _generate_examples(self, items: list[Item]) -> Iterator[tuple[str, dict]]:
    yield from checked_records(items, lambda item: _record(item, *check_image(item)), self.num_threads,
                               self.bad if self.skip_bad else None)


def checked_records(items, make, num_threads: int, bad: list[str] | None) -> Iterator[tuple[str, dict]]:
  """(item.key, make(item)) for every item, in order, made ahead by a thread pool (decoding releases the GIL).

  A BuildError from `make` stops the build; with a `bad` list it is described there and the item skipped.
  """
  def load(item):
    try:
      return item, make(item), None
    except BuildError as e:
      return item, None, str(e)

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for item, record, error in pool.map(load, items):  # in order
      if error is not None:
        if bad is None:
          raise BuildError(error)
        bad.append(error)
        continue
      yield item.key, record
