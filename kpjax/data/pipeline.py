"""The grain input pipeline: dataset records -> training batches (augmented) and evaluation batches.

A record (one item of the TFDS `fashionai_keypoints` data source, see kpjax.data.fashionai) is
{'image': encoded bytes (uint8 (H, W, 3) pixels are accepted too), 'image_id': str,
 'category': int index into kpjax.keypoints.CATEGORIES, 'keypoints': float32 (24, 2) original pixels
 (x, y), 'visibility': int32 (24,) in {1, 0, -1}, 'height': int, 'width': int}.

Training (`train_iterator`) is a grain pipeline over ONE global example stream
    source[category's examples] -> shuffle(seed) -> repeat() (reshuffled each epoch)
      -> random_map(decode + augment + targets) -> batch(per-process share) -> [process::processes]
      -> [mp_prefetch]
The global batch of step k is examples [k G, (k + 1) G) of that stream (G = the global batch size),
each decoded and augmented with a random stream derived from (seed, its position in the stream);
process p of P loads rows [p G/P, (p + 1) G/P) of it and nothing else. So the batches depend on
(seed, k) alone: any number of processes and devices with the same global batch trains on the same
examples, a run may resume on a different number of processes (the state is the step count), and
the batches do not depend on the number of grain worker processes either.
Evaluation (`eval_batches`) is a deterministic, padded pass over a split with no augmentation, the
images dealt round-robin to the processes.

The functions take what they use: the model's `kpjax.spec.ModelSpec` (category, input size,
preprocessing), `config.data` (the data sub-config, validated by kpjax.config_check) and plain values.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from kpjax import atomic
from kpjax import keypoints as kp
from kpjax.data import augment as augment_lib
from kpjax.data import modes
from kpjax.data import preprocess
from kpjax.spec import ModelSpec

RECORD_KEYS = ('image', 'image_id', 'category', 'keypoints', 'visibility', 'height', 'width')
_CATEGORY_CHUNK = 256  # records read at a time when indexing categories


class DatasetNotFoundError(ValueError):
  """The TFDS dataset (or the requested split) is not where the config says; the message says how to build it."""


# ---- Sources --------------------------------------------------------------------------------


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
  `categories()` is computed once (reading records, never decoding images) and cached.
  """

  def __init__(self, source: Sequence, name: str = ''):
    self._source = source
    self.name = name or type(source).__name__
    self._categories: np.ndarray | None = None

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
  return RecordSource(builder.as_data_source(split=split), name=f'{name}:{split}')


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
  from kpjax.data import build, synthetic  # pylint: disable=g-import-not-at-top
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
  (or `<workdir>/synthetic`) on first use.
  """
  if data.source == 'tfds':
    data_dir = os.path.abspath(os.path.expanduser(data.data_dir))
  else:  # 'synthetic' (kpjax.config_check allows no other)
    base = data.synthetic_dir
    if not base:
      if not workdir:
        raise ValueError("config.data.source='synthetic' needs config.data.synthetic_dir or a workdir")
      base = os.path.join(workdir, 'synthetic')
    data_dir = ensure_synthetic(base, int(data.synthetic_num_images), int(data.synthetic_seed), name=data.tfds_name)
  return open_tfds_source(data_dir, data.tfds_name, split)


class _Subset(Sequence):
  """source[indices[i]] (picklable; grain's MapDataset.source wraps it)."""

  def __init__(self, source: Sequence, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[int(self._indices[i])]


# ---- Per-example transforms -------------------------------------------------------------------


def _record_image(record: dict[str, Any]) -> np.ndarray:
  """uint8 (H, W, 3): the record's image decoded (or as is, when the source stores pixels)."""
  image = record['image']
  if isinstance(image, np.ndarray):
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise preprocess.ImageError(f'{record.get("image_id", "image")}: expected uint8 (H, W, 3) pixels; '
                                  f'got {image.dtype} {image.shape}')
    return image
  return preprocess.decode_image(image, record.get('image_id', ''))


def _targets(pixels: np.ndarray, visibility: np.ndarray, size: int,
             mode: modes.Preprocessing) -> tuple[np.ndarray, np.ndarray]:
  """Input pixels (L, 2), visibility (L,) -> (float32 (L, 2) model coords, 0 where masked; float32 (L,) mask).

  mask = 1 where the keypoint is annotated (v >= 0) and lies inside the input square.
  """
  inside = np.all((pixels >= -0.5) & (pixels <= size - 0.5), axis=-1)
  mask = (np.asarray(visibility) >= 0) & inside & np.all(np.isfinite(pixels), axis=-1)
  coords = mode.input_pixels_to_coords(np.where(mask[:, None], pixels, 0.0), size)
  coords = np.where(mask[:, None], coords, 0.0)
  return coords.astype(np.float32), mask.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """record -> {'image' f32 (S, S, 3), 'target' f32 (L, 2), 'mask' f32 (L,)} with a per-example rng."""
  spec: ModelSpec
  augment: augment_lib.AugmentConfig | None  # None = no augmentation

  def random_map(self, element, rng: np.random.Generator):
    image = _record_image(element)
    size, mode = self.spec.input_size, self.spec.preprocessing
    idx = kp.keypoint_indices(self.spec.category)
    points = np.asarray(element['keypoints'], np.float64)[idx]
    visibility = np.asarray(element['visibility'], np.int32)[idx]
    if self.augment is not None:
      pixels, points, visibility, _ = augment_lib.augment_example(
          image, points, visibility, self.spec.category, size, self.augment, rng)
      model_image = preprocess.normalize_image(pixels)
    else:
      model_image, affine = mode.prepare(image, size)
      points = preprocess.apply_affine(points, affine)
    target, mask = _targets(points, visibility, size, mode)
    return {'image': np.asarray(model_image, np.float32), 'target': target, 'mask': mask}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """record -> the eval item (see eval_batches), no augmentation."""
  spec: ModelSpec

  def map(self, element):
    image, affine = self.spec.preprocessing.prepare(_record_image(element), self.spec.input_size)
    return {
        'image': np.asarray(image, np.float32),
        'affine': np.asarray(affine, np.float64),
        'keypoints': np.asarray(element['keypoints'], np.float32),
        'visibility': np.asarray(element['visibility'], np.int32),
        'category': np.int32(element['category']),
        'image_id': str(element['image_id']),
        'valid': True,
    }


def _with_index(item: dict[str, Any], index: int) -> dict[str, Any]:
  return dict(item, index=np.int64(index))


# ---- Iterators ----------------------------------------------------------------------------------


def _seed32(*values: int) -> int:
  """A seed in [0, 2**32) derived from integers (different streams for shuffling/augmentation/shards)."""
  return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'need 0 <= process_index < process_count; got process {process_index} of {process_count}')


def _read_options(data) -> grain.ReadOptions:
  """Threads (each making whole elements) and buffered elements per process (data: config.data).

  Decoding and warping run in PIL/numpy, which release the GIL, so a few threads help; with worker
  processes each gets 2 threads unless data.num_threads says otherwise.
  """
  threads = data.num_threads or (min(8, os.cpu_count() or 1) if data.worker_count <= 0 else 2)
  return grain.ReadOptions(num_threads=int(threads), prefetch_buffer_size=int(threads))


def _selected_indices(source: Sequence, category: str, max_images: int = 0) -> np.ndarray:
  indices = example_indices(source, category)
  return indices[:max_images] if max_images else indices


def train_iterator(source: Sequence, spec: ModelSpec, data, *, global_batch_size: int,
                   augment: augment_lib.AugmentConfig | None, seed: int, process_index: int = 0,
                   process_count: int = 1) -> TrainIterator:
  """An infinite, deterministic, resumable iterator of this process's share of the training batches.

  Args:
    source: the training split (get_source).
    spec: the model trained (its category selects the records, its input size and preprocessing
      make the inputs and targets).
    data: config.data (worker_count, worker_buffer_size, num_threads).
    global_batch_size: examples per step over all processes; a multiple of process_count.
    augment: the augmentation ranges (kpjax.data.augment.AugmentConfig.from_config), None for none.
    seed: the stream's seed (shuffling and augmentation).
    process_index, process_count: this process and how many share the global batch.

  Yields {'image': float32 (b, S, S, 3), 'target': float32 (b, L, 2) model coordinates (the
  preprocessing mode's convention), 'mask': float32 (b, L)}, b = global_batch_size // process_count,
  rows process_index * b ... of the global batch (see the module docstring). mask is 1 where the
  keypoint is annotated (v >= 0) and still inside the input after augmentation; masked targets are 0.

  State: `it.get_state()` is a JSON-serialisable dict {'batches', 'worker_count', 'grain'} (see
  TrainIterator); `train_iterator(...).set_state(state)` continues exactly where `it` was, also with
  another number of processes or worker processes (the stream does not depend on them).
  """
  _check_process(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'config.batch_size ({global_batch_size}) must be a positive multiple of the '
                     f'number of processes ({process_count})')
  if augment is not None and not spec.preprocessing.supports_augmentation:
    raise ValueError(f'augmentation is not supported with preprocessing={spec.preprocessing.name!r}')
  indices = _selected_indices(source, spec.category)
  if len(indices) == 0:
    raise ValueError(f'no {spec.category} examples in {source!r}')
  per_process = global_batch_size // process_count
  ds = (grain.MapDataset.source(_Subset(source, indices))
        .shuffle(seed=_seed32(seed, 1))
        .repeat()
        .random_map(TrainTransform(spec=spec, augment=augment), seed=_seed32(seed, 2))
        .batch(per_process, drop_remainder=True))
  # The stream now holds the global batches as process_count consecutive parts each; this process
  # keeps its part of every step. Elements are made on access, so the others' parts cost nothing.
  ds = ds[process_index::process_count]
  # Batching before to_iter_dataset makes whole batches the unit of threads and worker processes, so
  # the stream does not depend on worker_count (worker k makes batches k, k + W, ...).
  ds = ds.to_iter_dataset(_read_options(data))
  worker_count = int(data.worker_count)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=int(data.worker_buffer_size)))
  return TrainIterator(iter(ds), worker_count)


