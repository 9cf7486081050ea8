"""KPDEM's own input and output conventions, reproduced exactly for converted released models.

The original (the published KPDEM training code, keypoints_Net.py and its dataset module) read each
image with skimage as RGB, resized it to a fixed square with `skimage.transform.resize(image, (size,
size))` (floats in [0, 1]) and divided by 255 once more, so the network saw values in [0, 1/255]. Its training targets were
keypoint pixel coordinates scaled to the square, truncated to whole input pixels (see Targets below)
and divided by its side:

    target_x = floor(x * size / W) / size,   target_y = floor(y * size / H) / size,

with (x, y) the FashionAI CSV's integer pixel indices of the original W x H image. The scaling is
corner-aligned (pixel index 0 -> 0, index W -> 1), not skimage's centre-aligned resampling grid
((x + 0.5) * size / W - 0.5): without the truncation an output c would mean x = c * W exactly, and
mapping it through the resampling grid instead would shift every prediction by 0.5 * (W / size - 1)
original pixels (3.5 px for a 512-wide image at size 64).

So, in kpjax's terms (kpjax.data.conventions.KpdemConvention):
  * `prepare_image` gives the network input and the affine original pixel (x, y) -> input pixel
    (x * size / W, y * size / H), the scaling the targets were made with;
  * `coords_to_input_pixels` turns a network output into those input pixels (c * size); the
    inverse affine then gives original pixels (c * W, c * H): the 'exact' reading of the outputs.

The resize is skimage's as of version 0.19 (order 1, mode 'reflect', anti-aliasing Gaussian of
sigma (factor - 1) / 2 when downsampling, computed in float64, clipped to the input's range), written
with scipy.ndimage, so kpjax does not depend on scikit-image; 0.19.3 and 0.26 give the same values to
1e-15. Versions 0.15 to 0.18 (current in 2019-2021) filtered a uint8 image in uint8: scipy.ndimage
keeps the input's dtype and each of its two 1D passes truncates, so their resized images are darker
by 0.2 to 1.8 levels of 255 (mean 1.00, measured with 0.16.2 and 0.18.3 on 30 synthetic garments,
512 px -> 64 px), otherwise the same. Before 0.15 the defaults were no anti-aliasing and mode
'constant': a model trained with such a version saw sharper (aliased) inputs than this reproduces.

Two more conventions make a converted model faithful on real photos:
  * Targets (`TARGETS`): the original stored `landmarks * 64 / w` into an integer array, so it
    trained on floor(x * 64 / W) / 64, the left/top edge of a 64-grid cell; 'truncated' maps outputs
    to the centre of the annotated pixels each cell holds (`coords_to_original`, derivation there),
    'exact' reads them as x / W (a model trained on unrounded targets, as kpjax trains).
  * Convolutions (kpjax.data.conventions.KpdemConvention.conv_algorithm, 'direct'): the pool/unpool
    steps decide exact ties in flat image regions by the last bits of the convolutions before them,
    and the stages after the last pool amplify Winograd's rounding, so every convolution runs direct,
    as PyTorch's do.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

TARGETS = ('truncated', 'exact')
CONVERTED_TARGETS = 'truncated'  # what the released checkpoints were trained on
TARGETS_METADATA_KEY = 'kpdem_targets'


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


# Input pixels are x * (size / W) in floating point; the original computed x * size / W, exact where it
# is an integer. The product can land a few ulps off that integer (49 * (32 / 49) = 31.999999999999996),
# while for integer x any other value is at least 1 / W from an integer: a margin far below 1 / W and far
# above float64's rounding of a pixel (~1e-14) tells the two apart.
_PIXEL_MARGIN = 1e-9


def truncate_pixels(pixels) -> np.ndarray:
  """floor(pixels) as the original computed it, floor(x * size / W): the 'truncated' targets' cells, float64."""
  return np.floor(np.asarray(pixels, np.float64) + _PIXEL_MARGIN)


def inside_input(pixels, size: int) -> np.ndarray:
  """bool (...,): input pixels (..., 2) in [0, size] on both axes, the image of the annotations' range [0, W]
  (the image and its border) under the corner-aligned scaling x * size / W. NaN is outside."""
  pixels = np.asarray(pixels, np.float64)
  size = _check_size(size)
  return np.all((pixels >= -_PIXEL_MARGIN) & (pixels <= size + _PIXEL_MARGIN), axis=-1)


# ---- Targets ---------------------------------------------------------------------------------------

def check_targets(targets: str) -> str:
  if targets not in TARGETS:
    raise ValueError(f'kpdem targets must be one of {", ".join(TARGETS)}; got {targets!r}')
  return targets


def targets_from_metadata(metadata) -> str:
  """A 'kpdem' model's targets: metadata[TARGETS_METADATA_KEY], else 'truncated' for a model the
  PyTorch converter wrote before the key existed (the released models') and 'exact' otherwise."""
  if TARGETS_METADATA_KEY in metadata:
    return check_targets(metadata[TARGETS_METADATA_KEY])
  return CONVERTED_TARGETS if metadata.get('converter') == 'convert.torch_to_flax' else 'exact'


