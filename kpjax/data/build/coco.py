"""A TFDS dataset of any keypoint set from COCO-format annotations: one example per annotated object, top-down.

    python -m kpjax.data.build --format coco --annotations TRAIN.json [--validation VAL.json] --images DIR
        --name NAME --data-dir D [--skip-bad] [--sigmas S | FILE.json] [--flip-pairs A:B,...] [--normalize A:B]
        [--keypoint-set SET.json]

Read without TensorFlow, as `fashionai_keypoints` is: `tfds.builder_from_directory(D/NAME/1.0.0)` and grain
(kpjax.data.sources). The keypoint set (kpjax.data.coco.keypoint_set: names and skeletons from the file's
`categories`, flip pairs from `left`/`right` names or --flip-pairs, sigmas from --sigmas or the defaults;
or a whole set written by hand, --keypoint-set) is the dataset's metadata `keypoint_set`; training,
evaluation and prediction take it from there.

Each object that is neither `iscrowd` nor without labelled keypoints (both are counted and left out) is
one record, in FashionAI's record layout (kpjax.data.sources) over the set's K keypoints:
    image       bytes: PNG of the object's crop (kpjax.data.coco.crop_window: the box grown by
                CROP_MARGIN on each side, cut at the image's edges)
    image_id    str: '<file_name>#<annotation id>'
    category    int32: index into the set's categories
    keypoints   float32 (K, 2): crop pixels (x, y); (-1, -1) where absent
    visibility  int32 (K,): COCO's v = 2 -> 1, 1 -> 0, 0 -> -1; a keypoint outside the crop -> -1; -1 outside
                the object's category
    height, width  int32: the crop's size
plus what COCO needs: annotation_id, coco_image_id (int64), file_name, bbox (4,) and area (float32, the
original image's), crop (2, 3) float32 (original pixels -> crop pixels, whole pixels; predictions map back
through its inverse) and coco_keypoints (K, 3) float32 (the file's x, y, v at the set's places, zeros
elsewhere). (TFDS records hold 32-bit floats: scoring against the file itself is exact, kpjax.evaluate
--coco-annotations.)
Splits: `train` from --annotations; `validation` from --validation, else the images whose file name
hashes below --validation-fraction (kpjax.data.build.fashionai.validation_hash; all of an image's
objects together).

A missing image, a keypoint list that is not 3K long, v outside {0, 1, 2}, a box outside its image, an
unknown category (and a corrupt image, a repeated id) stop the build naming the file, annotation id and
image, with nothing written; --skip-bad lists and skips them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image as PILImage

from kpjax.data import coco
from kpjax.data import keypoint_sets
from kpjax.data import keypoints as kp
from kpjax.data.build import fashionai
from kpjax.errors import BuildError, KeypointSetError

VERSION = '1.0.0'
_NAME = re.compile(r'[a-z][a-z0-9_]*')


@dataclasses.dataclass(frozen=True)
class Item:
  """One object to store: its image file, image entry, annotation and where it came from (for messages)."""
  key: str
  path: str
  image: coco.Image
  annotation: coco.Annotation
  where: str


def check_name(name: str) -> str:
  """`name` if it can name a TFDS dataset other than FashionAI's; BuildError otherwise."""
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise BuildError(f'--name {name!r}: expected a TFDS dataset name (lower case letters, digits and _, starting '
                     'with a letter)')
  if name == kp.TFDS_NAME:
    raise BuildError(f'--name {name}: that is the FashionAI dataset\'s name; choose another for COCO data')
  return name


def read_items(f: coco.CocoFile, images_dir: str, split: str, bad: list[str] | None,
               left_out: dict[str, int]) -> list[Item]:
  """The objects of a checked COCO file to store, counting crowd and zero-keypoint objects in `left_out`; a
  missing image file raises BuildError naming the annotation (or is listed in `bad`)."""
  out = []
  for a in f.annotations:
    if a.iscrowd:
      left_out['crowd'] = left_out.get('crowd', 0) + 1
      continue
    if a.labelled == 0:
      left_out['no_keypoints'] = left_out.get('no_keypoints', 0) + 1
      continue
    image = f.images[a.image_id]
    path = os.path.join(images_dir, *image.file_name.split('/'))
    where = f.where(a.id, a.image_id)
    if not os.path.isfile(path):
      message = f'{where}: image file {path} is missing'
      if bad is None:
        raise BuildError(message)
      bad.append(message)
      continue
    out.append(Item(f'{split}/{a.id}', path, image, a, where))
  return out


