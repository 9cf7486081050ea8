"""COCO keypoint results from a model trained on COCO-format data: what `python -m kpjax.predict --checkpoint W
--images DIR --out PRED.json [--boxes BOXES.json]` runs for such models (kpjax.cli.predict).

Top-down, as the model was trained: each object is cut out of its image exactly as the dataset build cut
it (kpjax.data.coco.crop_window: its box grown by CROP_MARGIN on each side, cut at the image's edges),
prepared as in training, predicted in fixed-size batches, and its keypoints mapped back to the original
image's pixels. The objects:
  * with --boxes, one per box of a COCO annotation file (crowd boxes left out) or of detections in the same
    form ({"images": [{id, file_name}], "annotations": [{image_id, category_id, bbox[, score]}]}); the images
    predicted are the ones that file lists, found under --images by `file_name`, and the results carry its
    image and category ids; boxes of categories the model does not predict are left out (and counted);
  * without, every image as one object (its whole frame, no margin), of the model's category (an 'all'
    model of several categories needs --category), `image_id` the image's path id as in the CSV
    (kpjax.inference.prediction.image_id): there is no id table to take integer ids from.
Each result is {image_id, category_id, keypoints: [x, y, confidence] * K (the category's keypoints, in its
order), score}: a keypoint's confidence is kpjax.inference.confidence.keypoint_confidence of its heatmap
(its mass within 3 input pixels of its own mean; the mean of both views with --flip), the object's score
the mean of its keypoints' confidences times the box's detector score (1 without one).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from kpjax.data import coco
from kpjax.data import keypoint_sets
from kpjax.errors import KeypointSetError, PredictionError
from kpjax.inference import prediction
from kpjax.io import atomic


@dataclasses.dataclass(frozen=True)
class Target:
  """One object to predict: its image (file, id), its category (a set name), box (None: the whole image) and
  detector score (None)."""
  path: str
  image_id: int | str
  category: str
  bbox: tuple[float, float, float, float] | None
  box_score: float | None


def _model_category(kset: keypoint_sets.KeypointSet, model_category: str, category: str | None) -> str:
  if model_category != keypoint_sets.ALL:
    if category and category != model_category:
      raise PredictionError(f'--category {category} disagrees with the {model_category} model')
    return model_category
  if category:
    return kset.check_category(category, allow_all=False)
  if len(kset.categories) == 1:
    return kset.category_names[0]
  raise PredictionError(f'the model predicts every category of {kset.describe()}: say the images\' category with '
                        '--category NAME, or give the objects with --boxes')


def box_targets(parsed, boxes_file: str, images_dir: str, kset: keypoint_sets.KeypointSet, model_category: str
                ) -> tuple[list[Target], list[str], int]:
  """(the objects of a --boxes file (`parsed`: coco.read_boxes') the model predicts, problems (missing image
  files), boxes left out)."""
  _, boxes, crowd = parsed
  targets, problems, left_out = [], [], crowd
  missing = set()
  for b in boxes:
    try:
      name = kset.coco_category(b.category_id).name
    except KeypointSetError:
      left_out += 1
      continue
    if model_category not in (keypoint_sets.ALL, name):
      left_out += 1
      continue
    path = os.path.join(images_dir, *b.file_name.split('/'))
    if not os.path.isfile(path):
      if path not in missing:
        problems.append(f'{path}: no such image ({b.file_name} in {boxes_file})')
        missing.add(path)
      continue
    targets.append(Target(path, b.image_id, name, b.bbox, b.score))
  return targets, problems, left_out


def _load(path: str, targets: list[Target], spec, keep_image: bool) -> list[dict]:
  """Every object of one image, prepared for the model; one item with 'error' when the image is unreadable."""
  from kpjax.data import images  # pylint: disable=g-import-not-at-top
  try:
    with open(path, 'rb') as f:
      pixels = images.decode_image(f.read(), name=path)
  except (OSError, ValueError) as e:
    return [{'path': path, 'error': str(e) if path in str(e) else f'{path}: {e}'}]
  h, w = pixels.shape[:2]
  out = []
  for t in targets:
    x0, y0, x1, y1 = (0, 0, w, h) if t.bbox is None else coco.crop_window(t.bbox, h, w)
    prepared, affine = spec.convention.prepare(pixels[y0:y1, x0:x1], spec.input_size)
    out.append({'target': t, 'input': prepared, 'affine': affine, 'offset': np.array([x0, y0], np.float64),
                'image': pixels if keep_image else None})
  return out


def _prepared(targets: Sequence[Target], spec, keep_images: bool, workers: int = 8):
  """Per image (in order of first appearance), its prepared objects; images read by a thread pool."""
  by_image: dict[str, list[Target]] = {}
  for t in targets:
    by_image.setdefault(t.path, []).append(t)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    yield from pool.map(lambda item: _load(item[0], item[1], spec, keep_images), by_image.items())


def _result(target: Target, kset: keypoint_sets.KeypointSet, pixels: np.ndarray, confidence: np.ndarray,
            model_category: str) -> dict:
  """One COCO result from the model's outputs for an object: pixels (L, 2) original, confidence (L,)."""
  cat = kset.category(target.category)
  if model_category == keypoint_sets.ALL:
    idx = kset.keypoint_indices(target.category)
    pixels, confidence = pixels[idx], confidence[idx]
  values = [float(v) for xy, c in zip(pixels, confidence) for v in (xy[0], xy[1], c)]
  score = float(np.mean(np.asarray(confidence, np.float64)))
  score *= 1.0 if target.box_score is None else target.box_score
  return {'image_id': target.image_id, 'category_id': cat.coco_id, 'keypoints': values, 'score': score}


