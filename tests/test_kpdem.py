"""kpjax.kpdem: the original's resize (against scikit-image itself) and coordinate conventions."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import transform

from kpjax import kpdem

SIZES = [  # (H, W, size): down, up, mixed (one axis each way), odd, tiny, square, identity
    (512, 512, 64), (300, 200, 64), (37, 53, 64), (20, 30, 64), (100, 40, 64), (513, 333, 32), (7, 9, 16),
    (1, 5, 8), (64, 64, 64)]


@pytest.mark.parametrize('h,w,size', SIZES)
def test_resize_equals_skimage(h, w, size):
  rng = np.random.default_rng(h * 1000 + w)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  image[: h // 2] = 255  # saturated and flat regions as well as noise
  want = transform.resize(image, (size, size))  # the original's call, skimage's defaults
  got = kpdem.skimage_resize(image, size)
  assert got.shape == want.shape == (size, size, 3) and got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  prepared, affine = kpdem.prepare_image(image, size)
  assert prepared.dtype == np.float32 and prepared.shape == (size, size, 3)
  np.testing.assert_allclose(prepared, (want / 255).astype(np.float32), rtol=0, atol=1e-9)
  assert 0 <= prepared.min() and prepared.max() <= 1 / 255 + 1e-9
  np.testing.assert_allclose(affine, [[size / w, 0, 0], [0, size / h, 0]])


def test_downsampling_is_antialiased():
  """A one-pixel checkerboard averages out (skimage >= 0.15's default); plain interpolation would alias."""
  board = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
  out = kpdem.skimage_resize(board, 32)
  assert abs(out.mean() - 0.5) < 0.01 and out.std() < 0.01


def test_coordinate_convention_inverts_the_original_targets():
  """Original target = pixel * size / W / size; prediction c -> c * size input px -> c * W original px."""
  rng = np.random.default_rng(0)
  h, w, size = 333, 517, 64
  keypoints = np.stack([rng.integers(0, w, 7), rng.integers(0, h, 7)], -1).astype(np.float64)
  target = keypoints * [size / w, size / h] / size  # as the training script built its targets
  assert 0 <= target.min() and target.max() < 1
  affine = kpdem.resize_affine(h, w, size)
  pixels = kpdem.coords_to_input_pixels(target, size)
  np.testing.assert_allclose(pixels, keypoints @ affine[:, :2].T + affine[:, 2], rtol=0, atol=1e-9)
  original = (pixels - affine[:, 2]) / np.diag(affine[:, :2])
  np.testing.assert_allclose(original, keypoints, rtol=0, atol=1e-9)
  np.testing.assert_allclose(kpdem.input_pixels_to_coords(pixels, size), target, rtol=0, atol=1e-15)


def test_bad_inputs_are_refused():
  image = np.zeros((10, 10, 3), np.uint8)
  with pytest.raises(ValueError, match='uint8'):
    kpdem.prepare_image(image.astype(np.float32), 8)
  with pytest.raises(ValueError, match=r'\(H, W, 3\)'):
    kpdem.prepare_image(image[..., 0], 8)
  with pytest.raises(ValueError, match='positive integer'):
    kpdem.prepare_image(image, 0)
  with pytest.raises(ValueError, match='positive integer'):
    kpdem.coords_to_input_pixels(np.zeros((1, 2)), 6.5)
