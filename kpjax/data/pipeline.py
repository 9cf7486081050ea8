"""The grain input pipeline: dataset records (kpjax.data.sources) -> training batches (augmented) and
evaluation batches.

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

The functions take what they use: the model's `kpjax.data.spec.ModelSpec` (category, input size,
preprocessing), `config.data` (the data sub-config, validated by kpjax.train.config_check) and plain values.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from kpjax.data import augment as augment_lib
from kpjax.data import conventions
from kpjax.data import geometry
from kpjax.data import images
from kpjax.data import sources
from kpjax.data.spec import ModelSpec
from kpjax.errors import ImageError


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
      raise ImageError(f'{record.get("image_id", "image")}: expected uint8 (H, W, 3) pixels; '
                                  f'got {image.dtype} {image.shape}')
    return image
  return images.decode_image(image, record.get('image_id', ''))


def _targets(pixels: np.ndarray, visibility: np.ndarray, size: int,
             mode: conventions.IOConvention) -> tuple[np.ndarray, np.ndarray]:
  """Input pixels (L, 2), visibility (L,) -> (float32 (L, 2) model coords, 0 where masked; float32 (L,) mask).

  mask = 1 where the keypoint is annotated (v >= 0) and lies inside the input square (`mode.inside`).
  """
  mask = (np.asarray(visibility) >= 0) & mode.inside(pixels, size)
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
    size, mode = self.spec.input_size, self.spec.convention
    idx = self.spec.keypoint_indices()
    points = np.asarray(element['keypoints'], np.float64)[idx]
    visibility = np.asarray(element['visibility'], np.int32)[idx]
    if self.augment is not None:
      pixels, points, visibility, _ = augment_lib.augment_example(
          image, points, visibility, self.spec.category, size, self.augment, rng,
          keypoint_set=self.spec.keypoint_set)
      model_image = geometry.normalize_image(pixels)
    else:
      model_image, affine = mode.prepare(image, size)
      points = geometry.apply_affine(points, affine)
    target, mask = _targets(points, visibility, size, mode)
    return {'image': np.asarray(model_image, np.float32), 'target': target, 'mask': mask}


# What evaluation items of a set scored with OKS (COCO data) carry besides the common keys: each object's
# ids, area and crop (see kpjax.data.sources.OBJECT_KEYS) as numbers; (shape, dtype) of one item's.
def object_fields(num_keypoints: int) -> dict[str, tuple[tuple[int, ...], type]]:
  return {'annotation_id': ((), np.int64), 'coco_image_id': ((), np.int64), 'area': ((), np.float64),
          'crop': ((2, 3), np.float64), 'coco_keypoints': ((num_keypoints, 3), np.float64)}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """record -> the eval item (see eval_batches), no augmentation."""
  spec: ModelSpec

  def map(self, element):
    image, affine = self.spec.convention.prepare(_record_image(element), self.spec.input_size)
    item = {
        'image': np.asarray(image, np.float32),
        'affine': np.asarray(affine, np.float64),
        'keypoints': np.asarray(element['keypoints'], np.float32),
        'visibility': np.asarray(element['visibility'], np.int32),
        'category': np.int32(element['category']),
        'image_id': str(element['image_id']),
        'valid': True,
    }
    if self.spec.keypoint_set.scored_by_oks:
      for key, (shape, dtype) in object_fields(self.spec.keypoint_set.num_keypoints).items():
        item[key] = np.asarray(element[key], dtype).reshape(shape)
    return item


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


def _selected_indices(source: Sequence, spec: ModelSpec, max_images: int = 0) -> np.ndarray:
  indices = sources.example_indices(source, spec.category, spec.keypoint_set)
  return indices[:max_images] if max_images else indices


def train_iterator(source: Sequence, spec: ModelSpec, data, *, global_batch_size: int,
                   augment: augment_lib.AugmentConfig | None, seed: int, process_index: int = 0,
                   process_count: int = 1, start_batch: int = 0) -> TrainIterator:
  """An infinite, deterministic, resumable iterator of this process's share of the training batches.

  Args:
    source: the training split (kpjax.data.sources.get_source).
    spec: the model trained (its category selects the records, its input size and convention make
      the inputs and targets).
    data: config.data (worker_count, worker_buffer_size, num_threads).
    global_batch_size: examples per step over all processes; a multiple of process_count.
    augment: the augmentation ranges (kpjax.data.augment.AugmentConfig.from_config), None for none.
    seed: the stream's seed (shuffling and augmentation).
    process_index, process_count: this process and how many share the global batch.
    start_batch: the first global batch to yield (a resumed run's step count).

  Yields {'image': float32 (b, S, S, 3), 'target': float32 (b, L, 2) model coordinates (the
  convention's), 'mask': float32 (b, L)}, b = global_batch_size // process_count, rows
  process_index * b ... of the global batch (see the module docstring). mask is 1 where the keypoint
  is annotated (v >= 0) and still inside the input after augmentation; masked targets are 0.

  State: `it.get_state()` is {'batches': global batches yielded since batch 0}, plain JSON; a new
  iterator with `start_batch=state['batches']` (or `set_state(state)`) continues exactly there, with any
  number of processes or grain worker processes, since the stream depends on neither.
  """
  _check_process(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'config.batch_size ({global_batch_size}) must be a positive multiple of the '
                     f'number of processes ({process_count})')
  if augment is not None and not spec.convention.supports_augmentation:
    raise ValueError(f'augmentation is not supported with preprocessing={spec.convention.name!r}')
  indices = _selected_indices(source, spec)
  if len(indices) == 0:
    raise ValueError(f'no {spec.category} examples in {source!r}')
  per_process = global_batch_size // process_count
  stream = (grain.MapDataset.source(_Subset(source, indices))
            .shuffle(seed=_seed32(seed, 1))
            .repeat()
            .random_map(TrainTransform(spec=spec, augment=augment), seed=_seed32(seed, 2))
            .batch(per_process, drop_remainder=True))
  worker_count = int(data.worker_count)

  def batches_from(batch: int) -> grain.DatasetIterator:
    # The stream holds the global batches as process_count consecutive parts each; this process keeps
    # its part of every step from `batch` on. MapDataset slices are lazy: skipped and other processes'
    # parts cost nothing.
    ds = stream[batch * process_count + process_index::process_count]
    # Batching before to_iter_dataset makes whole batches the unit of threads and worker processes, so
    # the stream does not depend on worker_count (worker k makes batches k, k + W, ...).
    ds = ds.to_iter_dataset(_read_options(data))
    if worker_count > 0:
      _ensure_absl_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=worker_count, per_worker_buffer_size=int(data.worker_buffer_size)))
    return iter(ds)

  return TrainIterator(batches_from, int(start_batch))


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """The training batch iterator: grain's, started at a global batch, whose state is that batch count.

  get_state() -> {'batches': int} (batches yielded since the stream's first); set_state(state) continues
  at state['batches'] (kpjax 0.1.0's states, which also held grain's own, are read the same way). The
  state holds nothing of grain's: the position in the stream says it all. Call close() to stop grain's
  worker processes.
  """

  def __init__(self, batches_from, start: int):
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
      raise ValueError(f'the first batch must be an integer >= 0; got {start!r}')
    self._batches_from = batches_from
    self._batches = start
    self._iterator = None  # made on first use, so that set_state before it costs nothing

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._batches_from(self._batches)
    batch = next(self._iterator)
    self._batches += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'batches': self._batches}

  def set_state(self, state: dict[str, Any]) -> None:
    batches = state.get('batches') if isinstance(state, dict) else None
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
      raise ValueError('not a kpjax train iterator state: expected a dict with an int >= 0 "batches" '
                       f'(from TrainIterator.get_state()); got {str(state)[:200]}')
    self.close()
    self._batches = batches

  def close(self) -> None:
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()
    self._iterator = None


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read an absl flag (grain_enable_multiprocess_worker_profiling); outside an
  # absl app (tests, notebooks) the flags are unparsed and reading one raises: use their defaults.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _padding_item(spec: ModelSpec) -> dict[str, Any]:
  size, k = spec.input_size, spec.keypoint_set.num_keypoints
  item = {
      'image': np.zeros((size, size, 3), np.float32),
      'affine': np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
      'keypoints': np.zeros((k, 2), np.float32),
      'visibility': np.full(k, -1, np.int32),
      'category': np.int32(0),
      'image_id': '',
      'index': np.int64(-1),
      'valid': False,
  }
  if spec.keypoint_set.scored_by_oks:
    item.update({key: np.zeros(shape, dtype) for key, (shape, dtype) in object_fields(k).items()})
    item['crop'] = item['affine'].copy()
  return item


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
    {'image' f32 (b, S, S, 3), 'affine' f64 (b, 2, 3) record px -> input px, 'keypoints' f32 (b, K, 2)
     record px (K: the keypoint set's, 24 for FashionAI), 'visibility' int32 (b, K), 'category' int32 (b,),
     'image_id' object (b,) str, 'index' int64 (b,) the image's place among the selected images (the
     split's order, whichever process has it), 'valid' bool (b,)}; padding rows have valid False, index
     -1, a zero image, an identity affine, visibility -1. A set scored with OKS (COCO data) adds each
     object's 'annotation_id', 'coco_image_id' int64 (b,), 'area' f64 (b,), 'crop' f64 (b, 2, 3) original
     px -> record px and 'coco_keypoints' f64 (b, K, 3) (kpjax.data.sources.OBJECT_KEYS); zeros in padding.
  """
  _check_process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive; got {batch_size}')
  if max_images < 0:
    raise ValueError(f'max_images must be >= 0 (0 = all); got {max_images}')
  selected = _selected_indices(source, spec, max_images)
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
    chunk += [_padding_item(spec)] * (batch_size - len(chunk))
    yield _stack(chunk)
