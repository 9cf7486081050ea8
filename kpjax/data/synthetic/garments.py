"""Procedural garments in the FashionAI layout: a dataset that needs no download, for demos and tests.

`generate(out_dir, num_images, seed)` writes, exactly as the official release lays it out,
    out_dir/train/Annotations/train.csv   image_id,image_category + the 24 `x_y_v` cells
    out_dir/train/Images/<category>/<name>.jpg
    out_dir/test/test.csv                 image_id,image_category (no labels, like the official test set)
    out_dir/test/Images/<category>/<name>.jpg

Each image shows one garment of one of the five categories as a flat silhouette (trousers with two
legs and a crotch, skirts, blouses/outwear/dresses with a neckline notch, sleeves and hems), randomly
sized, placed, rotated, stretched, coloured and textured over a mildly cluttered background. Every
keypoint of CATEGORY_KEYPOINTS[category] is a vertex of the drawn outline, so the labels are exact.
A garment is built in a canonical frame (x to the image's right, y down, height ~1) where the
garment's left (FashionAI `_left`, the wearer's left) is +x: the image's right side when the garment
faces the viewer, so a horizontal flip maps each left keypoint onto its right twin's place.

Visibility follows FashionAI: 1 visible; 0 occluded but annotated (a keypoint inside a part drawn
over it: an object lying on the garment, a sleeve folded behind the body, a sleeve over the body);
-1 absent (outside the image crop, or a sleeveless garment's cuffs). The normalisation pair of each
category (armpits, waistband) is always visible, so every image can be scored.

Every image is drawn from its own seed (`seed`, split, index), so the output is the same byte for byte
for a seed, whatever `num_images` is.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from kpjax.data import fashionai_csv as csv_io
from kpjax.data import keypoints as kp
from kpjax.io import atomic
from kpjax.io import paths

JPEG_QUALITY = 90
MIN_SIDE, MAX_SIDE = 128, 512  # FashionAI images are 512 x 512 and smaller
_TEST_STREAM = 1  # seed-sequence tag of the test split (train: 0)


@dataclasses.dataclass
class Garment:
  """A garment in its canonical frame (y down, garment's left = +x).

  parts: drawing order, each (name, polygon (n, 2)); a keypoint belongs to the part named in `owner`
  and is occluded when it lies inside a part drawn after it (other than its own).
  points: the category's keypoints, name -> (x, y); absent ones (sleeveless cuffs) are missing.
  lines: extra details drawn over the parts (seams, zips): (polyline (n, 2), relative width).
  """
  category: str
  parts: list[tuple[str, np.ndarray]]
  points: dict[str, np.ndarray]
  owner: dict[str, str]
  lines: list[tuple[np.ndarray, float]] = dataclasses.field(default_factory=list)


def _pair(rng: np.random.Generator, lo: float, hi: float, symmetric: bool, jitter: float) -> tuple[float, float]:
  """A value for the garment's left and right side: equal when symmetric, else slightly different."""
  v = rng.uniform(lo, hi)
  if symmetric:
    return v, v
  return v + rng.uniform(-jitter, jitter), v + rng.uniform(-jitter, jitter)


def _trousers(rng, symmetric) -> Garment:
  ww = rng.uniform(0.15, 0.24)  # waistband half width
  length = rng.uniform(0.55, 1.0)  # shorts .. long trousers
  rise = rng.uniform(0.22, 0.32) * min(1.0, length / 0.7)
  pts = {'waistband_left': np.array([ww, 0.0]), 'waistband_right': np.array([-ww, 0.0]),
         'crotch': np.array([0.0, rise])}
  splay = _pair(rng, -0.03, 0.12 * length, symmetric, 0.03)
  leg_w = _pair(rng, 0.10, 0.17, symmetric, 0.015)
  bottom = _pair(rng, length, length, symmetric, 0.03)
  for side, sign, i in (('left', 1, 0), ('right', -1, 1)):
    out_x = ww + splay[i]
    in_x = max(out_x - leg_w[i], 0.035)
    pts[f'bottom_{side}_out'] = np.array([sign * out_x, bottom[i]])
    pts[f'bottom_{side}_in'] = np.array([sign * in_x, bottom[i]])
  order = ('waistband_right', 'waistband_left', 'bottom_left_out', 'bottom_left_in', 'crotch',
           'bottom_right_in', 'bottom_right_out')
  body = np.stack([pts[n] for n in order])
  band = rng.uniform(0.03, 0.06)
  lines = [(np.array([[-ww, band], [ww, band]]), 0.012)]  # the waistband seam
  if rng.random() < 0.5:  # fly
    lines.append((np.array([[0.0, band], [0.0, rise * 0.8]]), 0.008))
  return Garment('trousers', [('body', body)], pts, {n: 'body' for n in pts}, lines)


def _skirt(rng, symmetric) -> Garment:
  ww = rng.uniform(0.15, 0.25)
  length = rng.uniform(0.4, 0.9)
  hw = _pair(rng, ww + 0.04, ww + 0.3 * length + 0.05, symmetric, 0.03)
  hy = _pair(rng, length, length, symmetric, 0.03)
  pts = {'waistband_left': np.array([ww, 0.0]), 'waistband_right': np.array([-ww, 0.0]),
         'hemline_left': np.array([hw[0], hy[0]]), 'hemline_right': np.array([-hw[1], hy[1]])}
  sag = rng.uniform(0.0, 0.05)
  t = np.linspace(0.0, 1.0, 9)[1:-1]
  hem = [(1 - u) * pts['hemline_left'] + u * pts['hemline_right'] + [0.0, sag * math.sin(math.pi * u)] for u in t]
  body = np.stack([pts['waistband_right'], pts['waistband_left'], pts['hemline_left'], *hem, pts['hemline_right']])
  band = rng.uniform(0.03, 0.06)
  lines = [(np.array([[-ww, band], [ww, band]]), 0.012)]
  return Garment('skirt', [('body', body)], pts, {n: 'body' for n in pts}, lines)


def _sleeve(shoulder, armpit, length, angle, cuff_ratio, sign) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(polygon, cuff_out, cuff_in) of a sleeve hanging from the armhole shoulder-armpit.

  angle: radians from straight down, positive = away from the body; sign: +1 left (x > 0), -1 right.
  """
  d = np.array([sign * math.sin(angle), math.cos(angle)])
  p = np.array([sign * math.cos(angle), -math.sin(angle)])  # across the sleeve, towards the shoulder side
  root = np.linalg.norm(shoulder - armpit)
  centre = 0.5 * (shoulder + armpit) + length * d
  cuff_out = centre + 0.5 * cuff_ratio * root * p
  cuff_in = centre - 0.5 * cuff_ratio * root * p
  return np.stack([shoulder, cuff_out, cuff_in, armpit]), cuff_out, cuff_in


def _top(category: str, rng, symmetric) -> Garment:
  names = set(kp.CATEGORY_KEYPOINTS[category])
  n = rng.uniform(0.07, 0.12)  # neckline half width
  s = rng.uniform(0.2, 0.28)  # shoulder half width
  sd = rng.uniform(0.03, 0.07)  # shoulder drop
  depth = rng.uniform(0.06, 0.2) if category != 'outwear' else rng.uniform(0.04, 0.12)
  a = s - rng.uniform(0.0, 0.03)  # armpit half width
  ya = sd + rng.uniform(0.17, 0.25)
  pts = {'neckline_left': np.array([n, 0.0]), 'neckline_right': np.array([-n, 0.0]),
         'center_front': np.array([0.0, depth]),
         'shoulder_left': np.array([s, sd]), 'shoulder_right': np.array([-s, sd]),
         'armpit_left': np.array([a, ya]), 'armpit_right': np.array([-a, ya])}
  if category == 'dress':
    yw = ya + rng.uniform(0.12, 0.22)
    wl = a - rng.uniform(0.02, 0.07)
    yh = yw + rng.uniform(0.3, 0.75)
    hw = _pair(rng, wl + 0.04, wl + 0.35, symmetric, 0.03)
    hy = _pair(rng, yh, yh, symmetric, 0.03)
    pts['hemline_left'] = np.array([hw[0], hy[0]])
    pts['hemline_right'] = np.array([-hw[1], hy[1]])
    hem_l, hem_r = 'hemline_left', 'hemline_right'
  else:
    yh = ya + rng.uniform(0.3, 0.5) if category == 'blouse' else ya + rng.uniform(0.4, 0.6)
    hw = _pair(rng, a - 0.04, a + 0.04, symmetric, 0.015)
    hy = _pair(rng, yh, yh, symmetric, 0.02)
    pts['top_hem_left'] = np.array([hw[0], hy[0]])
    pts['top_hem_right'] = np.array([-hw[1], hy[1]])
    hem_l, hem_r = 'top_hem_left', 'top_hem_right'
    yw = ya + (yh - ya) * rng.uniform(0.35, 0.55)
    wl = a - rng.uniform(0.0, 0.05)
  pts['waistline_left'] = np.array([wl, yw])
  pts['waistline_right'] = np.array([-wl, yw])
  outline = [pts['neckline_right'], pts['center_front'], pts['neckline_left'], pts['shoulder_left'],
             pts['armpit_left'], pts['waistline_left'], pts[hem_l]]
  if category == 'dress':  # a slightly curved hem
    sag = rng.uniform(0.0, 0.04)
    outline += [(1 - u) * pts[hem_l] + u * pts[hem_r] + [0.0, sag * math.sin(math.pi * u)]
                for u in np.linspace(0, 1, 9)[1:-1]]
  outline += [pts[hem_r], pts['waistline_right'], pts['armpit_right'], pts['shoulder_right']]
  body = np.stack(outline)

  sleeveless = rng.random() < {'dress': 0.25, 'blouse': 0.1, 'outwear': 0.0}[category]
  parts_behind, parts_front = [], []
  if not sleeveless:
    lo, hi = {'blouse': (0.12, 0.6), 'outwear': (0.35, 0.65), 'dress': (0.08, 0.5)}[category]
    length = rng.uniform(lo, hi)
    lengths = _pair(rng, length, length, symmetric, 0.04)
    angle = math.radians(rng.uniform(18, 65))
    angles = _pair(rng, angle, angle, symmetric, math.radians(10))
    cuff = _pair(rng, 0.55, 0.9, symmetric, 0.05)
    folded = None if symmetric or rng.random() > 0.15 or length < 0.3 else int(rng.integers(2))
    for i, (side, sign) in enumerate((('left', 1), ('right', -1))):
      ang = angles[i]
      if folded == i:  # the arm crosses in front of the wearer: the sleeve hides behind the body
        ang = -math.radians(rng.uniform(15, 35))
      poly, c_out, c_in = _sleeve(pts[f'shoulder_{side}'], pts[f'armpit_{side}'], lengths[i], ang, cuff[i], sign)
      pts[f'cuff_{side}_out'] = c_out
      pts[f'cuff_{side}_in'] = c_in
      (parts_behind if folded == i else parts_front).append((f'sleeve_{side}', poly))
  lines = []
  if category == 'outwear':  # the open front / zip
    lines.append((np.array([pts['center_front'], [0.0, min(hy)]]), 0.012))
  elif rng.random() < 0.4:  # a placket
    lines.append((np.array([pts['center_front'], [0.0, pts['center_front'][1] + 0.2]]), 0.008))
  pts = {k: v for k, v in pts.items() if k in names}
  owner = {k: ('sleeve_left' if k.startswith('cuff_left') else 'sleeve_right' if k.startswith('cuff_right')
               else 'body') for k in pts}
  return Garment(category, parts_behind + [('body', body)] + parts_front, pts, owner, lines)


def garment_shape(category: str, rng: np.random.Generator, symmetric: bool = False) -> Garment:
  """A random garment of `category` in its canonical frame; symmetric=True makes left/right mirror images."""
  kp.check_category(category, allow_all=False)
  if category == 'trousers':
    g = _trousers(rng, symmetric)
  elif category == 'skirt':
    g = _skirt(rng, symmetric)
  else:
    g = _top(category, rng, symmetric)
  return g


# ---- Geometry helpers ----------------------------------------------------------------------------

def _inside(points: np.ndarray, poly: np.ndarray, margin: float) -> np.ndarray:
  """Bool (N,): points strictly inside the polygon and farther than `margin` from its edges."""
  x, y = points[:, 0:1], points[:, 1:2]
  a, b = poly, np.roll(poly, -1, axis=0)
  crosses = ((a[:, 1] > y) != (b[:, 1] > y))
  with np.errstate(divide='ignore', invalid='ignore'):
    xint = a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
  inside = (np.sum(crosses & (x < xint), axis=1) % 2) == 1
  ab = b - a
  t = np.clip(((points[:, None, :] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
  dist = np.linalg.norm(points[:, None, :] - (a + t[..., None] * ab), axis=-1).min(axis=1)
  return inside & (dist > margin)


def _contrast_colour(rng, other, min_diff: float, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
  """A random RGB colour whose luminance differs from `other`'s by at least `min_diff`."""
  lum = lambda c: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
  target = lum(other)
  for _ in range(50):
    c = tuple(int(v) for v in rng.integers(lo, hi, 3))
    if abs(lum(c) - target) >= min_diff:
      return c
  return (20, 20, 20) if target > 127 else (235, 235, 235)


def _shift(colour, delta: int) -> tuple[int, int, int]:
  return tuple(int(np.clip(c + delta, 0, 255)) for c in colour)


def _transform(points: np.ndarray, m: np.ndarray) -> np.ndarray:
  return points @ m[:, :2].T + m[:, 2]


# ---- Drawing --------------------------------------------------------------------------------------

def _image_size(rng) -> tuple[int, int]:
  if rng.random() < 0.3:
    return MAX_SIDE, MAX_SIDE  # most FashionAI images are 512 x 512
  w = int(rng.integers(MIN_SIDE + 32, MAX_SIDE + 1))
  h = int(np.clip(round(w * rng.uniform(0.75, 1.33)), MIN_SIDE, MAX_SIDE))
  return w, h


def _background(rng, w: int, h: int) -> tuple[Image.Image, tuple[int, int, int]]:
  bg = tuple(int(v) for v in rng.integers(0, 256, 3))
  img = Image.new('RGB', (w, h), bg)
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(1, 5))):  # mild clutter: low-contrast shapes
    colour = _shift(bg, int(rng.integers(-35, 36)))
    x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
    x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h
    kind = rng.integers(3)
    if kind == 0:
      draw.rectangle([x0, y0, x1, y1], fill=colour)
    elif kind == 1:
      draw.ellipse([x0, y0, x1, y1], fill=colour)
    else:
      draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(2, 8)))
  return img, bg


