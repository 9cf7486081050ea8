"""The one image decoder: encoded bytes -> uint8 (H, W, 3) RGB, the upright image a viewer shows. Dataset
builds, training, `kpjax.predict` and `kpjax.serve` all decode through `decode_image`, so a photo gives the
same pixels (and so the same keypoints) everywhere.

What photos from phones, shops and editors hold, and what it becomes:
  * EXIF orientation (phones store the sensor's pixels plus a rotation tag): applied, so pixels and
    keypoints are those of the upright image a viewer shows.
  * transparency (RGBA, LA, PA, a palette's or a colour key's): composited over white, the background
    product photos are shown on; what a pixel hides under alpha 0 never shows.
  * grayscale, bilevel, palette, CMYK (Adobe's inverted CMYK JPEGs included) and YCbCr: Pillow's
    conversions to RGB. Embedded ICC profiles are not applied (colours as stored).
  * more than 8 bits a sample: 16-bit grayscale (PNG, TIFF) scaled by 255/65535 and rounded, not clipped;
    32-bit integer images are read as such 16-bit data; floating-point ones as [0, 1]; 16-bit RGB(A) PNGs
    Pillow already reads as 8 bits (the high byte of each sample: the same scaling, truncated).
  * animated or multi-page files (GIF, APNG, WebP, TIFF, MPO): the first frame.

Formats: FORMATS (JPEG, phones' multi-picture MPO JPEGs included, PNG, WebP, BMP, TIFF, GIF, AVIF) and HEIC/HEIF where
the pillow-heif plugin is installed; no other Pillow plugin is tried (some run external programs, e.g.
EPS through Ghostscript). Decompression bombs: the pixel count the header declares is checked against
`max_pixels` before a pixel is decoded.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageOps

from kpjax.errors import ImageError, ImageTooLarge

FORMATS = ('JPEG', 'PNG', 'WEBP', 'BMP', 'TIFF', 'GIF', 'AVIF')
HEIF_FORMAT = 'HEIF'  # registered by pillow-heif's opener, when that package is installed
DEFAULT_MAX_PIXELS = 100_000_000  # any phone photo (a 200 MP sensor bins to 50 MP); ~300 MB decoded
_ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


@functools.cache
def formats() -> tuple[str, ...]:
  """The Pillow formats decode_image opens: FORMATS, plus HEIF when pillow-heif is importable."""
  try:
    import pillow_heif  # pylint: disable=g-import-not-at-top
  except ImportError:
    return FORMATS
  pillow_heif.register_heif_opener()
  return FORMATS + (HEIF_FORMAT,)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
  """0..65535 -> 0..255, round(v * 255 / 65535) (so v = 257 k gives k exactly)."""
  values = np.clip(values.astype(np.int64), 0, 65535)
  return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
  """A loaded Pillow image of any mode -> uint8 (H, W, 3) RGB (module docstring)."""
  mode = img.mode
  if mode in _ALPHA_MODES or (mode in ('P', 'L', 'RGB', '1') and 'transparency' in img.info):
    rgba = np.asarray(img.convert('RGBA'), np.int64)
    alpha = rgba[..., 3:]
    return ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)  # over white
  if mode in _SIXTEEN_BIT_MODES or mode == 'I':
    gray = _scale_16bit(np.asarray(img))
  elif mode == 'F':
    gray = np.clip(np.rint(np.asarray(img, np.float64) * 255), 0, 255).astype(np.uint8)
  elif mode == 'RGB':
    return np.asarray(img, np.uint8)
  else:  # L, 1, P, CMYK, YCbCr, ...: Pillow's conversions
    return np.asarray(img.convert('RGB'), np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)


def decode_image(data: bytes, name: str = '', max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded image bytes -> uint8 (H, W, 3) RGB, upright (module docstring).

  Args:
    data: the file's bytes.
    name: what to call the image in messages (a path, an image id); 'image' when empty.
    max_pixels: the most pixels (width x height, as the header declares them) to decode; None: any
      number Pillow itself accepts (Image.MAX_IMAGE_PIXELS).

  Raises:
    ImageTooLarge: more pixels than `max_pixels` (nothing was decoded).
    ImageError: empty, not an image of FORMATS, truncated or corrupt; the message names `name`.
  """
  label = name or 'image'
  if not data:
    raise ImageError(f'{label}: empty (0 bytes); expected an image file ({", ".join(formats())})')
  try:
    with Image.open(io.BytesIO(data), formats=formats()) as img:
      width, height = img.size
      if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f'{label}: {width}x{height} is {width * height:,} pixels, more than the '
                            f'{max_pixels:,} accepted')
      img.load()  # the first frame of an animated or multi-page file
      try:
        ImageOps.exif_transpose(img, in_place=True)
      except Exception:  # pylint: disable=broad-except  (a damaged EXIF block: the pixels as stored)
        pass
      image = _to_rgb(img)
  except ImageError:
    raise
  except Image.DecompressionBombError as e:  # over Pillow's own limit, which it checks as it opens the file
    limit = min(max_pixels or 2 * Image.MAX_IMAGE_PIXELS, 2 * Image.MAX_IMAGE_PIXELS)
    raise ImageTooLarge(f'{label}: more pixels than the {limit:,} accepted ({e})') from None
  except Image.UnidentifiedImageError:
    raise ImageError(f'{label}: cannot decode image: not a file of a format kpjax reads ({", ".join(formats())}); '
                     f'{len(data):,} bytes starting {bytes(data[:8])!r}') from None
  except Exception as e:  # pylint: disable=broad-except  (decoders raise OSError, SyntaxError, struct.error...)
    raise ImageError(f'{label}: cannot decode image ({type(e).__name__}: {e})') from None
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ImageError(f'{label}: image has no pixels ({image.shape[1]}x{image.shape[0]})')
  return image
