"""The dsntnn API (DSNT soft-argmax, its losses and regularisers) as pure JAX functions.

Names, signatures, layouts and numerics follow the dsntnn package (v0.5.3) so that code and
checkpoints move across unchanged:

* heatmaps are `(B, L, *spatial)`, usually `(B, L, H, W)`; each `(H, W)` map sums to 1;
* coordinates are `(B, L, D)` ordered (x, y, ...), i.e. the reverse of the spatial axes;
* normalised coordinates put the centre of pixel i of n at (2i + 1) / n - 1, so [-1, 1] spans the
  image edges, not the outer pixel centres.

All functions are jit- and grad-safe; `euclidean_losses` has a zero (not NaN) gradient where the
prediction equals the target, as torch.norm does.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_EPS = 1e-24  # dsntnn's epsilon inside logarithms and normalisers


def normalized_linspace(length: int, dtype=jnp.float32) -> jax.Array:
  """Pixel-centre coordinates of `length` cells in normalised units, (length,): -1 + 1/n ... 1 - 1/n."""
  first = -(length - 1.0) / length
  return jnp.arange(length, dtype=dtype) * (2.0 / length) + first


def _check_heatmaps(heatmaps: jax.Array, ndims: int | None = None) -> None:
  if heatmaps.ndim < 3:
    raise ValueError(f'heatmaps must be (B, L, *spatial) with at least one spatial axis; got shape {heatmaps.shape}')
  if ndims is not None and heatmaps.ndim != ndims + 2:
    raise ValueError(f'expected heatmaps to be a {ndims + 2}D tensor (B, L + {ndims} spatial axes); got shape {heatmaps.shape}')


def _check_same_shape(actual: jax.Array, target: jax.Array) -> None:
  if actual.shape != target.shape:
    raise ValueError(f'input tensors must have the same size: {actual.shape} vs {target.shape}')


def linear_expectation(probs: jax.Array, values: Sequence[jax.Array]) -> jax.Array:
  """E[values_i] along each spatial axis i of `probs` (B, L, *spatial) -> (B, L, ndims), axis order."""
  spatial = probs.ndim - 2
  if len(values) != spatial:
    raise ValueError(f'need one value vector per spatial axis ({spatial}); got {len(values)}')
  expectation = []
  for i in range(spatial):
    other_axes = tuple(2 + j for j in range(spatial) if j != i)
    marginal = probs.sum(axis=other_axes) if other_axes else probs  # (B, L, n_i)
    expectation.append((marginal * values[i]).sum(-1))
  return jnp.stack(expectation, -1)


def soft_argmax(heatmaps: jax.Array, normalized_coordinates: bool = True) -> jax.Array:
  """Expected location of each heatmap: (B, L, *spatial) -> coords (B, L, D) as (x, y, ...).

  Normalised units by default; pixel indices (0 .. n-1) with `normalized_coordinates=False`.
  """
  _check_heatmaps(heatmaps)
  sizes = heatmaps.shape[2:]
  if normalized_coordinates:
    values = [normalized_linspace(d, heatmaps.dtype) for d in sizes]
  else:
    values = [jnp.arange(d, dtype=heatmaps.dtype) for d in sizes]
  return linear_expectation(heatmaps, values)[..., ::-1]


def dsnt(heatmaps: jax.Array, **kwargs) -> jax.Array:
  """Differentiable spatial to numerical transform: `soft_argmax` under the paper's name."""
  return soft_argmax(heatmaps, **kwargs)


def flat_softmax(inp: jax.Array) -> jax.Array:
  """Softmax over all spatial cells of each (B, L) map together: (B, L, *spatial), same shape."""
  _check_heatmaps(inp)
  flat = inp.reshape(inp.shape[:2] + (-1,))
  return jax.nn.softmax(flat, axis=-1).reshape(inp.shape)


