"""torch's MaxPool2d(2, 2) + MaxUnpool2d(2, 2) pair, which KPDEM applies after each of its first three blocks.

The pair keeps full resolution: each 2x2 window's maximum stays where it is and the other three become 0.
Two forms, equal bit for bit, values and gradients (one exception: where the cotangent is -0 at a kept
element, the scatter form's gradient is +0, as torch's is, and the fused form's -0; equal as numbers):

* `pool_unpool(x)`, the fused default ('mask'): one elementwise pass that keeps the chosen element of every
  window where it is;
* `max_unpool_2x2(*max_pool_2x2(x), (H, W))` ('scatter'): the pool's values and torch's flat indices, then a
  scatter of the values to those indices (torch's own pair, for code that wants the indices).

Which element a window keeps is torch's CPU kernel's choice (aten/src/ATen/native/cpu/MaxPoolKernel.cpp,
checked against torch 2.13 for contiguous and channels-last float32 and bfloat16): a row-major scan
(top-left, top-right, bottom-left, bottom-right) that moves on when an element is larger than the one
held or is NaN. So a window keeps its FIRST maximum (whole windows of equal values keep the top-left;
+0 and -0 are equal, the first is kept with its sign; a window of -inf keeps the top-left), and a window
holding a NaN keeps its LAST NaN, which then propagates as in torch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

UNPOOLS = ('mask', 'scatter')  # config.model.unpool: how the network runs each pool + unpool pair


def _check_nhwc_even(x: jax.Array, name: str) -> None:
  if x.ndim != 4:
    raise ValueError(f'{name} expects NHWC input (B, H, W, C); got shape {x.shape}')
  if x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f'{name} needs even H and W (2x2 windows, stride 2); got H={x.shape[1]}, W={x.shape[2]}')


def _window_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(values, which), each (B, H/2, W/2, C): every 2x2 window's kept element and its position in the
  window (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right, int32), chosen as torch's CPU kernel
  does (see the module docstring). values are the kept elements themselves, sign of zero included."""
  b, h, w, c = x.shape
  win = x.reshape(b, h // 2, 2, w // 2, 2, c)
  best, which = win[:, :, 0, :, 0], jnp.zeros((b, h // 2, w // 2, c), jnp.int32)
  for position, v in ((1, win[:, :, 0, :, 1]), (2, win[:, :, 1, :, 0]), (3, win[:, :, 1, :, 1])):
    take = (v > best) | jnp.isnan(v)
    best = jnp.where(take, v, best)
    which = jnp.where(take, jnp.int32(position), which)
  return best, which


def pool_unpool(x: jax.Array) -> jax.Array:
  """torch's MaxUnpool2d(2, 2)(*MaxPool2d(2, 2, return_indices=True)(x)) on NHWC input, fused.

  Keeps the first maximum (row-major; the last NaN where a window has any) of every 2x2 window where it
  is and zeroes the other three, exactly as torch does, ties included; the gradient flows to the kept
  element only.

  Args:
    x: (B, H, W, C) with H and W even (the pair cannot round-trip odd sizes).

  Returns:
    (B, H, W, C), same dtype.
  """
  _check_nhwc_even(x, 'pool_unpool')
  _, which = _window_max(x)
  keep = jnp.stack([jnp.stack([which == 0, which == 1], 3), jnp.stack([which == 2, which == 3], 3)], 2)
  return jnp.where(keep.reshape(x.shape), x, jnp.zeros((), x.dtype))


def max_pool_2x2(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """torch's MaxPool2d(2, 2, return_indices=True) on NHWC input.

  Args:
    x: (B, H, W, C) with H and W even.

  Returns:
    values: (B, H/2, W/2, C), x's dtype: each window's kept element (its first maximum, row-major; its
      last NaN where it has any), as torch.
    indices: (B, H/2, W/2, C) int32, torch's convention: per image and channel, the flat index h * W + w
      into the H x W input plane of the kept element.
  """
  _check_nhwc_even(x, 'max_pool_2x2')
  values, which = _window_max(x)
  _, hp, wp, _ = values.shape
  rows = 2 * lax.broadcasted_iota(jnp.int32, values.shape, 1) + which // 2
  cols = 2 * lax.broadcasted_iota(jnp.int32, values.shape, 2) + which % 2
  return values, rows * (2 * wp) + cols


# Scatter one value per (image, pooled position, channel) into the H*W plane of its image and channel:
# operand (B, H*W, C), indices (B, n, C, 1), updates (B, n, C); image and channel are batching dimensions.
_UNPOOL_SCATTER = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(1,),
                                              scatter_dims_to_operand_dims=(1,), operand_batching_dims=(0, 2),
                                              scatter_indices_batching_dims=(0, 2))


def max_unpool_2x2(values: jax.Array, indices: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """torch's MaxUnpool2d(2, 2)(values, indices, output_size) on NHWC input, written as a scatter.

  Every value goes to the flat index h * W + w of its image's and channel's H x W plane; everything else
  is 0. The gradient with respect to `values` is the output's gradient gathered back at `indices`.

  Args:
    values: (B, h, w, C), e.g. max_pool_2x2's.
    indices: (B, h, w, C) integers, flat indices into each H x W plane (torch's convention), distinct
      within a plane, as any 2x2 max-pool's are (repeated indices leave it undefined which value lands,
      as in torch). Indices outside [0, H * W) are dropped (torch raises an error for them).
    output_size: (H, W), each within 1 of twice the pooled size, as torch's MaxUnpool2d(2, 2) accepts
      (2h - 1, 2h or 2h + 1: an odd input floor-pools to the same h).

  Returns:
    (B, H, W, C), values' dtype.
  """
  if values.ndim != 4:
    raise ValueError(f'max_unpool_2x2 expects NHWC values (B, h, w, C); got shape {values.shape}')
  if indices.shape != values.shape or not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f'max_unpool_2x2 needs integer indices of the values\' shape {values.shape}; '
                     f'got {indices.dtype} {indices.shape}')
  b, hp, wp, c = values.shape
  if len(output_size) != 2:
    raise ValueError(f'max_unpool_2x2 output_size must be (H, W); got {output_size!r}')
  height, width = (int(s) for s in output_size)
  if abs(height - 2 * hp) > 1 or abs(width - 2 * wp) > 1:
    raise ValueError(f'max_unpool_2x2 output_size must be within 1 of twice the pooled size {hp}x{wp} '
                     f'(2x2 windows, stride 2); got {height}x{width}')
  out = lax.scatter(jnp.zeros((b, height * width, c), values.dtype),
                    indices.astype(jnp.int32).reshape(b, hp * wp, c, 1), values.reshape(b, hp * wp, c),
                    _UNPOOL_SCATTER, unique_indices=True, mode=lax.GatherScatterMode.FILL_OR_DROP)
  return out.reshape(b, height, width, c)


def pool_unpool_scatter(x: jax.Array) -> jax.Array:
  """pool_unpool(x) as max_unpool_2x2(*max_pool_2x2(x), (H, W)): the same bits, by a scatter."""
  _check_nhwc_even(x, 'pool_unpool_scatter')
  return max_unpool_2x2(*max_pool_2x2(x), x.shape[1:3])


def pool_unpool_fn(unpool: str) -> Callable[[jax.Array], jax.Array]:
  """The pool + unpool pair of config.model.unpool: 'mask' (pool_unpool) or 'scatter' (pool_unpool_scatter)."""
  if unpool not in UNPOOLS:
    raise ValueError(f'unpool must be one of {UNPOOLS}; got {unpool!r}')
  return pool_unpool if unpool == 'mask' else pool_unpool_scatter
