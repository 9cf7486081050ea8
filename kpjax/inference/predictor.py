"""Running a model over prepared images: loading it, the jitted (sharded) forward pass, flip TTA, and
mapping its outputs back to original-image pixels.

Shared by training's evaluation, `kpjax.evaluate`, `kpjax.predict` and `kpjax.export`, so that all of
them turn model outputs into original-image pixels the same way (the model's input/output convention,
kpjax.data.conventions).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kpjax.data import keypoint_sets
from kpjax.data import keypoints as kp
from kpjax.data.spec import ModelSpec
from kpjax.errors import KeypointSetError, SpecMismatch
from kpjax.inference import checkpoints
from kpjax.inference import devices
from kpjax.inference.confidence import keypoint_confidence

PredictFn = Callable[[Any, jax.Array], jax.Array]


def make_predict_fn(model, *, flip: bool = False, category: str | None = None, mesh=None,
                    keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI, confidence: bool = False) -> PredictFn:
  """A jitted `fn(variables, images (B, S, S, 3) f32) -> coords` in the model's output units.

  coords are (B, L, 2). With `flip`, the horizontally flipped batch runs too (one forward pass on 2B
  images) and coords are (B, 2, L, 2): [:, 0] the images', [:, 1] the flipped images' with their
  left/right keypoints swapped back (`keypoint_set.flip_permutation(category)`) but x still in the
  flipped frame. `to_original` mirrors and averages such pairs in each original image's pixels, where
  the mirror is exact for both conventions (`IOConvention.flipped_to_original`).

  With `confidence`, fn returns (coords, confidence (B, L) float32): each keypoint's
  kpjax.inference.confidence.keypoint_confidence, the mean of both views' with `flip`.

  With `confidence`, the fn returns (coords, confidence): confidence (B, L) float32 in [0, 1], each
  keypoint's kpjax.inference.confidence.keypoint_confidence; with `flip`, the mean of the two views'
  (the flipped view's keypoints swapped back as its coords are).

  With a `mesh` (kpjax.devices.make_mesh), the batch is split along its 'data' axis over every
  device and the variables replicated: pass images as a global array (devices.shard_batch; B a
  multiple of the device count) and variables placed by devices.replicate; coords come back sharded
  like the images (devices.local_rows reads this process's rows).
  """
  perm = None
  if flip:
    if category is None:
      raise ValueError('flip test-time augmentation needs the model category (to swap left and right)')
    perm = keypoint_set.flip_permutation(category)
    if len(perm) != model.n_locations:
      raise ValueError(f'category {category} has {len(perm)} keypoints but the model predicts {model.n_locations}')
    perm = tuple(int(i) for i in perm)
  return _compiled_predict(model, perm, mesh, bool(confidence))


@functools.lru_cache(maxsize=16)
def _compiled_predict(model, perm: tuple[int, ...] | None, mesh, with_confidence: bool) -> PredictFn:
  """One jitted function per (model, flip permutation, mesh, confidence), so repeated evaluations do not
  recompile."""

  def predict(variables, images):
    if perm is None:
      coords, heatmaps = model.apply(variables, images)
      return (coords, keypoint_confidence(heatmaps)) if with_confidence else coords
    b = images.shape[0]
    coords, heatmaps = model.apply(variables, jnp.concatenate([images, images[:, :, ::-1]], axis=0))
    idx = np.asarray(perm)
    coords = jnp.stack([coords[:b], coords[b:][:, idx]], axis=1)
    if not with_confidence:
      return coords
    views = keypoint_confidence(heatmaps)  # (2B, L); a flipped map's mass near its mean is the unflipped one's
    return coords, 0.5 * (views[:b] + views[b:][:, idx])

  if mesh is None:
    return jax.jit(predict)
  rows = devices.batch_sharding(mesh)
  out = (rows, rows) if with_confidence else rows
  return jax.jit(predict, in_shardings=(devices.replicated(mesh), rows), out_shardings=out)


def to_24(coords, category: str, keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI) -> np.ndarray:
  """(N, L, 2) coordinates of `category`'s keypoints -> (N, K, 2) in the set's order (FashionAI: the 24 in
  CSV order), NaN elsewhere."""
  coords = np.asarray(coords)
  idx = keypoint_set.keypoint_indices(category)
  if coords.shape[-2:] != (len(idx), 2):
    raise ValueError(f'{category} has {len(idx)} keypoints; got coordinates of shape {coords.shape}')
  out = np.full(coords.shape[:-2] + (keypoint_set.num_keypoints, 2), np.nan, dtype=np.float64)
  out[..., idx, :] = coords
  return out


def to_original(coords, affines, spec: ModelSpec) -> np.ndarray:
  """Model outputs and each image's affine (B, 2, 3) -> original-image pixels (B, L, 2), float64.

  coords: (B, L, 2), or (B, 2, L, 2) from a flip predict fn (the two views are averaged in pixels).
  """
  coords = np.asarray(coords, np.float64)
  affines = np.asarray(affines, np.float64)
  convention, size = spec.convention, spec.input_size
  if coords.ndim == 4:
    plain = convention.coords_to_original(coords[:, 0], affines, size)
    return 0.5 * (plain + convention.flipped_to_original(coords[:, 1], affines, size))
  return convention.coords_to_original(coords, affines, size)


def load_predictor(checkpoint_path: str, config=None, step: int | None = None):
  """(model, variables, spec, metadata) of a checkpoint, checked against `config` when one is given.

  The checkpoint's metadata decides the network and its input (`spec`); a config that describes
  another model is an error rather than a silently different model. The config's compute_dtype,
  model.conv_algorithm and model.unpool are used for the forward pass; without a config, float32, the
  convention's convolutions and the fused ('mask') unpool.
  """
  variables, metadata = checkpoints.load_model(checkpoint_path, step=step)
  spec = checkpoints.check_metadata(metadata)
  if config is None:
    return spec.build(), variables, spec, metadata
  try:  # a config names data, not a keypoint set: it describes a model of the checkpoint's set
    described = ModelSpec.from_config(config, spec.keypoint_set)
  except KeypointSetError as e:
    raise SpecMismatch(f'the config does not describe the checkpoint {checkpoint_path}, a model of the keypoint set '
                       f'{spec.keypoint_set.describe()}: {e}') from None
  described.check_matches(spec, theirs=f'the checkpoint {checkpoint_path}')
  model = spec.build(config.model.conv_algorithm, dtype=jnp.dtype(config.compute_dtype), unpool=config.model.unpool)
  return model, variables, spec, metadata
