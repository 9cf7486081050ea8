"""Running a model over prepared images: the jitted forward pass, flip TTA, and scoring a dataset.

Shared by training's evaluation, `kpjax.evaluate` and `kpjax.predict`, so that all three turn model
outputs into original-image pixels the same way (`kpjax.data.preprocess.coords_to_original`).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kpjax import checkpoint
from kpjax import keypoints as kp
from kpjax import metrics
from kpjax.data import preprocess

PredictFn = Callable[[Any, jax.Array], jax.Array]


def make_predict_fn(model, preprocessing: str, input_size: int, *, flip: bool = False,
                    category: str | None = None) -> PredictFn:
  """A jitted `fn(variables, images (B, S, S, 3) f32) -> coords` in the model's output units.

  coords are (B, L, 2). With `flip`, the horizontally flipped batch runs too (one forward pass on 2B
  images) and coords are (B, 2, L, 2): [:, 0] the images', [:, 1] the flipped images' with their
  left/right keypoints swapped back (`kp.flip_permutation(category)`) but x still in the flipped
  frame. `to_original` mirrors and averages such pairs in each original image's pixels, where the
  mirror is exact for both preprocessing modes (see `unflip_to_original`).
  """
  del input_size  # the model is fully convolutional; kept so callers state the input they feed
  if preprocessing not in ('kpjax', 'kpdem'):
    raise ValueError(f"preprocessing must be 'kpjax' or 'kpdem'; got {preprocessing!r}")
  if not flip:
    return _compiled_predict(model, None)
  if category is None:
    raise ValueError('flip test-time augmentation needs the model category (to swap left and right)')
  perm = kp.flip_permutation(category)
  if len(perm) != model.n_locations:
    raise ValueError(f'category {category} has {len(perm)} keypoints but the model predicts {model.n_locations}')
  return _compiled_predict(model, tuple(int(i) for i in perm))


@functools.lru_cache(maxsize=16)
def _compiled_predict(model, perm: tuple[int, ...] | None) -> PredictFn:
  """One jitted function per (model, flip permutation), so repeated evaluations do not recompile."""

  @jax.jit
  def predict(variables, images):
    if perm is None:
      return model.apply(variables, images)[0]
    b = images.shape[0]
    coords = model.apply(variables, jnp.concatenate([images, images[:, :, ::-1]], axis=0))[0]
    return jnp.stack([coords[:b], coords[b:][:, np.asarray(perm)]], axis=1)

  return predict


def unflip_to_original(coords, affine, preprocessing: str, input_size: int) -> np.ndarray:
  """Outputs (L, 2) for the horizontally flipped network input -> pixels of the unflipped original.

  'kpjax': the input flip maps input pixel column q to S - 1 - q, i.e. dsnt's normalised x to -x;
  the image's own affine then gives original pixels. 'kpdem': the original's resize commutes with
  flips, so the flipped input is the resized flipped original; its outputs map (same affine) to the
  flipped original's pixels x', and x = W - 1 - x' with W = S / affine[0, 0] (KPDEM's corner-aligned
  scaling, `kpjax.kpdem.resize_affine`; mirroring the input pixels instead would be off by
  W / S - 1 original pixels).
  """
  coords = np.asarray(coords, np.float64)
  affine = np.asarray(affine, np.float64)
  if preprocessing == 'kpjax':
    mirrored = coords * np.array([-1.0, 1.0])
    return np.asarray(preprocess.coords_to_original(mirrored, affine, input_size, preprocessing), np.float64)
  flipped = np.asarray(preprocess.coords_to_original(coords, affine, input_size, preprocessing), np.float64)
  width = input_size / affine[0, 0]
  return np.stack([width - 1 - flipped[..., 0], flipped[..., 1]], axis=-1)


def to_24(coords, category: str) -> np.ndarray:
  """(N, L, 2) coordinates of `category`'s keypoints -> (N, 24, 2) in CSV order, NaN elsewhere."""
  coords = np.asarray(coords)
  idx = kp.keypoint_indices(category)
  if coords.shape[-2:] != (len(idx), 2):
    raise ValueError(f'{category} has {len(idx)} keypoints; got coordinates of shape {coords.shape}')
  out = np.full(coords.shape[:-2] + (kp.NUM_KEYPOINTS, 2), np.nan, dtype=np.float64)
  out[..., idx, :] = coords
  return out


def to_original(coords, affines, preprocessing: str, input_size: int) -> np.ndarray:
  """Model outputs and each image's affine (B, 2, 3) -> original-image pixels (B, L, 2).

  coords: (B, L, 2), or (B, 2, L, 2) from a flip predict fn (the two views are averaged in pixels).
  """
  coords = np.asarray(coords, np.float64)
  affines = np.asarray(affines, np.float64)
  out = []
  for c, a in zip(coords, affines):
    if c.ndim == 3:
      plain = np.asarray(preprocess.coords_to_original(c[0], a, input_size, preprocessing), np.float64)
      out.append(0.5 * (plain + unflip_to_original(c[1], a, preprocessing, input_size)))
    else:
      out.append(np.asarray(preprocess.coords_to_original(c, a, input_size, preprocessing), np.float64))
  return np.stack(out) if out else np.zeros(coords.shape[:1] + coords.shape[-2:])