def _check_extent(extent, what: str) -> int:
  if isinstance(extent, bool) or int(extent) != extent or extent < 1:
    raise ValueError(f'{what} must be a positive whole number of pixels; got {extent!r}')
  return int(extent)


def original_size(affine, size: int) -> tuple[int, int]:
  """(height, width) of the original image of a `resize_affine(height, width, size)` (rounded)."""
  affine = np.asarray(affine, np.float64)
  size = _check_size(size)
  return int(round(size / affine[1, 1])), int(round(size / affine[0, 0]))


def cell_centre(k, extent: int, size: int) -> np.ndarray:
  """The centre of the integer pixels x with floor(x * size / extent) = k, for integer cells k (any shape).

  Those x satisfy k * extent / size <= x < (k + 1) * extent / size, so they are
  ceil(k * extent / size) .. ceil((k + 1) * extent / size) - 1, and their centre is
      m_k = (ceil(k * extent / size) + ceil((k + 1) * extent / size) - 1) / 2
  (computed in integers, exactly). A cell holding no pixel (extent < size) gets the point between its
  neighbours' pixels, ceil(k * extent / size) - 1/2. Returns float64.
  """
  extent, size = _check_extent(extent, 'extent'), _check_size(size)
  k = np.asarray(k, np.int64)
  first = -((-k * extent) // size)
  last = -((-(k + 1) * extent) // size) - 1
  return (first + last) / 2.0


def truncated_to_pixels(cells, extent: int, size: int) -> np.ndarray:
  """Network outputs along one axis in cells (c * size, real) -> original pixels, for 'truncated' targets.

  Piecewise linear through the cell centres: k0 = floor(cells), t = cells - k0,
  x = (1 - t) m_k0 + t m_(k0+1) (`cell_centre`). Non-finite inputs stay NaN. See `coords_to_original`.
  """
  cells = np.asarray(cells, np.float64)
  finite = np.isfinite(cells)
  safe = np.where(finite, cells, 0.0)
  k0 = np.floor(safe)
  t = safe - k0
  k0 = k0.astype(np.int64)
  pixels = (1 - t) * cell_centre(k0, extent, size) + t * cell_centre(k0 + 1, extent, size)
  return np.where(finite, pixels, np.nan)


def coords_to_original(coords, height: int, width: int, size: int, targets: str = CONVERTED_TARGETS) -> np.ndarray:
  """Network outputs (..., L, 2) (x, y) of a 'kpdem' model -> pixels of the height x width original.

  'exact': x = c_x * width, y = c_y * height (the outputs read as the targets x / W, y / H).

  'truncated' (the released models): the original's dataset code kept the integer annotations
  (x in 0..W-1) in an integer array and assigned `landmarks[:, 0] * size / w` into it, so the targets
  were k / size with k = floor(x * size / W) (the cast truncates; x >= 0). Given k, the annotated x
  was one of the integers of cell k, and the estimate whose error averages to zero over them is their
  centre m_k (`cell_centre`); as the cells partition 0..W-1, the mean error over uniformly distributed
  integer x is then exactly 0. A trained network outputs c ~ E[k] / size; where k is spread over two
  neighbouring cells k0, k0 + 1 with weights 1 - t, t, the expected centre is (1 - t) m_k0 + t m_(k0+1):
  the linear interpolation of m at c * size that `truncated_to_pixels` computes.
  With e_j = ceil(j W / size) - j W / size in [0, 1): m_k = (k + 1/2) W / size - 1/2 + (e_k + e_(k+1)) / 2.
  When size divides W (512 / 64) every e_j is 0 and x = (c * size + 1/2) * W / size - 1/2: the old
  reading c * W plus W / (2 size) - 1/2 (3.5 px at 512). Reading c * W instead is biased by
  E[x - (W / size) k] = (W - g) / (2 size) with g = gcd(W, size) (from
  sum_{x<W} floor(size x / W) = ((size - 1)(W - 1) + g - 1) / 2), 3.5 px at W = 512, size = 64.

  Args:
    coords: (..., L, 2) network outputs, the original's [0, 1] convention.
    height, width: the original image's size in pixels (integers: the cells depend on them exactly).
    size: the network input's side the targets were scaled to (64).
    targets: 'truncated' or 'exact'.

  Returns:
    (..., L, 2) float64 original pixels (x, y).
  """
  check_targets(targets)
  height, width = _check_extent(height, 'height'), _check_extent(width, 'width')
  size = _check_size(size)
  coords = np.asarray(coords, np.float64)
  if coords.shape[-1:] != (2,):
    raise ValueError(f'coords must be (..., 2) (x, y); got shape {coords.shape}')
  if targets == 'exact':
    return coords * np.array([width, height], np.float64)
  return np.stack([truncated_to_pixels(coords[..., 0] * size, width, size),
                   truncated_to_pixels(coords[..., 1] * size, height, size)], axis=-1)


def truncation_bias(extent: int, size: int) -> float:
  """Mean of x - c * extent over integer x in 0..extent-1 when c = floor(x * size / extent) / size:
  (extent - gcd(extent, size)) / (2 size), what reading 'truncated' outputs as 'exact' costs per axis."""
  extent, size = _check_extent(extent, 'extent'), _check_size(size)
  return (extent - math.gcd(extent, size)) / (2 * size)