def _crop_record(item: Item, kset: keypoint_sets.KeypointSet) -> dict:
  """The record of one object; BuildError naming it for an unreadable image or a box outside it."""
  _, pixels = fashionai.read_image(item.path, item.where)
  h, w = pixels.shape[:2]
  if (item.image.width, item.image.height) not in ((None, None), (w, h)):
    raise BuildError(f'{item.where}: the file says the image is {item.image.width}x{item.image.height}, but '
                     f'{item.path} is {w}x{h}')
  a = item.annotation
  try:
    coco.check_box(a.bbox, w, h)
  except ValueError as e:
    raise BuildError(f'{item.where}: {e}') from None
  x0, y0, x1, y1 = coco.crop_window(a.bbox, h, w)
  crop = coco.crop_affine(x0, y0)
  buf = io.BytesIO()
  PILImage.fromarray(pixels[y0:y1, x0:x1]).save(buf, format='PNG')
  full = coco.set_keypoints(a, kset)
  xy, visibility = coco.training_keypoints(full, crop, (y1 - y0, x1 - x0))
  category = kset.coco_category(a.category_id).name
  outside = ~kset.category_mask(category)
  visibility[outside] = -1
  return {'image': buf.getvalue(), 'image_id': f'{item.image.file_name}#{a.id}',
          'category': kset.category_index(category), 'keypoints': xy, 'visibility': visibility,
          'height': y1 - y0, 'width': x1 - x0, 'annotation_id': a.id, 'coco_image_id': a.image_id,
          'file_name': item.image.file_name, 'bbox': a.bbox.astype(np.float32), 'area': np.float32(a.area),
          'crop': crop.astype(np.float32), 'coco_keypoints': full.astype(np.float32)}


class CocoKeypoints(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Objects of a COCO keypoint file, cropped top-down (the dataset's name is the user's: --name)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'One record per object: its crop (PNG), keypoints in crop pixels, the COCO ids, box, '
                            'area, crop affine and keypoints.'}

  def __init__(self, *, name: str, splits: dict[str, list[Item]], keypoint_set: keypoint_sets.KeypointSet,
               metadata: dict, skip_bad: bool = False, num_threads: int = 8, **kwargs):
    self.name = name  # as tfds' AdhocBuilder does: a builder class for any dataset name
    self._items = splits
    self.keypoint_set = keypoint_set
    self._metadata = metadata
    self.skip_bad = bool(skip_bad)
    self.num_threads = max(1, int(num_threads))
    self.bad: list[str] = []
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-overridden-method
    return None  # (see FashionaiKeypoints.code_path)

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    k = self.keypoint_set.num_keypoints
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes of the crop
            'image_id': tfds.features.Text(),
            'category': tfds.features.Scalar(dtype=np.int32),
            'keypoints': tfds.features.Tensor(shape=(k, 2), dtype=np.float32),
            'visibility': tfds.features.Tensor(shape=(k,), dtype=np.int32),
            'height': tfds.features.Scalar(dtype=np.int32),
            'width': tfds.features.Scalar(dtype=np.int32),
            'annotation_id': tfds.features.Scalar(dtype=np.int64),
            'coco_image_id': tfds.features.Scalar(dtype=np.int64),
            'file_name': tfds.features.Text(),
            'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
            'area': tfds.features.Scalar(dtype=np.float32),
            'crop': tfds.features.Tensor(shape=(2, 3), dtype=np.float32),
            'coco_keypoints': tfds.features.Tensor(shape=(k, 3), dtype=np.float32),
        }),
        metadata=tfds.core.MetadataDict(**self._metadata),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(items) for split, items in self._items.items() if items}

  def _generate_examples(self, items: list[Item]) -> Iterator[tuple[str, dict]]:
    yield from fashionai.checked_records(items, lambda item: _crop_record(item, self.keypoint_set), self.num_threads,
                                         self.bad if self.skip_bad else None)


