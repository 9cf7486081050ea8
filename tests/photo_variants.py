"""One garment photo in the forms phones, shops and editors write it, for the tests of the one image decoder
(kpjax.data.images) and of kpjax.predict and kpjax.serve on real-world files.

`garment_photo()` is a product photo: a grey synthetic skirt on white with a red, a green and a blue
marker (Gaussian blobs, test_predict.blob_image's colours) on three of its keypoints, which test_predict's
colour-detector model finds to within an input pixel. `colour_variants` encodes it every way below,
`grey_variants` its grey version, each with the RGB image a correct decoder returns for it (built here
with numpy from the definitions: EXIF's orientation table, compositing over white, 16-bit scaling) and
whether that is exactly the file's pixels (lossless) or only close to them (JPEG, lossy WebP).
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
from PIL import Image

from kpjax.data import keypoints as kp
from kpjax.data.synthetic import garments

import test_predict as tp

MARKED = ('waistband_left', 'waistband_right', 'hemline_left')  # red, green, blue markers
DETECTORS = (0, 1, 2, 0)  # the skirt model's keypoints -> colour detector (hemline_right finds the red one)
HEIGHT, WIDTH = 150, 200

# EXIF orientation o: the stored pixels are the upright image transformed by STORED[o] (EXIF 2.3, tag 274:
# where the stored 0th row and 0th column lie in the upright image). A viewer undoes it.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # top-right: mirrored left-right
    3: lambda a: a[::-1, ::-1],  # bottom-right: rotated 180
    4: lambda a: a[::-1],  # bottom-left: mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # left-top: transposed
    6: lambda a: np.rot90(a, 1),  # right-top: stored 90 degrees anticlockwise of upright
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # right-bottom: transverse
    8: lambda a: np.rot90(a, -1),  # left-bottom: stored 90 degrees clockwise of upright
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """An encoded file, the RGB pixels a correct decoder gives for it, and whether they are exact."""
  data: bytes
  expected: np.ndarray
  exact: bool


def garment_photo(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 (HEIGHT, WIDTH, 3) photo, (3, 2) marker centres (x, y) in pixels) of a skirt on white."""
  ex = garments.render('skirt', np.random.default_rng(seed), width=WIDTH, height=HEIGHT, clutter=False,
                       rotation_deg=10.0)
  centres = np.stack([ex.keypoints[kp.KEYPOINT_NAMES.index(n)] for n in MARKED]).astype(np.float64)
  assert (ex.visibility[[kp.KEYPOINT_NAMES.index(n) for n in MARKED]] == 1).all(), 'pick a seed with the markers inside'
  luma = ex.image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  grey = np.where(ex.mask, 60 + 0.6 * luma, 255.0)  # a mid-grey garment: no colour detector fires on it
  image = np.repeat(grey[..., None], 3, axis=-1)
  yy, xx = np.mgrid[:HEIGHT, :WIDTH]
  sigma = max(HEIGHT, WIDTH) / tp.SIZE * 1.5
  for colour, (x, y) in zip(tp.COLOURS, centres):
    w = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))[..., None]
    image = image * (1 - w) + colour * w
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), centres


def encode(image, fmt: str, **options) -> bytes:
  buf = io.BytesIO()
  (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format=fmt, **options)
  return buf.getvalue()


def png_16bit(samples: np.ndarray) -> bytes:
  """A 16-bit PNG of (H, W, C) uint16 samples (C = 1 grey, 3 RGB, 4 RGBA), written by hand from the PNG
  spec (Pillow cannot write 16-bit colour)."""
  samples = samples if samples.ndim == 3 else samples[..., None]
  h, w, c = samples.shape
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
  raw = b''.join(b'\x00' + np.ascontiguousarray(samples[y]).astype('>u2').tobytes() for y in range(h))

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))

  header = struct.pack('>IIBBBBB', w, h, 16, colour_type, 0, 0, 0)
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b'')


def tiff_array(samples: np.ndarray) -> bytes:
  """A TIFF of any numpy sample type (uint16, int32, float32...), written by tifffile."""
  import tifffile  # pylint: disable=g-import-not-at-top  (scikit-image's dependency, a test extra)
  buf = io.BytesIO()
  tifffile.imwrite(buf, samples)
  return buf.getvalue()


def with_orientation(stored: np.ndarray, orientation: int, fmt: str, **options) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return encode(np.ascontiguousarray(stored), fmt, exif=exif, **options)


