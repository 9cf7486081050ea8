"""Max-pool decisions at ties, kpjax against the PyTorch original (convert/torch_model.py): not a test file.

KPDEM's first 2x2 max-pool (after conv1_2) keeps the first largest element of each window (row-major)
and the unpool zeroes the other three. On flat image regions (plain fabric, studio backgrounds,
saturated areas) whole windows tie exactly, so which element survives depends on the last bits of the
two convolutions before it, and a network whose output depends on the image can move by many pixels.
These helpers draw such images, build such a network, and report for kpjax (any conv_algorithm) and
torch (oneDNN on or off, float32 or float64) the kept element of every first-pool window and the
coordinates. Used by tests/test_pool_ties.py and benchmarks/pool_ties.py.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import torch

from kpjax.data import kpdem
from kpjax.model import network as model_lib
from kpjax.data import synthetic
import torch_reference as tr

CATEGORIES = ('trousers', 'skirt', 'blouse', 'dress', 'outwear')


def flat_region_images(n: int, seed: int = 0, side: int = 512, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Plain synthetic garments and the original's network inputs for them.

  Each image is one garment of one colour on a one-colour background (kpjax.data.synthetic.render with
  clutter=False: no texture, no noise); every other one also has its top quarter saturated (255) and a
  constant grey square. Returns (uint8 (n, side, side, 3), float32 (n, size, size, 3) 'kpdem' inputs:
  skimage's resize, / 255 twice).
  """
  rng = np.random.default_rng(seed)
  originals = []
  for i in range(n):
    image = synthetic.render(CATEGORIES[i % len(CATEGORIES)], rng, side, side, clutter=False).image.copy()
    if i % 2 == 0:
      image[:side // 4] = 255
      image[side // 2:side // 2 + side // 8, side // 8:side // 4] = 128
    originals.append(image)
  inputs = np.stack([kpdem.prepare_image(image, size)[0] for image in originals])
  return np.stack(originals), inputs


def image_dependent_torch_model(n_locations: int, width: float, num_stages: int, seed: int = 0,
                                first_gain: float = 255.0, hm_gain: float = 10.0):
  """torch_reference.make_torch_model (He init) with conv1_1's weights times `first_gain`.

  The 'kpdem' input lies in [0, 1/255]: with plain He weights the biases swamp it and every image gets
  almost the same coordinates. 255 restores a unit-range signal; hm_gain 10 peaks the heatmaps, so the
  coordinates follow the image (tens of pixels apart between the images above).
  """
  model = tr.make_torch_model(n_locations, width=width, num_stages=num_stages, seed=seed, init='he',
                              hm_gain=hm_gain)
  with torch.no_grad():
    model.fcn.model1_0_0.conv1_1.weight.mul_(first_gain)
  return model


def kept_element(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(B, H, W, C) -> (index in 0..3 of each 2x2 window's first maximum in row-major order, the maximum),
  both (B, H/2, W/2, C): torch's MaxPool2d(2, 2) rule, written independently with numpy's argmax."""
  b, h, w, c = x.shape
  windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
  return windows.argmax(-1), windows.max(-1)


def torch_first_pool(model, images: np.ndarray, dtype=torch.float32, onednn: bool = True):
  """torch's (coords (B, L, 2), first pooled block's output (B, H, W, C)) in float64, computed in `dtype`
  with oneDNN's convolutions (torch's CPU default) or without them (torch's own im2col + GEMM)."""
  model = copy.deepcopy(model).to(dtype)
  captured = {}
  hook = model.fcn.model1_0_0.register_forward_hook(lambda m, i, out: captured.update(out=out.detach().clone()))
  previous = torch.backends.mkldnn.enabled
  torch.backends.mkldnn.enabled = onednn
  try:
    with torch.no_grad():
      coords, _ = model(tr.nhwc_to_torch(images).to(dtype))
  finally:
    torch.backends.mkldnn.enabled = previous
    hook.remove()
  return coords.double().numpy(), captured['out'].double().permute(0, 2, 3, 1).numpy()


def kpjax_first_pool(variables, images: np.ndarray, n_locations: int, width: float, num_stages: int,
                     conv_algorithm: str):
  """kpjax's (coords (B, L, 2), model1_0_0's output (B, H, W, C)) in float64, computed in float32."""
  net = model_lib.CoordRegressionNetwork(n_locations, width=width, num_stages=num_stages,
                                         conv_algorithm=conv_algorithm)

  @jax.jit
  def run(v, x):
    return net.apply(v, x, capture_intermediates=lambda module, _: module.name == 'model1_0_0')

  (coords, _), state = run(variables, jnp.asarray(images))
  block = state['intermediates']['fcn']['model1_0_0']['__call__'][0]
  return np.asarray(coords, np.float64), np.asarray(block, np.float64)


def compare(reference, other, side: int) -> dict:
  """How far `other` is from `reference`, both (coords, first block output) pairs.

  windows: first-pool windows (all channels) whose maximum is positive in the reference and whose kept
  element differs (all-zero windows keep the first element everywhere); of: how many such windows;
  px_max, px_mean: coordinate distances in pixels of a side x side original (a coordinate c means
  pixel c * side in the original's convention).
  """
  ref_idx, ref_max = kept_element(reference[1])
  idx, _ = kept_element(other[1])
  live = ref_max > 0
  px = np.linalg.norm((other[0] - reference[0]) * side, axis=-1)
  return {'windows': int(((idx != ref_idx) & live).sum()), 'of': int(live.sum()),
          'px_max': float(px.max()), 'px_mean': float(px.mean())}


def tied_windows(block: np.ndarray) -> int:
  """Windows whose positive maximum is shared by two or more of their elements (exact ties)."""
  b, h, w, c = block.shape
  windows = np.sort(block.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4), -1)
  return int(((windows[:, 3] == windows[:, 2]) & (windows[:, 3] > 0)).sum())
