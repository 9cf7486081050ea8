"""Where training and evaluation records come from: a TFDS dataset built by kpjax.data.build (array_record,
read without TensorFlow), or synthetic garments generated and built on first use. Either may be in a local
directory or in gs://bucket/... (kpjax.io.paths): array_record reads its files from Cloud Storage itself.

A record (one item of the TFDS `fashionai_keypoints` data source, see kpjax.data.build.fashionai) is
{'image': encoded bytes (uint8 (H, W, 3) pixels are accepted too), 'image_id': str,
 'category': int index into kpjax.data.keypoints.CATEGORIES, 'keypoints': float32 (24, 2) original pixels
 (x, y), 'visibility': int32 (24,) in {1, 0, -1}, 'height': int, 'width': int}.
Any other keypoint set's records (a COCO build, kpjax.data.build.coco) have the same keys with K keypoints
and the category an index into the set's categories, plus OBJECT_KEYS. A source knows its set
(`RecordSource.keypoint_set`, from the dataset's metadata; FashionAI's when it records none).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import numpy as np

from kpjax.data import keypoint_sets
from kpjax.data import keypoints as kp
from kpjax.errors import DatasetNotFoundError
from kpjax.io import atomic
from kpjax.io import paths

RECORD_KEYS = ('image', 'image_id', 'category', 'keypoints', 'visibility', 'height', 'width')
# What a record of one object of a COCO file adds (kpjax.data.build.coco): its ids and file, its box and area
# in the original image, the crop's affine (original pixels -> the record's image pixels) and the file's
# own (K, 3) keypoints (x, y, v in the original image, v COCO's 0/1/2; zeros outside the category).
OBJECT_KEYS = {'annotation_id': np.int64, 'coco_image_id': np.int64, 'file_name': str, 'bbox': np.float64,
               'area': np.float64, 'crop': np.float64, 'coco_keypoints': np.float64}
SYNTHETIC_SUBDIR = 'synthetic'  # a run's own synthetic data, inside its workdir (config.data.synthetic_dir = '')
_CATEGORY_CHUNK = 256  # records read at a time when indexing categories
# A built dataset's metadata.json (tfds MetadataDict) key: {split: [category index of each record, in
# the split's order]}, written by kpjax.data.build (after the 0.1.0 release) so that selecting a category
# reads no record; datasets without it (built by 0.1.0) are indexed by reading every record once per process.
CATEGORY_INDEX_KEY = 'category_index'
_NOTED: set[str] = set()  # datasets whose missing index was reported (once per process)


def normalize_record(record: dict[str, Any]) -> dict[str, Any]:
  """A data-source item -> a record with plain types (image_id str, category int, float32/int32 arrays)."""
  image_id = record['image_id']
  if isinstance(image_id, np.ndarray):
    image_id = image_id.item()
  if isinstance(image_id, bytes):
    image_id = image_id.decode('utf-8')
  image = record['image']
  if isinstance(image, np.ndarray) and image.ndim == 3:  # a builder that stores decoded pixels
    image = np.asarray(image, np.uint8)
  else:
    if isinstance(image, np.ndarray):
      image = image.item() if image.dtype == object or image.ndim == 0 else image.tobytes()
    image = bytes(image)
  out = {
      'image': image,
      'image_id': str(image_id),
      'category': int(record['category']),
      'keypoints': np.asarray(record['keypoints'], np.float32).reshape(-1, 2),
      'visibility': np.asarray(record['visibility'], np.int32).reshape(-1),
      'height': int(record['height']),
      'width': int(record['width']),
  }
  for key, kind in OBJECT_KEYS.items():
    if key in record:
      out[key] = _text(record[key]) if kind is str else np.asarray(record[key], kind)
  return out


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class RecordSource(Sequence):
  """Random access to normalised records over any sequence of raw records (a TFDS data source, a list).

  Picklable when the wrapped source is (TFDS array_record sources are), so grain workers can use it.
  `categories()` is the given index (`categories`, int (N,)), or else computed once by reading every
  record (never decoding images) and cached; `unindexed_note`, when given, is printed (once per process)
  before such a read. `keypoint_set`: what the records' keypoints are (FashionAI's unless given).
  """

  def __init__(self, source: Sequence, name: str = '', keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI,
               categories: Sequence[int] | None = None, unindexed_note: str = ''):
    self._source = source
    self.name = name or type(source).__name__
    self.keypoint_set = keypoint_set
    self._categories = None if categories is None else np.asarray(categories, np.int32)
    self._unindexed_note = unindexed_note

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return normalize_record(self._source[int(index)])

  def _read_many(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    getitems = getattr(self._source, '__getitems__', None)
    if getitems is not None:
      return list(getitems([int(i) for i in indices]))
    return [self._source[int(i)] for i in indices]

  def categories(self) -> np.ndarray:
    """int32 (N,): every record's category index, in source order."""
    if self._categories is None:
      if self._unindexed_note and self._unindexed_note not in _NOTED:
        _NOTED.add(self._unindexed_note)
        print(f'note: {self._unindexed_note}', file=sys.stderr, flush=True)
      cats = np.empty(len(self), np.int32)
      for start in range(0, len(self), _CATEGORY_CHUNK):
        chunk = range(start, min(start + _CATEGORY_CHUNK, len(self)))
        cats[start:start + len(chunk)] = [int(r['category']) for r in self._read_many(chunk)]
      self._categories = cats
    return self._categories

  def __repr__(self) -> str:
    return f'RecordSource({self.name}, {len(self)} records)'


