"""KPDEM's training loss: Euclidean coordinate error plus a Jensen-Shannon heatmap regulariser."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kpjax.model import dsnt


def keypoint_loss(coords: jax.Array, heatmaps: jax.Array, target: jax.Array, mask: jax.Array | None = None,
                  sigma_t: float = 1.0, js_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """average_loss(euclidean_losses + js_weight * js_reg_losses(sigma_t), mask), as dsntnn's recipe.

  Args:
    coords: (B, L, 2) predicted normalised (x, y).
    heatmaps: (B, L, H, W) predicted distributions.
    target: (B, L, 2) normalised (x, y); entries under mask 0 may hold anything finite or not.
    mask: (B, L), 1 for annotated keypoints (FashionAI visibility 0 or 1), 0 for absent ones
      (-1); None counts every keypoint (the original's unmasked loss).
    sigma_t: std of the regulariser's target Gaussian, in heatmap pixels.
    js_weight: weight of the regulariser (1 in KPDEM).

  Returns:
    (loss scalar, {'euclidean', 'js'}: the two terms' masked means), float32.
  """
  coords = coords.astype(jnp.float32)
  heatmaps = heatmaps.astype(jnp.float32)
  if mask is not None:
    mask = mask.astype(jnp.float32)
    # Absent keypoints carry placeholder targets; keep them finite so no NaN leaks through 0 * NaN.
    target = jnp.where(mask[..., None] > 0, target, 0.0)
  euclidean = dsnt.euclidean_losses(coords, target)
  js = dsnt.js_reg_losses(heatmaps, target, sigma_t)
  loss = dsnt.average_loss(euclidean + js_weight * js, mask)
  return loss, {'euclidean': dsnt.average_loss(euclidean, mask), 'js': dsnt.average_loss(js, mask)}
