"""Scoring a model over a dataset split: sharded forward passes over evaluation batches, the per-image results
gathered from every process, the split's scores computed once over the whole split: FashionAI's NE (where
the keypoint set defines normalising pairs) and, for a set scored with OKS (COCO data), COCO's keypoint AP
(kpjax.metrics.oks) with each object's mean keypoint confidence as its score."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from kpjax.data import keypoint_sets
from kpjax.data import pipeline
from kpjax.data.spec import ModelSpec
from kpjax.inference import devices
from kpjax.inference.predictor import PredictFn, to_24, to_original
from kpjax.metrics import normalized_error as ne_lib
from kpjax.metrics import oks as oks_lib

_ROWS = ('index', 'valid', 'category', 'pred', 'keypoints', 'visibility')


def main_metric(keypoint_set: keypoint_sets.KeypointSet) -> tuple[str, bool]:
  """(the evaluation figure that ranks checkpoints of a model of `keypoint_set`, whether lower is better):
  ('ap', False) for sets scored with OKS, else ('ne', True)."""
  return ('ap', False) if keypoint_set.scored_by_oks else ('ne', True)


def evaluate_batches(predict_fn: PredictFn, variables, batches: Iterable[dict], spec: ModelSpec,
                     mesh=None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Predicts every batch and scores the predictions: NE where the set defines it, OKS AP for COCO data.

  Args:
    predict_fn: from `make_predict_fn` (or any fn(variables, images) -> (B, L, 2) model coordinates; for a
      set scored with OKS, made with confidence=True: -> (coords, confidence (B, L)), confidences scoring
      the objects; plain coords score every object 1).
    variables: the model's variables (with a mesh: placed by devices.replicate).
    batches: `kpjax.data.pipeline.eval_batches` items of this process: 'image' (b, S, S, 3), 'affine'
      (b, 2, 3), 'keypoints' (b, K, 2) record pixels, 'visibility' (b, K), 'category' (b,) int,
      'image_id' (b,), 'index' (b,) int (the image's place in the split's order), 'valid' (b,) bool
      (False rows are padding and dropped), and for OKS sets the object fields (pipeline.eval_batches).
    spec: the model (its keypoint set and category, and the input conventions that map outputs to pixels).
    mesh: run each batch sharded over the mesh's devices (predict_fn made with the same mesh). In a
      multi-process run every process passes its own batches (the same number of the same size),
      and the per-image results of all of them are gathered: every process scores the whole split.

  Returns:
    (metrics, predictions): `metrics.normalized_error` of the valid rows (when the set defines a
    normalising pair) and, for OKS sets, `metrics.oks.keypoint_ap`'s ('ap', 'ap50', ..., '<key>/<category>');
    predictions {'image_id' (N,) object, 'category' (N,) int, 'pred' (N, K, 2) record pixels (NaN outside
    the model's keypoints), 'keypoints' (N, K, 2), 'visibility' (N, K)} (plus 'confidence' (N, K) and the
    object fields for OKS sets), in the split's order.
  """
  kset = spec.keypoint_set
  objects = kset.scored_by_oks
  keys = _ROWS + (('confidence',) + tuple(pipeline.object_fields(kset.num_keypoints)) if objects else ())
  parts = {k: [] for k in keys + ('image_id',)}
  pending = None  # keep one batch in flight so that host work overlaps the next forward pass

  def collect(batch, output):
    coords, conf = output if isinstance(output, tuple) else (output, None)
    coords = devices.local_rows(coords) if mesh is not None else np.asarray(coords)
    parts['pred'].append(to_24(to_original(coords, batch['affine'], spec), spec.category, kset))
    parts['image_id'].append(np.asarray(batch['image_id'], dtype=object))
    parts['index'].append(np.asarray(batch['index'], np.int64))
    parts['valid'].append(np.asarray(batch['valid'], bool))
    parts['category'].append(np.asarray(batch['category'], np.int64))
    parts['keypoints'].append(np.asarray(batch['keypoints'], np.float64))
    parts['visibility'].append(np.asarray(batch['visibility'], np.int64))
    if objects:
      conf = np.ones(coords.shape[:1] + coords.shape[-2:-1]) if conf is None else (
          devices.local_rows(conf) if mesh is not None else np.asarray(conf))
      full = np.full(coords.shape[:1] + (kset.num_keypoints,), np.nan)
      full[:, spec.keypoint_indices()] = conf
      parts['confidence'].append(full)
      for key in pipeline.object_fields(kset.num_keypoints):
        parts[key].append(np.asarray(batch[key]))

  for batch in batches:
    images = devices.shard_batch({'image': batch['image']}, mesh)['image'] if mesh is not None else batch['image']
    output = predict_fn(variables, images)
    if pending is not None:
      collect(*pending)
    pending = (batch, output)
  if pending is not None:
    collect(*pending)
  if not parts['pred']:
    raise ValueError('no images to evaluate: the batches were empty')
  rows = {k: np.concatenate(v) for k, v in parts.items()}
  ids = rows.pop('image_id')
  rows = devices.gather_rows(dict(rows, image_id=_encode_ids(ids)))
  keep = np.flatnonzero(rows['valid'])
  keep = keep[np.argsort(rows['index'][keep], kind='stable')]
  predictions = {k: rows[k][keep] for k in keys if k not in ('index', 'valid')}
  predictions['image_id'] = _decode_ids(rows['image_id'][keep])
  category = spec.category
  if category != keypoint_sets.ALL:
    wrong = predictions['category'] != kset.category_index(category)
    if wrong.any():
      i = int(np.argmax(wrong))
      raise ValueError(f'a {category} model cannot score image {predictions["image_id"][i]} of category '
                       f'{kset.category_names[predictions["category"][i]]}; evaluate per-category models on their '
                       'own category')
  scores: dict[str, float] = {}
  if kset.has_normalization or not objects:
    scores.update(ne_lib.normalized_error(predictions['pred'], predictions['keypoints'], predictions['visibility'],
                                          predictions['category'], keypoint_set=kset))
  if objects:
    scores.update(object_ap(predictions, spec))
  return scores, predictions