def evaluate_batches(predict_fn: PredictFn, variables, batches: Iterable[dict], category: str,
                     preprocessing: str, input_size: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Predicts every batch and scores the predictions with FashionAI NE.

  Args:
    predict_fn: from `make_predict_fn` (or any fn(variables, images) -> (B, L, 2) model coordinates).
    variables: the model's variables.
    batches: `kpjax.data.pipeline.eval_batches` items: 'image' (b, S, S, 3), 'affine' (b, 2, 3),
      'keypoints' (b, 24, 2) original pixels, 'visibility' (b, 24), 'category' (b,) int,
      'image_id' (b,), 'valid' (b,) bool (False rows are padding and dropped).
    category: the model's category ('all' or one garment).
    preprocessing, input_size: the model's input conventions (metadata / config).

  Returns:
    (metrics, predictions): `metrics.normalized_error` of the valid rows, and
    {'image_id' (N,) object, 'category' (N,) int, 'pred' (N, 24, 2) original pixels (NaN outside the
    model's keypoints), 'keypoints' (N, 24, 2), 'visibility' (N, 24)}.
  """
  parts = {k: [] for k in ('image_id', 'category', 'pred', 'keypoints', 'visibility')}
  pending = None  # keep one batch in flight so that host work overlaps the next forward pass

  def collect(batch, coords):
    valid = np.asarray(batch['valid'], bool)
    pred = to_original(np.asarray(coords)[valid], np.asarray(batch['affine'])[valid], preprocessing, input_size)
    parts['pred'].append(to_24(pred, category))
    parts['image_id'].append(np.asarray(batch['image_id'], dtype=object)[valid])
    parts['category'].append(np.asarray(batch['category'], np.int64)[valid])
    parts['keypoints'].append(np.asarray(batch['keypoints'], np.float64)[valid])
    parts['visibility'].append(np.asarray(batch['visibility'], np.int64)[valid])

  for batch in batches:
    coords = predict_fn(variables, batch['image'])
    if pending is not None:
      collect(*pending)
    pending = (batch, coords)
  if pending is not None:
    collect(*pending)
  if not parts['pred']:
    raise ValueError('no images to evaluate: the batches were empty')
  predictions = {k: np.concatenate(v) for k, v in parts.items()}
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


def load_config(path: str, overrides: Sequence[str] = ()):
  """`get_config()` of the config file at `path`, with `FIELD=VALUE` overrides (e.g. `data.data_dir=/d`).

  Values are parsed as Python literals where they look like one, else taken as strings, and must
  keep the field's type (ints may set floats). Raises ValueError naming the file or field.
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ValueError(f'config file {path} does not exist; expected a file such as configs/trousers.py')
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # so that `from configs import base` works
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location('_kpjax_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception as e:  # a user file: any error is the user's to see
    raise ValueError(f'cannot load config {path}: {type(e).__name__}: {e}') from None
  for item in overrides:
    field, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'config override {item!r} must be FIELD=VALUE')
    *parents, leaf = field.split('.')
    node = config
    try:
      for name in parents:
        node = node[name]
      old = node[leaf]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f'{path} has no field {field!r}') from None
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if isinstance(old, bool) and text.lower() in ('true', 'false'):
      value = text.lower() == 'true'
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif isinstance(old, str):
      value = text
    if old is not None and type(value) is not type(old) and not (isinstance(old, tuple) and isinstance(value, list)):
      raise ValueError(f'config field {field} is a {type(old).__name__}; got {text!r}')
    node[leaf] = tuple(value) if isinstance(old, tuple) else value
  return config


_CONFIG_VS_METADATA = (('category', lambda c: c.category), ('input_size', lambda c: int(c.input_size)),
                       ('preprocessing', lambda c: c.preprocessing))


def load_predictor(checkpoint_path: str, config=None, step: int | None = None):
  """(model, variables, metadata) of a checkpoint, checked against `config` when one is given.

  The checkpoint's metadata decides the network and its input (category, input_size, preprocessing);
  a config that says otherwise is an error rather than a silently different model. The config's
  `compute_dtype` is used for the convolutions.
  """
  variables, metadata = checkpoint.load_model(checkpoint_path, step=step)
  kwargs = {}
  if config is not None:
    for key, get in _CONFIG_VS_METADATA:
      if get(config) != metadata[key]:
        raise ValueError(f'the config says {key} = {get(config)!r} but the checkpoint {checkpoint_path} was made '
                         f'with {key} = {metadata[key]!r}; pass the config it was trained or converted with')
    kwargs['dtype'] = jnp.dtype(config.get('compute_dtype', 'float32'))
  model = checkpoint.model_from_metadata(metadata, **kwargs)
  return model, variables, metadata
