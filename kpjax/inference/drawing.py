"""Drawings of keypoints on garments (PIL): predictions, prediction | truth pairs, grids.

Keypoints are coloured by side (left blue, right red, centre yellow), labelled with their names and joined
by their category's skeleton (the keypoint set's: FashionAI's garments unless one is given,
kpjax.data.keypoint_sets). Occluded ground-truth points (v = 0)
are drawn hollow, absent ones (v = -1) and NaN coordinates not at all. Small images are enlarged
before drawing so that names stay legible. Nothing here touches JAX.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kpjax.data import keypoint_sets
from kpjax.data import keypoints as kp
from kpjax.io import atomic

LEFT_COLOR = (40, 140, 255)
RIGHT_COLOR = (255, 60, 60)
CENTER_COLOR = (255, 200, 0)
EDGE_CENTER_COLOR = (235, 235, 235)
OUTLINE = (0, 0, 0)

_MIRROR = kp.flip_permutation(kp.ALL)


def _mirror(name: str) -> str:
  return kp.KEYPOINT_NAMES[_MIRROR[kp.KEYPOINT_NAMES.index(name)]]


# The garment outlines (FashionAI's set, kpjax.data.keypoints.SKELETON); an 'all' drawing has none.
SKELETON: dict[str, tuple[tuple[str, str], ...]] = {**kp.SKELETON, kp.ALL: ()}


def _skeleton(kset: keypoint_sets.KeypointSet, category: str) -> tuple[tuple[str, str], ...]:
  return () if category == keypoint_sets.ALL else kset.skeleton(category)


def side_color(name: str) -> tuple[int, int, int]:
  """Blue for a left keypoint, red for a right one (a `left`/`right` word in its name), yellow otherwise."""
  words = name.lower().split('_')
  if 'left' in words:
    return LEFT_COLOR
  if 'right' in words:
    return RIGHT_COLOR
  return CENTER_COLOR


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def to_uint8_image(image) -> np.ndarray:
  """A PIL image or array (H, W), (H, W, 3|4), uint8 or floats in [0, 1] -> uint8 (H, W, 3)."""
  if isinstance(image, Image.Image):
    return np.asarray(image.convert('RGB'))
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
    raise ValueError(f'expected an image (H, W), (H, W, 3) or (H, W, 4); got shape {arr.shape}')
  return arr[..., :3]


def _category_points(coords, category: str, visibility=None, keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI
                     ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
  """(names, coords (L, 2), visibility (L,)) of `category`'s keypoints from K-row (the set's) or L-row input."""
  names = keypoint_set.keypoint_names(category)
  k = keypoint_set.num_keypoints
  coords = np.asarray(coords, np.float64)
  if coords.ndim != 2 or coords.shape[1] != 2:
    raise ValueError(f'coords must be ({k}, 2) or (L, 2) pixels (x, y); got shape {coords.shape}')
  vis = np.ones(coords.shape[0], np.int64) if visibility is None else np.asarray(visibility).astype(np.int64)
  if vis.shape != coords.shape[:1]:
    raise ValueError(f'visibility must have one entry per keypoint ({coords.shape[0]}); got shape {vis.shape}')
  if coords.shape[0] == k and len(names) != k:
    idx = keypoint_set.keypoint_indices(category)
    coords, vis = coords[idx], vis[idx]
  elif coords.shape[0] != len(names):
    raise ValueError(f'{category} has {len(names)} keypoints; got coords for {coords.shape[0]} '
                     f'(expected {len(names)} or {k})')
  return names, coords, vis


def draw_keypoints(image, coords, category: str, visibility=None, *, labels: bool = True,
                   title: str | None = None, min_size: int = 384,
                   keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI) -> Image.Image:
  """The image with `category`'s keypoints drawn on it.

  Args:
    image: array (H, W, 3) uint8 or floats in [0, 1], or a PIL image, in the coordinates' pixels.
    coords: (K, 2) pixels (x, y) of the set's keypoints (FashionAI: the 24 in CSV order), or (L, 2) for
      `category`'s keypoints only.
    category: a category of the set (a garment) or 'all' (every keypoint, no skeleton).
    visibility: optional (K,) or (L,) in {1, 0, -1}: 0 drawn hollow, -1 skipped.
    labels: write each keypoint's name next to it.
    title: a caption written in the top-left corner.
    min_size: enlarge the image so that its shorter side is at least this many pixels.
    keypoint_set: the set the keypoints are of (FashionAI's by default).

  Returns:
    An RGB PIL image (possibly enlarged; the keypoints are scaled with it).
  """
  keypoint_set.check_category(category)
  names, pts, vis = _category_points(coords, category, visibility, keypoint_set)
  arr = to_uint8_image(image)
  h, w = arr.shape[:2]
  scale = max(1.0, min_size / max(1, min(h, w)))
  canvas = Image.fromarray(arr)
  if scale > 1:
    canvas = canvas.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
  # Pixel centres: x -> (x + 0.5) * scale - 0.5 keeps points on the same content after resizing.
  pts = (pts + 0.5) * scale - 0.5
  shown = np.isfinite(pts).all(-1) & (vis >= 0)
  draw = ImageDraw.Draw(canvas)
  size = canvas.size
  r = max(3, round(min(size) / 90))
  line = max(2, r // 2)
  index = {n: i for i, n in enumerate(names)}
  for a, b in _skeleton(keypoint_set, category):
    i, j = index[a], index[b]
    if shown[i] and shown[j]:
      color = side_color(a) if side_color(a) == side_color(b) else EDGE_CENTER_COLOR
      draw.line([tuple(pts[i]), tuple(pts[j])], fill=OUTLINE, width=line + 2)
      draw.line([tuple(pts[i]), tuple(pts[j])], fill=color, width=line)
  font = _font(max(10, round(min(size) / 32)))
  for i, name in enumerate(names):
    if not shown[i]:
      continue
    x, y = pts[i]
    box = (x - r, y - r, x + r, y + r)
    color = side_color(name)
    if vis[i] == 0:  # occluded: a hollow ring, a little larger than a dot
      ro = r + 1
      draw.ellipse((x - ro - 1, y - ro - 1, x + ro + 1, y + ro + 1), outline=OUTLINE, width=1)
      draw.ellipse((x - ro, y - ro, x + ro, y + ro), outline=color, width=max(1, ro // 3))
    else:
      draw.ellipse(box, fill=color, outline=OUTLINE, width=1)
    if labels:
      tx = x + r + 2
      text_width = draw.textlength(name, font=font)
      if tx + text_width > size[0] and x - r - 2 - text_width >= 0:  # no room on the right
        tx = x - r - 2 - text_width
      draw.text((tx, y - r), name, fill=color, font=font, stroke_width=1, stroke_fill=OUTLINE)
  if title:
    draw.text((4, 2), title, fill=(255, 255, 255), font=_font(max(12, round(min(size) / 24))),
              stroke_width=2, stroke_fill=OUTLINE)
  return canvas


def side_by_side(*images, gap: int = 4, background=(255, 255, 255)) -> Image.Image:
  """Images in one row (e.g. prediction | ground truth), each scaled to the tallest one's height."""
  tiles = [Image.fromarray(to_uint8_image(im)) for im in images]
  if not tiles:
    raise ValueError('side_by_side needs at least one image')
  height = max(t.height for t in tiles)
  tiles = [t if t.height == height else t.resize((round(t.width * height / t.height), height), Image.BILINEAR)
           for t in tiles]
  out = Image.new('RGB', (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), background)
  x = 0
  for t in tiles:
    out.paste(t, (x, 0))
    x += t.width + gap
  return out


def draw_prediction(image, pred, category: str, gt=None, gt_visibility=None, *, labels: bool = True,
                    min_size: int = 384, keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI) -> Image.Image:
  """The prediction drawn on `image`; with a ground truth, prediction and ground truth side by side."""
  drawn = draw_keypoints(image, pred, category, labels=labels, min_size=min_size,
                         title='prediction' if gt is not None else None, keypoint_set=keypoint_set)
  if gt is None:
    return drawn
  truth = draw_keypoints(image, gt, category, gt_visibility, labels=labels, min_size=min_size,
                         title='ground truth', keypoint_set=keypoint_set)
  return side_by_side(drawn, truth)


def make_grid(images: Sequence, columns: int = 4, gap: int = 4, background=(255, 255, 255)) -> Image.Image:
  """Images on a grid of `columns` columns; every cell is the size of the largest image."""
  tiles = [Image.fromarray(to_uint8_image(im)) for im in images]
  if not tiles:
    raise ValueError('make_grid needs at least one image')
  columns = max(1, min(columns, len(tiles)))
  rows = math.ceil(len(tiles) / columns)
  cw, ch = max(t.width for t in tiles), max(t.height for t in tiles)
  out = Image.new('RGB', (columns * cw + (columns - 1) * gap, rows * ch + (rows - 1) * gap), background)
  for k, t in enumerate(tiles):
    r, c = divmod(k, columns)
    out.paste(t, (c * (cw + gap), r * (ch + gap)))
  return out


def save_png(image, path: str | os.PathLike) -> str:
  """Writes `image` (PIL or array) to `path` as PNG atomically (temp file + rename); returns the path."""
  pil = image if isinstance(image, Image.Image) else Image.fromarray(to_uint8_image(image))
  with atomic.staged_file(path) as tmp:
    pil.save(tmp, format='PNG')
  return os.fspath(path)


def save_grid(images: Sequence, path: str | os.PathLike, columns: int = 4, max_cell: int = 512) -> str:
  """Writes the images on one grid PNG at `path`; cells larger than `max_cell` are shrunk."""
  tiles = []
  for im in images:
    t = Image.fromarray(to_uint8_image(im))
    if max(t.size) > max_cell:
      t.thumbnail((max_cell, max_cell), Image.BILINEAR)
    tiles.append(t)
  return save_png(make_grid(tiles, columns=columns), path)


def save_prediction_grid(path: str | os.PathLike, images: Sequence, preds: Sequence, categories: Sequence,
                         gts: Sequence | None = None, visibilities: Sequence | None = None, *,
                         columns: int = 2, labels: bool = False, min_size: int = 256,
                         keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI) -> str:
  """Training's picture of validation predictions: one prediction|truth pair per image, on a grid.

  Args:
    path: the PNG to write (atomically).
    images: original images (H, W, 3) uint8, each in its own size.
    preds: (K, 2) original pixels per image (`kpjax.inference.scoring.evaluate_batches`' 'pred' rows).
    categories: each image's category (name or index into the set's categories, `kp.CATEGORIES`).
    gts, visibilities: optional ground truth (K, 2) and (K,) per image, drawn alongside.
    keypoint_set: the set of the keypoints (FashionAI's by default).
  """
  tiles = []
  for k, (image, pred, cat) in enumerate(zip(images, preds, categories)):
    cat = keypoint_set.category_names[int(cat)] if isinstance(cat, (int, np.integer)) else str(cat)
    gt = None if gts is None else gts[k]
    vis = None if visibilities is None else visibilities[k]
    tiles.append(draw_prediction(image, pred, cat, gt, vis, labels=labels, min_size=min_size,
                                 keypoint_set=keypoint_set))
  return save_grid(tiles, path, columns=columns, max_cell=2 * min_size + 4)
