"""torch's MaxPool2d(2, 2) + MaxUnpool2d(2, 2) pair, which KPDEM applies after each of its first three blocks.

The pair keeps full resolution: each 2x2 window's first maximum stays where it is and the other three become 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pool_unpool(x: jax.Array) -> jax.Array:
  """torch's MaxUnpool2d(2, 2)(*MaxPool2d(2, 2, return_indices=True)(x)) on NHWC input.

  Keeps the first maximum (row-major) of every 2x2 window where it is and zeroes the other three,
  exactly as torch does, ties included; the gradient flows to the kept element only.

  Args:
    x: (B, H, W, C) with H and W even (the pair cannot round-trip odd sizes).

  Returns:
    (B, H, W, C), same dtype.
  """
  if x.ndim != 4:
    raise ValueError(f'pool_unpool expects NHWC input (B, H, W, C); got shape {x.shape}')
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f'pool_unpool needs even H and W (2x2 windows, stride 2); got H={h}, W={w}')
  win = x.reshape(b, h // 2, 2, w // 2, 2, c)
  tl, tr = win[:, :, 0, :, 0], win[:, :, 0, :, 1]
  bl, br = win[:, :, 1, :, 0], win[:, :, 1, :, 1]
  m = jnp.maximum(jnp.maximum(tl, tr), jnp.maximum(bl, br))
  keep_tl = tl == m
  keep_tr = (tr == m) & ~keep_tl
  keep_bl = (bl == m) & ~(keep_tl | keep_tr)
  keep_br = ~(keep_tl | keep_tr | keep_bl)
  keep = jnp.stack([jnp.stack([keep_tl, keep_tr], 3), jnp.stack([keep_bl, keep_br], 3)], 2)
  return jnp.where(keep.reshape(x.shape), x, jnp.zeros((), x.dtype))