def _same_categories(train: coco.CocoFile, other: coco.CocoFile) -> None:
  if train.categories != other.categories:
    raise BuildError(f'{other.path}: its keypoint categories differ from {train.path}\'s; both files must define the '
                     'same categories (ids, names, keypoints, skeletons)')


def build(annotations: str, images_dir: str, name: str, data_dir: str, *, validation: str | None = None,
          validation_fraction: float = 0.1, skip_bad: bool = False, sigmas=None,
          flip_pairs: Sequence[tuple[str, str]] | None = None, normalization: tuple[str, str] | None = None,
          keypoint_set: keypoint_sets.KeypointSet | None = None, overwrite: bool = False, num_threads: int = 8,
          progress: bool = False):
  """Builds <data_dir>/<name>/1.0.0 from COCO keypoint annotations (module docstring); a BuildSummary.

  sigmas: keypoint_sets.parse_sigmas' value; flip_pairs: (left, right) names (None: from the names);
  normalization: a keypoint pair that normalises NE where a category has both; keypoint_set: the whole set
  defined by hand instead (coco.fit_keypoint_set: the file's categories and keypoints, any flips, sigmas,
  skeletons and pairs; not with the three before). Raises BuildError naming
  the first bad annotation (file, annotation id, image) unless skip_bad, with nothing written.
  """
  from kpjax.data import build as build_lib  # pylint: disable=g-import-not-at-top

  check_name(name)
  if not 0.0 <= validation_fraction < 1.0:
    raise BuildError(f'--validation-fraction must be in [0, 1); got {validation_fraction}')
  images_dir = os.path.abspath(os.path.expanduser(images_dir))
  if not os.path.isdir(images_dir):
    raise BuildError(f'--images {images_dir}: no such directory; expected the folder the files\' file_name are in')
  final = build_lib.dataset_dir(data_dir, name, VERSION)
  from kpjax.io import atomic  # pylint: disable=g-import-not-at-top
  atomic.check_target(final, replace=overwrite, flag='--overwrite', error=BuildError)
  bad = [] if skip_bad else None
  left_out: dict[str, int] = {}
  train_file = coco.read_annotations(os.path.abspath(annotations), BuildError, bad)
  files = {'train': train_file}
  if validation:
    files['validation'] = coco.read_annotations(os.path.abspath(validation), BuildError, bad)
    _same_categories(train_file, files['validation'])
  try:
    if keypoint_set is not None:
      if sigmas is not None or flip_pairs is not None or normalization is not None:
        raise KeypointSetError('a keypoint set given whole defines its sigmas, flip pairs and normalisation; '
                               'drop --sigmas, --flip-pairs and --normalize')
      kset = coco.fit_keypoint_set(keypoint_set, list(train_file.categories.values()), name)
    else:
      kset = coco.keypoint_set(list(train_file.categories.values()), name, sigmas=sigmas, flip_pairs=flip_pairs,
                               normalization=normalization)
  except KeypointSetError as e:
    raise BuildError(f'{train_file.path}: {e}') from None
  splits = {split: read_items(f, images_dir, split, bad, left_out) for split, f in files.items()}
  if not validation and validation_fraction > 0:
    items = splits['train']
    held = [fashionai.validation_hash(it.image.file_name) < validation_fraction for it in items]
    splits = {'train': [it for it, h in zip(items, held) if not h],
              'validation': [it for it, h in zip(items, held) if h]}
  if not splits['train']:
    raise BuildError(f'{train_file.path}: no object to train on (every one is a crowd, has no labelled keypoint, '
                     'or was skipped)')
  metadata = {keypoint_sets.METADATA_KEY: kset.to_json(), 'format': 'coco', 'crop_margin': coco.CROP_MARGIN,
              'annotations': {s: f.path for s, f in files.items()}, 'images': images_dir,
              'left_out': dict(left_out)}

  def make(work):
    return CocoKeypoints(name=name, splits=splits, keypoint_set=kset, metadata=metadata, skip_bad=skip_bad,
                         num_threads=num_threads, data_dir=work, file_format='array_record')

  builder, counts = build_lib.write_staged(final, name, VERSION, make, overwrite=overwrite, progress=progress)
  return build_lib.BuildSummary(final, counts, list(bad or []) + list(builder.bad), left_out)
