"""COCO keypoint files: reading and checking annotations, results and boxes; the keypoint set a file's
`categories` define; how an object is cropped for a top-down model; COCO's visibility in kpjax's terms.

Read by the COCO dataset build (kpjax.data.build.coco), `kpjax.evaluate --coco-annotations`, `kpjax.predict
--boxes` and the synthetic COCO writer's tests. Every problem names the file, the annotation id and the
image; callers pass the error class to raise (BuildError, EvaluationError, PredictionError) and, to skip
bad annotations instead, a list that collects their messages. numpy only.

Conventions:
* Coordinates are used as the file gives them, as kpjax pixel coordinates (kpjax.data.geometry).
* Visibility: COCO's v = 2 (labelled, visible) is kpjax's 1, v = 1 (labelled, not visible) kpjax's 0
  (occluded), v = 0 (not labelled, e.g. outside the image) kpjax's -1 (absent, position (-1, -1)).
* A top-down example is the object's box grown by CROP_MARGIN of its width (height) on the left and right
  (top and bottom), cut at the image's edges, and cut out of the image at whole pixels (`crop_window`);
  its affine (original pixels -> crop pixels) is a translation by whole pixels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from kpjax.data import keypoint_sets

CROP_MARGIN = 0.125  # of the box's width (height), added on each side: crops are 1.25x the box
BOX_TOLERANCE = 1.0  # pixels a box may extend beyond its image (rounding in annotation tools)
VISIBILITY_FROM_COCO = {2: 1, 1: 0, 0: -1}


@dataclasses.dataclass(frozen=True)
class Image:
  id: int
  file_name: str
  width: int | None = None
  height: int | None = None


@dataclasses.dataclass(frozen=True)
class CocoCategory:
  """A keypoint category of a file: its COCO id, name, keypoint names and skeleton (pairs of names)."""
  id: int
  name: str
  keypoints: tuple[str, ...]
  skeleton: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Annotation:
  """One object: keypoints (K, 3) x, y, v as in the file (v in {0, 1, 2}); bbox (4,) x, y, w, h."""
  id: int
  image_id: int
  category_id: int
  keypoints: np.ndarray
  bbox: np.ndarray
  area: float
  iscrowd: bool
  num_keypoints: int
  score: float | None = None  # detections only

  @property
  def labelled(self) -> int:
    """Keypoints with v > 0."""
    return int(np.count_nonzero(self.keypoints[:, 2] > 0))


@dataclasses.dataclass
class CocoFile:
  """A checked COCO keypoint file: its images by id, keypoint categories by id, and the annotations kept
  (file order)."""
  path: str
  images: dict[int, Image]
  categories: dict[int, CocoCategory]
  annotations: list[Annotation]

  def where(self, annotation_id: Any, image_id: Any = None) -> str:
    """'FILE: annotation N (image FILE_NAME)' for messages."""
    image = self.images.get(image_id) if isinstance(image_id, int) else None
    name = image.file_name if image is not None else f'id {image_id}' if image_id is not None else '?'
    return f'{self.path}: annotation {annotation_id} (image {name})'


def load_json(path: str, what: str, error: type[Exception]) -> Any:
  """The JSON value in `path`; `error` naming the file and `what` it should hold otherwise."""
  if not os.path.isfile(path):
    raise error(f'{path}: no such file; expected {what}')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f'{path}: not a readable JSON file ({e}); expected {what}') from None


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _numbers(v, n: int | None = None) -> bool:
  return (isinstance(v, list) and (n is None or len(v) == n)
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))


def _read_images(data: Mapping, path: str, error) -> dict[int, Image]:
  images: dict[int, Image] = {}
  if not isinstance(data.get('images'), list):
    raise error(f'{path}: no "images" list; expected a COCO file with images, annotations and categories')
  for i, im in enumerate(data['images']):
    if not isinstance(im, dict) or not _is_int(im.get('id')) or not isinstance(im.get('file_name'), str):
      raise error(f'{path}: images[{i}] needs an integer "id" and a "file_name"; got {str(im)[:200]}')
    if im['id'] in images:
      raise error(f'{path}: image id {im["id"]} is listed twice ({images[im["id"]].file_name}, {im["file_name"]})')
    size = [im.get(k) for k in ('width', 'height')]
    if any(s is not None and not (_is_int(s) and s > 0) for s in size):
      raise error(f'{path}: image {im["file_name"]} has width/height {size}; expected positive integers')
    images[im['id']] = Image(im['id'], im['file_name'], *size)
  return images


def read_categories(data: Mapping, path: str, error) -> dict[int, CocoCategory]:
  """The keypoint categories of a COCO file (categories without a `keypoints` list are not keypoint
  categories and are left out); `error` for a malformed one."""
  out: dict[int, CocoCategory] = {}
  if not isinstance(data.get('categories'), list):
    raise error(f'{path}: no "categories" list; expected COCO keypoint categories (id, name, keypoints, skeleton)')
  for i, c in enumerate(data['categories']):
    if not isinstance(c, dict) or not _is_int(c.get('id')) or not isinstance(c.get('name'), str):
      raise error(f'{path}: categories[{i}] needs an integer "id" and a "name"; got {str(c)[:200]}')
    if c.get('keypoints') in (None, []):
      continue
    names = c['keypoints']
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
      raise error(f'{path}: category {c["name"]} ({c["id"]}): "keypoints" must list distinct names; got {names}')
    skeleton = []
    for edge in c.get('skeleton') or []:
      if not (isinstance(edge, list) and len(edge) == 2 and all(_is_int(j) and 1 <= j <= len(names) for j in edge)):
        raise error(f'{path}: category {c["name"]} ({c["id"]}): skeleton edge {edge} must be two keypoint numbers '
                    f'in 1..{len(names)} (COCO numbers keypoints from 1)')
      skeleton.append((names[edge[0] - 1], names[edge[1] - 1]))
    if c['id'] in out or c['name'] in {k.name for k in out.values()}:
      raise error(f'{path}: category {c["name"]} ({c["id"]}) is listed twice')
    out[c['id']] = CocoCategory(c['id'], c['name'], tuple(names), tuple(skeleton))
  return out


def _annotation(a: Mapping, f: CocoFile, *, check_boxes: bool, keypoints_required: bool) -> Annotation:
  """One checked annotation; ValueError (the message without its place) for a bad one."""
  if a.get('image_id') not in f.images:
    raise ValueError(f'image id {a.get("image_id")!r} is not in the file\'s images')
  if a.get('category_id') not in f.categories:
    known = ', '.join(f'{c.id} ({c.name})' for c in f.categories.values())
    raise ValueError(f'unknown category {a.get("category_id")!r}; the file\'s keypoint categories are {known}')
  cat = f.categories[a['category_id']]
  k = len(cat.keypoints)
  iscrowd = a.get('iscrowd', 0)
  if iscrowd not in (0, 1) or isinstance(iscrowd, bool):
    raise ValueError(f'iscrowd {iscrowd!r}; expected 0 or 1')
  raw = a.get('keypoints')
  if raw is None and (iscrowd or not keypoints_required):
    raw = [0] * (3 * k)
  if not _numbers(raw) or len(raw) != 3 * k:
    got = f'{len(raw)} numbers' if isinstance(raw, list) else repr(raw)[:80]
    raise ValueError(f'keypoints must be 3 x {k} = {3 * k} numbers (x, y, v for each of {cat.name}\'s keypoints); '
                     f'got {got}')
  kps = np.asarray(raw, np.float64).reshape(k, 3)
  bad_v = [v for v in kps[:, 2] if v not in (0, 1, 2)]
  if bad_v:
    raise ValueError(f'keypoint visibility {bad_v[0]:g}; expected v in {{0, 1, 2}} (0 not labelled, 1 labelled '
                     'but not visible, 2 visible)')
  box = a.get('bbox')
  if not _numbers(box, 4) or box[2] <= 0 or box[3] <= 0:
    raise ValueError(f'bbox {box!r}; expected [x, y, width, height] with a positive width and height')
  image = f.images[a['image_id']]
  if check_boxes and image.width is not None and image.height is not None:
    check_box(box, image.width, image.height)
  area = a.get('area', box[2] * box[3])
  if not isinstance(area, (int, float)) or isinstance(area, bool) or not math.isfinite(area) or area < 0:
    raise ValueError(f'area {area!r}; expected a number >= 0')
  labelled = int(np.count_nonzero(kps[:, 2] > 0))
  num = a.get('num_keypoints', labelled)
  if not _is_int(num) or num < 0:
    raise ValueError(f'num_keypoints {num!r}; expected an integer >= 0')
  score = a.get('score')
  if score is not None and not _numbers([score]):
    raise ValueError(f'score {score!r}; expected a number')
  return Annotation(a['id'], a['image_id'], a['category_id'], kps, np.asarray(box, np.float64), float(area),
                    bool(iscrowd), int(num), None if score is None else float(score))


def check_box(box: Sequence[float], width: int, height: int) -> None:
  """ValueError unless the box [x, y, w, h] lies inside a width x height image (BOX_TOLERANCE px beyond)."""
  x, y, w, h = (float(v) for v in box)
  t = BOX_TOLERANCE
  if x < -t or y < -t or x + w > width + t or y + h > height + t:
    raise ValueError(f'box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside its {width}x{height} image')


def read_annotations(path: str, error: type[Exception], bad: list[str] | None = None, *,
                     check_boxes: bool = True, keypoints_required: bool = True) -> CocoFile:
  """A COCO keypoint annotation file, checked: every annotation names a known image and keypoint category,
  has 3K numbers with v in {0, 1, 2}, a box of positive size (inside its image when check_boxes and the
  image's size is given), area, iscrowd, num_keypoints (default: the labelled keypoints).

  A bad annotation raises `error` naming the file, annotation id and image; with a `bad` list it is
  described there and left out instead. A file that is not COCO at all always raises.
  """
  data = load_json(path, 'a COCO keypoint annotation file', error)
  if not isinstance(data, dict):
    raise error(f'{path}: a JSON {type(data).__name__}; expected a COCO file (an object with images, annotations, '
                'categories)')
  f = CocoFile(path, _read_images(data, path, error), read_categories(data, path, error), [])
  if not f.categories:
    raise error(f'{path}: no category lists keypoints; expected COCO keypoint categories (id, name, keypoints)')
  if not isinstance(data.get('annotations'), list):
    raise error(f'{path}: no "annotations" list')
  seen = set()
  for i, a in enumerate(data['annotations']):
    if not isinstance(a, dict) or not _is_int(a.get('id')):
      message = f'{path}: annotations[{i}] needs an integer "id"; got {str(a)[:200]}'
    elif a['id'] in seen:
      message = f'{f.where(a["id"], a.get("image_id"))}: annotation id {a["id"]} is used twice'
    else:
      seen.add(a['id'])
      try:
        f.annotations.append(_annotation(a, f, check_boxes=check_boxes, keypoints_required=keypoints_required))
        continue
      except ValueError as e:
        message = f'{f.where(a["id"], a.get("image_id"))}: {e}'
    if bad is None:
      raise error(message)
    bad.append(message)
  return f


def keypoint_set(categories: Sequence[CocoCategory], name: str, *,
                 sigmas: float | Mapping[str, Sequence[float]] | None = None,
                 flip_pairs: Sequence[tuple[str, str]] | None = None,
                 normalization: tuple[str, str] | None = None) -> keypoint_sets.KeypointSet:
  """The keypoint set of a file's categories (in id order): names and skeletons from the file, keypoints
  of the same name shared between categories, scored with OKS by area.

  sigmas: keypoint_sets.parse_sigmas' value (None: keypoint_sets.default_sigmas); flip_pairs: (left,
  right) names, or None to pair `left`/`right` names (keypoint_sets.flip_pairs_from_names);
  normalization: a pair of names that normalises NE in every category that has both.
  """
  categories = sorted(categories, key=lambda c: c.id)
  names: list[str] = []
  for c in categories:
    names += [n for n in c.keypoints if n not in names]
  pairs = keypoint_sets.flip_pairs_from_names(names) if flip_pairs is None else tuple(flip_pairs)
  cats = []
  for c in categories:
    norm = normalization if normalization and set(normalization) <= set(c.keypoints) else None
    cats.append(keypoint_sets.Category(
        name=c.name, keypoints=c.keypoints, sigmas=keypoint_sets.category_sigmas(sigmas, c.name, c.keypoints),
        skeleton=c.skeleton, normalization=tuple(norm) if norm else None, coco_id=c.id))
  return keypoint_sets.KeypointSet(name=name, keypoints=tuple(names), categories=tuple(cats), flip_pairs=pairs,
                                   object_scale='area')


def fit_keypoint_set(kset: keypoint_sets.KeypointSet, categories: Sequence[CocoCategory], name: str
                     ) -> keypoint_sets.KeypointSet:
  """A set defined by hand (keypoint_sets.KeypointSet.from_json of a --keypoint-set file) made the one of a COCO
  file: it must have the file's categories by name, each with the file's keypoints in the file's order; the
  result is called `name`, scored with OKS by area, and its categories carry the file's ids.
  KeypointSetError saying what differs otherwise."""
  mine = {c.name: c for c in kset.categories}
  theirs = {c.name: c for c in categories}
  if set(mine) != set(theirs):
    raise keypoint_sets.KeypointSetError(f'the keypoint set has the categories {sorted(mine)}; the file '
                                         f'{sorted(theirs)}')
  for n, c in theirs.items():
    if mine[n].keypoints != c.keypoints:
      raise keypoint_sets.KeypointSetError(f'category {n!r} has the keypoints {list(mine[n].keypoints)} in the '
                                           f'keypoint set but {list(c.keypoints)} in the file (the same, in order)')
  cats = tuple(dataclasses.replace(mine[c.name], coco_id=c.id, skeleton=mine[c.name].skeleton or c.skeleton)
               for c in sorted(categories, key=lambda c: c.id))
  return dataclasses.replace(kset, name=name, categories=cats, object_scale='area')


def set_keypoints(annotation: Annotation, kset: keypoint_sets.KeypointSet) -> np.ndarray:
  """(K_set, 3) float64: the annotation's x, y, v at its keypoints' places in the set, zeros elsewhere."""
  cat = kset.coco_category(annotation.category_id)
  out = np.zeros((kset.num_keypoints, 3), np.float64)
  out[kset.keypoint_indices(cat.name)] = annotation.keypoints
  return out


def crop_window(bbox: Sequence[float], height: int, width: int, margin: float = CROP_MARGIN
                ) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1): the whole-pixel window [x0, x1) x [y0, y1) a top-down model sees of the object in
  box [x, y, w, h]: the box grown by `margin` of its size on each side, cut at the image's edges, at
  least one pixel."""
  x, y, w, h = (float(v) for v in bbox)
  x0 = min(max(0, math.floor(x - margin * w)), width - 1)
  y0 = min(max(0, math.floor(y - margin * h)), height - 1)
  x1 = max(min(width, math.ceil(x + w + margin * w)), x0 + 1)
  y1 = max(min(height, math.ceil(y + h + margin * h)), y0 + 1)
  return x0, y0, x1, y1