def object_ap(predictions: dict[str, np.ndarray], spec: ModelSpec) -> dict[str, float]:
  """COCO's keypoint AP of one prediction per object of a split (evaluate_batches' predictions of a model of an
  OKS set): the records are the ground truth (their crowd and zero-keypoint objects were left out when the
  dataset was built, so this is the file's AP without its ignore regions), each object's score its mean
  keypoint confidence, keypoints mapped back to the original image through its crop."""
  kset = spec.keypoint_set
  crop_inverse = np.linalg.inv(np.concatenate([predictions['crop'], np.tile([[[0.0, 0.0, 1.0]]],
                                                                            (len(predictions['crop']), 1, 1))], 1))
  pred = np.einsum('nij,nkj->nki', crop_inverse[:, :2, :2], predictions['pred']) + crop_inverse[:, None, :2, 2]
  categories = []
  names = (kset.category_names if spec.category == keypoint_sets.ALL else (spec.category,))
  for name in names:
    c = kset.category_index(name)
    rows = np.flatnonzero(predictions['category'] == c)
    idx = kset.keypoint_indices(name)
    truth = predictions['coco_keypoints'][rows][:, idx].astype(np.float64)
    gt = oks_lib.GroundTruth(
        image_ids=predictions['coco_image_id'][rows], ids=predictions['annotation_id'][rows], keypoints=truth,
        bbox=np.zeros((len(rows), 4)), area=predictions['area'][rows].astype(np.float64),
        iscrowd=np.zeros(len(rows), bool), num_keypoints=np.count_nonzero(truth[:, :, 2] > 0, axis=1))
    dt = oks_lib.Detections(image_ids=predictions['coco_image_id'][rows], keypoints=pred[rows][:, idx],
                            scores=predictions['confidence'][rows][:, idx].mean(-1) if len(rows) else np.zeros(0))
    categories.append(oks_lib.Category(name, kset.category(name).oks_sigmas(), gt, dt))
  return oks_lib.keypoint_ap(categories, predictions['coco_image_id'])


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