def _safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """L2 norm whose gradient at 0 is 0 (as torch.norm's), not NaN."""
  sq = jnp.sum(x * x, axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def euclidean_losses(actual: jax.Array, target: jax.Array) -> jax.Array:
  """Euclidean distance per point: (B, L, D), (B, L, D) -> (B, L)."""
  _check_same_shape(actual, target)
  return _safe_norm(actual - target, axis=-1)


def l1_losses(actual: jax.Array, target: jax.Array) -> jax.Array:
  """Mean absolute error over the D coordinates of each point: (B, L, D) -> (B, L)."""
  _check_same_shape(actual, target)
  diff = actual - target
  # |d| written as d * sign(d): the same value, and the gradient sign(d), 0 at an exact hit as in torch
  # (jnp.abs's gradient at 0 is 1).
  return (diff * jnp.sign(diff)).mean(-1)


def mse_losses(actual: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over the D coordinates of each point: (B, L, D) -> (B, L)."""
  _check_same_shape(actual, target)
  return jnp.square(actual - target).mean(-1)


def make_gauss(means: jax.Array, size: Sequence[int], sigma: float, normalize: bool = True) -> jax.Array:
  """Gaussian heatmaps centred on `means`, differentiable in the means.

  Args:
    means: (..., D) centres in normalised coordinates, ordered (x, y, ...).
    size: spatial size ordered (..., height, width), D entries.
    sigma: standard deviation in pixels (the same for every axis).
    normalize: divide each map by its sum (+1e-24) so it is a distribution.

  Returns:
    (..., *size) heatmaps.
  """
  size = tuple(int(s) for s in size)
  ndims = len(size)
  if means.shape[-1] != ndims:
    raise ValueError(f'means has {means.shape[-1]} coordinates but size has {ndims} axes')
  gauss = None
  for axis_from_end, s in enumerate(reversed(size)):  # x first (last spatial axis)
    coords = normalized_linspace(s, means.dtype)
    mean = means[..., axis_from_end:axis_from_end + 1]  # (..., 1)
    stddev = 2 * sigma / s
    k = -0.5 * (1 / stddev) ** 2
    exp = jnp.exp(jnp.square(coords - mean) * k)  # (..., s)
    # Place this axis' profile at spatial position ndims - 1 - axis_from_end.
    shape = exp.shape[:-1] + tuple(s if d == ndims - 1 - axis_from_end else 1 for d in range(ndims))
    exp = exp.reshape(shape)
    gauss = exp if gauss is None else gauss * exp
  if not normalize:
    return gauss
  spatial_axes = tuple(range(-ndims, 0))
  return gauss / (gauss.sum(axis=spatial_axes, keepdims=True) + _EPS)


def average_loss(losses: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of per-location losses (B, L) -> scalar; with a (B, L) mask, over the masked-in ones only.

  The denominator is clamped to 1, so an all-zero mask gives 0, not NaN.
  """
  if mask is None:
    return losses.sum() / max(losses.size, 1)
  if mask.shape != losses.shape:
    raise ValueError(f'mask must be the same size as losses: {mask.shape} vs {losses.shape}')
  mask = mask.astype(losses.dtype)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1)


def _kl(p: jax.Array, q: jax.Array, ndims: int) -> jax.Array:
  unsummed = p * (jnp.log(p + _EPS) - jnp.log(q + _EPS))
  return unsummed.sum(axis=tuple(range(-ndims, 0)))


def _js(p: jax.Array, q: jax.Array, ndims: int) -> jax.Array:
  m = 0.5 * (p + q)
  return 0.5 * _kl(p, m, ndims) + 0.5 * _kl(q, m, ndims)


def _divergence_reg_losses(heatmaps, mu_t, sigma_t, divergence):
  ndims = mu_t.shape[-1]
  _check_heatmaps(heatmaps, ndims)
  if heatmaps.shape[:-ndims] != mu_t.shape[:-1]:
    raise ValueError(f'heatmaps {heatmaps.shape} and target means {mu_t.shape} disagree on (B, L)')
  gauss = make_gauss(mu_t, heatmaps.shape[2:], sigma_t)
  return divergence(heatmaps, gauss, ndims)


def kl_reg_losses(heatmaps: jax.Array, mu_t: jax.Array, sigma_t: float) -> jax.Array:
  """KL(heatmap || Gaussian(mu_t, sigma_t px)) per location: (B, L, H, W), (B, L, 2) -> (B, L)."""
  return _divergence_reg_losses(heatmaps, mu_t, sigma_t, _kl)


def js_reg_losses(heatmaps: jax.Array, mu_t: jax.Array, sigma_t: float) -> jax.Array:
  """Jensen-Shannon divergence to Gaussian(mu_t, sigma_t px) per location: -> (B, L), in nats."""
  return _divergence_reg_losses(heatmaps, mu_t, sigma_t, _js)


def variance_reg_losses(heatmaps: jax.Array, sigma_t: float) -> jax.Array:
  """Squared error between each heatmap's variance and sigma_t**2, summed over axes: -> (B, L).

  Variances are in pixel units (dsntnn's variant, larger than the paper's by a constant factor).
  """
  _check_heatmaps(heatmaps)
  sizes = heatmaps.shape[2:]
  values = [normalized_linspace(d, heatmaps.dtype) for d in sizes]
  mu = linear_expectation(heatmaps, values)  # (B, L, ndims), axis order
  centred = [jnp.square(v - mu[..., i:i + 1]) for i, v in enumerate(values)]  # (B, L, n_i)
  var = jnp.stack([
      (heatmaps.sum(axis=tuple(2 + j for j in range(len(sizes)) if j != i)) * c).sum(-1)
      for i, c in enumerate(centred)
  ], -1)
  heatmap_size = jnp.asarray(sizes, dtype=var.dtype)
  actual_variance = var * jnp.square(heatmap_size / 2)
  return jnp.square(actual_variance - sigma_t ** 2).sum(-1)


def _size_xy(size, like):
  return jnp.asarray(size, dtype=jnp.result_type(like, jnp.float32))[::-1]


def normalized_to_pixel_coordinates(coords: jax.Array, size: Sequence[int]) -> jax.Array:
  """Normalised (x, y) -> pixel (x, y), pixel centres at integers; size is (H, W)."""
  return 0.5 * ((coords + 1) * _size_xy(size, coords) - 1)


def pixel_to_normalized_coordinates(coords: jax.Array, size: Sequence[int]) -> jax.Array:
  """Pixel (x, y) -> normalised (x, y); size is (H, W). The inverse of the function above."""
  return ((2 * coords + 1) / _size_xy(size, coords)) - 1


__all__ = [
    'flat_softmax', 'dsnt', 'soft_argmax', 'euclidean_losses', 'l1_losses', 'mse_losses', 'make_gauss',
    'js_reg_losses', 'kl_reg_losses', 'variance_reg_losses', 'average_loss',
    'normalized_to_pixel_coordinates', 'pixel_to_normalized_coordinates', 'normalized_linspace',
    'linear_expectation',
]