def _junk(rng, shape, block: int = 25) -> np.ndarray:
  """Blocks of pure red, green or blue: what an RGBA file may hide under alpha 0 (editors keep whatever was
  there). A decoder that drops the alpha shows them, and at this size they survive the model's downscaling,
  so the colour detectors fire on them."""
  h, w = shape[:2]
  blocks = np.eye(3, dtype=np.uint8)[rng.integers(0, 3, (-(-h // block), -(-w // block)))] * 255
  junk = np.repeat(np.repeat(blocks, block, axis=0), block, axis=1)[:h, :w]
  return junk if len(shape) == 3 else junk[..., 0]


def colour_variants(photo: np.ndarray, seed: int = 0) -> dict[str, Variant]:
  """The colour photo as files of every kind kpjax must read the same way (module docstring)."""
  rng = np.random.default_rng(seed)
  white = (photo == 255).all(-1)
  quantized = Image.fromarray(photo).quantize(256)  # palette formats hold these colours
  palette_rgb = np.asarray(quantized.convert('RGB'))
  second = 255 - photo  # the second frame of animated files: never decoded
  v = {
      'plain.png': Variant(encode(photo, 'PNG'), photo, True),
      'plain.jpg': Variant(encode(photo, 'JPEG', quality=95), photo, False),
      'exif6.jpg': Variant(with_orientation(STORED[6](photo), 6, 'JPEG', quality=95), photo, False),
      'rgba.png': Variant(encode(np.dstack([np.where(white[..., None], _junk(rng, photo.shape), photo),
                                            np.where(white, 0, 255).astype(np.uint8)]), 'PNG'), photo, True),
      'palette.png': Variant(encode(quantized, 'PNG'), palette_rgb, True),
      'palette.gif': Variant(encode(quantized, 'GIF'), palette_rgb, True),
      'cmyk.jpg': Variant(encode(Image.fromarray(photo).convert('CMYK'), 'JPEG', quality=95), photo, False),
      'cmyk.tif': Variant(encode(Image.fromarray(photo).convert('CMYK'), 'TIFF'), photo, True),
      'rgb16.png': Variant(png_16bit(photo.astype(np.uint16) * 257), photo, True),
      'rgba16.png': Variant(png_16bit(np.dstack([photo.astype(np.uint16) * 257,
                                                 np.full(photo.shape[:2], 65535, np.uint16)])), photo, True),
      'rgb16.tif': Variant(tiff_array(photo.astype(np.uint16) * 257), photo, True),
      'plain.bmp': Variant(encode(photo, 'BMP'), photo, True),
      'plain.tif': Variant(encode(photo, 'TIFF', compression='tiff_lzw'), photo, True),
      'lossless.webp': Variant(encode(photo, 'WEBP', lossless=True), photo, True),
      'lossy.webp': Variant(encode(photo, 'WEBP', quality=95), photo, False),
      'animated.gif': Variant(encode(quantized, 'GIF', save_all=True,
                                     append_images=[Image.fromarray(second).quantize(256)]), palette_rgb, True),
      'animated.png': Variant(encode(photo, 'PNG', save_all=True, append_images=[Image.fromarray(second)]),
                              photo, True),
      'animated.webp': Variant(encode(photo, 'WEBP', lossless=True, save_all=True,
                                      append_images=[Image.fromarray(second)]), photo, True),
  }
  for o in (2, 3, 4, 5, 7, 8):
    v[f'exif{o}.png'] = Variant(with_orientation(STORED[o](photo), o, 'PNG'), photo, True)
  v['exif6.tif'] = Variant(with_orientation(STORED[6](photo), 6, 'TIFF'), photo, True)
  v['exif8.webp'] = Variant(with_orientation(STORED[8](photo), 8, 'WEBP', lossless=True), photo, True)
  return v


def grey_variants(photo: np.ndarray, seed: int = 0) -> dict[str, Variant]:
  """The photo's grey version as 8-, 16- and 32-bit and floating-point grey files, with and without alpha."""
  rng = np.random.default_rng(seed)
  grey = photo[..., 1]
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  white = grey == 255
  return {
      'grey_rgb.png': Variant(encode(rgb, 'PNG'), rgb, True),
      'grey.png': Variant(encode(grey, 'PNG'), rgb, True),
      'grey_alpha.png': Variant(encode(Image.fromarray(np.dstack([np.where(white, _junk(rng, grey.shape),
                                                                            grey).astype(np.uint8),
                                                                   np.where(white, 0, 255).astype(np.uint8)]), 'LA'),
                                       'PNG'), rgb, True),
      'grey16.png': Variant(png_16bit(grey.astype(np.uint16) * 257), rgb, True),
      'grey16.tif': Variant(tiff_array(grey.astype(np.uint16) * 257), rgb, True),
      'grey32.tif': Variant(tiff_array(grey.astype(np.int32) * 257), rgb, True),
      'greyfloat.tif': Variant(tiff_array(grey.astype(np.float32) / 255), rgb, True),
      'grey.jpg': Variant(encode(grey, 'JPEG', quality=95), rgb, False),
  }
