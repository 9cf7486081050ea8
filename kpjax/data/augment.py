"""Keypoint-aware training augmentation: one random affine for pixels and keypoints, plus colour jitter.

Every geometric change (zoom, rotation, translation, horizontal flip) is a (2, 3) matrix on
model-input pixel coordinates (pixel centres at integers, see kpjax.data.geometry) composed with
the letterbox into ONE affine original pixel -> input pixel. The image is resampled once through
it (geometry.warp_image) and the keypoints go through the same matrix (geometry.apply_affine),
so they move exactly with the pixels. A flip also swaps left/right keypoints (the keypoint set's flip
pairs, kpjax.data.keypoint_sets), so `cuff_left_in` still names the garment's left cuff.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kpjax.data import geometry
from kpjax.data import keypoint_sets
from kpjax.data import keypoints as kp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The ranges of config.augment as plain values (picklable for grain's worker processes).

  scale: (lo, hi) zoom factor; rotation_deg: uniform in [-r, r]; translate: fraction of the input
  side, each axis; flip: horizontal flip with probability 0.5; color_jitter: brightness, contrast
  and saturation factors uniform in [1 - j, 1 + j] (0 = off).
  """
  scale: tuple[float, float] = (1.0, 1.0)
  rotation_deg: float = 0.0
  translate: float = 0.0
  flip: bool = False
  color_jitter: float = 0.0

  @classmethod
  def from_config(cls, augment) -> AugmentConfig | None:
    """From config.augment (validated by kpjax.train.config_check); None when augmentation is off."""
    if not augment.enabled:
      return None
    return cls(scale=tuple(float(s) for s in augment.scale), rotation_deg=float(augment.rotation_deg),
               translate=float(augment.translate), flip=bool(augment.flip), color_jitter=float(augment.color_jitter))


def augmentation_affine(size: int, scale: float = 1.0, angle_deg: float = 0.0,
                        shift: Sequence[float] = (0.0, 0.0), flip: bool = False) -> np.ndarray:
  """(2, 3) float64 on input pixels: mirror (x -> size-1-x), zoom, rotate about the centre, shift.

  The centre of the input, ((size-1)/2, (size-1)/2), stays put under flip, zoom and rotation; `shift`
  (dx, dy) is in input pixels. Positive angles turn the image clockwise on screen (y points down).
  """
  c = (size - 1) / 2.0
  t = np.radians(angle_deg)
  linear = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
  if flip:
    linear = linear @ np.diag([-1.0, 1.0])
  offset = np.array([c, c]) + np.asarray(shift, np.float64) - linear @ np.array([c, c])
  return np.concatenate([linear, offset[:, None]], axis=1)


def sample_affine(rng: np.random.Generator, size: int, cfg: AugmentConfig) -> tuple[np.ndarray, bool]:
  """A random augmentation_affine within cfg's ranges -> ((2, 3) float64, flipped)."""
  scale = rng.uniform(cfg.scale[0], cfg.scale[1])
  angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)
  shift = rng.uniform(-cfg.translate, cfg.translate, size=2) * size
  flip = bool(cfg.flip and rng.random() < 0.5)
  return augmentation_affine(size, scale, angle, shift, flip), flip


def flip_keypoints(points: np.ndarray, visibility: np.ndarray, category: str,
                   keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI) -> tuple[np.ndarray, np.ndarray]:
  """Swaps left/right twins of `category`'s keypoints (L, 2), (L,) after a mirror (positions unchanged)."""
  perm = keypoint_set.flip_permutation(category)
  return points[perm], visibility[perm]


def source_coverage(affine, height: int, width: int, size: int) -> np.ndarray:
  """Bool (size, size): which output pixels of warp_image(image (height, width), affine) fall inside the image."""
  inv = geometry.invert_affine(affine)
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
  sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  return (sx >= -0.5) & (sx <= width - 0.5) & (sy >= -0.5) & (sy <= height - 0.5)


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float,
                 valid: np.ndarray | None = None) -> np.ndarray:
  """Random brightness, contrast and saturation (in a random order) of (H, W, 3) 0..255 -> float32 0..255.

  Factors are uniform in [1 - strength, 1 + strength]. Contrast blends towards the mean grey of the
  `valid` pixels (bool (H, W), default all); pixels outside `valid` (letterbox padding) are returned
  unchanged so padding stays the fill colour.
  """
  out = np.asarray(image, np.float32)
  if strength <= 0:
    return out.copy()
  original = out
  grey_weights = np.array([0.299, 0.587, 0.114], np.float32)
  factors = rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)
  for op in rng.permutation(3):
    if op == 0:  # brightness
      out = out * factors[0]
    elif op == 1:  # contrast
      grey = out @ grey_weights
      mean = grey[valid].mean() if valid is not None and valid.any() else grey.mean()
      out = (out - mean) * factors[1] + mean
    else:  # saturation
      grey = (out @ grey_weights)[..., None]
      out = (out - grey) * factors[2] + grey
    out = np.clip(out, 0.0, 255.0)
  if valid is not None:
    out = np.where(valid[..., None], out, original)
  return out.astype(np.float32)


def augment_example(image: np.ndarray, points: np.ndarray, visibility: np.ndarray, category: str,
                    size: int, cfg: AugmentConfig, rng: np.random.Generator, *,
                    keypoint_set: keypoint_sets.KeypointSet = kp.FASHIONAI
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One training example through a random letterbox + augmentation affine and colour jitter.

  Args:
    image: uint8 (H, W, 3) RGB.
    points: (L, 2) original pixels (x, y) of `category`'s keypoints (all the set's for 'all').
    visibility: (L,) int in {1, 0, -1}.
    category: the model's category (decides the flip permutation, with `keypoint_set`).
    size: side of the square input.
    cfg: augmentation ranges.
    rng: this example's generator.

  Returns:
    (float32 (size, size, 3) in 0..255, float64 (L, 2) input pixels, (L,) visibility after the flip's
     swap, float64 (2, 3) affine original -> input).
  """
  height, width = image.shape[:2]
  aug, flipped = sample_affine(rng, size, cfg)
  affine = geometry.compose_affines(aug, geometry.letterbox_affine(height, width, size))
  warped = geometry.warp_image(image, affine, size)
  valid = source_coverage(affine, height, width, size) if cfg.color_jitter > 0 else None
  pixels = color_jitter(warped, rng, cfg.color_jitter, valid)
  moved = geometry.apply_affine(points, affine)
  visibility = np.asarray(visibility)
  if flipped:
    moved, visibility = flip_keypoints(moved, visibility, category, keypoint_set)
  return pixels, moved, visibility, affine
