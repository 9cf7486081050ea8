"""kpjax.data.images.decode_image: every image mode comes out as uint8 RGB, bad bytes name their file."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from kpjax import errors
from kpjax.data.images import decode_image


def _encode(image: Image.Image, fmt: str = 'PNG', **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def test_rgb_png_is_returned_exactly():
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  out = decode_image(_encode(Image.fromarray(pixels)), 'a.png')
  assert out.dtype == np.uint8 and out.shape == (5, 7, 3)  # (H, W, 3): rows first
  np.testing.assert_array_equal(out, pixels)


def test_other_modes_become_rgb():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(gray, 'L'))), np.stack([gray] * 3, axis=-1))
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., :3] = [[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]]
  rgba[..., 3] = [[0, 255], [128, 7]]  # alpha is dropped, not composited
  np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(rgba, 'RGBA'))), rgba[..., :3])
  palette = Image.new('P', (3, 1))
  palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (3 * 253))
  palette.putdata([2, 0, 1])
  np.testing.assert_array_equal(decode_image(_encode(palette)), [[[0, 0, 255], [255, 0, 0], [0, 255, 0]]])
  bits = Image.new('1', (2, 1))
  bits.putdata([0, 1])
  np.testing.assert_array_equal(decode_image(_encode(bits)), [[[0, 0, 0], [255, 255, 255]]])


def test_jpeg_decodes_to_rgb():
  flat = np.full((16, 24, 3), (200, 40, 90), np.uint8)
  out = decode_image(_encode(Image.fromarray(flat), 'JPEG', quality=95), 'b.jpg')
  assert out.shape == (16, 24, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - flat).max() <= 3  # a flat colour survives JPEG's quantisation within a few levels
  gray = decode_image(_encode(Image.new('L', (4, 4), 99), 'JPEG'))
  assert gray.shape == (4, 4, 3) and np.all(gray == gray[..., :1])


@pytest.mark.parametrize('data, why', [
    (b'', 'empty'),
    (b'this is a text file, not an image', 'not an image'),
    (_encode(Image.new('RGB', (32, 32), (1, 2, 3)), 'JPEG')[:200], 'truncated JPEG'),
    (_encode(Image.new('RGB', (32, 32), (1, 2, 3)))[:60], 'truncated PNG'),
    # A BMP header of a 0 x 3 image: no pixels (PIL refuses such files when it opens them).
    (b'BM' + struct.pack('<IHHI', 54, 0, 0, 54) + struct.pack('<IiiHHIIiiII', 40, 0, 3, 1, 24, 0, 0, 0, 0, 0, 0),
     'no pixels'),
])
def test_what_cannot_be_decoded_is_an_error_naming_the_file(data, why):
  with pytest.raises(errors.ImageError, match=r'^Images/skirt/x\.jpg: cannot decode image \(') as e:
    decode_image(data, 'Images/skirt/x.jpg')
  assert isinstance(e.value, errors.UserError), why
  with pytest.raises(errors.ImageError, match=r'^image: cannot decode image'):
    decode_image(data)  # without a name