def _texture(rng, w: int, h: int, colour, scale: float) -> Image.Image | None:
  """A full-size texture image around `colour` (None = plain): stripes, checks or blotchy noise."""
  kind = rng.choice(['plain', 'stripes', 'checks', 'noise'], p=[0.4, 0.25, 0.15, 0.2])
  if kind == 'plain':
    return None
  other = _shift(colour, int(rng.choice([-1, 1]) * rng.integers(20, 40)))
  if kind == 'noise':
    small = rng.integers(-25, 26, (max(2, h // 24), max(2, w // 24), 1)).astype(np.int16)
    noise = np.asarray(Image.fromarray((small[..., 0] + 128).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                       np.int16)[..., None] - 128
    return Image.fromarray(np.clip(np.asarray(colour, np.int16) + noise, 0, 255).astype(np.uint8))
  period = max(4.0, scale * rng.uniform(0.04, 0.12))
  xx = np.arange(w, dtype=np.float32)[None, :] / np.float32(period / 2)
  yy = np.arange(h, dtype=np.float32)[:, None] / np.float32(period / 2)
  theta = rng.uniform(0, math.pi)
  c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
  on = np.floor(xx * c + yy * s).astype(np.int32) & 1 == 1
  if kind == 'checks':
    on ^= np.floor(yy * c - xx * s).astype(np.int32) & 1 == 1
  arr = np.where(on[..., None], np.asarray(other, np.uint8), np.asarray(colour, np.uint8))
  return Image.fromarray(arr.astype(np.uint8))


@dataclasses.dataclass
class Example:
  """One drawn image: uint8 (H, W, 3) pixels, keypoints float32 (24, 2) pixels, visibility int32 (24,)."""
  category: str
  image: np.ndarray
  keypoints: np.ndarray
  visibility: np.ndarray
  mask: np.ndarray  # bool (H, W): garment pixels (before occluding objects)


def _placement(rng, g: Garment, w: int, h: int, crop: bool, rotation_deg: float) -> np.ndarray:
  """(2, 3) canonical -> pixel affine: random rotation, aspect, scale and position."""
  angle = math.radians(rng.uniform(-rotation_deg, rotation_deg))
  aspect = rng.uniform(0.85, 1.18)
  c, s = math.cos(angle), math.sin(angle)
  lin = np.array([[c, -s], [s, c]]) @ np.diag([aspect, 1.0])
  allpts = np.concatenate([p for _, p in g.parts])
  pts = allpts @ lin.T
  lo, hi = pts.min(0), pts.max(0)
  extent = hi - lo
  fill = rng.uniform(0.95, 1.1) if crop else rng.uniform(0.72, 0.92)
  scale = fill * min(w / extent[0], h / extent[1])
  size = extent * scale
  slack = np.array([w, h]) - size
  if crop:  # push the garment partly out of the frame
    offset = rng.uniform(0, 1, 2) * slack  # slack < 0: the garment overhangs both sides
    offset = offset + rng.choice([-1, 1], 2) * rng.uniform(0.03, 0.15, 2) * size
  else:
    offset = rng.uniform(0.15, 0.85, 2) * slack
  t = offset - lo * scale
  return np.concatenate([lin * scale, t[:, None]], axis=1)


def render(category: str, rng: np.random.Generator, width: int | None = None, height: int | None = None,
           symmetric: bool = False, rotation_deg: float = 15.0, clutter: bool = True) -> Example:
  """Draws one garment image of `category` with its 24 keypoint labels (FashionAI convention)."""
  g = garment_shape(category, rng, symmetric=symmetric)
  if width is None or height is None:
    width, height = _image_size(rng)
  w, h = int(width), int(height)
  names = list(g.points)
  canon = np.stack([g.points[n] for n in names])
  norm = [names.index(n) for n in kp.NORMALIZATION_PAIR[category]]
  crop = clutter and rng.random() < 0.1
  for attempt in range(20):
    m = _placement(rng, g, w, h, crop and attempt < 10, rotation_deg)
    xy = _transform(canon, m)
    inside = (xy[:, 0] >= 0.5) & (xy[:, 0] <= w - 1.5) & (xy[:, 1] >= 0.5) & (xy[:, 1] <= h - 1.5)
    if inside[norm].all() and (inside.all() or crop):
      break

  if clutter:
    img, bg = _background(rng, w, h)
  else:
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new('RGB', (w, h), bg)
  colour = _contrast_colour(rng, bg, 90)
  scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
  texture = _texture(rng, w, h, colour, scale) if clutter else None
  edge = _shift(colour, -45 if sum(colour) > 200 else 45)
  draw = ImageDraw.Draw(img)
  mask_img = Image.new('L', (w, h), 0)
  mask_draw = ImageDraw.Draw(mask_img)
  outline_w = max(1, int(round(scale * 0.008)))
  pixel_parts = []
  for name, poly in g.parts:
    pp = _transform(poly, m)
    pixel_parts.append((name, pp))
    flat = [tuple(p) for p in pp]
    if texture is None:
      draw.polygon(flat, fill=colour)
    else:
      part_mask = Image.new('L', (w, h), 0)
      ImageDraw.Draw(part_mask).polygon(flat, fill=255)
      img.paste(texture, mask=part_mask)
    draw.line(flat + [flat[0]], fill=edge, width=outline_w, joint='curve')
    mask_draw.polygon(flat, fill=255)
  for line, rel_width in g.lines:
    draw.line([tuple(p) for p in _transform(line, m)], fill=edge, width=max(1, int(round(scale * rel_width))))

  vis = np.ones(len(names), np.int32)
  order = [name for name, _ in pixel_parts]
  for j, n in enumerate(names):  # hidden under a part drawn after its own
    for other, poly in pixel_parts[order.index(g.owner[n]) + 1:]:
      if _inside(xy[j:j + 1], poly, margin=1.5)[0]:
        vis[j] = 0

  if clutter and rng.random() < 0.15:  # an object lying on the garment over one keypoint
    candidates = [j for j in range(len(names)) if j not in norm and inside[j]]
    if candidates:
      j = int(rng.choice(candidates))
      d_norm = min(np.linalg.norm(xy[k] - xy[j]) for k in norm)
      rx = min(scale * rng.uniform(0.05, 0.1), 0.4 * d_norm)  # never reaches the normalisation pair
      if rx > 3:
        ry = rx * rng.uniform(0.7, 1.3)
        centre = xy[j] + rng.uniform(-0.4, 0.4, 2) * rx
        box = [centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry]
        fill = _contrast_colour(rng, colour, 60)
        u = np.abs(xy - centre) / [rx, ry]
        if rng.random() < 0.5:
          draw.ellipse(box, fill=fill)
          covered = (u ** 2).sum(-1) < 1
        else:
          draw.rectangle(box, fill=fill)
          covered = u.max(-1) < 1
        vis[covered] = 0
  image = np.asarray(img, np.uint8)
  if clutter:
    noise = rng.integers(-6, 7, image.shape, dtype=np.int16)
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)

  keypoints = np.full((kp.NUM_KEYPOINTS, 2), -1, np.float32)
  visibility = np.full((kp.NUM_KEYPOINTS,), -1, np.int32)
  for j, n in enumerate(names):
    if inside[j]:
      col = kp.KEYPOINT_NAMES.index(n)
      keypoints[col] = xy[j]
      visibility[col] = vis[j]
  return Example(category, image, keypoints, visibility, np.asarray(mask_img) > 0)


# ---- Writing the FashionAI layout -----------------------------------------------------------------

def _encode_jpeg(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=JPEG_QUALITY)
  return buf.getvalue()


def _example(seed: int, stream: int, index: int) -> tuple[str, Example]:
  """(image_id, example) of image `index` of a split: its own random stream, so sets nest."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream, index]))
  category = kp.CATEGORIES[int(rng.integers(len(kp.CATEGORIES)))]
  ex = render(category, rng)
  name = hashlib.md5(f'kpjax-synthetic:{seed}:{stream}:{index}'.encode()).hexdigest()
  return f'Images/{category}/{name}.jpg', ex


def _write_example(split_dir: str, seed: int, stream: int, index: int) -> tuple[str, str, list[str]]:
  image_id, ex = _example(seed, stream, index)
  path = os.path.join(split_dir, image_id)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(_encode_jpeg(ex.image))
  return image_id, ex.category, csv_io.annotation_cells(ex.keypoints, ex.visibility)


def _write_split(split_dir: str, seed: int, stream: int, count: int) -> list[tuple[str, str, list[str]]]:
  # Each image has its own random stream, so threads (PIL and numpy release the GIL while they draw
  # and encode) write the same files in any order.
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    rows = list(pool.map(lambda i: _write_example(split_dir, seed, stream, i), range(count)))
  rows.sort(key=lambda r: (kp.CATEGORIES.index(r[1]), r[0]))  # grouped by category, as the release
  return rows


def new_output_dir(out_dir: str) -> str:
  """`out_dir` resolved (kpjax.io.paths: absolute, or gs://...), if it does not exist or is empty (a synthetic
  set is written whole)."""
  out = paths.resolve(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f'{out} already exists and is not empty; choose another --out or remove it')
  return os.fspath(out)


def generate(out_dir: str, num_images: int, seed: int, num_test: int | None = None) -> str:
  """Writes `num_images` labelled training images and a small unlabelled test split under `out_dir`.

  num_test: test images (default: num_images // 10, at least 1). `out_dir` must not exist or be empty;
  everything is written to a temporary sibling and renamed into place, so a reader never sees half a
  set. Returns `out_dir`.
  """
  num_images = int(num_images)
  if num_images < 1:
    raise ValueError(f'num_images must be at least 1; got {num_images}')
  num_test = max(1, num_images // 10) if num_test is None else int(num_test)
  if num_test < 0:
    raise ValueError(f'num_test must be >= 0; got {num_test}')
  out_dir = new_output_dir(out_dir)  # a local directory or gs://... (built locally, then uploaded)
  with atomic.staged_dir(out_dir, replace=paths.resolve(out_dir).is_dir()) as tmp:  # an empty one (checked above)
    rows = _write_split(os.path.join(tmp, 'train'), seed, 0, num_images)
    atomic.write_text(os.path.join(tmp, 'train', 'Annotations', 'train.csv'), csv_io.format_submission(rows))
    test_rows = _write_split(os.path.join(tmp, 'test'), seed, _TEST_STREAM, num_test)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(csv_io.HEADER[:2])
    writer.writerows((image_id, category) for image_id, category, _ in test_rows)
    atomic.write_text(os.path.join(tmp, 'test', 'test.csv'), buf.getvalue())
  return out_dir
