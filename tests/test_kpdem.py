"""kpjax.data.kpdem: the original's resize (against scikit-image itself) and coordinate conventions."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import transform

from kpjax.data import kpdem

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


def original_targets(points, height, width, size=64):
  """The original's dataset code on integer annotations (N, 2): an integer array assigned a float
  scaling (numpy truncates it), then pixel / size (DESIGN.md). Returns float64 (N, 2) targets."""
  landmarks = np.array(points, dtype=int)
  landmarks[:, 0] = landmarks[:, 0] * size / width
  landmarks[:, 1] = landmarks[:, 1] * size / height
  return landmarks / size


EXTENTS = [1, 7, 33, 50, 63, 64, 65, 100, 128, 333, 500, 512, 517, 1000]  # odd, even, < 64, multiples of 64


@pytest.mark.parametrize('width', EXTENTS)
def test_truncated_targets_map_to_the_centre_of_their_pixels(width):
  """Every integer x -> the original's target -> the centre of the x sharing that target; mean error 0."""
  height = 97
  x = np.arange(width)
  y = np.arange(width) % height
  target = original_targets(np.stack([x, y], -1), height, width)
  got = kpdem.coords_to_original(target, height, width, 64, 'truncated')
  for axis, (values, extent) in enumerate([(x, width), (y, height)]):
    cells = np.floor(target[:, axis] * 64 + 0.5).astype(int)  # the stored integers
    centre = np.empty(len(values))
    for k in np.unique(cells):  # centre of each cell's pixels, found by grouping
      members = values[cells == k] if axis == 0 else np.arange(extent)[np.arange(extent) * 64 // extent == k]
      centre[cells == k] = (members.min() + members.max()) / 2
    np.testing.assert_allclose(got[:, axis], centre, rtol=0, atol=1e-9)
  # Over uniformly distributed integer x the error averages to 0; the plain reading c * W is biased
  # by (W - gcd(W, 64)) / 128 (~W / 128: 3.5 px at 512).
  assert abs(np.mean(x - got[:, 0])) < 1e-9
  old_bias = np.mean(x - target[:, 0] * width)
  assert old_bias == pytest.approx(kpdem.truncation_bias(width, 64), abs=1e-9)
  assert old_bias == pytest.approx((width - np.gcd(width, 64)) / 128, abs=1e-9)
  assert abs(old_bias - width / 128) <= 0.5
  np.testing.assert_allclose(kpdem.coords_to_original(target, height, width, 64, 'exact'),
                             target * [width, height], rtol=0, atol=1e-12)


@pytest.mark.parametrize('width', EXTENTS)
def test_truncated_mapping_is_continuous_and_monotone(width):
  """Between cells the mapping interpolates linearly (the expected centre of a two-cell spread);
  with 64 | W it is the cell centre formula (64 c + 1/2) W / 64 - 1/2 everywhere."""
  c = np.linspace(-0.2, 1.2, 2801)
  pixels = kpdem.truncated_to_pixels(c * 64, width, 64)
  assert np.all(np.diff(pixels) >= 0)
  assert np.max(np.abs(np.diff(pixels))) <= (np.diff(c)[0] * 64) * np.ceil(width / 64) + 1e-9
  k0, t = 5, 0.3  # a network spread over cells 5 and 6 with weights 0.7 and 0.3
  want = 0.7 * kpdem.cell_centre(k0, width, 64) + 0.3 * kpdem.cell_centre(k0 + 1, width, 64)
  assert kpdem.truncated_to_pixels(k0 + t, width, 64) == pytest.approx(want, abs=1e-9)
  if width % 64 == 0:
    np.testing.assert_allclose(pixels, (64 * c + 0.5) * width / 64 - 0.5, rtol=0, atol=1e-9)


def test_cell_centre_by_hand_and_bad_inputs():
  # W = 100, size 64: cell 0 holds x = 0, 1 (centre 0.5); cell 1 holds x = 2 (100/64 = 1.5625 .. 3.125);
  # W = 32: every other cell is empty, its centre is the point between its neighbours' pixels.
  np.testing.assert_allclose(kpdem.cell_centre(np.array([0, 1, 2]), 100, 64), [0.5, 2.5, 4.0])
  np.testing.assert_allclose(kpdem.cell_centre(np.array([0, 1, 2, 3]), 32, 64), [0.0, 0.5, 1.0, 1.5])
  np.testing.assert_allclose(kpdem.cell_centre(np.arange(3), 512, 64), [3.5, 11.5, 19.5])
  coords = np.array([[[0.5, np.nan], [np.inf, 0.25]]])
  got = kpdem.coords_to_original(coords, 512, 512, 64, 'truncated')
  assert got.shape == (1, 2, 2) and np.isnan(got[0, 0, 1]) and np.isnan(got[0, 1, 0])
  assert got[0, 0, 0] == 259.5 and got[0, 1, 1] == 131.5
  with pytest.raises(ValueError, match='width must be a positive whole number'):
    kpdem.coords_to_original(coords, 512, 511.5, 64)
  with pytest.raises(ValueError, match="truncated, exact; got 'floor'"):
    kpdem.coords_to_original(coords, 512, 512, 64, 'floor')
  for h, w in [(512, 512), (333, 517), (7, 1000), (1, 1)]:
    assert kpdem.original_size(kpdem.resize_affine(h, w, 64), 64) == (h, w)


def test_targets_from_metadata():
  assert kpdem.targets_from_metadata({'kpdem_targets': 'exact', 'converter': 'convert.torch_to_flax'}) == 'exact'
  assert kpdem.targets_from_metadata({'converter': 'convert.torch_to_flax'}) == 'truncated'  # converted earlier
  assert kpdem.targets_from_metadata({'step': 100}) == 'exact'  # trained by kpjax, whose targets are exact
  with pytest.raises(ValueError, match='kpdem targets'):
    kpdem.targets_from_metadata({'kpdem_targets': 'rounded'})