def source_categories(source: Sequence) -> np.ndarray:
  """int32 (N,): the category index of every record of `source` (a RecordSource or a list of records)."""
  if hasattr(source, 'categories'):
    return np.asarray(source.categories(), np.int32)
  return np.array([int(source[i]['category']) for i in range(len(source))], np.int32)


def source_keypoint_set(source: Sequence) -> keypoint_sets.KeypointSet:
  """The keypoint set of `source`'s records (a RecordSource's; FashionAI's for a plain list)."""
  return getattr(source, 'keypoint_set', kp.FASHIONAI)


def example_indices(source: Sequence, category: str,
                    keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI) -> np.ndarray:
  """int64 (M,): source positions of the records a `category` model of `keypoint_set` uses ('all': every record)."""
  if category == kp.ALL:
    return np.arange(len(source), dtype=np.int64)
  return np.flatnonzero(source_categories(source) == keypoint_set.category_index(category)).astype(np.int64)


def is_fashionai(data) -> bool:
  """Whether config.data names FashionAI data (synthetic garments, or the `fashionai_keypoints` build)."""
  return data.source == 'synthetic' or data.tfds_name == kp.TFDS_NAME


def _build_command(data_dir: str, name: str = kp.TFDS_NAME) -> str:
  if name != kp.TFDS_NAME:
    return (f'python -m kpjax.data.build --format coco --annotations TRAIN.json --validation VAL.json '
            f'--images <the images> --name {name} --data-dir {data_dir}')
  return ('python -m kpjax.data.build --manual-dir <where the FashionAI archives were extracted> '
          f'--data-dir {data_dir}')


def find_tfds_dir(data_dir: str, name: str) -> str | None:
  """The newest built version directory `data_dir/name/[config/]version` (holding dataset_info.json), or None."""
  root = paths.resolve(data_dir).joinpath(name)
  candidates = list(root.glob('*/dataset_info.json')) + list(root.glob('*/*/dataset_info.json'))
  if not candidates:
    return None

  def version_key(path):
    parts = path.parent.name.split('.')
    return tuple(int(p) if p.isdigit() else -1 for p in parts)

  return os.fspath(max(candidates, key=version_key).parent)


