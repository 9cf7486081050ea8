"""Pixel geometry between an original image and the network input: affines, the letterbox, warping, scaling.

Pixel convention: integer coordinates are pixel centres (as FashionAI's annotations are), so pixel
(i, j) covers [i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]. An `affine` is a (2, 3) float64 matrix that maps
original-image pixel (x, y) to model-input pixel (x, y); training's augmentation composes its random
transforms into the same kind of matrix, so keypoints move exactly with the pixels.

The two input/output conventions a model can have ('kpjax' letterbox + mean/std, 'kpdem' the
original's resize) are objects in kpjax.data.conventions, built from the operations here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from kpjax.model import layers

MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255  # ImageNet statistics, in 0..255 units
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255
FILL_RGB = tuple(int(round(c)) for c in MEAN_RGB)  # letterbox padding: 0 after normalisation


def check_input_size(size: int) -> int:
  """`size` as an int if the network takes square inputs of that side (kpjax.model.layers.INPUT_SIDE_RULE)."""
  if isinstance(size, float) and size.is_integer():
    size = int(size)
  if not layers.valid_side(size):
    raise ValueError(f'input size must be {layers.INPUT_SIDE_RULE}; got {size}')
  return int(size)


def apply_affine(points, affine) -> np.ndarray:
  """points (..., L, 2) (x, y) through affine (..., 2, 3) -> (..., L, 2), float64."""
  points = np.asarray(points, np.float64)
  affine = np.asarray(affine, np.float64)
  return np.einsum('...ij,...lj->...li', affine[..., :2], points) + affine[..., None, :, 2]


def invert_affine(affine) -> np.ndarray:
  """The inverse of affine(s) (..., 2, 3)."""
  affine = np.asarray(affine, np.float64)
  linear = np.linalg.inv(affine[..., :2])
  offset = -np.einsum('...ij,...j->...i', linear, affine[..., 2])
  return np.concatenate([linear, offset[..., None]], axis=-1)


def compose_affines(second, first) -> np.ndarray:
  """The affine doing `first` then `second` ((2, 3) each)."""
  a = np.vstack([np.asarray(second, np.float64), [0, 0, 1]])
  b = np.vstack([np.asarray(first, np.float64), [0, 0, 1]])
  return (a @ b)[:2]


def letterbox_affine(height: int, width: int, size: int) -> np.ndarray:
  """(2, 3): the image scaled to fit `size` x `size` with its aspect kept, centred."""
  s = size / max(height, width)
  pad_x = (size - s * width) / 2
  pad_y = (size - s * height) / 2
  # Pixel edges map to edges: x_in + 0.5 = s * (x + 0.5) + pad.
  return np.array([[s, 0.0, 0.5 * s - 0.5 + pad_x], [0.0, s, 0.5 * s - 0.5 + pad_y]], np.float64)


def warp_image(image: np.ndarray, affine, size: int, fill=FILL_RGB) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (size, size, 3) with pixel p of the input at affine(p) in the output.

  Bilinear; when the transform shrinks by 2x or more the image is first box-filtered by the integer
  factor, so that downscaling does not alias. Only whole factor x factor boxes are averaged: where the
  factor does not divide a side, the last few (< factor) source rows or columns are left out rather than
  averaged into a narrower box, whose centre would not lie on the reduced grid the affine assumes (the
  image would spill about a reduced pixel into the padding).
  """
  affine = np.asarray(affine, np.float64)
  img = Image.fromarray(np.ascontiguousarray(image))
  scale = np.sqrt(abs(np.linalg.det(affine[:, :2])))
  factor = min(int(1.0 / scale) if scale > 0 else 1, img.width, img.height)
  if factor >= 2:
    img = img.reduce(factor, box=(0, 0, img.width - img.width % factor, img.height - img.height % factor))
    # Reduced pixel centres: x_r = (x + 0.5) / factor - 0.5, so x = factor * x_r + (factor - 1) / 2.
    to_full = np.array([[factor, 0.0, (factor - 1) / 2], [0.0, factor, (factor - 1) / 2]])
    affine = compose_affines(affine, to_full)
  # PIL samples output pixel (i, j) at source point M (i + 0.5, j + 0.5) in edge coordinates; convert
  # our centre-coordinate inverse to edge coordinates.
  inv = invert_affine(affine)
  shift = np.array([[1, 0, 0.5], [0, 1, 0.5]], np.float64)  # centre -> edge coordinates
  unshift = np.array([[1, 0, -0.5], [0, 1, -0.5]], np.float64)
  edge_inv = compose_affines(shift, compose_affines(inv, unshift))
  out = img.transform((size, size), Image.Transform.AFFINE, data=tuple(edge_inv.reshape(-1)),
                      resample=Image.Resampling.BILINEAR, fillcolor=tuple(fill))
  return np.asarray(out, np.uint8)


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> float32 with ImageNet mean/std (the 'kpjax' mode's input scaling)."""
  return (np.asarray(image, np.float32) - MEAN_RGB) / STDDEV_RGB
