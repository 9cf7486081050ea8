"""Keypoints for any images, as a FashionAI submission CSV (and optional drawings): what
`python -m kpjax.predict` runs (kpjax.cli.predict).

Each image is letterboxed (or resized, for converted KPDEM models) to the model's input exactly as in
training, run in fixed-size jit-compiled batches, and its keypoints mapped back to the original
image's pixels. Image ids are paths from the last `Images/` folder on (`Images/skirt/x.jpg`, the
FashionAI layout), else the paths as found. An unreadable image is reported and skipped (and counted
in the summary's problems). Images, folders, globs, the CSV and the drawings may be in gs://bucket/...
(kpjax.io.paths).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from typing import Iterator, Sequence

import numpy as np

from kpjax.data import keypoints as kp
from kpjax.errors import PredictionError
from kpjax.io import atomic
from kpjax.io import paths as paths_lib

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
_GLOB_CHARS = set('*?[')


def image_id(path: str, root: str | None = None) -> str:
  """The submission id of an image file: from its last `Images` folder on, else relative to the
  folder `root` it was found in, else its file name."""
  parts = os.path.normpath(path).split(os.sep)
  if 'Images' in parts[:-1]:
    last = len(parts) - 1 - parts[:-1][::-1].index('Images') - 1
    return '/'.join(parts[last:])
  if root is not None:
    return os.path.relpath(path, root).replace(os.sep, '/')
  return parts[-1]


def collect_images(paths: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Expands files, folders (recursively, image extensions only) and globs.

  Returns:
    ([(image_id, file path)] in a stable order without repeats, [problems]): a path that does not
    exist or a pattern that matches nothing is a problem, as is two files sharing one id.
  """
  found: list[tuple[str, str]] = []
  problems: list[str] = []
  for pattern in paths:
    is_glob = bool(_GLOB_CHARS & set(pattern))
    where = paths_lib.resolve(pattern) if paths_lib.is_remote(pattern) and not is_glob else None
    if where.is_dir() if where is not None else os.path.isdir(pattern):
      files = [f for f in paths_lib.list_files(pattern)
               if f.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(f).startswith('.')]
      if not files:
        problems.append(f'{pattern}: no images ({", ".join(IMAGE_EXTENSIONS)}) in this folder')
      found += [(image_id(f, pattern), f) for f in files]
    elif where.exists() if where is not None else os.path.exists(pattern):
      found.append((image_id(pattern), pattern))
    elif is_glob:
      files = paths_lib.glob(pattern)
      if not files:
        problems.append(f'{pattern}: matches no file')
      found += [(image_id(f), f) for f in files]
    else:
      problems.append(f'{pattern}: no such file or folder')
  unique: list[tuple[str, str]] = []
  seen_paths: set[str] = set()
  owner: dict[str, str] = {}
  for iid, path in found:
    real = path if paths_lib.is_remote(path) else os.path.realpath(path)
    if real in seen_paths:
      continue
    seen_paths.add(real)
    if iid in owner:
      problems.append(f'{path}: has the same image id {iid!r} as {owner[iid]}; skipped')
      continue
    owner[iid] = path
    unique.append((iid, path))
  return unique, problems


def _load(item: tuple[str, str, str], spec, keep_image: bool):
  """Reads and prepares one image for the model `spec` describes; returns a dict, or one with 'error' set."""
  from kpjax.data import images  # pylint: disable=g-import-not-at-top
  iid, path, category = item
  try:
    data = paths_lib.resolve(path).read_bytes()
    image = images.decode_image(data, name=path)
    prepared, affine = spec.convention.prepare(image, spec.input_size)
  except (OSError, ValueError) as e:
    return {'image_id': iid, 'path': path, 'error': str(e) if path in str(e) else f'{path}: {e}'}
  return {'image_id': iid, 'path': path, 'category': category, 'input': prepared, 'affine': affine,
          'size': image.shape[:2], 'image': image if keep_image else None}


