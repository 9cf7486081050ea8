"""KPDEM's own input and output conventions, reproduced exactly for converted released models.

The original (see DESIGN.md, "The original PyTorch code") read each image with skimage as RGB,
resized it to a fixed square with `skimage.transform.resize(image, (size, size))` (floats in [0, 1])
and divided by 255 once more, so the network saw values in [0, 1/255]. Its training targets were
keypoint pixel coordinates scaled to the square and divided by its side:

    target_x = (x * size / W) / size = x / W,   target_y = y / H,

with (x, y) the FashionAI CSV's integer pixel indices of the original W x H image. That is a
corner-aligned scaling (pixel index 0 -> 0, index W -> 1), not skimage's centre-aligned resampling
grid ((x + 0.5) * size / W - 0.5): a trained model's output c therefore means x = c * W exactly,
and mapping it through the resampling grid instead would shift every prediction by
0.5 * (W / size - 1) original pixels (3.5 px for a 512-wide image at size 64).

So, in kpjax's terms (kpjax.data.preprocess, mode 'kpdem'):
  * `prepare_image` gives the network input and the affine original pixel (x, y) -> input pixel
    (x * size / W, y * size / H), the scaling the targets were made with;
  * `coords_to_input_pixels` turns a network output into those input pixels (c * size); the
    inverse affine then gives original pixels (c * W, c * H).

The resize is skimage's (version 0.19 and later: order 1, mode 'reflect', anti-aliasing
Gaussian of sigma (factor - 1) / 2 when downsampling, clipped to the input's range) written with
scipy.ndimage, so kpjax does not depend on scikit-image. Caveat: skimage before 0.15 (2019)
defaulted to no anti-aliasing and mode 'constant'; a model trained with such a version saw
sharper (aliased) inputs than this reproduces.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an RGB image of shape (H, W, 3); got shape {image.shape}')
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image (as read from a JPEG/PNG file); got dtype {image.dtype}')
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f'image has no pixels: shape {image.shape}')
  return image


def _check_size(size) -> int:
  if isinstance(size, bool) or int(size) != size or size < 1:
    raise ValueError(f'size must be a positive integer (the square input side in pixels); got {size!r}')
  return int(size)


def skimage_resize(image: np.ndarray, size: int) -> np.ndarray:
  """`skimage.transform.resize(image, (size, size))` with its defaults, for a uint8 (H, W, 3) image.

  Returns float64 (size, size, 3) in [0, 1] (the range of the input's values / 255).
  """
  image = _check_image(image)
  size = _check_size(size)
  x = np.multiply(image, 1.0 / 255, dtype=np.float64)  # skimage.img_as_float
  in_shape = x.shape
  out_shape = (size, size, in_shape[2])
  factors = np.divide(in_shape, out_shape)
  if any(o < i for o, i in zip(out_shape, in_shape)):  # anti-aliasing when any axis shrinks
    sigma = np.maximum(0, (factors - 1) / 2)
    filtered = ndimage.gaussian_filter(x, sigma, cval=0, mode='mirror')  # skimage 'reflect'
  else:
    filtered = x
  out = ndimage.zoom(filtered, [1 / f for f in factors], order=1, mode='mirror', cval=0, grid_mode=True)
  np.clip(out, x.min(), x.max(), out=out)
  return out


def resize_affine(height: int, width: int, size: int) -> np.ndarray:
  """(2, 3) float64: original pixel (x, y) -> input pixel (x * size / W, y * size / H), KPDEM's target scaling."""
  return np.array([[size / width, 0.0, 0.0], [0.0, size / height, 0.0]], dtype=np.float64)


def prepare_image(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The original's network input for one image.

  Args:
    image: uint8 (H, W, 3) RGB, as decoded from the file.
    size: side of the square input (64 for the released models).

  Returns:
    (float32 (size, size, 3) in [0, 1/255]: skimage's resize then / 255 once more,
     float64 (2, 3) affine original pixel (x, y) -> input pixel, see `resize_affine`).
  """
  image = _check_image(image)
  resized = skimage_resize(image, size)
  return (resized / 255.0).astype(np.float32), resize_affine(image.shape[0], image.shape[1], _check_size(size))


def coords_to_input_pixels(coords, size: int) -> np.ndarray:
  """Network outputs (..., L, 2) (x, y), the original's [0, 1] convention -> input pixels (coords * size).

  The exact inverse of the original's target = pixel / size (see the module docstring).
  """
  return np.asarray(coords, np.float64) * _check_size(size)


def input_pixels_to_coords(pixels, size: int) -> np.ndarray:
  """Input pixels (..., L, 2) -> the original's targets (pixels / size, in [0, 1] inside the image)."""
  return np.asarray(pixels, np.float64) / _check_size(size)


# ---- Convolutions ----------------------------------------------------------------------------------

def resolve_conv_algorithm(requested: str = 'auto') -> str:
  """The network's conv_algorithm for a converted model: 'auto' -> 'direct-pooled', anything else as asked.

  Every 2x2 max-pool of KPDEM is undone at once by a max-unpool that keeps the first largest element
  of the window and zeroes the rest; on flat image regions the windows tie exactly, and which element
  survives then depends on the last bits of the convolutions before the pool. Direct convolutions
  compute every output position alike (as the original's do), so exact ties stay exact; Winograd's
  rounding depends on the position within its 4x4 tiles and breaks them. Measured with
  benchmarks/pool_ties.py (the full network on 6 plain synthetic garments, 197,172 live first-pool
  windows of which 57% tie exactly), against torch float32: Winograd ('auto' on a CPU) keeps another
  element in 67,905 windows and moves the coordinates by up to 139 px (mean 39); 'direct' in 1,346
  (67 px, mean 25), within what torch shows against itself without oneDNN (1,427; 104 px, mean 21)
  or in float64 (1,821; 84 px, mean 20). 'direct-pooled' (kpjax.model.block_conv_algorithm) runs
  the three pooled blocks direct (6% of the multiply-adds) and the rest as 'auto', where every layer
  is continuous: it decides every tie as 'direct' does (same figures) and is 1.6x as fast on a CPU
  (the full network's forward pass on 4 64x64 images: 'auto' 11.2 s, 'direct-pooled' 13.2, 'direct'
  20.7, on the busy 2-core machine).
  'direct' or 'winograd' may still be asked for; on GPU/TPU 'auto' is XLA's convolution anyway.
  """
  from kpjax import model as model_lib  # pylint: disable=g-import-not-at-top  (jax only when asked)
  if requested not in model_lib.CONV_ALGORITHMS:
    raise ValueError(f'conv_algorithm must be one of {model_lib.CONV_ALGORITHMS}; got {requested!r}')
  return 'direct-pooled' if requested == 'auto' else requested
