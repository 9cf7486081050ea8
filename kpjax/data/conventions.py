"""A model's input/output convention: how images become its input and its outputs become pixels.

A convention is more than preprocessing: it also reads the network's outputs back into image pixels,
decides whether training may augment, and which convolutions reproduce such models best. A model has
one, named by `preprocessing` in configs and checkpoint metadata (the field's name since the first
release):

  'kpjax' (models trained here): letterbox (aspect kept, centred, padded with the mean colour),
          ImageNet mean/std; coordinates are dsntnn's normalised [-1, 1] over the input square.
  'kpdem' (converted released checkpoints): the original KPDEM code's conventions (kpjax.data.kpdem):
          skimage's resize to a square, /255 twice; coordinates are input pixel / size in [0, 1].

Everything that depends on the convention (preparing an image, model coordinates <-> input pixels <->
original pixels, which input pixels lie on the input, undoing a horizontal flip, whether training may
augment, which convolutions reproduce the model best, an example input for checks) is a method of its
object, so callers hold an `IOConvention` and never compare names. Pixel conventions are
kpjax.data.geometry's: integer coordinates are pixel centres, an affine maps original pixel (x, y) to
input pixel (x, y).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import numpy as np

from kpjax.data import geometry
from kpjax.data import kpdem


@dataclasses.dataclass(frozen=True)
class IOConvention:
  """How images are fed to a model and its outputs read back. Picklable (grain workers get a copy)."""
  name: ClassVar[str]
  description: ClassVar[str]  # one sentence for exported models' metadata and the docs
  supports_augmentation: ClassVar[bool]
  conv_algorithm: ClassVar[str]  # the network's conv_algorithm that reproduces such models best by default

  def prepare(self, image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) -> (float32 (size, size, 3) network input, float64 (2, 3) affine original -> input px)."""
    raise NotImplementedError

  def coords_to_input_pixels(self, coords, size: int) -> np.ndarray:
    """Model coordinates (..., L, 2) (x, y) -> input pixels (..., L, 2), float64."""
    raise NotImplementedError

  def input_pixels_to_coords(self, pixels, size: int) -> np.ndarray:
    """Input pixels (..., L, 2) -> model coordinates: the training targets' convention, float64."""
    raise NotImplementedError

  def inside(self, pixels, size: int) -> np.ndarray:
    """bool (..., L): whether input pixels (..., L, 2) lie on the size x size input, as this convention's
    pixels measure it (a training target is kept only there; NaN is outside)."""
    raise NotImplementedError

  def flipped_to_original(self, coords, affine, size: int) -> np.ndarray:
    """Outputs (..., L, 2) for the horizontally flipped input (left/right keypoints already swapped
    back) -> pixels of the unflipped original image, float64."""
    raise NotImplementedError

  def example_input(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A random float32 batch (B, S, S, 3) in the value range this convention's inputs have (for checks)."""
    raise NotImplementedError

  def other_input_size_problem(self, trained_size: int, size: int) -> str | None:
    """Why a model trained on trained_size x trained_size inputs cannot be run (and its outputs read as
    this convention says) at another `size`; None when it can."""
    del trained_size, size
    return None

  def coords_to_original(self, coords, affine, size: int) -> np.ndarray:
    """Model coordinates (..., L, 2) -> original-image pixels through the inverse of `affine` (..., 2, 3)."""
    pixels = self.coords_to_input_pixels(coords, size)
    return geometry.apply_affine(pixels, geometry.invert_affine(affine))

  def metadata(self) -> dict[str, Any]:
    """The checkpoint metadata entries that recreate this object (`from_metadata`)."""
    return {'preprocessing': self.name}


@dataclasses.dataclass(frozen=True)
class KpjaxConvention(IOConvention):
  """Letterbox + ImageNet mean/std; dsntnn's [-1, 1] coordinates. Models trained in kpjax."""
  name: ClassVar[str] = 'kpjax'
  description: ClassVar[str] = (
      'RGB image letterboxed into SxS (scaled to fit with its aspect kept, centred, bilinear, padded with the '
      'ImageNet mean colour), then (pixel - 255 * [0.485, 0.456, 0.406]) / (255 * [0.229, 0.224, 0.225]); '
      "coords are dsntnn's normalised (x, y) in [-1, 1]: input pixel = ((c + 1) * S - 1) / 2, then the inverse "
      'of the letterbox affine gives original pixels')
  supports_augmentation: ClassVar[bool] = True
  conv_algorithm: ClassVar[str] = 'auto'

  def prepare(self, image, size):
    image = _check_image(image)
    size = geometry.check_input_size(size)
    affine = geometry.letterbox_affine(image.shape[0], image.shape[1], size)
    return geometry.normalize_image(geometry.warp_image(image, affine, size)), affine

  def coords_to_input_pixels(self, coords, size):
    return 0.5 * ((np.asarray(coords, np.float64) + 1) * size - 1)  # dsntnn.normalized_to_pixel_coordinates

  def input_pixels_to_coords(self, pixels, size):
    return (2 * np.asarray(pixels, np.float64) + 1) / size - 1  # dsntnn.pixel_to_normalized_coordinates

  def inside(self, pixels, size):
    # Integer coordinates are pixel centres: the square spans [-0.5, S - 0.5] (coords [-1, 1]).
    pixels = np.asarray(pixels, np.float64)
    return np.all((pixels >= -0.5) & (pixels <= size - 0.5), axis=-1)

  def flipped_to_original(self, coords, affine, size):
    # Flipping the input maps input column q to S - 1 - q, i.e. normalised x to -x; the image's own
    # affine then gives original pixels.
    return self.coords_to_original(np.asarray(coords, np.float64) * np.array([-1.0, 1.0]), affine, size)

  def example_input(self, rng, shape):
    return ((rng.random(shape, dtype=np.float32) - 0.5) / 0.25).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class KpdemConvention(IOConvention):
  """The original's resize to a square and [0, 1] coordinates (kpjax.data.kpdem). Converted models.

  targets: what the model was trained on (kpjax.data.kpdem.TARGETS): 'truncated', the original dataset
  code's floor(x * S / W) / S (the released models; outputs are read as the centre of their cell), or
  'exact', x / W. Training in this mode makes the targets it names.
  """
  name: ClassVar[str] = 'kpdem'
  description: ClassVar[str] = (
      'RGB image resized to SxS as skimage.transform.resize does (bilinear, anti-aliased, values in [0, 1]), '
      'then divided by 255 once more (the original KPDEM script); coords are (x, y) in [0, 1] of the image, '
      'read as original pixels by kpjax.data.kpdem.coords_to_original (kpdem_targets exact: (c_x * W, c_y * H); '
      'truncated: the centre of the original\'s 1/S-wide target cell, about ((S c_x + 1/2) W / S - 1/2, '
      '(S c_y + 1/2) H / S - 1/2))')
  supports_augmentation: ClassVar[bool] = False  # the non-aspect-preserving resize has no augmented twin here
  # 'direct' convolutions (XLA's, computed as PyTorch's are) in every block. Before the max-pools: the
  # pools keep the first largest element of each window, on flat image regions whole windows tie
  # exactly, and Winograd's position-dependent rounding breaks such ties differently from PyTorch.
  # Measured (benchmarks/pool_ties.py, the full network on 6 plain synthetic garments, 197,172 live
  # first-pool windows, 57% exact ties) against torch float32: Winograd ('auto' on a CPU) keeps another
  # element in 67,905 windows (coordinates up to 139 px of 512 away), 'direct' before the pools in 1,346
  # (67 px), torch against itself without oneDNN in 1,427 (104 px), in float64 in 1,821 (84 px). After
  # the last pool too: Winograd's ~1e-6 relative rounding there is continuous but amplified by the
  # stages; on real photos a converted model whose output follows the image put keypoints ~130 px (of
  # 512) from the torch original with 'direct-pooled' (Winograd after the last pool), ~24 px with
  # 'direct', where torch against itself (its own convolution instead of oneDNN) moves them ~11 px.
  conv_algorithm: ClassVar[str] = 'direct'
  targets: str = kpdem.CONVERTED_TARGETS

  def __post_init__(self):
    kpdem.check_targets(self.targets)

  def prepare(self, image, size):
    return kpdem.prepare_image(_check_image(image), geometry.check_input_size(size))

  def coords_to_input_pixels(self, coords, size):
    """The 'exact' reading, c * size (the 'truncated' one depends on the original's size: coords_to_original)."""
    return kpdem.coords_to_input_pixels(coords, size)

  def input_pixels_to_coords(self, pixels, size):
    pixels = np.asarray(pixels, np.float64)
    return kpdem.input_pixels_to_coords(kpdem.truncate_pixels(pixels) if self.targets == 'truncated' else pixels,
                                        size)

  def inside(self, pixels, size):
    return kpdem.inside_input(pixels, size)  # [0, S]: the corner-aligned image of the annotations' [0, W]

  def other_input_size_problem(self, trained_size, size):
    if self.targets != 'truncated' or size == trained_size:
      return None
    return (f"its outputs are cells of the {trained_size}-pixel grid its 'truncated' targets were made on "
            f'(floor(x * {trained_size} / W) / {trained_size}), which only its own input size '
            f'{trained_size} reads back; at {size} they would be read on a {size}-pixel grid')

  def coords_to_original(self, coords, affine, size):
    affine = np.asarray(affine, np.float64)
    coords = np.asarray(coords, np.float64)
    if affine.ndim == 2:
      height, width = kpdem.original_size(affine, size)
      return kpdem.coords_to_original(coords, height, width, size, self.targets)
    return np.stack([self.coords_to_original(c, a, size) for c, a in zip(coords, affine)])

  def flipped_to_original(self, coords, affine, size):
    # The original's resize commutes with flips, so the flipped input is the resized flipped
    # original: its outputs map (same affine) to the flipped original's pixels x', and x = W - 1 - x'
    # (mirroring the input pixels instead would be off by W / S - 1 original pixels).
    affine = np.asarray(affine, np.float64)
    flipped = self.coords_to_original(coords, affine, size)
    width = np.round(size / affine[..., 0, 0])
    return np.stack([np.asarray(width)[..., None] - 1 - flipped[..., 0], flipped[..., 1]], axis=-1)

  def example_input(self, rng, shape):
    return rng.random(shape, dtype=np.float32) / np.float32(255.0)

  def metadata(self):
    return {'preprocessing': self.name, kpdem.TARGETS_METADATA_KEY: self.targets}


CONVENTIONS: dict[str, type[IOConvention]] = {c.name: c for c in (KpjaxConvention, KpdemConvention)}
NAMES = tuple(CONVENTIONS)


def get(name: str, kpdem_targets: str = kpdem.CONVERTED_TARGETS) -> IOConvention:
  """The convention called `name` ('kpjax' or 'kpdem', whose targets are `kpdem_targets`); ValueError
  naming the choices otherwise."""
  if name not in CONVENTIONS:
    raise ValueError(f'unknown preprocessing {name!r}; expected one of {", ".join(NAMES)}')
  return KpdemConvention(targets=kpdem_targets) if name == KpdemConvention.name else CONVENTIONS[name]()


def from_metadata(metadata: Mapping[str, Any]) -> IOConvention:
  """The convention a checkpoint's metadata records (a 'kpdem' model's targets: kpdem.targets_from_metadata)."""
  if metadata['preprocessing'] != KpdemConvention.name:
    return get(metadata['preprocessing'])
  return KpdemConvention(targets=kpdem.targets_from_metadata(metadata))


def _check_image(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an RGB image (H, W, 3); got shape {image.shape}')
  return image
