"""Running a model over prepared images: the jitted forward pass, flip TTA, and scoring a dataset.

Shared by training's evaluation, `kpjax.evaluate` and `kpjax.predict`, so that all three turn model
outputs into original-image pixels the same way (the model's preprocessing mode, kpjax.data.modes).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kpjax import checkpoint
from kpjax import keypoints as kp
from kpjax import metrics
from kpjax import parallel
from kpjax.spec import ModelSpec

PredictFn = Callable[[Any, jax.Array], jax.Array]


def make_predict_fn(model, *, flip: bool = False, category: str | None = None, mesh=None) -> PredictFn:
  """A jitted `fn(variables, images (B, S, S, 3) f32) -> coords` in the model's output units.

  coords are (B, L, 2). With `flip`, the horizontally flipped batch runs too (one forward pass on 2B
  images) and coords are (B, 2, L, 2): [:, 0] the images', [:, 1] the flipped images' with their
  left/right keypoints swapped back (`kp.flip_permutation(category)`) but x still in the flipped
  frame. `to_original` mirrors and averages such pairs in each original image's pixels, where the
  mirror is exact for both preprocessing modes (`Preprocessing.flipped_to_original`).

  With a `mesh` (kpjax.parallel.make_mesh), the batch is split along its 'data' axis over every
  device and the variables replicated: pass images as a global array (parallel.shard_batch; B a
  multiple of the device count) and variables placed by parallel.replicate; coords come back sharded
  like the images (parallel.local_rows reads this process's rows).
  """
  perm = None
  if flip:
    if category is None:
      raise ValueError('flip test-time augmentation needs the model category (to swap left and right)')
    perm = kp.flip_permutation(category)
    if len(perm) != model.n_locations:
      raise ValueError(f'category {category} has {len(perm)} keypoints but the model predicts {model.n_locations}')
    perm = tuple(int(i) for i in perm)
  return _compiled_predict(model, perm, mesh)


@functools.lru_cache(maxsize=16)
def _compiled_predict(model, perm: tuple[int, ...] | None, mesh) -> PredictFn:
  """One jitted function per (model, flip permutation, mesh), so repeated evaluations do not recompile."""

  def predict(variables, images):
    if perm is None:
      return model.apply(variables, images)[0]
    b = images.shape[0]
    coords = model.apply(variables, jnp.concatenate([images, images[:, :, ::-1]], axis=0))[0]
    return jnp.stack([coords[:b], coords[b:][:, np.asarray(perm)]], axis=1)

  if mesh is None:
    return jax.jit(predict)
  rows = parallel.batch_sharding(mesh)
  return jax.jit(predict, in_shardings=(parallel.replicated(mesh), rows), out_shardings=rows)


def to_24(coords, category: str) -> np.ndarray:
  """(N, L, 2) coordinates of `category`'s keypoints -> (N, 24, 2) in CSV order, NaN elsewhere."""
  coords = np.asarray(coords)
  idx = kp.keypoint_indices(category)
  if coords.shape[-2:] != (len(idx), 2):
    raise ValueError(f'{category} has {len(idx)} keypoints; got coordinates of shape {coords.shape}')
  out = np.full(coords.shape[:-2] + (kp.NUM_KEYPOINTS, 2), np.nan, dtype=np.float64)
  out[..., idx, :] = coords
  return out


def to_original(coords, affines, spec: ModelSpec) -> np.ndarray:
  """Model outputs and each image's affine (B, 2, 3) -> original-image pixels (B, L, 2), float64.

  coords: (B, L, 2), or (B, 2, L, 2) from a flip predict fn (the two views are averaged in pixels).
  """
  coords = np.asarray(coords, np.float64)
  affines = np.asarray(affines, np.float64)
  mode, size = spec.preprocessing, spec.input_size
  if coords.ndim == 4:
    plain = mode.coords_to_original(coords[:, 0], affines, size)
    return 0.5 * (plain + mode.flipped_to_original(coords[:, 1], affines, size))
  return mode.coords_to_original(coords, affines, size)


def evaluate_batches(predict_fn: PredictFn, variables, batches: Iterable[dict], spec: ModelSpec,
                     mesh=None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Predicts every batch and scores the predictions with FashionAI NE.

  Args:
    predict_fn: from `make_predict_fn` (or any fn(variables, images) -> (B, L, 2) model coordinates).
    variables: the model's variables (with a mesh: placed by parallel.replicate).
    batches: `kpjax.data.pipeline.eval_batches` items of this process: 'image' (b, S, S, 3), 'affine'
      (b, 2, 3), 'keypoints' (b, 24, 2) original pixels, 'visibility' (b, 24), 'category' (b,) int,
      'image_id' (b,), 'index' (b,) int (the image's place in the split's order), 'valid' (b,) bool
      (False rows are padding and dropped).
    spec: the model (its category, and the input conventions that map outputs to pixels).
    mesh: run each batch sharded over the mesh's devices (predict_fn made with the same mesh). In a
      multi-process run every process passes its own batches (the same number of the same size),
      and the per-image results of all of them are gathered: every process scores the whole split.

  Returns:
    (metrics, predictions): `metrics.normalized_error` of the valid rows, and
    {'image_id' (N,) object, 'category' (N,) int, 'pred' (N, 24, 2) original pixels (NaN outside the
    model's keypoints), 'keypoints' (N, 24, 2), 'visibility' (N, 24)}, in the split's order.
  """
  parts = {k: [] for k in ('index', 'valid', 'image_id', 'category', 'pred', 'keypoints', 'visibility')}
  pending = None  # keep one batch in flight so that host work overlaps the next forward pass

  def collect(batch, coords):
    coords = parallel.local_rows(coords) if mesh is not None else np.asarray(coords)
    parts['pred'].append(to_24(to_original(coords, batch['affine'], spec), spec.category))
    parts['image_id'].append(np.asarray(batch['image_id'], dtype=object))
    parts['index'].append(np.asarray(batch['index'], np.int64))
    parts['valid'].append(np.asarray(batch['valid'], bool))
    parts['category'].append(np.asarray(batch['category'], np.int64))
    parts['keypoints'].append(np.asarray(batch['keypoints'], np.float64))
    parts['visibility'].append(np.asarray(batch['visibility'], np.int64))

  for batch in batches:
    images = parallel.shard_batch({'image': batch['image']}, mesh)['image'] if mesh is not None else batch['image']
    coords = predict_fn(variables, images)
    if pending is not None:
      collect(*pending)
    pending = (batch, coords)
  if pending is not None:
    collect(*pending)
  if not parts['pred']:
    raise ValueError('no images to evaluate: the batches were empty')
  rows = {k: np.concatenate(v) for k, v in parts.items()}
  ids = rows.pop('image_id')
  rows = parallel.gather_rows(dict(rows, image_id=_encode_ids(ids)))
  keep = np.flatnonzero(rows['valid'])
  keep = keep[np.argsort(rows['index'][keep], kind='stable')]
  predictions = {k: rows[k][keep] for k in ('category', 'pred', 'keypoints', 'visibility')}
  predictions['image_id'] = _decode_ids(rows['image_id'][keep])
  category = spec.category
  if category != kp.ALL:
    wrong = predictions['category'] != kp.category_index(category)
    if wrong.any():
      i = int(np.argmax(wrong))
      raise ValueError(f'a {category} model cannot score image {predictions["image_id"][i]} of category '
                       f'{kp.CATEGORIES[predictions["category"][i]]}; evaluate per-category models on their '
                       'own category')
  scores = metrics.normalized_error(predictions['pred'], predictions['keypoints'], predictions['visibility'],
                                    predictions['category'])
  return scores, predictions


def _encode_ids(ids: np.ndarray) -> np.ndarray:
  """Image ids (N,) str -> uint8 (N, W) UTF-8, zero-padded to a width W every process agrees on."""
  encoded = [str(i).encode('utf-8') for i in ids]
  width = int(parallel.gather_rows({'w': np.array([max(map(len, encoded), default=0)])})['w'].max())
  codes = np.zeros((len(encoded), max(width, 1)), np.uint8)
  for row, data in zip(codes, encoded):
    row[:len(data)] = np.frombuffer(data, np.uint8)
  return codes


def _decode_ids(codes: np.ndarray) -> np.ndarray:
  return np.array([bytes(row).rstrip(b'\0').decode('utf-8') for row in codes], dtype=object)


def load_predictor(checkpoint_path: str, config=None, step: int | None = None):
  """(model, variables, spec, metadata) of a checkpoint, checked against `config` when one is given.

  The checkpoint's metadata decides the network and its input (`spec`); a config that describes
  another model is an error rather than a silently different model. The config's compute_dtype and
  model.conv_algorithm are used for the forward pass; without a config, float32 and the
  preprocessing mode's convolutions.
  """
  variables, metadata = checkpoint.load_model(checkpoint_path, step=step)
  spec = checkpoint.check_metadata(metadata)
  if config is None:
    return spec.build(), variables, spec, metadata
  ModelSpec.from_config(config).check_matches(spec, theirs=f'the checkpoint {checkpoint_path}')
  model = spec.build(config.model.conv_algorithm, dtype=jnp.dtype(config.compute_dtype))
  return model, variables, spec, metadata
