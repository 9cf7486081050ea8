"""The keypoints of one photo from a kpjax ONNX file, with onnxruntime and without kpjax.

    python -m kpjax.export --checkpoint workdir/demo --format onnx --out demo.onnx
    python examples/onnxruntime_predict.py demo.onnx photo.jpg

Needs numpy, Pillow and onnxruntime, plus scikit-image for converted ('kpdem') models. Prints one
`name x y` line per keypoint of the model, in the photo's own pixels (integer coordinates are pixel
centres), kept inside the photo as `python -m kpjax.predict` writes them. Everything it needs to know
comes from the file's metadata; what each step computes is the file contract in docs/export.md.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255  # ImageNet's, in pixel levels
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
FILL = (124, 116, 104)  # the letterbox's padding: MEAN rounded, 0 after normalising


def read_metadata(session: ort.InferenceSession) -> dict:
  """The export's metadata_props (strings) with `input_size` an int and `keypoints` a list."""
  meta = dict(session.get_modelmeta().custom_metadata_map)
  meta['input_size'] = int(meta['input_size'])
  meta['keypoints'] = json.loads(meta['keypoints'])
  return meta


def prepare(img: Image.Image, meta: dict) -> tuple[np.ndarray, dict]:
  """RGB photo -> (network input float32 (S, S, 3), what `to_pixels` needs to map outputs back)."""
  size = meta['input_size']
  width, height = img.size
  if meta['preprocessing'] == 'kpjax':  # letterbox into S x S, then ImageNet mean/std
    scale = size / max(width, height)
    pad = np.array([size - scale * width, size - scale * height]) / 2
    factor = max(1, min(int(1 / scale), width, height))  # shrinking 2x or more: box-filter by the whole factor
    a = 1 / (scale * factor)
    whole = (0, 0, width - width % factor, height - height % factor)  # whole factor x factor boxes only
    boxed = (img.reduce(factor, box=whole) if factor > 1 else img).transform(
        (size, size), Image.Transform.AFFINE, (a, 0, -pad[0] * a, 0, a, -pad[1] * a),
        resample=Image.Resampling.BILINEAR, fillcolor=FILL)
    x = (np.asarray(boxed, np.float32) - MEAN) / STD
    return x.astype(np.float32), {'scale': scale, 'pad': pad}
  from skimage.transform import resize  # 'kpdem': the original script's resize, then / 255 once more
  x = resize(np.asarray(img), (size, size)) / 255
  return x.astype(np.float32), {}


def _cell_centre(k: np.ndarray, extent: int, cells: int) -> np.ndarray:
  """The middle of the integer pixels x of an `extent`-pixel side with floor(x * cells / extent) = k."""
  return (-(-k * extent // cells) - (-(k + 1) * extent // cells) - 1) / 2


def to_pixels(coords: np.ndarray, meta: dict, image_size: tuple[int, int], context: dict) -> np.ndarray:
  """The network's `coords` (L, 2) -> the photo's pixels (L, 2) (x, y), kept inside the photo."""
  size = meta['input_size']
  width, height = image_size
  c = np.asarray(coords, np.float64)
  if meta['preprocessing'] == 'kpjax':  # dsntnn's [-1, 1] -> input pixels -> the inverse letterbox
    xy = (((c + 1) * size - 1) / 2 + 0.5 - context['pad']) / context['scale'] - 0.5
  elif meta['kpdem_targets'] == 'exact':  # fractions of the photo
    xy = c * [width, height]
  else:  # 'truncated' (released models): the centre of the original's target cell, interpolated between cells
    cells = int(meta.get('checkpoint_input_size', size))  # the grid the model was trained on
    k = np.floor(c * cells).astype(np.int64)
    t = c * cells - k
    xy = np.stack([(1 - t[:, i]) * _cell_centre(k[:, i], n, cells) + t[:, i] * _cell_centre(k[:, i] + 1, n, cells)
                   for i, n in enumerate((width, height))], axis=-1)
  return np.clip(xy, 0, [width - 1, height - 1])


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print('usage: python examples/onnxruntime_predict.py MODEL.onnx IMAGE', file=sys.stderr)
    return 2
  session = ort.InferenceSession(argv[0], providers=['CPUExecutionProvider'])
  meta = read_metadata(session)
  img = Image.open(argv[1]).convert('RGB')
  x, context = prepare(img, meta)
  coords, _ = session.run(None, {'images': x[None]})  # also `heatmaps`: (1, L, S, S), each summing to 1
  for name, (u, v) in zip(meta['keypoints'], to_pixels(coords[0], meta, img.size, context)):
    print(f'{name} {u:.3f} {v:.3f}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