def prepared_batches(items: Sequence[tuple[str, str, str]], batch_size: int, spec, keep_images: bool,
                     workers: int = 8) -> Iterator[list[dict]]:
  """Lists of up to `batch_size` images loaded for the model `spec` describes (kpjax.data.spec.ModelSpec)
  (or errors), read by a thread pool one batch ahead."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    def submit(chunk):
      return [pool.submit(_load, it, spec, keep_images) for it in chunk]
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    ahead = [submit(c) for c in chunks[:2]]
    for k in range(len(chunks)):
      futures = ahead.pop(0)
      if k + 2 < len(chunks):
        ahead.append(submit(chunks[k + 2]))
      yield [f.result() for f in futures]


def inside_image(xy, height: int, width: int) -> tuple[float, float]:
  """A keypoint (x, y) kept inside the image: pixel centres 0..W-1, 0..H-1 (as submissions write them)."""
  return float(np.clip(xy[0], 0, width - 1)), float(np.clip(xy[1], 0, height - 1))


def submission_cells(coords24: np.ndarray, category: str, height: int, width: int, decimals: int = 0) -> list[str]:
  """The 24 `x_y_1` cells of one image: its category's keypoints kept inside the image (pixel centres
  0..W-1, 0..H-1) and rounded to `decimals` digits after the point (0: whole pixels, the challenge's
  format); `-1_-1_-1` for the others."""
  from kpjax.data import fashionai_csv as csv_io  # pylint: disable=g-import-not-at-top
  mask = kp.category_mask(category)
  cells = []
  for j in range(kp.NUM_KEYPOINTS):
    if mask[j] and np.isfinite(coords24[j]).all():
      cells.append(csv_io.format_cell(*inside_image(coords24[j], height, width), 1, decimals))
    else:
      cells.append(csv_io.ABSENT_CELL)
  return cells


def image_result(coords: np.ndarray, confidence: np.ndarray, category: str, model_category: str, height: int,
                 width: int, keypoint_set=kp.FASHIONAI) -> dict:
  """One image's keypoints as JSON (`kpjax.predict --json` and `kpjax.serve` answer alike):

    {"category": ..., "image": {"width", "height"}, "keypoints": [{"name", "x", "y", "confidence"}]}

  coords (L, 2) original-image pixels and confidence (L,) in [0, 1] of the model's `model_category`
  keypoints (of `keypoint_set`); the keypoints listed are `category`'s, in the set's order, kept inside the
  image as in submissions.
  """
  names = keypoint_set.keypoint_names(model_category)
  keypoints = []
  for name in keypoint_set.keypoint_names(category):
    j = names.index(name)
    x, y = inside_image(coords[j], height, width)
    keypoints.append({'name': name, 'x': x, 'y': y, 'confidence': float(confidence[j])})
  return {'category': category, 'image': {'width': int(width), 'height': int(height)}, 'keypoints': keypoints}


def drawing_path(directory: str, iid: str) -> str:
  """Where --draw puts an image's drawing: its id's folders under `directory`, extension .png."""
  parts = [p if p not in ('', '.', '..') else '_' for p in os.path.splitext(iid)[0].split('/')]
  return paths_lib.join(directory, *parts) + '.png'


def assign_categories(items: list[tuple[str, str]], model_category: str, category: str | None,
                      categories_csv: str | None) -> tuple[list[tuple[str, str, str]], int]:
  """(image_id, path, category) for every image to predict, and how many were left out.

  A per-category model predicts its own category; given a test.csv it keeps only the images listed
  with that category (so five models can share one --images folder). An 'all' model needs
  `category` (every image) or the CSV (each image; an image the CSV lacks is an error).
  """
  from kpjax.data import fashionai_csv as csv_io  # pylint: disable=g-import-not-at-top
  table = csv_io.read_categories(categories_csv) if categories_csv else None
  if table is not None:
    missing = [i for i, _ in items if i not in table]
    if missing:
      raise PredictionError(f'{categories_csv} has no category for image {missing[0]}'
                       + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''))
  if model_category != kp.ALL:
    if category and category != model_category:
      raise PredictionError(f'--category {category} disagrees with the {model_category} model')
    kept = [(i, p, model_category) for i, p in items if table is None or table[i] == model_category]
    return kept, len(items) - len(kept)
  if category:
    cat = kp.check_category(category, allow_all=False)
    return [(i, p, cat) for i, p in items], 0
  if table is not None:
    return [(i, p, table[i]) for i, p in items], 0
  raise PredictionError("the model predicts all 24 keypoints (category 'all'): say each image's garment with "
                   '--category CAT or --categories test.csv')


@dataclasses.dataclass
class PredictionSummary:
  """What `predict_files` did: images predicted and written, images it was asked to predict, and the
  problems (unreadable images, paths that match nothing), each one line."""
  predicted: int
  requested: int
  problems: list[str]


def predict_files(checkpoint_path: str, image_paths: Sequence[str], out: str, *, config=None, flip: bool = False,
                  batch_size: int = 16, decimals: int = 0, category: str | None = None,
                  categories_csv: str | None = None, draw: str | None = None, step: int | None = None,
                  json_out: str | None = None, log=None) -> PredictionSummary:
  """Predicts the images (files, folders, globs) with the model at `checkpoint_path` and writes the
  FashionAI submission CSV `out` (with `draw`, one PNG per image under that folder; with `json_out`, a
  JSON file `{"checkpoint", "flip", "images": [{"image_id", **image_result}]}`: every keypoint's
  unrounded pixels and its confidence, kpjax.inference.confidence); a model of another keypoint set
  (COCO-format data) writes COCO results instead (kpjax.inference.coco_prediction), whose keypoint scores
  are those confidences.

  config: a (validated) config that must describe the model, or None; category / categories_csv: the
  images' categories for an 'all' model (see assign_categories). Unreadable images are reported through
  `log` (default: stderr) and skipped; PredictionError when nothing can be predicted, before anything is
  written.
  """
  from kpjax.data import fashionai_csv as csv_io  # pylint: disable=g-import-not-at-top
  from kpjax.inference import devices  # pylint: disable=g-import-not-at-top  (JAX only once arguments are fine)
  from kpjax.inference import drawing  # pylint: disable=g-import-not-at-top
  from kpjax.inference import predictor  # pylint: disable=g-import-not-at-top

  log = log or (lambda line: print(line, file=sys.stderr))
  for target in (out, draw):
    if target:
      paths_lib.resolve(target)  # a gs:// one without its bucket (or the gcs extra) stops here, before any work
  items, problems = collect_images(image_paths)
  if not items:
    raise PredictionError('no images to predict: ' + ('; '.join(problems) if problems else 'none given'))
  for p in problems:
    log(f'warning: {p}')
  model, variables, spec, _ = predictor.load_predictor(checkpoint_path, config, step=step)
  if spec.keypoint_set != kp.FASHIONAI:  # a model of COCO-format data writes COCO results
    if categories_csv:
      raise PredictionError(f'--categories is a FashionAI test.csv; {checkpoint_path} predicts the keypoint set '
                            f'{spec.keypoint_set.describe()} (give --category, or the objects with --boxes)')
    if json_out:
      raise PredictionError(f'--json is for FashionAI models; {checkpoint_path} predicts the keypoint set '
                            f'{spec.keypoint_set.describe()}, whose COCO results already hold every keypoint\'s score')
    from kpjax.inference import coco_prediction  # pylint: disable=g-import-not-at-top
    return coco_prediction.predict_coco(checkpoint_path, image_paths, out, config=config, flip=flip,
                                        batch_size=batch_size, category=category, draw=draw, step=step, log=log,
                                        loaded=(model, variables, spec))
  model_category, size = spec.category, spec.input_size
  work, left_out = assign_categories(items, model_category, category, categories_csv)
  if left_out:
    log(f'{left_out} images listed with another category than the {model_category} model\'s are left out')
  if not work:
    raise PredictionError(f'none of the {len(items)} images is a {model_category} in {categories_csv}')
  mesh = devices.make_mesh()  # every device of this machine takes its share of each batch
  variables = devices.replicate(variables, mesh)
  predict_fn = predictor.make_predict_fn(model, flip=flip, category=model_category, mesh=mesh,
                                        confidence=bool(json_out))

  rows: list[tuple[str, str, list[str]]] = []
  results: list[dict] = []
  failed = list(problems)
  batch_size = devices.local_batch_size(min(batch_size, len(work)), mesh)
  start = time.perf_counter()
  for batch in prepared_batches(work, batch_size, spec, keep_images=bool(draw)):
    ok = [b for b in batch if 'error' not in b]
    for b in batch:
      if 'error' in b:
        log(f'error: {b["error"]}')
        failed.append(b['error'])
    if not ok:
      continue
    inputs = np.zeros((batch_size, size, size, 3), np.float32)  # fixed shape: one compilation
    inputs[:len(ok)] = np.stack([b['input'] for b in ok])
    outputs = predict_fn(variables, devices.shard_batch({'x': inputs}, mesh)['x'])
    coords, confidence = outputs if json_out else (outputs, None)
    coords = devices.local_rows(coords)[:len(ok)]
    original = predictor.to_original(coords, np.stack([b['affine'] for b in ok]), spec)
    pixels = predictor.to_24(original, model_category)
    if json_out:
      confidence = devices.local_rows(confidence)[:len(ok)]
      results += [dict(image_id=b['image_id'], **image_result(o, c, b['category'], model_category, *b['size'],
                                                             spec.keypoint_set))
                  for b, o, c in zip(ok, original, confidence)]
    for b, p in zip(ok, pixels):
      h, w = b['size']
      rows.append((b['image_id'], b['category'], submission_cells(p, b['category'], h, w, decimals)))
      if draw:
        drawn = drawing.draw_keypoints(b['image'], p, b['category'], title=b['image_id'])
        drawing.save_png(drawn, drawing_path(draw, b['image_id']))
  if rows:
    atomic.write_text(out, csv_io.format_submission(rows))
    if json_out:
      atomic.write_text(json_out, json.dumps({'checkpoint': checkpoint_path, 'flip': bool(flip), 'images': results},
                                             indent=1) + '\n')
  seconds = time.perf_counter() - start
  written = ' and '.join(p for p in (out, json_out) if p) if rows else 'nothing written'
  log(f'predicted {len(rows)} of {len(work)} images in {seconds:.1f} s '
      f'({len(rows) / max(seconds, 1e-9):.1f} images/s, compilation included) -> {written}'
      + (f'; {len(failed)} problems' if failed else ''))
  return PredictionSummary(len(rows), len(work), failed)
