"""compute_dtype='bfloat16': bf16 convolutions, float32 parameters, float32 softmax/DSNT/loss.

A slim model is trained for a few dozen steps (float32, the project's real training step) on a fixed
synthetic batch, so its heatmaps are peaked (a random network's are nearly flat and would make any two
precisions agree). Then, on that trained model:
  * bf16 inference keeps parameters float32 and returns float32 coords and heatmaps (each map sums to 1);
  * bf16's outputs are as close to float32's as bf16's rounding allows this model: each heatmap's
    total-variation distance and each coordinate's error within tests/bf16_reference.py's bound, the
    spread of float32 runs with bf16-sized rounding noise (trained models differ from CPU to CPU, and
    so does how far bf16 moves a two-peaked map: no fixed number fits them all);
  * a bf16 training step keeps parameters and optimiser state float32, and its loss is within the same
    bound of the float32 loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bf16_reference
import train_fixture as fx
from kpjax.data import keypoints
from kpjax.model import losses as losses_lib
from kpjax.train import step as ts
from kpjax.configs import base

SIZE, BATCH, STEPS = 32, 4, 40


def _config(dtype='float32'):
  config = base.get_config()
  config.category = 'skirt'  # 4 keypoints
  config.input_size = SIZE
  config.batch_size = BATCH
  config.model.width = 0.125
  config.model.num_stages = 2
  config.compute_dtype = dtype
  config.optimizer = 'adam'
  config.learning_rate = 3e-3
  config.warmup_steps = 0
  config.schedule = 'constant'
  config.total_steps = STEPS
  return config


def _batch(n_locations):
  """Images with one coloured blob per keypoint (keypoint k in channel k % 3), targets at the blobs."""
  rng = np.random.default_rng(0)
  target = rng.uniform(-0.7, 0.7, (BATCH, n_locations, 2)).astype(np.float32)
  centres = (target + 1) * SIZE / 2 - 0.5  # pixel (x, y)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  images = 0.1 * rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)
  for b in range(BATCH):
    for k in range(n_locations):
      blob = np.exp(-((xx - centres[b, k, 0]) ** 2 + (yy - centres[b, k, 1]) ** 2) / (2 * 1.5 ** 2))
      images[b, :, :, k % 3] += (1.0 + k // 3) * blob
  return {'image': jnp.asarray(images), 'target': jnp.asarray(target),
          'mask': jnp.ones((BATCH, n_locations), jnp.float32)}


@pytest.fixture(scope='module')
def trained():
  config = _config()
  model = ts.build_model(config)
  batch = _batch(keypoints.num_keypoints(config.category))
  step, state = fx.step_and_state(config)
  losses = []
  for _ in range(STEPS):
    before = jax.tree_util.tree_map(jnp.array, state)  # the step donates its input
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return config, model, state, batch, losses, before


def _all_float32(tree):
  """Every floating-point leaf is float32 (optimiser step counters are integers)."""
  floats = {x.dtype for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
  return floats == {jnp.dtype(jnp.float32)}


def test_training_worked(trained):
  _, model, state, batch, losses, _ = trained
  assert np.isfinite(losses).all() and losses[-1] < losses[0], (losses[0], losses[-1])
  _, heatmaps = jax.jit(model.apply)({'params': state.params}, batch['image'])
  assert float(jnp.max(heatmaps)) > 50 / SIZE ** 2  # peaked maps (a flat one has 1 / SIZE^2 everywhere)


def test_bfloat16_inference_close_to_float32(trained):
  _, model, state, batch, _, _ = trained
  variables = {'params': state.params}
  coords32, heatmaps32 = jax.jit(model.apply)(variables, batch['image'])
  model16 = model.clone(dtype=jnp.bfloat16)
  coords16, heatmaps16 = jax.jit(model16.apply)(variables, batch['image'])
  assert _all_float32(variables)
  assert coords16.dtype == heatmaps16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(heatmaps16).sum((-1, -2)), 1.0, rtol=1e-5)  # float32 softmax
  assert not np.array_equal(np.asarray(heatmaps16), np.asarray(heatmaps32))  # bf16 did run
  bf16_reference.assert_within_rounding_spread(model, variables, batch['image'], coords16, heatmaps16)


def test_bfloat16_training_step_keeps_float32_state(trained):
  _, model, _, batch, losses, before = trained
  config = _config()
  # The loss of noisy float32 forward passes (bf16's rounding as noise) spreads around float32's loss by
  # as much as bf16's may differ from it.
  coords, heatmaps = bf16_reference.noisy_outputs(model, {'params': before.params}, batch['image'])
  noisy = [float(losses_lib.keypoint_loss(c, h, batch['target'], batch['mask'], sigma_t=config.sigma_t,
                                          js_weight=config.js_weight)[0]) for c, h in zip(coords, heatmaps)]
  spread = bf16_reference.rms(np.array(noisy) - losses[-1])
  config16 = _config('bfloat16')
  assert ts.build_model(config16).dtype == jnp.bfloat16
  step16, _ = fx.step_and_state(config16)
  new_state, metrics16 = step16(before, batch)  # the last step, in bf16 (donates `before`)
  assert _all_float32(new_state.params) and _all_float32(new_state.opt_state)
  assert bool(metrics16['finite'])
  assert metrics16['loss'].dtype == jnp.float32
  assert 0 < abs(float(metrics16['loss']) - losses[-1]) <= bf16_reference.BOUND * spread, (
      float(metrics16['loss']), losses[-1], spread)
