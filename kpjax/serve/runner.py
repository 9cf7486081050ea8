"""The model behind kpjax.serve: loaded and run exactly as kpjax.predict runs it, in fixed batch shapes
compiled at start-up.

`ModelRunner.prepare` (decode threads) turns an upload into the model's input with the one image decoder
(kpjax.data.images) and the model's own convention (letterbox or KPDEM resize); `run` (the batcher's
thread) pads a batch to the smallest compiled size that holds it, splits it over every local device as
kpjax.predict does (kpjax.inference.devices), and maps the outputs back to each image's pixels with
kpjax.inference.predictor.to_original. Every (flip, batch size) pair is compiled ahead of time by
`compile`, so nothing compiles while serving: a compiled executable refuses any other shape.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import jax
import numpy as np

from kpjax.data import images
from kpjax.data import keypoint_sets
from kpjax.inference import checkpoints
from kpjax.inference import devices
from kpjax.inference import predictor


@dataclasses.dataclass(frozen=True)
class Prepared:
  """One decoded upload, ready for the model: input (S, S, 3) float32, affine (2, 3) original -> input
  pixels, and the upright image's size."""
  input: np.ndarray
  affine: np.ndarray
  height: int
  width: int


@dataclasses.dataclass(frozen=True)
class Output:
  """The model's answer for one image: coords (L, 2) original-image pixels (float64), confidence (L,)
  in [0, 1], for the model's own keypoints (spec.keypoint_set.keypoint_names(model category))."""
  coords: np.ndarray
  confidence: np.ndarray


def batch_sizes(max_batch: int, num_devices: int) -> tuple[int, ...]:
  """The batch shapes to compile: powers of two up to `max_batch`, and `max_batch`, each rounded up to a
  multiple of the device count (every device takes whole rows)."""
  if max_batch < 1:
    raise ValueError(f'the largest batch must be at least 1; got {max_batch}')
  sizes = {max_batch} | {2 ** k for k in range(max_batch.bit_length()) if 2 ** k <= max_batch}
  return tuple(sorted({-(-s // num_devices) * num_devices for s in sizes}))


def model_name(checkpoint: str, step: int | None = None) -> str:
  """A short name for answers and logs: the model directory's name, or `<workdir>@<step>`."""
  where = checkpoints.locate(checkpoint, step)
  if where.kind == 'model':
    return os.path.basename(where.directory)
  base = os.path.basename(where.workdir or os.path.dirname(where.directory))
  return f'{base}@{where.step}' if where.step is not None else base


class ModelRunner:
  """A loaded model with its compiled batched forward passes (module docstring).

  Attributes:
    name: model_name; category: the model's ('all' for one model over its keypoint set); categories: what a
      request may ask for (every category of the set for 'all', else the model's own); spec, metadata: the
      checkpoint's (spec.keypoint_set: what its outputs are);
      batch_sizes: the compiled batch shapes; mesh: the devices.
  """

  def __init__(self, checkpoint: str, *, step: int | None = None, max_batch: int = 16):
    model, variables, self.spec, self.metadata = predictor.load_predictor(checkpoint, step=step)
    self.name = model_name(checkpoint, step)
    self.checkpoint = checkpoint
    self.category = self.spec.category
    kset = self.spec.keypoint_set
    self.categories = kset.category_names if self.category == keypoint_sets.ALL else (self.category,)
    self.mesh = devices.make_mesh()
    self.batch_sizes = batch_sizes(max_batch, len(self.mesh.local_devices))
    self._variables = devices.replicate(variables, self.mesh)
    self._functions = {flip: predictor.make_predict_fn(model, flip=flip, category=self.category, mesh=self.mesh,
                                                       keypoint_set=kset, confidence=True) for flip in (False, True)}
    self._compiled: dict[tuple[bool, int], object] = {}

  def compile(self) -> float:
    """Compiles the forward pass for every (flip, batch size) and runs each once (the first run of an
    executable pays for its buffers; a user's first photo should not); returns the seconds it took."""
    start = time.perf_counter()
    size = self.spec.input_size
    sharding = devices.batch_sharding(self.mesh)
    for flip, fn in self._functions.items():
      for b in self.batch_sizes:
        images_shape = jax.ShapeDtypeStruct((b, size, size, 3), np.float32, sharding=sharding)
        self._compiled[flip, b] = fn.lower(self._variables, images_shape).compile()
        zeros = devices.shard_batch({'x': np.zeros((b, size, size, 3), np.float32)}, self.mesh)['x']
        jax.block_until_ready(self._compiled[flip, b](self._variables, zeros))
    return time.perf_counter() - start

  def padded_size(self, n: int) -> int:
    """The compiled batch size a batch of `n` images runs in."""
    for b in self.batch_sizes:
      if b >= n:
        return b
    raise ValueError(f'a batch of {n} images is larger than the largest compiled batch ({self.batch_sizes[-1]})')

  def prepare(self, data: bytes, max_pixels: int | None = images.DEFAULT_MAX_PIXELS, name: str = 'upload') -> Prepared:
    """Upload bytes -> the model's input (kpjax.errors.ImageError, ImageTooLarge for bad ones)."""
    image = images.decode_image(data, name=name, max_pixels=max_pixels)
    model_input, affine = self.spec.convention.prepare(image, self.spec.input_size)
    return Prepared(model_input, affine, int(image.shape[0]), int(image.shape[1]))

  def run(self, flip: bool, batch: Sequence[Prepared]) -> list[Output]:
    """The model's outputs for 1..max(batch_sizes) prepared images, in original pixels."""
    if not self._compiled:
      raise RuntimeError('ModelRunner.compile() must run before run()')
    n = len(batch)
    padded = self.padded_size(n)
    size = self.spec.input_size
    inputs = np.zeros((padded, size, size, 3), np.float32)  # padding rows: zeros, ignored
    inputs[:n] = np.stack([p.input for p in batch])
    x = devices.shard_batch({'x': inputs}, self.mesh)['x']
    coords, confidence = self._compiled[bool(flip), padded](self._variables, x)
    coords = devices.local_rows(coords)[:n]
    confidence = devices.local_rows(confidence)[:n]
    original = predictor.to_original(coords, np.stack([p.affine for p in batch]), self.spec)
    return [Output(o, np.asarray(c, np.float64)) for o, c in zip(original, confidence)]
