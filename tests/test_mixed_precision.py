"""compute_dtype='bfloat16': bf16 convolutions, float32 parameters, float32 softmax/DSNT/loss.

A slim model is trained for a few dozen steps (float32, the project's real training step) on a fixed
synthetic batch, so its heatmaps are peaked (a random network's are nearly flat and would make any two
precisions agree). Then, on that trained model:
  * bf16 inference keeps parameters float32 and returns float32 coords and heatmaps (each map sums to 1);
  * bf16 coords are within 0.01 normalised units of float32's on average (0.16 px at 32 px; measured
    ~0.002) and 0.1 at worst (1.6 px; measured 0.006-0.05: bfloat16 keeps 8 significant bits, and a
    two-peaked heatmap moves its expectation more), each heatmap within total-variation distance 0.15
    of float32's (measured ~0.04);
  * a bf16 training step keeps parameters and optimiser state float32, and its loss is within 5% of the
    float32 loss (measured ~0.5%).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixture as fx
from kpjax.data import keypoints
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
  *_, losses, _ = trained
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])  # measured ~0.62


def test_bfloat16_inference_close_to_float32(trained):
  _, model, state, batch, _, _ = trained
  variables = {'params': state.params}
  coords32, heatmaps32 = jax.jit(model.apply)(variables, batch['image'])
  model16 = model.clone(dtype=jnp.bfloat16)
  coords16, heatmaps16 = jax.jit(model16.apply)(variables, batch['image'])
  assert _all_float32(variables)
  assert coords16.dtype == heatmaps16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(heatmaps16).sum((-1, -2)), 1.0, rtol=1e-5)
  assert float(jnp.max(heatmaps32)) > 0.05  # peaked maps (a flat 32x32 map has 0.001 everywhere)
  err = jnp.abs(coords16 - coords32)
  tv = 0.5 * jnp.abs(heatmaps16 - heatmaps32).sum((-1, -2))
  assert float(err.mean()) <= 0.01
  assert float(err.max()) <= 0.1
  assert float(tv.max()) <= 0.15


def test_bfloat16_training_step_keeps_float32_state(trained):
  *_, batch, losses, before = trained
  config16 = _config('bfloat16')
  model16 = ts.build_model(config16)
  assert model16.dtype == jnp.bfloat16
  step16, _ = fx.step_and_state(config16)
  new_state, metrics16 = step16(before, batch)  # the last step, in bf16
  assert _all_float32(new_state.params) and _all_float32(new_state.opt_state)
  assert bool(metrics16['finite'])
  assert metrics16['loss'].dtype == jnp.float32
  assert float(metrics16['loss']) == pytest.approx(losses[-1], rel=0.05)
