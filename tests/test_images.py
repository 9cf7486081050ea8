"""kpjax.data.images.decode_image, the one decoder: the upright image a viewer shows, in plain RGB, whatever
the file (EXIF orientation, alpha, grey, palette, CMYK, 16 bits, animation, format), and bad files refused
with a message naming them. Expected pixels are built with numpy from the definitions (tests/photo_variants)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kpjax.data import images
from kpjax import errors

import photo_variants as pv


@pytest.fixture(scope='module')
def photo():
  return pv.garment_photo()[0]


@pytest.fixture(scope='module')
def variants(photo):
  return {**pv.colour_variants(photo), **pv.grey_variants(photo)}


def _raw_pixels(data: bytes) -> np.ndarray:
  """Pillow's samples of the file as stored: no orientation, no compositing (the lossy files' reference)."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img)


VARIANTS = sorted(pv.colour_variants(pv.garment_photo()[0])) + sorted(pv.grey_variants(pv.garment_photo()[0]))


@pytest.mark.parametrize('name', VARIANTS)
def test_each_variant_decodes_to_the_upright_rgb_image(variants, name):
  v = variants[name]
  got = images.decode_image(v.data, name)
  assert got.dtype == np.uint8 and got.shape == v.expected.shape
  if v.exact:
    np.testing.assert_array_equal(got, v.expected)
    return
  # Lossy files: the decoder adds only the orientation and the colour conversion to the codec's samples.
  raw = _raw_pixels(v.data).astype(np.int64)
  if name == 'exif6.jpg':
    want = np.rot90(raw, -1)  # undoes STORED[6]
  elif name == 'cmyk.jpg':
    c, m, y, k = np.moveaxis(raw, -1, 0)
    want = np.stack([(255 - ch) * (255 - k) / 255 for ch in (c, m, y)], axis=-1)
  elif raw.ndim == 2:
    want = np.repeat(raw[..., None], 3, axis=-1)
  else:
    want = raw
  np.testing.assert_allclose(got, want, atol=1.0 if name == 'cmyk.jpg' else 0)  # CMYK: rounding of /255


def test_orientation_table_is_the_exif_definition():
  """STORED follows EXIF's words: where the stored 0th row and 0th column lie in the upright image."""
  upright = np.arange(2 * 3).reshape(2, 3, 1)  # 2 rows, 3 columns
  top, bottom, left, right = upright[0, :, 0], upright[-1, :, 0], upright[:, 0, 0], upright[:, -1, 0]
  rows = {o: pv.STORED[o](upright)[0, :, 0] for o in pv.STORED}
  cols = {o: pv.STORED[o](upright)[:, 0, 0] for o in pv.STORED}
  expect = {1: (top, left), 2: (top[::-1], right), 3: (bottom[::-1], right[::-1]), 4: (bottom, left[::-1]),
            5: (left, top), 6: (right, top[::-1]), 7: (right[::-1], bottom[::-1]), 8: (left[::-1], bottom)}
  for o, (row0, col0) in expect.items():
    np.testing.assert_array_equal(rows[o], row0, err_msg=f'orientation {o} row 0')
    np.testing.assert_array_equal(cols[o], col0, err_msg=f'orientation {o} column 0')


def test_alpha_is_composited_over_white():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (16, 17, 3), dtype=np.uint8)
  alpha = rng.integers(0, 256, (16, 17), dtype=np.uint8)
  alpha[0, :3] = 0, 255, 128
  over_white = (rgb * (alpha[..., None] / 255.0) + 255 * (1 - alpha[..., None] / 255.0))
  got = images.decode_image(pv.encode(np.dstack([rgb, alpha]), 'PNG'))
  np.testing.assert_allclose(got, over_white, atol=0.5 + 1e-9)  # rounded to the nearest level
  np.testing.assert_array_equal(got[0, 0], 255)
  np.testing.assert_array_equal(got[0, 1], rgb[0, 1])
  grey = rgb[..., 0].astype(np.float64)
  got = images.decode_image(pv.encode(Image.fromarray(np.dstack([rgb[..., 0], alpha]), 'LA'), 'PNG'))
  np.testing.assert_allclose(got, np.repeat((grey * alpha / 255.0 + 255 * (1 - alpha / 255.0))[..., None], 3, -1),
                             atol=0.5 + 1e-9)


def test_transparent_palette_and_colour_key_show_white():
  rng = np.random.default_rng(2)
  index = rng.integers(0, 4, (10, 12), dtype=np.uint8)
  palette = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
  img = Image.fromarray(index, 'P')
  img.putpalette(palette.reshape(-1).tolist())
  for fmt in ('PNG', 'GIF'):
    got = images.decode_image(pv.encode(img, fmt, transparency=0))
    np.testing.assert_array_equal(got, np.where((index == 0)[..., None], 255, palette[index]))
  rgb = palette[index]
  got = images.decode_image(pv.encode(rgb, 'PNG', transparency=(200, 0, 0)))  # tRNS colour key
  np.testing.assert_array_equal(got, np.where((index == 1)[..., None], 255, rgb))


