"""kpjax.model.losses.keypoint_loss against KPDEM's dsntnn recipe (convert/torch_model.kpdem_loss).

average_loss(euclidean_losses + js_weight * js_reg_losses(sigma_t), mask): values and gradients (w.r.t.
coords and heatmaps) against torch autograd in float64, with and without a mask; absent keypoints
(mask 0) may carry NaN placeholder targets without poisoning the loss or any gradient.
"""

from __future__ import annotations

import dsntnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import torch_model
from kpjax import dsnt
from kpjax.model.losses import keypoint_loss


def _predictions(seed: int, b: int = 2, n_locations: int = 5, h: int = 8, w: int = 12):
  """Plausible network outputs: softmax heatmaps and their DSNT coords, plus targets in [-0.9, 0.9]."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((b, n_locations, h * w)) * 2
  p = np.exp(logits - logits.max(-1, keepdims=True))
  heatmaps = (p / p.sum(-1, keepdims=True)).reshape(b, n_locations, h, w)
  xs, ys = (2 * np.arange(w) + 1) / w - 1, (2 * np.arange(h) + 1) / h - 1
  coords = np.stack([(heatmaps.sum(2) * xs).sum(-1), (heatmaps.sum(3) * ys).sum(-1)], -1)
  heatmaps, coords = heatmaps.astype(np.float32), coords.astype(np.float32)
  target = rng.uniform(-0.9, 0.9, (b, n_locations, 2)).astype(np.float32)
  mask = (rng.random((b, n_locations)) < 0.6).astype(np.float32)
  mask[0, 0], mask[-1, -1] = 0.0, 1.0  # at least one absent and one present keypoint
  return coords, heatmaps, target, mask


def _torch_recipe(coords, heatmaps, target, mask, sigma_t, js_weight):
  """dsntnn in float64: (loss, d loss / d coords, d loss / d heatmaps, euclidean mean, js mean)."""
  c = torch.tensor(coords, dtype=torch.float64, requires_grad=True)
  h = torch.tensor(heatmaps, dtype=torch.float64, requires_grad=True)
  t = torch.tensor(target, dtype=torch.float64)
  m = None if mask is None else torch.tensor(mask, dtype=torch.float64)
  if js_weight == 1.0:
    loss = torch_model.kpdem_loss(c, h, t, sigma_t=sigma_t, mask=m)  # the project's one torch recipe
  else:
    loss = dsntnn.average_loss(dsntnn.euclidean_losses(c, t) + js_weight * dsntnn.js_reg_losses(h, t, sigma_t), m)
  loss.backward()
  with torch.no_grad():
    euc = dsntnn.average_loss(dsntnn.euclidean_losses(c, t), m)
    js = dsntnn.average_loss(dsntnn.js_reg_losses(h, t, sigma_t), m)
  return float(loss.detach()), c.grad.numpy(), h.grad.numpy(), float(euc), float(js)


_loss_and_grads = jax.jit(jax.value_and_grad(keypoint_loss, argnums=(0, 1), has_aux=True))  # sigma_t traced too


@pytest.mark.parametrize('masked', [False, True], ids=['no_mask', 'mask'])
@pytest.mark.parametrize('sigma_t,js_weight', [(1.0, 1.0), (2.0, 1.0), (1.0, 0.0), (0.5, 3.0)])
def test_matches_dsntnn_recipe(masked, sigma_t, js_weight):
  coords, heatmaps, target, mask = _predictions(seed=int(sigma_t * 10 + js_weight) + masked)
  mask = mask if masked else None
  expected, d_coords, d_heatmaps, euc, js = _torch_recipe(coords, heatmaps, target, mask, sigma_t, js_weight)
  (loss, parts), (g_coords, g_heatmaps) = _loss_and_grads(
      jnp.asarray(coords), jnp.asarray(heatmaps), jnp.asarray(target), None if mask is None else jnp.asarray(mask),
      sigma_t=sigma_t, js_weight=js_weight)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(parts['euclidean']) == pytest.approx(euc, rel=1e-6)
  assert float(parts['js']) == pytest.approx(js, rel=1e-5, abs=1e-7)
  assert float(loss) == pytest.approx(float(parts['euclidean']) + js_weight * float(parts['js']), rel=1e-6)
  np.testing.assert_allclose(np.asarray(g_coords), d_coords, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_heatmaps), d_heatmaps, rtol=1e-5, atol=1e-6)
  if masked:  # absent keypoints contribute nothing
    assert not np.asarray(g_coords)[mask == 0].any() and not np.asarray(g_heatmaps)[mask == 0].any()


def test_eager_matches_jit():
  coords, heatmaps, target, mask = map(jnp.asarray, _predictions(seed=3))
  eager = keypoint_loss(coords, heatmaps, target, mask)
  jitted = jax.jit(keypoint_loss)(coords, heatmaps, target, mask)
  np.testing.assert_allclose(float(eager[0]), float(jitted[0]), rtol=1e-6)


_target_grad = jax.jit(jax.grad(lambda c, h, t, m: keypoint_loss(c, h, t, m)[0], argnums=2))


@pytest.mark.parametrize('placeholder', [np.nan, np.inf, -1e30])
def test_placeholder_targets_under_mask_zero_do_not_poison(placeholder):
  """FashionAI's absent keypoints are -1_-1_-1: whatever their target holds, nothing may leak."""
  coords, heatmaps, target, mask = _predictions(seed=11)
  clean = target.copy()
  clean[mask == 0] = 0.25  # any finite placeholder
  dirty = target.copy()
  dirty[mask == 0] = placeholder
  args = [jnp.asarray(a) for a in (coords, heatmaps)]
  (loss_clean, _), grads_clean = _loss_and_grads(*args, jnp.asarray(clean), jnp.asarray(mask))
  (loss_dirty, parts), grads_dirty = _loss_and_grads(*args, jnp.asarray(dirty), jnp.asarray(mask))
  assert np.isfinite(float(loss_dirty)) and all(np.isfinite(float(v)) for v in parts.values())
  assert float(loss_dirty) == float(loss_clean)
  for gd, gc in zip(grads_dirty, grads_clean):
    assert np.all(np.isfinite(np.asarray(gd)))
    np.testing.assert_array_equal(np.asarray(gd), np.asarray(gc))
  # The gradient w.r.t. the target is finite (and 0 under mask 0) too.
  g_target = _target_grad(*args, jnp.asarray(dirty), jnp.asarray(mask))
  assert np.all(np.isfinite(np.asarray(g_target))) and not np.asarray(g_target)[mask == 0].any()
  # And it equals dsntnn's recipe on the clean targets.
  expected = _torch_recipe(coords, heatmaps, clean, mask, 1.0, 1.0)[0]
  assert float(loss_dirty) == pytest.approx(expected, rel=1e-6)


