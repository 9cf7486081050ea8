"""Scoring a model over a dataset split: sharded forward passes over evaluation batches, the per-image
results gathered from every process, FashionAI's NE computed once over the whole split."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from kpjax.data import keypoints as kp
from kpjax.data.spec import ModelSpec
from kpjax.inference import devices
from kpjax.inference.predictor import PredictFn, to_24, to_original
from kpjax.metrics import normalized_error as ne_lib


def evaluate_batches(predict_fn: PredictFn, variables, batches: Iterable[dict], spec: ModelSpec,
                     mesh=None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Predicts every batch and scores the predictions with FashionAI NE.

  Args:
    predict_fn: from `make_predict_fn` (or any fn(variables, images) -> (B, L, 2) model coordinates).
    variables: the model's variables (with a mesh: placed by devices.replicate).
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
    coords = devices.local_rows(coords) if mesh is not None else np.asarray(coords)
    parts['pred'].append(to_24(to_original(coords, batch['affine'], spec), spec.category))
    parts['image_id'].append(np.asarray(batch['image_id'], dtype=object))
    parts['index'].append(np.asarray(batch['index'], np.int64))
    parts['valid'].append(np.asarray(batch['valid'], bool))
    parts['category'].append(np.asarray(batch['category'], np.int64))
    parts['keypoints'].append(np.asarray(batch['keypoints'], np.float64))
    parts['visibility'].append(np.asarray(batch['visibility'], np.int64))

  for batch in batches:
    images = devices.shard_batch({'image': batch['image']}, mesh)['image'] if mesh is not None else batch['image']
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
  rows = devices.gather_rows(dict(rows, image_id=_encode_ids(ids)))
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
  scores = ne_lib.normalized_error(predictions['pred'], predictions['keypoints'], predictions['visibility'],
                                    predictions['category'])
  return scores, predictions


def _encode_ids(ids: np.ndarray) -> np.ndarray:
  """Image ids (N,) str -> uint8 (N, W) UTF-8, zero-padded to a width W every process agrees on."""
  encoded = [str(i).encode('utf-8') for i in ids]
  width = int(devices.gather_rows({'w': np.array([max(map(len, encoded), default=0)])})['w'].max())
  codes = np.zeros((len(encoded), max(width, 1)), np.uint8)
  for row, data in zip(codes, encoded):
    row[:len(data)] = np.frombuffer(data, np.uint8)
  return codes


def _decode_ids(codes: np.ndarray) -> np.ndarray:
  return np.array([bytes(row).rstrip(b'\0').decode('utf-8') for row in codes], dtype=object)
