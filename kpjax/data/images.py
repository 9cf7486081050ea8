"""The one image decoder: encoded bytes (JPEG, PNG, ...) -> uint8 (H, W, 3) RGB, used by dataset builds,
training, prediction and serving alike."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kpjax.errors import ImageError


def decode_image(data: bytes, name: str = '') -> np.ndarray:
  """Encoded image bytes (JPEG, PNG...) -> uint8 (H, W, 3) RGB; raises ImageError naming `name`."""
  label = name or 'image'
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      rgb = img.convert('RGB')
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
    raise ImageError(f'{label}: cannot decode image ({e})') from None
  image = np.asarray(rgb, dtype=np.uint8)
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ImageError(f'{label}: image has no pixels ({image.shape[1]}x{image.shape[0]})')
  return image
