"""bfloat16's rounding as noise in float32: how far bf16 may move a model's outputs, for bounding bf16 runs.

A bf16 forward pass (CoordRegressionNetwork(dtype=bfloat16)) rounds to bfloat16's 8 significant bits the
image, every kernel and bias, and each conv's output (the product sum, accumulated in float32, then
the sum with the bias); max-pool/unpool, ReLU and concatenation are exact in bf16, softmax and DSNT run
in float32. Each rounding multiplies a value by (1 + d) with |d| <= u = 2^-8, bf16's unit roundoff; for
values spread over a binade the RMS of d is u (E[1/m^2] / 3)^(1/2) = 0.42 u (m uniform in log over
[1, 2): E[1/m^2] = 3 / (8 ln 2)).

`noisy_outputs` runs the float32 network with an independent d ~ Uniform(-u, u) (RMS u / sqrt(3) =
0.58 u: a third more than rounding's) at each of those places. The spread of its outputs around
float32's is what bf16's precision moves them by, for this model and these inputs: a map that is
sensitive (two-peaked, or near a pool's tie) spreads as far as bf16 may move it, a sharp one barely.
To first order the outputs respond linearly to many independent roundings, so a bf16 run's deviation
is one more draw of (a smaller copy of) that spread: `BOUND` times its RMS over the draws bounds it,
whatever the CPU's bf16 kernels round.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kpjax.model import network

UNIT_ROUNDOFF = 2.0 ** -8  # bfloat16: 8 significant bits, round to nearest
DRAWS = 16
# A deviation within BOUND RMS of the draws: for a Gaussian deviation the chance of exceeding 4 sigma is
# 6e-5, and the RMS of 16 draws is within 0.7x of the true one with probability 0.95 (chi, 16 dof); the
# noise is a third larger than rounding's, leaving ~2x against a kernel that rounds more than assumed.
BOUND = 4.0


def _perturbed(x, key):
  return x * (1 + UNIT_ROUNDOFF * jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0))


def noisy_apply(model: network.CoordRegressionNetwork, variables, images, key):
  """model.apply (float32) with bf16-sized relative noise wherever a bf16 forward pass rounds."""
  count = iter(range(1 << 30))
  keys = (jax.random.fold_in(key, i) for i in count)  # one key per rounding place, in trace order
  leaves, tree = jax.tree_util.tree_flatten(variables)
  variables = jax.tree_util.tree_unflatten(tree, [_perturbed(x, next(keys)) for x in leaves])

  def interceptor(call, args, kwargs, context):
    out = call(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, (network.Conv, nn.Conv)):
      out = _perturbed(_perturbed(out, next(keys)), next(keys))  # the product sum, then the bias sum
    return out

  with nn.intercept_methods(interceptor):
    return model.apply(variables, _perturbed(images, next(keys)))


def noisy_outputs(model, variables, images, draws: int = DRAWS, seed: int = 0):
  """(coords (draws, B, L, 2), heatmaps (draws, B, L, H, W)) of `draws` noisy float32 runs, numpy."""
  run = jax.jit(lambda v, x, k: noisy_apply(model, v, x, k))
  outs = [run(variables, images, jax.random.key(seed * 1000 + i)) for i in range(draws)]
  return np.stack([np.asarray(c) for c, _ in outs]), np.stack([np.asarray(h) for _, h in outs])


def total_variation(a, b) -> np.ndarray:
  """Total-variation distance of heatmaps (..., H, W): half their L1 distance, in [0, 1]."""
  return 0.5 * np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).sum((-1, -2))


def rms(x, axis=0) -> np.ndarray:
  return np.sqrt(np.mean(np.square(np.asarray(x, np.float64)), axis=axis))


def assert_within_rounding_spread(model, variables, images, coords16, heatmaps16):
  """bf16 outputs against the float32 model's own: each heatmap's total-variation distance and each
  coordinate's error within BOUND times the RMS of the noisy float32 runs' (per map and per coordinate)."""
  coords32, heatmaps32 = (np.asarray(a) for a in jax.jit(model.apply)(variables, images))
  noisy_coords, noisy_heatmaps = noisy_outputs(model, variables, images)
  tv, tv_spread = total_variation(heatmaps16, heatmaps32), rms(total_variation(noisy_heatmaps, heatmaps32))
  err, err_spread = np.abs(np.asarray(coords16) - coords32), rms(noisy_coords - coords32)
  assert np.all(tv_spread > 0) and np.all(err_spread > 0)  # the noise reaches every output
  assert np.all(tv <= BOUND * tv_spread), (tv / tv_spread).max()
  assert np.all(err <= BOUND * err_spread), (err / err_spread).max()
  return tv / tv_spread, err / err_spread
