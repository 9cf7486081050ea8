"""Where training and evaluation records come from: a TFDS dataset built by kpjax.data.build (array_record,
read without TensorFlow), or synthetic garments generated and built on first use.

A record (one item of the TFDS `fashionai_keypoints` data source, see kpjax.data.build.fashionai) is
{'image': encoded bytes (uint8 (H, W, 3) pixels are accepted too), 'image_id': str,
 'category': int index into kpjax.data.keypoints.CATEGORIES, 'keypoints': float32 (24, 2) original pixels
 (x, y), 'visibility': int32 (24,) in {1, 0, -1}, 'height': int, 'width': int}.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any, Sequence

import numpy as np

from kpjax.data import keypoints as kp
from kpjax.errors import DatasetNotFoundError
from kpjax.io import atomic

RECORD_KEYS = ('image', 'image_id', 'category', 'keypoints', 'visibility', 'height', 'width')
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
  return {
      'image': image,
      'image_id': str(image_id),
      'category': int(record['category']),
      'keypoints': np.asarray(record['keypoints'], np.float32).reshape(kp.NUM_KEYPOINTS, 2),
      'visibility': np.asarray(record['visibility'], np.int32).reshape(kp.NUM_KEYPOINTS),
      'height': int(record['height']),
      'width': int(record['width']),
  }


class RecordSource(Sequence):
  """Random access to normalised records over any sequence of raw records (a TFDS data source, a list).

  Picklable when the wrapped source is (TFDS array_record sources are), so grain workers can use it.
  `categories()` is the given index (`categories`, int (N,)), or else computed once by reading every
  record (never decoding images) and cached; `unindexed_note`, when given, is printed (once per process)
  before such a read.
  """

  def __init__(self, source: Sequence, name: str = '', categories: Sequence[int] | None = None,
               unindexed_note: str = ''):
    self._source = source
    self.name = name or type(source).__name__
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


def example_indices(source: Sequence, category: str) -> np.ndarray:
  """int64 (M,): source positions of the records a `category` model uses ('all': every record)."""
  if category == kp.ALL:
    return np.arange(len(source), dtype=np.int64)
  return np.flatnonzero(source_categories(source) == kp.category_index(category)).astype(np.int64)


def _build_command(data_dir: str) -> str:
  return ('python -m kpjax.data.build --manual-dir <where the FashionAI archives were extracted> '
          f'--data-dir {data_dir}')


def find_tfds_dir(data_dir: str, name: str) -> str | None:
  """The newest built version directory `data_dir/name/[config/]version` (holding dataset_info.json), or None."""
  candidates = glob.glob(os.path.join(data_dir, name, '*', 'dataset_info.json'))
  candidates += glob.glob(os.path.join(data_dir, name, '*', '*', 'dataset_info.json'))
  if not candidates:
    return None

  def version_key(path):
    parts = os.path.basename(os.path.dirname(path)).split('.')
    return tuple(int(p) if p.isdigit() else -1 for p in parts)

  return os.path.dirname(max(candidates, key=version_key))


def open_tfds_source(data_dir: str, name: str, split: str) -> RecordSource:
  """The `split` of the TFDS dataset `name` built under `data_dir`, as a RecordSource (no TensorFlow)."""
  builder_dir = find_tfds_dir(data_dir, name)
  if builder_dir is None:
    raise DatasetNotFoundError(
        f'TFDS dataset {name!r} is not built in {data_dir} (no {name}/<version>/dataset_info.json); '
        f'build it with: {_build_command(data_dir)}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(builder_dir)
  splits = sorted(builder.info.splits)
  if split not in builder.info.splits:
    raise DatasetNotFoundError(f'TFDS dataset {name!r} in {builder_dir} has no split {split!r}; '
                               f'it has {", ".join(splits) or "none"}')
  source = builder.as_data_source(split=split)
  index = (builder.info.metadata or {}).get(CATEGORY_INDEX_KEY, {}).get(split)
  if index is None:
    return RecordSource(source, name=f'{name}:{split}', unindexed_note=(
        f'{builder_dir} has no category index (built by kpjax 0.1.0): selecting a category reads every record '
        f'of a split once; rebuild it (python -m kpjax.data.build ... --overwrite) to skip that'))
  if len(index) != len(source) or not all(isinstance(c, int) and 0 <= c < len(kp.CATEGORIES) for c in index):
    raise DatasetNotFoundError(f'{builder_dir}/metadata.json: the {CATEGORY_INDEX_KEY} of split {split!r} does '
                               f'not describe its {len(source)} records; rebuild the dataset (--overwrite)')
  return RecordSource(source, name=f'{name}:{split}', categories=index)


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


def ensure_synthetic(base_dir: str, num_images: int, seed: int, name: str = 'fashionai_keypoints') -> str:
  """Generates and builds the synthetic dataset under `base_dir` unless it is there; returns the TFDS data_dir.

  Layout: base_dir/raw (the FashionAI-style files: train/Annotations/train.csv, train/Images/...) and
  base_dir/tfds (the built dataset). Everything is made in a temporary sibling directory and renamed
  into place in one step, so no reader ever sees half a dataset. Several processes (JAX hosts,
  parallel tests) may call this at once: each builds its own copy (generation is seeded, so the
  copies are identical), the first rename wins and the others discard theirs. That also works when
  hosts do not share a file system, where a "process 0 builds, the others wait" scheme would hang.
  """
  base_dir = os.path.abspath(os.path.expanduser(base_dir))
  tfds_dir = os.path.join(base_dir, 'tfds')
  if find_tfds_dir(tfds_dir, name) is not None:
    return tfds_dir
  if os.path.exists(base_dir) and (not os.path.isdir(base_dir) or os.listdir(base_dir)):
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
    data_dir = os.path.abspath(os.path.expanduser(data.data_dir))
  else:  # 'synthetic' (kpjax.train.config_check allows no other)
    base = data.synthetic_dir
    if not base:
      if not workdir:
        raise ValueError("config.data.source='synthetic' needs config.data.synthetic_dir or a workdir")
      base = os.path.join(workdir, SYNTHETIC_SUBDIR)
    data_dir = ensure_synthetic(base, int(data.synthetic_num_images), int(data.synthetic_seed), name=data.tfds_name)
  return open_tfds_source(data_dir, data.tfds_name, split)
