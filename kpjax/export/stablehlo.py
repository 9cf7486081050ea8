"""KPDEM as a serialized `jax.export` artifact (StableHLO): runs without kpjax or Flax installed.

    exported = jax.export.deserialize(open('trousers.stablehlo', 'rb').read())
    coords, heatmaps = exported.call(images)   # images float32 (B, S, S, 3), on CPU or a CUDA GPU

The parameters are closed over by the exported function and so baked into the module as constants:
the file is self-contained and about as large as the float32 parameters (~148 MB for the full
network), and a caller cannot swap weights without exporting again.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

PLATFORMS = ('cpu', 'cuda')  # one module lowered for both; `call` picks the platform it runs on


def export_bytes(model, variables: Any, input_size: int, batch: int | None = None) -> bytes:
  """Serialized `jax.export.Exported` of `images -> model.apply(variables, images)`.

  Args:
    model: a CoordRegressionNetwork (use direct convolutions: they lower to one stablehlo.convolution
      each and let XLA pick its algorithm on whichever platform runs the artifact).
    variables: its variables (host arrays; baked in as constants).
    input_size: S, the square input side.
    batch: a fixed batch size, or None for a symbolic one ('batch').

  Returns:
    The bytes of `Exported.serialize()`: input float32 (B, S, S, 3) NHWC, outputs (coords (B, L, 2),
    heatmaps (B, L, S, S)) float32.
  """
  variables = jax.tree_util.tree_map(np.asarray, variables)
  b = export.symbolic_shape('batch')[0] if batch is None else int(batch)
  fn = jax.jit(lambda images: model.apply(variables, images))
  exported = export.export(fn, platforms=PLATFORMS)(
      jax.ShapeDtypeStruct((b, input_size, input_size, 3), jnp.float32))
  return bytes(exported.serialize())