def test_16_bit_samples_are_scaled_not_clipped():
  values = np.array([[0, 1, 128, 129, 257, 30000, 32767, 32768, 65278, 65535]], np.uint16)
  want = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5)  # round(v * 255 / 65535)
  assert want[0, 5] == 117  # clipping would make 30000 white
  for data in (pv.png_16bit(values), pv.tiff_array(values)):
    got = images.decode_image(data)
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, -1))


def test_first_frame_of_multi_frame_files(photo):
  other = 255 - photo
  tiff = pv.encode(photo, 'TIFF', save_all=True, append_images=[Image.fromarray(other)])
  with Image.open(io.BytesIO(tiff)) as img:
    assert img.n_frames == 2
  np.testing.assert_array_equal(images.decode_image(tiff), photo)


def test_a_damaged_orientation_leaves_the_pixels_as_stored(photo):
  exif = Image.Exif()
  exif[0x0112] = 9  # not an orientation
  np.testing.assert_array_equal(images.decode_image(pv.encode(photo, 'PNG', exif=exif)), photo)


def _png_header_only(width: int, height: int) -> bytes:
  """A PNG that declares width x height and holds a few bytes of data (a decompression bomb's shape)."""
  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
          + chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')  # Pillow's own, at 89 megapixels
def test_too_many_pixels_are_refused_before_decoding():
  bomb = _png_header_only(12_000, 10_000)  # 120 megapixels declared in 100 bytes
  with pytest.raises(errors.ImageTooLarge, match=r'upload: 12000x10000 is 120,000,000 pixels, more than the '
                                                  r'100,000,000 accepted'):
    images.decode_image(bomb, 'upload')
  huge = _png_header_only(40_000, 30_000)  # over Pillow's own limit (2 Image.MAX_IMAGE_PIXELS), which it checks first
  with pytest.raises(errors.ImageTooLarge, match=r'upload: more pixels than the 100,000,000 accepted .*1200000000'):
    images.decode_image(huge, 'upload')
  with pytest.raises(errors.ImageTooLarge, match='decompression bomb'):  # and holds without max_pixels
    images.decode_image(huge, max_pixels=None)
  small = pv.encode(np.zeros((30, 40, 3), np.uint8), 'PNG')
  with pytest.raises(errors.ImageTooLarge, match='1,200 pixels, more than the 1,199 accepted'):
    images.decode_image(small, max_pixels=1199)
  assert images.decode_image(small, max_pixels=1200).shape == (30, 40, 3)
  assert issubclass(errors.ImageTooLarge, errors.ImageError)


@pytest.mark.parametrize('data, message', [
    (b'', 'x.jpg: empty \\(0 bytes\\); expected an image file \\(JPEG, PNG'),
    (b'<html>404</html>', "x.jpg: cannot decode image: not a file of a format kpjax reads .*starting b'<html>40'"),
    (b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n', 'not a file of a format kpjax reads'),  # no Ghostscript
])
def test_bad_bytes_are_refused_with_the_name(data, message):
  with pytest.raises(errors.ImageError, match=message):
    images.decode_image(data, 'x.jpg')


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG', 'WEBP', 'GIF', 'TIFF'])
def test_truncated_files_are_refused(photo, fmt):
  data = pv.encode(photo, fmt)
  with pytest.raises(errors.ImageError, match='cut.png: cannot decode image'):
    images.decode_image(data[:len(data) // 2], 'cut.png')


def test_heic_when_its_plugin_is_installed(photo):
  pillow_heif = pytest.importorskip('pillow_heif', reason='HEIC needs the pillow-heif plugin, which is not installed')
  assert images.HEIF_FORMAT in images.formats()
  data = pv.encode(photo, 'HEIF', quality=-1)  # lossless
  assert pillow_heif.is_supported(data)
  np.testing.assert_allclose(images.decode_image(data), photo, atol=2)


def _encode(image: Image.Image, fmt: str = 'PNG', **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def test_rgb_png_is_returned_exactly():
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  out = images.decode_image(_encode(Image.fromarray(pixels)), 'a.png')
  assert out.dtype == np.uint8 and out.shape == (5, 7, 3)  # (H, W, 3): rows first
  np.testing.assert_array_equal(out, pixels)


def test_jpeg_decodes_to_rgb():
  flat = np.full((16, 24, 3), (200, 40, 90), np.uint8)
  out = images.decode_image(_encode(Image.fromarray(flat), 'JPEG', quality=95), 'b.jpg')
  assert out.shape == (16, 24, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - flat).max() <= 3  # a flat colour survives JPEG's quantisation within a few levels
  gray = images.decode_image(_encode(Image.new('L', (4, 4), 99), 'JPEG'))
  assert gray.shape == (4, 4, 3) and np.all(gray == gray[..., :1])
