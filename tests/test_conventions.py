"""kpjax.data.conventions: both input/output conventions, against hand-computed images, pixels and mirrors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from kpjax.data import conventions
from kpjax.data import geometry

SIZE = 16
KPJAX = conventions.get('kpjax')
KPDEM_TRUNCATED = conventions.get('kpdem', kpdem_targets='truncated')
KPDEM_EXACT = conventions.get('kpdem', kpdem_targets='exact')
ALL = [KPJAX, KPDEM_TRUNCATED, KPDEM_EXACT]
IDS = ['kpjax', 'kpdem-truncated', 'kpdem-exact']
FILL = (np.array(geometry.FILL_RGB, np.float32) - geometry.MEAN_RGB) / geometry.STDDEV_RGB  # padding, normalised


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---- Preparing images --------------------------------------------------------------------------

def test_kpjax_prepare_letterboxes_and_normalises():
  # Landscape 100 x 50 into 16 x 16: scale 0.16, the image's edges at input rows 3.5 and 11.5, so rows 4..11
  # are image and rows 0..3 and 12..15 padding (the mean colour, ~0 after normalisation).
  x, affine = KPJAX.prepare(_image(50, 100), SIZE)
  assert x.shape == (SIZE, SIZE, 3) and x.dtype == np.float32 and affine.dtype == np.float64
  np.testing.assert_allclose(affine, [[0.16, 0, -0.42], [0, 0.16, 3.58]], atol=1e-12)
  lo = (0 - geometry.MEAN_RGB) / geometry.STDDEV_RGB
  hi = (255 - geometry.MEAN_RGB) / geometry.STDDEV_RGB
  assert np.all(x >= lo - 1e-6) and np.all(x <= hi + 1e-6)
  assert np.abs(FILL).max() < 0.5 / geometry.STDDEV_RGB.min()
  for rows in (x[:4], x[13:]):  # row 12: test_kpjax_padding_starts_at_the_images_edge
    np.testing.assert_allclose(rows, np.broadcast_to(FILL, rows.shape), atol=1e-6)
  assert np.abs(x[4:12] - FILL).max(axis=(1, 2)).min() > 0.1  # every image row holds image
  # A flat image is flat after letterboxing, at its colour's normalised value.
  x, _ = KPJAX.prepare(np.full((20, 20, 3), 200, np.uint8), SIZE)
  np.testing.assert_allclose(x, np.broadcast_to((200 - geometry.MEAN_RGB) / geometry.STDDEV_RGB, x.shape),
                             atol=1e-5)


@pytest.mark.parametrize('height, width', [(48, 96), (50, 100)])
def test_kpjax_padding_starts_at_the_images_edge(height, width):
  # Both images letterbox to rows 3.5 .. 11.5 of the input (a factor-6 reduction first, which divides 48 x 96
  # but not 50 x 100): row 12 is padding.
  x, _ = KPJAX.prepare(np.full((height, width, 3), 255, np.uint8), SIZE)
  np.testing.assert_allclose(x[12], np.broadcast_to(FILL, x[12].shape), atol=1e-6)


@pytest.mark.parametrize('convention', [KPDEM_TRUNCATED, KPDEM_EXACT], ids=IDS[1:])
def test_kpdem_prepare_resizes_to_the_square_in_0_to_1_over_255(convention):
  x, affine = convention.prepare(_image(48, 80), SIZE)
  assert x.shape == (SIZE, SIZE, 3) and x.dtype == np.float32
  assert x.min() >= 0 and x.max() <= np.float32(1 / 255)
  np.testing.assert_allclose(affine, [[16 / 80, 0, 0], [0, 16 / 48, 0]], atol=1e-15)
  x, _ = convention.prepare(np.full((30, 70, 3), 51, np.uint8), SIZE)  # a flat image stays flat: 51 / 255 / 255
  np.testing.assert_allclose(x, np.float32(51 / 255 / 255), rtol=1e-6)


@pytest.mark.parametrize('convention', ALL, ids=IDS)
def test_prepare_refuses_what_is_not_an_rgb_image_or_a_valid_size(convention):
  with pytest.raises(ValueError, match=r'expected an RGB image \(H, W, 3\); got shape \(20, 20\)'):
    convention.prepare(np.zeros((20, 20), np.uint8), SIZE)
  with pytest.raises(ValueError, match='input size must be a positive even number of pixels'):
    convention.prepare(_image(20, 20), 15)


# ---- Model coordinates and input pixels --------------------------------------------------------

def test_kpjax_coords_are_dsntnn_normalised_over_the_input():
  # -1 and 1 are the outer edges of the input's first and last pixels, 0 its centre.
  np.testing.assert_allclose(KPJAX.coords_to_input_pixels([[-1, -1], [1, 1], [0, 0.5]], SIZE),
                             [[-0.5, -0.5], [15.5, 15.5], [7.5, 11.5]], atol=1e-12)
  np.testing.assert_allclose(KPJAX.input_pixels_to_coords([[-0.5, 15.5], [7.5, 3.5]], SIZE),
                             [[-1, 1], [0, -0.5]], atol=1e-12)


def test_kpdem_coords_are_input_pixels_over_the_size():
  np.testing.assert_allclose(KPDEM_EXACT.coords_to_input_pixels([[0.5, 0.25]], SIZE), [[8, 4]])
  np.testing.assert_allclose(KPDEM_EXACT.input_pixels_to_coords([[3.7, 12.25]], SIZE), [[3.7 / 16, 12.25 / 16]])
  # 'truncated': the targets the original trained on were whole input pixels, floor(p) / size.
  np.testing.assert_allclose(KPDEM_TRUNCATED.input_pixels_to_coords([[3.7, 12.25]], SIZE), [[3 / 16, 12 / 16]])


@pytest.mark.parametrize('convention', [KPJAX, KPDEM_EXACT], ids=['kpjax', 'kpdem-exact'])
def test_coords_and_input_pixels_round_trip(convention):
  coords = np.random.default_rng(2).uniform(-1, 1, (3, 5, 2))
  pixels = convention.coords_to_input_pixels(coords, SIZE)
  np.testing.assert_allclose(convention.input_pixels_to_coords(pixels, SIZE), coords, atol=1e-12)
  np.testing.assert_allclose(convention.coords_to_input_pixels(convention.input_pixels_to_coords(pixels, SIZE),
                                                               SIZE), pixels, atol=1e-12)


def test_truncated_targets_read_back_at_the_centre_of_their_input_pixel():
  # Input pixel p's target is floor(p) / S; mapped back through a 1:1 resize (W = H = S) it is pixel floor(p).
  pixels = np.array([[[3.0, 12.0], [3.9, 0.2]]])
  coords = KPDEM_TRUNCATED.input_pixels_to_coords(pixels, SIZE)
  affine = np.array([[1.0, 0, 0], [0, 1.0, 0]])
  np.testing.assert_allclose(KPDEM_TRUNCATED.coords_to_original(coords, affine, SIZE)[0], [[3, 12], [3, 0]])


# ---- Undoing a horizontal flip -----------------------------------------------------------------

def test_kpjax_flipped_to_original_is_the_exact_mirror():
  # Original 100 x 50 point (10, 20); the mirrored image has it at x' = 99 - 10 = 89. The letterbox of
  # either image is [[0.16, 0, -0.42], [0, 0.16, 3.58]]: input pixel (13.82, 6.78), so the mirrored
  # image's output is (2 * 13.82 + 1) / 16 - 1 = 0.79, (2 * 6.78 + 1) / 16 - 1 = -0.09.
  affine = np.array([[0.16, 0, -0.42], [0, 0.16, 3.58]])
  np.testing.assert_allclose(KPJAX.flipped_to_original([[0.79, -0.09]], affine, SIZE), [[10, 20]], atol=1e-9)


def test_kpdem_flipped_to_original_is_the_exact_mirror():
  # Original 80 x 48 point (10, 20), mirrored at x' = 79 - 10 = 69.
  affine = np.array([[0.2, 0, 0], [0, 1 / 3, 0]])
  # 'exact' outputs are x' / W, y / H.
  np.testing.assert_allclose(KPDEM_EXACT.flipped_to_original([[69 / 80, 20 / 48]], affine, SIZE), [[10, 20]],
                             atol=1e-9)
  # 'truncated' outputs are cells: floor(69 * 16 / 80) = 13 holds x' = 65..69 (centre 67, so x = 79 - 67 = 12);
  # floor(20 * 16 / 48) = 6 holds y = 18..20 (centre 19).
  np.testing.assert_allclose(KPDEM_TRUNCATED.flipped_to_original([[13 / 16, 6 / 16]], affine, SIZE), [[12, 19]],
                             atol=1e-9)


@pytest.mark.parametrize('convention', ALL, ids=IDS)
def test_flipped_to_original_of_batches_uses_each_images_affine(convention):
  """A batch of images of different sizes, each with its own affine, maps as each image alone does: kpjax
  mirrors the input (normalised x -> -x) before its own reading, kpdem mirrors the reading (x -> W - 1 - x)."""
  sizes = [(50, 100), (48, 80), (90, 40)]
  affines = np.stack([convention.prepare(_image(h, w), SIZE)[1] for h, w in sizes])
  coords = np.random.default_rng(4).uniform(0.05, 0.95, (3, 6, 2))
  mirrored = convention.flipped_to_original(coords, affines, SIZE)
  assert mirrored.shape == (3, 6, 2)
  for i, (_, width) in enumerate(sizes):
    if convention is KPJAX:
      want = convention.coords_to_original(coords[i] * [-1, 1], affines[i], SIZE)
    else:
      read = convention.coords_to_original(coords[i], affines[i], SIZE)
      want = np.stack([width - 1 - read[:, 0], read[:, 1]], axis=-1)
    np.testing.assert_allclose(mirrored[i], want, atol=1e-9)
    np.testing.assert_allclose(convention.flipped_to_original(coords[i], affines[i], SIZE), want, atol=1e-9)


def test_kpjax_mirror_about_the_input_centre_is_the_images_mirror():
  """A letterboxed image is centred, so mirroring the input mirrors the image: x -> W - 1 - x."""
  affine = KPJAX.prepare(_image(50, 100), SIZE)[1]
  coords = np.array([[0.3, -0.2], [-0.7, 0.9]])
  x = KPJAX.coords_to_original(coords, affine, SIZE)
  np.testing.assert_allclose(KPJAX.flipped_to_original(coords, affine, SIZE), np.stack([99 - x[:, 0], x[:, 1]], -1),
                             atol=1e-9)


# ---- Metadata and names ------------------------------------------------------------------------

def test_metadata_round_trips():
  assert KPJAX.metadata() == {'preprocessing': 'kpjax'}
  assert KPDEM_TRUNCATED.metadata() == {'preprocessing': 'kpdem', 'kpdem_targets': 'truncated'}
  assert KPDEM_EXACT.metadata() == {'preprocessing': 'kpdem', 'kpdem_targets': 'exact'}
  for convention in ALL:
    assert conventions.from_metadata(convention.metadata()) == convention
    assert conventions.from_metadata(dict(convention.metadata(), width=1.0, category='skirt')) == convention
    assert pickle.loads(pickle.dumps(convention)) == convention  # grain workers get copies
  assert KPDEM_TRUNCATED != KPDEM_EXACT and KPJAX != KPDEM_EXACT


def test_get_and_its_errors():
  assert conventions.NAMES == ('kpjax', 'kpdem')
  assert isinstance(conventions.get('kpjax'), conventions.KpjaxConvention)
  assert conventions.get('kpdem') == conventions.KpdemConvention(targets='truncated')  # the released models'
  with pytest.raises(ValueError, match=r"^unknown preprocessing 'opencv'; expected one of kpjax, kpdem$"):
    conventions.get('opencv')
  with pytest.raises(ValueError, match=r"kpdem targets must be one of truncated, exact; got 'rounded'"):
    conventions.get('kpdem', kpdem_targets='rounded')
  with pytest.raises(ValueError, match="unknown preprocessing 'opencv'"):
    conventions.from_metadata({'preprocessing': 'opencv'})


@pytest.mark.parametrize('convention', ALL, ids=IDS)
def test_example_inputs_have_the_conventions_range(convention):
  x = convention.example_input(np.random.default_rng(0), (2, SIZE, SIZE, 3))
  assert x.shape == (2, SIZE, SIZE, 3) and x.dtype == np.float32
  if convention is KPJAX:
    assert -2.1 < x.min() < -1.5 and 1.5 < x.max() < 2.1  # (uniform - 0.5) / 0.25: about [-2, 2]
  else:
    assert x.min() >= 0 and x.max() <= np.float32(1 / 255)