def predict_coco(checkpoint_path: str, image_paths: Sequence[str], out: str, *, boxes: str | None = None,
                 config=None, flip: bool = False, batch_size: int = 16, category: str | None = None,
                 draw: str | None = None, step: int | None = None, log=None, loaded=None
                 ) -> prediction.PredictionSummary:
  """Predicts the objects (module docstring) with the model at `checkpoint_path` and writes COCO results `out`
  (and with `draw`, one PNG per image under that folder).

  image_paths: with `boxes`, one folder (the boxes' file names are relative to it); without, image files,
  folders and globs (kpjax.inference.prediction.collect_images). loaded: (model, variables, spec) of the
  checkpoint when the caller has loaded it already. Unreadable images are reported through `log` (default:
  stderr) and skipped; PredictionError when nothing can be predicted, before anything is written.
  """
  from kpjax.inference import devices  # pylint: disable=g-import-not-at-top  (JAX only once arguments are fine)
  from kpjax.inference import drawing  # pylint: disable=g-import-not-at-top
  from kpjax.inference import predictor  # pylint: disable=g-import-not-at-top

  log = log or (lambda line: print(line, file=sys.stderr))
  if boxes is not None:
    if len(image_paths) != 1 or not os.path.isdir(image_paths[0]):
      raise PredictionError(f'--boxes needs --images to be the one folder its file names are in; got '
                            f'{" ".join(image_paths)}')
    parsed = coco.read_boxes(boxes, PredictionError)  # a bad file is an error before the model is loaded
    items, problems = [], []
  else:
    items, problems = prediction.collect_images(image_paths)
    if not items:
      raise PredictionError('no images to predict: ' + ('; '.join(problems) if problems else 'none given'))
  model, variables, spec = loaded or predictor.load_predictor(checkpoint_path, config, step=step)[:3]
  kset = spec.keypoint_set
  if not kset.scored_by_oks:
    raise PredictionError(f'{checkpoint_path} predicts the keypoint set {kset.describe()}, not COCO-format data\'s: '
                          'COCO results (and --boxes) need a model trained on a COCO build; this one writes a CSV')
  if boxes is not None:
    targets, missing, left_out = box_targets(parsed, boxes, image_paths[0], kset, spec.category)
    problems += missing
    if left_out:
      log(f'{left_out} boxes left out (crowds, or categories the {spec.category} model does not predict)')
  else:
    name = _model_category(kset, spec.category, category)
    targets = [Target(path, iid, name, None, None) for iid, path in items]
  for p in problems:
    log(f'warning: {p}')
  if not targets:
    raise PredictionError(f'no objects to predict in {boxes or " ".join(image_paths)}')
  mesh = devices.make_mesh()
  variables = devices.replicate(variables, mesh)
  predict_fn = predictor.make_predict_fn(model, flip=flip, category=spec.category, mesh=mesh, keypoint_set=kset,
                                         confidence=True)
  batch_size = devices.local_batch_size(min(batch_size, len(targets)), mesh)
  size = spec.input_size
  results: list[dict] = []
  failed = list(problems)
  pending: list[dict] = []
  drawn: dict[str, object] = {}
  start = time.perf_counter()

  def run(objects: list[dict]) -> None:
    inputs = np.zeros((batch_size, size, size, 3), np.float32)  # fixed shape: one compilation
    inputs[:len(objects)] = np.stack([o['input'] for o in objects])
    coords, conf = predict_fn(variables, devices.shard_batch({'x': inputs}, mesh)['x'])
    coords, conf = devices.local_rows(coords)[:len(objects)], devices.local_rows(conf)[:len(objects)]
    pixels = predictor.to_original(coords, np.stack([o['affine'] for o in objects]), spec)
    pixels = pixels + np.stack([o['offset'] for o in objects])[:, None, :]
    for o, p, c in zip(objects, pixels, np.asarray(conf)):
      results.append(_result(o['target'], kset, p, c, spec.category))
      if draw:
        t = o['target']
        image = drawn.get(t.path, o['image'])
        names = kset.keypoint_names(spec.category)
        full = np.full((kset.num_keypoints, 2), np.nan)
        full[[kset.keypoints.index(n) for n in names]] = p
        drawn[t.path] = drawing.draw_keypoints(image, full, t.category, labels=False, min_size=1, keypoint_set=kset)

  for loaded_image in _prepared(targets, spec, keep_images=bool(draw)):
    for o in loaded_image:
      if 'error' in o:
        log(f'error: {o["error"]}')
        failed.append(o['error'])
        continue
      pending.append(o)
      if len(pending) == batch_size:
        run(pending)
        pending = []
  if pending:
    run(pending)
  if results:
    atomic.write_text(out, json.dumps(results) + '\n')
  for path, picture in drawn.items():
    iid = next(t.image_id for t in targets if t.path == path)
    drawing.save_png(picture, prediction.drawing_path(draw, str(iid) if boxes is None else
                                                      os.path.relpath(path, image_paths[0]).replace(os.sep, '/')))
  seconds = time.perf_counter() - start
  log(f'predicted {len(results)} of {len(targets)} objects in {seconds:.1f} s '
      f'({len(results) / max(seconds, 1e-9):.1f} objects/s, compilation included) -> '
      f'{out if results else "nothing written"}' + (f'; {len(failed)} problems' if failed else ''))
  return prediction.PredictionSummary(len(results), len(targets), failed)