def _tfds_builder(data_dir: str, name: str):
  """(tfds builder, its directory) of the dataset `name` built under `data_dir`; DatasetNotFoundError if none."""
  builder_dir = find_tfds_dir(data_dir, name)
  if builder_dir is None:
    raise DatasetNotFoundError(
        f'TFDS dataset {name!r} is not built in {data_dir} (no {name}/<version>/dataset_info.json); '
        f'build it with: {_build_command(data_dir, name)}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder_from_directory(builder_dir), builder_dir


def _metadata_keypoint_set(builder, builder_dir: str) -> keypoint_sets.KeypointSet:
  return keypoint_sets.from_metadata(dict(builder.info.metadata or {}), where=f'{builder_dir}/metadata.json')


def open_tfds_source(data_dir: str, name: str, split: str) -> RecordSource:
  """The `split` of the TFDS dataset `name` built under `data_dir`, as a RecordSource (no TensorFlow)."""
  builder, builder_dir = _tfds_builder(data_dir, name)
  splits = sorted(builder.info.splits)
  if split not in builder.info.splits:
    raise DatasetNotFoundError(f'TFDS dataset {name!r} in {builder_dir} has no split {split!r}; '
                               f'it has {", ".join(splits) or "none"}')
  source = builder.as_data_source(split=split)
  kset = _metadata_keypoint_set(builder, builder_dir)
  index = (builder.info.metadata or {}).get(CATEGORY_INDEX_KEY, {}).get(split)
  if index is None:
    return RecordSource(source, name=f'{name}:{split}', keypoint_set=kset, unindexed_note=(
        f'{builder_dir} has no category index (built by kpjax 0.1.0): selecting a category reads every record '
        f'of a split once; rebuild it (python -m kpjax.data.build ... --overwrite) to skip that'))
  if len(index) != len(source) or not all(isinstance(c, int) and 0 <= c < len(kset.categories) for c in index):
    raise DatasetNotFoundError(f'{builder_dir}/metadata.json: the {CATEGORY_INDEX_KEY} of split {split!r} does '
                               f'not describe its {len(source)} records; rebuild the dataset (--overwrite)')
  return RecordSource(source, name=f'{name}:{split}', keypoint_set=kset, categories=index)


def write_category_index(builder) -> dict[str, list[int]]:
  """Stores every split's category index (CATEGORY_INDEX_KEY) in a built TFDS dataset's metadata.json.

  builder: the tfds builder that has just built it (kpjax.data.build). Reads each split once, as
  `RecordSource.categories` does, so that later runs read none to select a category. Returns the index.
  """
  index = {split: RecordSource(builder.as_data_source(split=split)).categories().tolist()
           for split in sorted(builder.info.splits)}
  builder.info.metadata[CATEGORY_INDEX_KEY] = index
  builder.info.metadata.save_metadata(builder.data_dir)
  return index


def dataset_keypoint_set(data) -> keypoint_sets.KeypointSet:
  """The keypoint set of the data config.data names, read without touching anything: FashionAI's for
  FashionAI data (is_fashionai), else the one the built dataset's metadata records."""
  if is_fashionai(data):
    return kp.FASHIONAI
  builder, builder_dir = _tfds_builder(os.path.abspath(os.path.expanduser(data.data_dir)), data.tfds_name)
  return _metadata_keypoint_set(builder, builder_dir)


def ensure_synthetic(base_dir: str, num_images: int, seed: int, name: str = kp.TFDS_NAME) -> str:
  """Generates and builds the synthetic dataset under `base_dir` unless it is there; returns the TFDS data_dir.

  Layout: base_dir/raw (the FashionAI-style files: train/Annotations/train.csv, train/Images/...) and
  base_dir/tfds (the built dataset). Everything is made in a temporary sibling directory and renamed
  into place in one step, so no reader ever sees half a dataset. Several processes (JAX hosts,
  parallel tests) may call this at once: each builds its own copy (generation is seeded, so the
  copies are identical), the first rename wins and the others discard theirs. That also works when
  hosts do not share a file system, where a "process 0 builds, the others wait" scheme would hang.

  In a bucket (gs://), which every host sees, process 0 of a multi-process run builds and uploads it (a
  local build, then kpjax.io.atomic's upload) while the others wait for it at a barrier.
  """
  base = paths.resolve(base_dir)
  base_dir, tfds_dir = os.fspath(base), paths.join(base, 'tfds')
  if paths.is_remote(base_dir):
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if jax.process_index() == 0:
        _build_synthetic(base, tfds_dir, num_images, seed, name)
      multihost_utils.sync_global_devices(f'kpjax synthetic dataset {base_dir}')  # every call, every process
      if find_tfds_dir(tfds_dir, name) is None:
        raise DatasetNotFoundError(f'process 0 did not build the synthetic dataset in {base_dir}')
      return tfds_dir
  return _build_synthetic(base, tfds_dir, num_images, seed, name)


def _build_synthetic(base, tfds_dir: str, num_images: int, seed: int, name: str) -> str:
  base_dir = os.fspath(base)
  if find_tfds_dir(tfds_dir, name) is not None:
    return tfds_dir
  leftover = base.exists() and (not base.is_dir() or any(base.iterdir()))
  if leftover and not (paths.is_remote(base_dir) and not paths.is_complete(base)):  # an upload cut short is redone
    raise DatasetNotFoundError(f'{base_dir} exists but holds no built synthetic dataset (expected '
                               f'{name}/<version>/dataset_info.json under {tfds_dir}); remove it or point '
                               'config.data.synthetic_dir elsewhere')
  from kpjax.data import build, synthetic  # pylint: disable=g-import-not-at-top  (tfds and PIL drawing: on demand)
  with atomic.staged_dir(base_dir, first_wins=True) as tmp:
    synthetic.generate(os.path.join(tmp, 'raw'), num_images, seed)
    build.build_dataset(os.path.join(tmp, 'raw'), os.path.join(tmp, 'tfds'))
    if find_tfds_dir(os.path.join(tmp, 'tfds'), name) is None:
      raise DatasetNotFoundError(f'building the synthetic dataset wrote no {name}/<version>/dataset_info.json '
                                 f'under {os.path.join(tmp, "tfds")}')
  if find_tfds_dir(tfds_dir, name) is None:  # ours, or another process's that won the rename
    raise DatasetNotFoundError(f'{base_dir} appeared while the synthetic dataset was being built, but holds no '
                               f'{name}/<version>/dataset_info.json under {tfds_dir}; remove it and run again')
  return tfds_dir


def get_source(data, split: str, workdir: str | None = None) -> RecordSource:
  """A random-access source of normalised records of `split` (see the module docstring).

  data: config.data. source 'tfds': the dataset built under data.data_dir (DatasetNotFoundError
  with the build command when it is not); 'synthetic': generated and built under data.synthetic_dir
  (or `<workdir>/synthetic`, SYNTHETIC_SUBDIR) on first use.
  """
  if data.source == 'tfds':
    data_dir = os.fspath(paths.resolve(data.data_dir))
  else:  # 'synthetic' (kpjax.train.config_check allows no other)
    base = data.synthetic_dir
    if not base:
      if not workdir:
        raise ValueError("config.data.source='synthetic' needs config.data.synthetic_dir or a workdir")
      base = paths.join(workdir, SYNTHETIC_SUBDIR)
    data_dir = ensure_synthetic(base, int(data.synthetic_num_images), int(data.synthetic_seed), name=data.tfds_name)
  return open_tfds_source(data_dir, data.tfds_name, split)
