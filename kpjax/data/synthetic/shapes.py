"""Synthetic COCO keypoint data that is not garments: stick figures and arrows, several to an image.

`generate_coco(out_dir, num_images, seed)` writes
    out_dir/images/<split>_<index>.png
    out_dir/annotations/train.json, out_dir/annotations/validation.json   (COCO keypoint files)
with two categories of different keypoint counts (a second keypoint set for kpjax, to prove nothing
assumes FashionAI's 24):
    figure (id 1): head, neck, left_hand, right_hand, hip, left_foot, right_foot (7)
    arrow  (id 3): tip, left_barb, right_barb (3)
Each image holds 1-4 objects, randomly sized (some below COCO's 32x32 'medium' area, some above its
96x96 'large'), rotated and placed, drawn in order over a plain, noisy background, and possibly:
  * partly outside the image: a keypoint outside it is not labelled (0, 0, v = 0), as COCO does;
  * occluded: a keypoint under an object drawn later is labelled but not visible (v = 1);
  * too small to annotate: a zero-keypoint object (num_keypoints 0, every v = 0);
  * a crowd: a cluster of small arrows annotated as one `iscrowd` object without keypoints.
Every labelled keypoint is exactly where the drawn shape has it. A shape's left (`left_*`) is +x in its
own frame, the image's right when it faces the viewer, so a horizontal flip maps each left keypoint onto
its right twin's place. Boxes are the extent of each object's pixels inside the image, areas the boxes'.
Every image is drawn from its own seed (seed, split, index): the files are the same for a seed.
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from kpjax.data.synthetic import garments
from kpjax.io import atomic

CATEGORIES = (
    {'id': 1, 'name': 'figure', 'supercategory': 'shape',
     'keypoints': ['head', 'neck', 'left_hand', 'right_hand', 'hip', 'left_foot', 'right_foot'],
     'skeleton': [[1, 2], [2, 3], [2, 4], [2, 5], [5, 6], [5, 7]]},
    {'id': 3, 'name': 'arrow', 'supercategory': 'shape', 'keypoints': ['tip', 'left_barb', 'right_barb'],
     'skeleton': [[1, 2], [1, 3], [2, 3]]},
)
_SPLITS = {'train': 0, 'validation': 1}  # seed-sequence tag of each split


def _figure(rng) -> tuple[np.ndarray, list]:
  """Canonical keypoints (7, 2) (y down, height ~1) and drawing ops [('line', pts, width) | ('disc', c, r)]."""
  arm = rng.uniform(0.25, 0.45, 2)
  drop = rng.uniform(-0.1, 0.35, 2)
  leg = rng.uniform(0.05, 0.28, 2)
  head, neck, hip = np.array([0.0, 0.0]), np.array([0.0, 0.2]), np.array([0.0, 0.58])
  lhand, rhand = np.array([arm[0], 0.2 + drop[0]]), np.array([-arm[1], 0.2 + drop[1]])
  lfoot, rfoot = np.array([leg[0], 1.0]), np.array([-leg[1], 1.0])
  points = np.stack([head, neck, lhand, rhand, hip, lfoot, rfoot])
  ops = [('line', [neck, hip], 0.07), ('line', [neck, lhand], 0.05), ('line', [neck, rhand], 0.05),
         ('line', [hip, lfoot], 0.06), ('line', [hip, rfoot], 0.06), ('disc', head, 0.1)]
  return points, ops


def _arrow(rng) -> tuple[np.ndarray, list]:
  half, depth = rng.uniform(0.25, 0.45), rng.uniform(0.6, 0.9)
  tip, left, right = np.array([0.0, 0.0]), np.array([half, depth]), np.array([-half, depth])
  notch = np.array([0.0, depth * rng.uniform(0.55, 0.8)])
  return np.stack([tip, left, right]), [('polygon', [tip, left, notch, right], 0.0)]


_SHAPES = {'figure': _figure, 'arrow': _arrow}


def _placement(rng, height_px: float, centre) -> np.ndarray:
  """(2, 3) canonical -> pixel affine: rotation, aspect, scale, translation (canonical (0, 0.5) to centre)."""
  angle = math.radians(rng.uniform(-35, 35))
  c, s = math.cos(angle), math.sin(angle)
  lin = height_px * np.array([[c, -s], [s, c]]) @ np.diag([rng.uniform(0.8, 1.25), 1.0])
  return np.concatenate([lin, (np.asarray(centre) - lin @ np.array([0.0, 0.5]))[:, None]], axis=1)


def _apply(m, p) -> np.ndarray:
  return np.asarray(p, np.float64) @ m[:, :2].T + m[:, 2]


def _draw(draw: ImageDraw.ImageDraw, ops, m, fill) -> None:
  scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
  for kind, pts, width in ops:
    if kind == 'line':
      draw.line([tuple(p) for p in _apply(m, pts)], fill=fill, width=max(1, round(width * scale)))
    elif kind == 'disc':  # pts: the centre, width: the radius
      (cx, cy), r = _apply(m, [pts])[0], max(1.0, width * scale)
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
      draw.polygon([tuple(p) for p in _apply(m, pts)], fill=fill)


def _mask(w: int, h: int, ops, m) -> np.ndarray:
  img = Image.new('L', (w, h), 0)
  _draw(ImageDraw.Draw(img), ops, m, 255)
  return np.asarray(img) > 0


def _colour(rng, background) -> tuple[int, int, int]:
  for _ in range(50):
    c = tuple(int(v) for v in rng.integers(0, 256, 3))
    if abs(sum(c) - sum(background)) > 180:
      return c
  return (20, 20, 20) if sum(background) > 380 else (235, 235, 235)


def render_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
  """uint8 (H, W, 3) and its objects [{category, keypoints (K, 3) x y v, bbox, area, iscrowd}] (COCO terms)."""
  w, h = int(rng.integers(128, 193)), int(rng.integers(128, 193))
  background = tuple(int(v) for v in rng.integers(0, 256, 3))
  img = Image.new('RGB', (w, h), background)
  draw = ImageDraw.Draw(img)
  objects = []  # (category, canonical points, ops, affine, kind)
  for _ in range(int(rng.integers(1, 5))):
    category = 'figure' if rng.random() < 0.55 else 'arrow'
    points, ops = _SHAPES[category](rng)
    kind = 'tiny' if rng.random() < 0.1 else 'normal'
    size = rng.uniform(8, 14) if kind == 'tiny' else math.exp(rng.uniform(math.log(22), math.log(150)))
    overhang = rng.random() < 0.2  # partly outside the image
    lo, hi = (-0.05, 1.05) if overhang else (0.2, 0.8)
    objects.append((category, points, ops, _placement(rng, size, rng.uniform(lo, hi, 2) * (w, h)), kind))
  if rng.random() < 0.25:  # a crowd of small arrows
    centre = rng.uniform(0.25, 0.75, 2) * (w, h)
    members = []
    for _ in range(int(rng.integers(3, 7))):
      points, ops = _arrow(rng)
      members.append((ops, _placement(rng, rng.uniform(9, 15), centre + rng.uniform(-18, 18, 2))))
    objects.insert(int(rng.integers(len(objects) + 1)), ('arrow', None, members, None, 'crowd'))

  masks = []
  for category, points, ops, m, kind in objects:
    fill = _colour(rng, background)
    if kind == 'crowd':
      mask = np.zeros((h, w), bool)
      for member_ops, member_m in ops:
        _draw(draw, member_ops, member_m, fill)
        mask |= _mask(w, h, member_ops, member_m)
    else:
      _draw(draw, ops, m, fill)
      mask = _mask(w, h, ops, m)
    masks.append(mask)
  image = np.asarray(img, np.int16) + rng.integers(-8, 9, (h, w, 3), dtype=np.int16)
  image = np.clip(image, 0, 255).astype(np.uint8)

  out = []
  for i, (category, points, ops, m, kind) in enumerate(objects):
    mask = masks[i]
    if not mask.any():
      continue  # entirely outside the image
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    k = len(next(c for c in CATEGORIES if c['name'] == category)['keypoints'])
    kps = np.zeros((k, 3))
    if kind == 'normal':
      xy = _apply(m, points)
      later = np.zeros((h, w), bool)
      for other in masks[i + 1:]:
        later |= other
      for j, (x, y) in enumerate(xy):
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
          continue  # outside the image: not labelled
        hidden = later[int(round(y)), int(round(x))]
        kps[j] = (round(float(x), 2), round(float(y), 2), 1 if hidden else 2)
    out.append({'category': category, 'keypoints': kps, 'bbox': bbox, 'area': bbox[2] * bbox[3],
                'iscrowd': int(kind == 'crowd')})
  return image, out


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def _split(images_dir: str, seed: int, split: str, count: int, first_annotation_id: int) -> dict:
  ids = {c['name']: c['id'] for c in CATEGORIES}
  images, annotations = [], []
  ann_id = first_annotation_id
  for index in range(count):
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _SPLITS[split], index]))
    image, objects = render_image(rng)
    file_name = f'{split}_{index:06d}.png'
    with open(os.path.join(images_dir, file_name), 'wb') as f:  # inside generate_coco's staged directory
      f.write(_png(image))
    image_id = index + 1 + (100000 if split == 'validation' else 0)
    images.append({'id': image_id, 'file_name': file_name, 'height': int(image.shape[0]),
                   'width': int(image.shape[1])})
    for o in objects:
      kps = o['keypoints']
      annotations.append({'id': ann_id, 'image_id': image_id, 'category_id': ids[o['category']],
                          'keypoints': [float(v) if j % 3 < 2 else int(v) for j, v in enumerate(kps.reshape(-1))],
                          'num_keypoints': int(np.count_nonzero(kps[:, 2] > 0)), 'bbox': o['bbox'],
                          'area': o['area'], 'iscrowd': o['iscrowd']})
      ann_id += 1
  return {'info': {'description': f'kpjax synthetic shapes ({split}, seed {seed})'}, 'images': images,
          'annotations': annotations, 'categories': [dict(c) for c in CATEGORIES]}


def generate_coco(out_dir: str, num_images: int, seed: int, num_validation: int | None = None) -> str:
  """Writes `num_images` training and `num_validation` (default num_images // 4, at least 1) validation images
  with their COCO keypoint files under `out_dir` (which must not exist or be empty; written to a temporary
  sibling and renamed into place). Returns out_dir."""
  num_images = int(num_images)
  if num_images < 1:
    raise ValueError(f'num_images must be at least 1; got {num_images}')
  num_validation = max(1, num_images // 4) if num_validation is None else int(num_validation)
  if num_validation < 0:
    raise ValueError(f'num_validation must be >= 0; got {num_validation}')
  out_dir = garments.new_output_dir(out_dir)
  with atomic.staged_dir(out_dir, replace=os.path.isdir(out_dir)) as tmp:
    images_dir = os.path.join(tmp, 'images')
    os.makedirs(images_dir)
    train = _split(images_dir, seed, 'train', num_images, 1)
    files = {'train': train}
    if num_validation:
      files['validation'] = _split(images_dir, seed, 'validation', num_validation, 1000000)
    os.makedirs(os.path.join(tmp, 'annotations'))
    for split, data in files.items():
      with open(os.path.join(tmp, 'annotations', f'{split}.json'), 'w', encoding='utf-8') as f:
        f.write(json.dumps(data) + '\n')
  return out_dir
