"""Per-keypoint confidence from a DSNT heatmap: how much of its probability lies near its own mean.

KPDEM's heatmaps are flat softmaxes (each map sums to 1) trained towards a Gaussian of std `sigma_t`
input pixels (kpjax's default and the original's: 1) around the target. A confident map puts nearly
all its mass within a few pixels of its expectation; an unsure one (an occluded, cropped-off or
ambiguous keypoint) spreads it out or splits it between candidates, and the expectation then lies
between them, where there is little mass. So

    confidence = sum of the heatmap over the pixels within `radius` input pixels of its mean,

in [0, 1]: about 0.99 for the trained target shape at the default radius (3 sigma_t of a 2-D Gaussian
of std 1 px: 1 - exp(-9/2)), near 0 for a map spread over the image. The mean is the map's own DSNT
expectation, so the measure does not depend on the model's input/output convention (converted 'kpdem'
models read their outputs in another unit, but their maps are heatmaps all the same).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kpjax.model import dsnt

DEFAULT_RADIUS = 3.0  # input pixels: 3 sigma_t of the training target at sigma_t = 1


def keypoint_confidence(heatmaps: jax.Array, radius: float = DEFAULT_RADIUS) -> jax.Array:
  """Mass of each heatmap within `radius` pixels of its expectation.

  Args:
    heatmaps: (B, L, H, W), each (H, W) map a distribution (sums to 1), as the network returns them.
    radius: in input pixels (heatmaps are at the input's resolution).

  Returns:
    (B, L) float32 in [0, 1].
  """
  if heatmaps.ndim != 4:
    raise ValueError(f'heatmaps must be (B, L, H, W); got shape {heatmaps.shape}')
  heatmaps = heatmaps.astype(jnp.float32)
  h, w = heatmaps.shape[2:]
  centre = dsnt.normalized_to_pixel_coordinates(dsnt.dsnt(heatmaps), (h, w))  # (B, L, 2) pixel (x, y)
  dx = jnp.arange(w, dtype=jnp.float32) - centre[..., 0:1]  # (B, L, W)
  dy = jnp.arange(h, dtype=jnp.float32) - centre[..., 1:2]  # (B, L, H)
  near = (dy[..., :, None] ** 2 + dx[..., None, :] ** 2) <= radius ** 2  # (B, L, H, W)
  return jnp.clip(jnp.sum(jnp.where(near, heatmaps, 0.0), axis=(-2, -1)), 0.0, 1.0)