def crop_affine(x0: int, y0: int) -> np.ndarray:
  """(2, 3) float64: original pixels -> pixels of the crop whose top-left pixel is (x0, y0)."""
  return np.array([[1.0, 0.0, -float(x0)], [0.0, 1.0, -float(y0)]])


def training_keypoints(coco_keypoints: np.ndarray, crop: np.ndarray, crop_size: tuple[int, int]
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(K, 3) COCO x, y, v (original pixels) -> kpjax's (K, 2) float32 crop pixels and (K,) int32 visibility.

  v maps by VISIBILITY_FROM_COCO; a labelled keypoint outside the crop (height, width), which the model
  cannot see, is absent (-1) as well; absent ones sit at (-1, -1) as in FashionAI's records.
  """
  kps = np.asarray(coco_keypoints, np.float64)
  visibility = np.array([VISIBILITY_FROM_COCO[int(v)] for v in kps[:, 2]], np.int32)
  xy = kps[:, :2] + crop[:, 2]
  h, w = crop_size
  inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)
  visibility = np.where(inside, visibility, -1).astype(np.int32)
  xy = np.where((visibility >= 0)[:, None], xy, -1.0)
  return xy.astype(np.float32), visibility


# ---- Results and boxes -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Result:
  """One detection of a results file: (K, 3) keypoints x, y, score of its category's K keypoints."""
  image_id: int
  category_id: int
  keypoints: np.ndarray
  score: float


def read_results(path: str, gt: CocoFile, error: type[Exception]) -> list[Result]:
  """A COCO keypoint results file ([{image_id, category_id, keypoints: 3K numbers, score}], what `kpjax.predict`
  writes), checked against the ground truth: known images and categories, 3K numbers, a score."""
  data = load_json(path, 'COCO keypoint results (a list of {image_id, category_id, keypoints, score})', error)
  if not isinstance(data, list):
    raise error(f'{path}: a JSON {type(data).__name__}; expected a list of {{image_id, category_id, keypoints, '
                'score}} (COCO keypoint results)')
  if not data:
    raise error(f'{path} holds no results')
  out = []
  for i, r in enumerate(data):
    where = f'{path}: result {i}'
    if not isinstance(r, dict):
      raise error(f'{where}: expected an object {{image_id, category_id, keypoints, score}}; got {str(r)[:100]}')
    if r.get('image_id') not in gt.images:
      raise error(f'{where}: image id {r.get("image_id")!r} is not in the ground truth {gt.path}')
    if r.get('category_id') not in gt.categories:
      raise error(f'{where} (image {gt.images[r["image_id"]].file_name}): category {r.get("category_id")!r} is not '
                  f'a keypoint category of {gt.path}')
    k = len(gt.categories[r['category_id']].keypoints)
    if not _numbers(r.get('keypoints'), 3 * k):
      raise error(f'{where} (image {gt.images[r["image_id"]].file_name}): keypoints must be 3 x {k} numbers '
                  f'(x, y, score); got {str(r.get("keypoints"))[:100]}')
    if not _numbers([r.get('score')]):
      raise error(f'{where} (image {gt.images[r["image_id"]].file_name}): score {r.get("score")!r}; expected a number')
    out.append(Result(r['image_id'], r['category_id'], np.asarray(r['keypoints'], np.float64).reshape(k, 3),
                      float(r['score'])))
  return out


@dataclasses.dataclass(frozen=True)
class Box:
  """One box to predict: its image (id, file name), COCO category id, [x, y, w, h] and detector score (None)."""
  image_id: int
  file_name: str
  category_id: int
  bbox: tuple[float, float, float, float]
  score: float | None


def read_boxes(path: str, error: type[Exception]) -> tuple[dict[int, Image], list[Box], int]:
  """The boxes of a COCO annotation file or of detections in one ({"images": [...], "annotations": [{image_id,
  category_id, bbox[, score]}]}): (its images, the boxes in file order, how many crowd boxes were left out)."""
  data = load_json(path, 'COCO boxes ({"images": [...], "annotations": [...]})', error)
  if isinstance(data, list):
    raise error(f'{path}: a list of detections has no image file names; put it in a COCO object: '
                '{"images": [{"id", "file_name"}, ...], "annotations": <the list>}')
  if not isinstance(data, dict) or not isinstance(data.get('annotations'), list):
    raise error(f'{path}: expected a COCO object with "images" and "annotations" (boxes)')
  images = _read_images(data, path, error)
  boxes, crowd = [], 0
  for i, a in enumerate(data['annotations']):
    where = f'{path}: annotation {a.get("id", i) if isinstance(a, dict) else i}'
    if not isinstance(a, dict) or a.get('image_id') not in images:
      raise error(f'{where}: image id {a.get("image_id") if isinstance(a, dict) else None!r} is not in the '
                  'file\'s images')
    where += f' (image {images[a["image_id"]].file_name})'
    if a.get('iscrowd', 0):
      crowd += 1
      continue
    box, score = a.get('bbox'), a.get('score')
    if not _is_int(a.get('category_id')):
      raise error(f'{where}: needs an integer category_id')
    if not _numbers(box, 4) or box[2] <= 0 or box[3] <= 0:
      raise error(f'{where}: bbox {box!r}; expected [x, y, width, height] with a positive width and height')
    if score is not None and not _numbers([score]):
      raise error(f'{where}: score {score!r}; expected a number')
    boxes.append(Box(a['image_id'], images[a['image_id']].file_name, a['category_id'], tuple(float(v) for v in box),
                     None if score is None else float(score)))
  return images, boxes, crowd