def _grain_state(batches: int, worker_count: int) -> dict[str, Any]:
  """grain 0.2's iterator state after `batches` batches of the train pipeline with `worker_count` workers.

  Worker w of W makes batches w, w + W, ... (mp_prefetch interleaves its workers round-robin); the
  format is checked against grain's own states in tests/test_pipeline.py.
  """
  if worker_count <= 0:
    return {'next_index': batches}
  return {
      'next_index_in_cycle': batches % worker_count,
      'next_index_in_datasets': worker_count,
      'iterators_in_use_indices': list(range(worker_count)),
      'iterators_in_use_states': [{'next_index': (batches + worker_count - 1 - w) // worker_count}
                                  for w in range(worker_count)],
      'exhausted': [0] * worker_count,
      'future_states': {},
  }


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """The training batch iterator: grain's, plus a state that survives a change of worker_count.

  get_state() -> {'batches': int (batches yielded so far), 'worker_count': int, 'grain': grain's own
  state dict}, plain JSON types (json.dumps it to store it; pipeline.state_to_json). set_state()
  takes such a dict from an iterator over the same source, model and seed: with the same
  worker_count it restores grain's state as is, otherwise it rebuilds it from 'batches' (the batch
  stream depends neither on worker_count nor on the number of processes, and 'batches' counts
  steps). Call close() to stop worker processes early.
  """

  def __init__(self, iterator: grain.DatasetIterator, worker_count: int):
    self._iterator = iterator
    self._worker_count = worker_count
    self._batches = 0

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._batches += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'batches': self._batches, 'worker_count': self._worker_count, 'grain': self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or not isinstance(state.get('batches'), int) or state['batches'] < 0:
      raise ValueError('not a kpjax train iterator state: expected a dict with an int >= 0 "batches" '
                       f'(from TrainIterator.get_state()); got {str(state)[:200]}')
    batches = state['batches']
    if state.get('worker_count') == self._worker_count and isinstance(state.get('grain'), dict):
      inner = state['grain']
    else:
      inner = _grain_state(batches, self._worker_count)
    self._iterator.set_state(inner)
    self._batches = batches

  def close(self) -> None:
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read an absl flag (grain_enable_multiprocess_worker_profiling); outside an
  # absl app (tests, notebooks) the flags are unparsed and reading one raises: use their defaults.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _padding_item(size: int) -> dict[str, Any]:
  return {
      'image': np.zeros((size, size, 3), np.float32),
      'affine': np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
      'keypoints': np.zeros((kp.NUM_KEYPOINTS, 2), np.float32),
      'visibility': np.full(kp.NUM_KEYPOINTS, -1, np.int32),
      'category': np.int32(0),
      'image_id': '',
      'index': np.int64(-1),
      'valid': False,
  }


def _stack(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  batch = {k: np.stack([it[k] for it in items]) for k in items[0] if k != 'image_id'}
  batch['image_id'] = np.array([it['image_id'] for it in items], dtype=object)
  batch['valid'] = batch['valid'].astype(bool)
  return batch


def eval_batches(source: Sequence, spec: ModelSpec, data, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1, max_images: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Deterministic evaluation batches of this process's share of `source`, padded to full batches.

  Args:
    source: a record source (get_source).
    spec: the model evaluated (per-category models keep only their category's images).
    data: config.data (threads).
    batch_size: examples per yielded batch (per process; every batch has exactly this many rows).
    process_index, process_count: this process takes every process_count-th selected image; all
      processes yield the same number of batches (padding rows where a process runs short).
    max_images: keep only the first N selected images (0 = all).

  Yields:
    {'image' f32 (b, S, S, 3), 'affine' f64 (b, 2, 3) original px -> input px, 'keypoints' f32 (b, 24, 2)
     original px, 'visibility' int32 (b, 24), 'category' int32 (b,), 'image_id' object (b,) str,
     'index' int64 (b,) the image's place among the selected images (the split's order, whichever
     process has it), 'valid' bool (b,)}; padding rows have valid False, index -1, a zero image, an
     identity affine, visibility -1.
  """
  _check_process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive; got {batch_size}')
  if max_images < 0:
    raise ValueError(f'max_images must be >= 0 (0 = all); got {max_images}')
  selected = _selected_indices(source, spec.category, max_images)
  num_batches = math.ceil(math.ceil(len(selected) / process_count) / batch_size)
  return _eval_generator(source, spec, data, selected, process_index, process_count, batch_size, num_batches)


def _eval_generator(source, spec, data, selected, process_index, process_count, batch_size, num_batches):
  mine = np.arange(len(selected))[process_index::process_count]  # places in the split's order
  items = iter(())
  if len(mine):
    items = iter(grain.MapDataset.source(_Subset(source, selected[mine])).map(EvalTransform(spec))
                 .to_iter_dataset(_read_options(data)))
  places = iter(mine)
  for _ in range(num_batches):
    chunk = [_with_index(item, next(places)) for _, item in zip(range(batch_size), items)]
    chunk += [_padding_item(spec.input_size)] * (batch_size - len(chunk))
    yield _stack(chunk)


def state_to_json(state: dict[str, Any]) -> str:
  """An iterator state -> a JSON string (grain's states are dicts of ints/strings)."""
  return json.dumps(state, sort_keys=True)


def state_from_json(text: str) -> dict[str, Any]:
  return json.loads(text)