def test_all_masked_gives_zero_loss_and_zero_gradients():
  coords, heatmaps, target, _ = _predictions(seed=5)
  target[:] = np.nan
  mask = jnp.zeros(target.shape[:2])
  (loss, parts), grads = _loss_and_grads(jnp.asarray(coords), jnp.asarray(heatmaps), jnp.asarray(target), mask)
  assert float(loss) == 0.0 and float(parts['euclidean']) == 0.0 and float(parts['js']) == 0.0
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize('dtype', [jnp.bool_, jnp.int32, jnp.float32])
def test_mask_dtypes(dtype):
  coords, heatmaps, target, mask = _predictions(seed=8)
  args = [jnp.asarray(a) for a in (coords, heatmaps, target)]
  reference = float(keypoint_loss(*args, jnp.asarray(mask, jnp.float32))[0])
  assert float(jax.jit(keypoint_loss)(*args, jnp.asarray(mask).astype(dtype))[0]) == pytest.approx(reference, rel=1e-6)


def test_no_mask_counts_every_keypoint_like_the_original():
  coords, heatmaps, target, _ = _predictions(seed=9)
  args = [jnp.asarray(a) for a in (coords, heatmaps, target)]
  ones = jnp.ones(target.shape[:2])
  assert float(keypoint_loss(*args)[0]) == pytest.approx(float(keypoint_loss(*args, ones)[0]), rel=1e-6)


def test_bfloat16_predictions_are_scored_in_float32():
  coords, heatmaps, target, mask = _predictions(seed=4)
  loss, parts = jax.jit(keypoint_loss)(jnp.asarray(coords, jnp.bfloat16), jnp.asarray(heatmaps, jnp.bfloat16),
                                       jnp.asarray(target), jnp.asarray(mask))
  assert loss.dtype == jnp.float32 and parts['js'].dtype == jnp.float32
  reference = float(keypoint_loss(*map(jnp.asarray, (coords, heatmaps, target, mask)))[0])
  assert float(loss) == pytest.approx(reference, rel=2e-2)


def test_perfect_prediction_has_zero_euclidean_term_and_finite_gradients():
  """Coords exactly on target (Euclidean distance 0) and one-hot heatmaps: finite, zero Euclidean gradient."""
  logits = np.zeros((1, 3, 8, 8), np.float32)
  for k, (i, j) in enumerate([(1, 1), (4, 6), (7, 0)]):
    logits[0, k, i, j] = 1e4
  heatmaps = dsnt.flat_softmax(jnp.asarray(logits))
  coords = dsnt.dsnt(heatmaps)
  (loss, parts), (g_coords, g_heatmaps) = _loss_and_grads(coords, heatmaps, coords, jnp.ones((1, 3)))
  assert float(parts['euclidean']) == 0.0 and np.isfinite(float(loss))
  assert np.all(np.isfinite(np.asarray(g_heatmaps)))
  np.testing.assert_array_equal(np.asarray(g_coords), 0.0)
