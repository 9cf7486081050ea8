"""kpjax.dsnt against the dsntnn package (the reference), values and gradients, eager and under jax.jit.

The reference runs in float64 on the same float32-representable inputs, so each comparison measures the
float32 JAX result's own error: tolerances are a few float32 ulps of the quantity's scale. Gradients are
vector-Jacobian products with a random cotangent (jax.vjp vs torch.autograd.grad).
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import dsntnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kpjax import dsnt

RTOL, ATOL = 1e-5, 1e-6  # float32 against a float64 reference


def _softmax_heatmaps(rng, shape, scale=3.0):
  logits = rng.standard_normal(shape) * scale
  flat = logits.reshape(shape[:2] + (-1,))
  p = np.exp(flat - flat.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).reshape(shape).astype(np.float32)


def _compare(jax_fn: Callable, torch_fn: Callable, inputs: Sequence[np.ndarray], diff: Sequence[int] = (0,),
             jit: bool = True, rtol: float = RTOL, atol: float = ATOL, grad_atol: float | None = None,
             seed: int = 0):
  """Values of jax_fn(*inputs) vs torch_fn(*inputs) and their VJPs w.r.t. inputs[diff] (float64 torch).

  With jit, values and VJP come from one jitted function (one compilation); without, both run eagerly.
  """
  inputs = [np.asarray(a, np.float32) for a in inputs]
  t_in = [torch.tensor(a, dtype=torch.float64, requires_grad=i in diff) for i, a in enumerate(inputs)]
  expected = torch_fn(*t_in)
  j_in = [jnp.asarray(a) for a in inputs]
  cotangent = np.random.default_rng(seed).standard_normal(tuple(expected.shape)).astype(np.float32)

  def values_and_vjp(args, cot):
    if not diff:
      return jax_fn(*args), ()

    def partial_fn(*d):
      full = list(args)
      for i, v in zip(diff, d):
        full[i] = v
      return jax_fn(*full)
    out, vjp = jax.vjp(partial_fn, *[args[i] for i in diff])
    return out, vjp(cot)

  run = jax.jit(values_and_vjp) if jit else values_and_vjp
  actual, actual_grads = run(j_in, jnp.asarray(cotangent))
  assert actual.dtype == jnp.float32, actual.dtype
  assert actual.shape == tuple(expected.shape), (actual.shape, expected.shape)
  np.testing.assert_allclose(np.asarray(actual), expected.detach().numpy(), rtol=rtol, atol=atol)
  if not diff:
    return
  expected_grads = torch.autograd.grad(expected, [t_in[i] for i in diff], torch.tensor(cotangent, dtype=torch.float64),
                                       allow_unused=True)
  for i, a, e in zip(diff, actual_grads, expected_grads):
    e = np.zeros(inputs[i].shape) if e is None else e.numpy()
    assert np.all(np.isfinite(np.asarray(a))), f'non-finite gradient for input {i}'
    np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol if grad_atol is None else grad_atol,
                               err_msg=f'gradient w.r.t. input {i}')


SPATIAL = [(7,), (5, 6), (8, 8), (4, 3, 5)]  # 1D, 2D non-square, 2D square, 3D


# ------------------------------------------------------------------------------------------------ API


def test_public_api_and_signatures_follow_dsntnn():
  for name in ['flat_softmax', 'dsnt', 'soft_argmax', 'euclidean_losses', 'l1_losses', 'mse_losses', 'make_gauss',
               'js_reg_losses', 'kl_reg_losses', 'variance_reg_losses', 'average_loss',
               'normalized_to_pixel_coordinates', 'pixel_to_normalized_coordinates', 'normalized_linspace',
               'linear_expectation']:
    ours = inspect.signature(getattr(dsnt, name)).parameters
    theirs = inspect.signature(getattr(dsntnn, name)).parameters
    drop = {'device'}  # a torch notion
    assert [p for p in ours if p not in drop] == [p for p in theirs if p not in drop], name
    for p in theirs:
      if p in ours and theirs[p].default is not inspect.Parameter.empty:
        assert ours[p].default == theirs[p].default or p == 'dtype', (name, p)


# ------------------------------------------------------------------------------------- flat_softmax


@pytest.mark.parametrize('spatial', SPATIAL)
def test_flat_softmax(spatial):
  rng = np.random.default_rng(len(spatial) * 10 + spatial[0])
  logits = rng.standard_normal((2, 3) + spatial) * 4
  _compare(dsnt.flat_softmax, dsntnn.flat_softmax, [logits])
  out = np.asarray(dsnt.flat_softmax(jnp.asarray(logits, jnp.float32)))
  np.testing.assert_allclose(out.reshape(2, 3, -1).sum(-1), 1.0, rtol=1e-6)


def test_flat_softmax_large_logits_is_stable():
  logits = np.zeros((1, 2, 4, 5), np.float32)
  logits[0, 0, 1, 2] = 1e4
  logits[0, 1] = 1e30  # huge but equal: uniform
  out = np.asarray(dsnt.flat_softmax(jnp.asarray(logits)))
  assert np.all(np.isfinite(out))
  assert out[0, 0, 1, 2] == 1.0 and out[0, 0].sum() == 1.0
  np.testing.assert_allclose(out[0, 1], 1 / 20, rtol=1e-6)


# ------------------------------------------------------------------------------- dsnt / soft_argmax


@pytest.mark.parametrize('spatial', SPATIAL)
@pytest.mark.parametrize('normalized', [True, False])
def test_soft_argmax(spatial, normalized):
  rng = np.random.default_rng(sum(spatial) + normalized)
  heatmaps = _softmax_heatmaps(rng, (2, 3) + spatial)
  scale = 1.0 if normalized else max(spatial)
  _compare(lambda h: dsnt.soft_argmax(h, normalized_coordinates=normalized),
           lambda h: dsntnn.soft_argmax(h, normalized_coordinates=normalized), [heatmaps], atol=ATOL * scale)


@pytest.mark.parametrize('spatial', [(5, 6), (4, 3, 5)])
def test_dsnt_on_unnormalised_maps_and_default_kwargs(spatial):
  """DSNT is a linear expectation: it must agree on any map, not only distributions."""
  rng = np.random.default_rng(3)
  maps = rng.standard_normal((1, 2) + spatial)
  _compare(dsnt.dsnt, dsntnn.dsnt, [maps])
  _compare(lambda h: dsnt.dsnt(h, normalized_coordinates=False),
           lambda h: dsntnn.dsnt(h, normalized_coordinates=False), [maps], atol=ATOL * max(spatial))


@pytest.mark.parametrize('h,w', [(4, 4), (5, 7), (16, 8), (1, 3)])
def test_one_hot_heatmap_hand_computed(h, w):
  """A one-hot map at pixel (row i, column j) has DSNT ((2j+1)/W - 1, (2i+1)/H - 1), pixel (j, i).

  Every pixel at once: location k = i * W + j of one (1, H * W, H, W) batch is one-hot at (i, j).
  """
  hm = np.eye(h * w, dtype=np.float32).reshape(1, h * w, h, w)
  rows, cols = np.divmod(np.arange(h * w), w)
  coords = np.asarray(dsnt.dsnt(jnp.asarray(hm)))[0]
  np.testing.assert_allclose(coords, np.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], -1), rtol=0,
                             atol=1e-6)
  pixels = np.asarray(dsnt.soft_argmax(jnp.asarray(hm), normalized_coordinates=False))[0]
  np.testing.assert_array_equal(pixels, np.stack([cols, rows], -1))


def test_uniform_heatmap_is_centred():
  hm = jnp.full((2, 3, 6, 10), 1 / 60, jnp.float32)
  np.testing.assert_allclose(np.asarray(dsnt.dsnt(hm)), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dsnt.soft_argmax(hm, normalized_coordinates=False)),
                             np.broadcast_to([4.5, 2.5], (2, 3, 2)), atol=1e-5)


@pytest.mark.parametrize('spatial', [(5, 6), (4, 3, 5)])
def test_linear_expectation(spatial):
  rng = np.random.default_rng(17)
  probs = _softmax_heatmaps(rng, (2, 2) + spatial)
  values = [rng.standard_normal(n).astype(np.float32) for n in spatial]

  def jax_fn(p, *v):
    return dsnt.linear_expectation(p, list(v))

  def torch_fn(p, *v):
    return dsntnn.linear_expectation(p, list(v))

  _compare(jax_fn, torch_fn, [probs] + values, diff=tuple(range(1 + len(spatial))))


# ----------------------------------------------------------------------------- coordinate losses


@pytest.mark.parametrize('name', ['euclidean_losses', 'l1_losses', 'mse_losses'])
@pytest.mark.parametrize('d', [1, 3])
def test_coordinate_losses(name, d):
  rng = np.random.default_rng(d)
  actual = rng.uniform(-1, 1, (3, 5, d))
  target = rng.uniform(-1, 1, (3, 5, d))
  target[0, 0] = actual[0, 0]  # one exact hit: torch's gradient there is 0, ours must be too (not NaN)
  _compare(getattr(dsnt, name), getattr(dsntnn, name), [actual, target], diff=(0, 1))


def test_euclidean_hand_computed_and_zero_distance_gradient():
  actual = jnp.array([[[3.0, 4.0], [1.0, 1.0]]])
  target = jnp.array([[[0.0, 0.0], [1.0, 1.0]]])
  np.testing.assert_allclose(np.asarray(dsnt.euclidean_losses(actual, target)), [[5.0, 0.0]])
  np.testing.assert_allclose(np.asarray(dsnt.l1_losses(actual, target)), [[3.5, 0.0]])
  np.testing.assert_allclose(np.asarray(dsnt.mse_losses(actual, target)), [[12.5, 0.0]])
  for fn in (dsnt.euclidean_losses, jax.jit(dsnt.euclidean_losses)):
    ga, gt = jax.grad(lambda a, t: fn(a, t).sum(), argnums=(0, 1))(actual, target)
    np.testing.assert_allclose(np.asarray(ga), [[[0.6, 0.8], [0.0, 0.0]]], rtol=1e-7, atol=0)
    np.testing.assert_allclose(np.asarray(gt), [[[-0.6, -0.8], [0.0, 0.0]]], rtol=1e-7, atol=0)
  # torch's |x| has gradient sign(x), 0 at an exact hit (jnp.abs's alone would give 1 there).
  for name in ('l1_losses', 'mse_losses'):
    g = jax.grad(lambda a: getattr(dsnt, name)(a, target).sum())(actual)
    np.testing.assert_array_equal(np.asarray(g)[0, 1], [0.0, 0.0])


@pytest.mark.parametrize('name', ['euclidean_losses', 'l1_losses', 'mse_losses'])
def test_coordinate_losses_shape_mismatch(name):
  with pytest.raises(ValueError, match='same size'):
    getattr(dsnt, name)(jnp.zeros((2, 3, 2)), jnp.zeros((2, 4, 2)))


# ------------------------------------------------------------------------------------- make_gauss


@pytest.mark.parametrize('size,sigma,normalize', [((9,), 0.5, True), ((9,), 2.5, False), ((5, 6), 1.0, True),
                                                  ((5, 6), 0.5, False), ((8, 8), 2.5, True), ((4, 3, 5), 1.0, True),
                                                  ((4, 3, 5), 2.5, False)])
def test_make_gauss(size, sigma, normalize):
  rng = np.random.default_rng(len(size) + int(sigma * 2) + normalize)
  means = rng.uniform(-1, 1, (2, 3, len(size)))
  _compare(lambda m: dsnt.make_gauss(m, size, sigma, normalize=normalize),
           lambda m: dsntnn.make_gauss(m, size, sigma, normalize=normalize), [means],
           grad_atol=ATOL * max(size) / sigma)


def test_make_gauss_hand_computed():
  h, w, sigma = 6, 8, 1.5
  i, j = 2, 5
  mean = jnp.array([[[(2 * j + 1) / w - 1, (2 * i + 1) / h - 1]]], jnp.float32)
  g = np.asarray(dsnt.make_gauss(mean, (h, w), sigma, normalize=False))[0, 0]
  rows, cols = np.mgrid[0:h, 0:w]
  expected = np.exp(-((rows - i) ** 2 + (cols - j) ** 2) / (2 * sigma ** 2))  # sigma in pixels
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)
  assert g[i, j] == pytest.approx(1.0)
  gn = np.asarray(dsnt.make_gauss(mean, (h, w), sigma))[0, 0]
  np.testing.assert_allclose(gn, expected / expected.sum(), rtol=1e-5, atol=1e-7)
  assert gn.sum() == pytest.approx(1.0, abs=1e-6)
  # Keyword call exactly as dsntnn's callers write it.
  np.testing.assert_allclose(np.asarray(dsnt.make_gauss(means=mean, size=(h, w), sigma=sigma, normalize=False))[0, 0],
                             g)


def test_make_gauss_rejects_mismatched_dims():
  with pytest.raises(ValueError, match='coordinates'):
    dsnt.make_gauss(jnp.zeros((1, 1, 2)), (4, 4, 4), 1.0)


# ---------------------------------------------------------------------------- divergence losses


@pytest.mark.parametrize('name', ['js_reg_losses', 'kl_reg_losses'])
@pytest.mark.parametrize('spatial,sigma_t', [((5, 6), 1.0), ((8, 8), 2.5), ((4, 3, 5), 1.0), ((9,), 2.5)])
def test_divergence_reg_losses(name, spatial, sigma_t):
  rng = np.random.default_rng(sum(spatial) + int(sigma_t))
  heatmaps = _softmax_heatmaps(rng, (2, 3) + spatial)
  mu_t = rng.uniform(-0.9, 0.9, (2, 3, len(spatial)))
  _compare(lambda h, m: getattr(dsnt, name)(h, m, sigma_t), lambda h, m: getattr(dsntnn, name)(h, m, sigma_t),
           [heatmaps, mu_t], diff=(0, 1), grad_atol=1e-5)


@pytest.mark.parametrize('name', ['js_reg_losses', 'kl_reg_losses'])
def test_divergence_of_the_target_gaussian_is_zero(name):
  mu = jnp.array([[[0.1, -0.3], [0.6, 0.2]]], jnp.float32)
  gauss = dsnt.make_gauss(mu, (16, 12), 1.0)
  np.testing.assert_allclose(np.asarray(getattr(dsnt, name)(gauss, mu, 1.0)), 0.0, atol=1e-6)


def test_js_of_disjoint_one_hot_maps_is_log2():
  """JS between two distributions with disjoint support is ln 2; a far Gaussian is nearly disjoint."""
  hm = np.zeros((1, 1, 32, 32), np.float32)
  hm[0, 0, 0, 0] = 1.0
  far = jnp.array([[[0.9, 0.9]]], jnp.float32)
  assert float(dsnt.js_reg_losses(jnp.asarray(hm), far, 0.5)[0, 0]) == pytest.approx(np.log(2), rel=1e-6)


def test_divergence_losses_reject_bad_shapes():
  with pytest.raises(ValueError, match='4D'):
    dsnt.js_reg_losses(jnp.zeros((1, 2, 4, 4, 4)), jnp.zeros((1, 2, 2)), 1.0)
  with pytest.raises(ValueError, match='disagree'):
    dsnt.kl_reg_losses(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 3, 2)), 1.0)


@pytest.mark.parametrize('shape,sigma_t', [((1, 3, 6, 5), 0.5), ((2, 3, 8, 8), 1.0), ((3, 2, 4, 6, 5), 1.0),
                                           ((2, 2, 9), 0.5)])
def test_variance_reg_losses(shape, sigma_t):
  """Batch 1 and batch > 1 both: dsntnn squeezes the batch axis of the mean only when it is 1."""
  rng = np.random.default_rng(sum(shape))
  heatmaps = _softmax_heatmaps(rng, shape, scale=2.0)
  _compare(lambda h: dsnt.variance_reg_losses(h, sigma_t), lambda h: dsntnn.variance_reg_losses(h, sigma_t),
           [heatmaps], rtol=1e-4, atol=1e-4, grad_atol=1e-4)


def test_variance_of_a_wide_gaussian_matches_sigma():
  mu = jnp.zeros((1, 1, 2), jnp.float32)
  gauss = dsnt.make_gauss(mu, (64, 64), 3.0)
  assert float(dsnt.variance_reg_losses(gauss, 3.0)[0, 0]) == pytest.approx(0.0, abs=1e-3)
  assert float(dsnt.variance_reg_losses(gauss, 1.0)[0, 0]) == pytest.approx(2 * (9 - 1) ** 2, rel=1e-3)


# ------------------------------------------------------------------------------------ average_loss


@pytest.mark.parametrize('mask_kind', ['none', 'binary', 'zeros', 'ones', 'fractional'])
def test_average_loss(mask_kind):
  rng = np.random.default_rng(len(mask_kind))
  losses = rng.uniform(0, 3, (4, 6))
  if mask_kind == 'none':
    _compare(dsnt.average_loss, dsntnn.average_loss, [losses])
    return
  mask = {'binary': (rng.random((4, 6)) < 0.5).astype(float), 'zeros': np.zeros((4, 6)), 'ones': np.ones((4, 6)),
          'fractional': rng.uniform(0, 0.1, (4, 6))}[mask_kind]
  _compare(dsnt.average_loss, dsntnn.average_loss, [losses, mask], diff=(0, 1))


def test_average_loss_hand_computed():
  losses = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  assert float(dsnt.average_loss(losses)) == pytest.approx(3.5)
  mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
  assert float(dsnt.average_loss(losses, mask)) == pytest.approx(10 / 3)
  assert float(dsnt.average_loss(losses, mask=jnp.zeros((2, 3)))) == 0.0
  assert float(dsnt.average_loss(losses, jnp.array([[True, False, False], [False, False, True]]))) == pytest.approx(3.5)
  g = jax.grad(lambda l: dsnt.average_loss(l, jnp.zeros((2, 3))))(losses)
  np.testing.assert_array_equal(np.asarray(g), 0.0)
  with pytest.raises(ValueError, match='same size'):
    dsnt.average_loss(losses, jnp.ones((3, 2)))


# ----------------------------------------------------------------------------- coordinate systems


@pytest.mark.parametrize('length', [1, 2, 3, 4, 7, 64, 65])
def test_normalized_linspace(length):
  ours = np.asarray(dsnt.normalized_linspace(length))
  theirs = dsntnn.normalized_linspace(length, dtype=torch.float32).numpy()
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-7)
  np.testing.assert_allclose(ours, (2 * np.arange(length) + 1) / length - 1, rtol=0, atol=2e-7)
  np.testing.assert_allclose(ours, -ours[::-1], atol=2e-7)  # symmetric about 0


def test_normalized_linspace_hand_computed():
  np.testing.assert_allclose(np.asarray(dsnt.normalized_linspace(4)), [-0.75, -0.25, 0.25, 0.75])
  np.testing.assert_allclose(np.asarray(dsnt.normalized_linspace(1)), [0.0])


@pytest.mark.parametrize('size,direction', [((8, 8), 'to_pixel'), ((6, 10), 'to_pixel'), ((4, 6, 10), 'to_pixel'),
                                            ((12,), 'to_normalized'), ((64, 48), 'to_normalized'),
                                            ((6, 10), 'to_normalized')])
def test_coordinate_conversions(size, direction):
  rng = np.random.default_rng(len(size) + sum(size))
  name = 'normalized_to_pixel_coordinates' if direction == 'to_pixel' else 'pixel_to_normalized_coordinates'
  coords = rng.uniform(-1, 1, (2, 5, len(size))) if direction == 'to_pixel' else rng.uniform(
      0, max(size), (2, 5, len(size)))
  _compare(lambda c: getattr(dsnt, name)(c, size), lambda c: getattr(dsntnn, name)(c, size), [coords],
           atol=ATOL * max(size))


@pytest.mark.parametrize('size', [(8, 8), (6, 10), (64, 48), (4, 6, 10)])
def test_coordinate_conversions_round_trip_and_pixel_centres(size):
  rng = np.random.default_rng(sum(size))
  x = jnp.asarray(rng.uniform(-1, 1, (3, 4, len(size))), jnp.float32)
  back = dsnt.pixel_to_normalized_coordinates(dsnt.normalized_to_pixel_coordinates(x, size), size)
  np.testing.assert_allclose(np.asarray(back), np.asarray(x), atol=1e-6)
  # Pixel centres: integer pixel index k along an axis of n pixels is (2k + 1) / n - 1; size is (..., H, W).
  n_xy = size[::-1]
  for k in range(3):
    pix = jnp.full((1, 1, len(size)), float(k))
    np.testing.assert_allclose(np.asarray(dsnt.pixel_to_normalized_coordinates(pix, size))[0, 0],
                               [(2 * k + 1) / n - 1 for n in n_xy], atol=1e-6)
  # The image edges are -1 and 1: pixel -0.5 and n - 0.5.
  edges = jnp.asarray([[[-1.0] * len(size), [1.0] * len(size)]], jnp.float32)
  np.testing.assert_allclose(np.asarray(dsnt.normalized_to_pixel_coordinates(edges, size))[0],
                             [[-0.5] * len(size), [n - 0.5 for n in n_xy]], atol=1e-5)


def test_dsnt_and_conversion_agree_on_one_hot_pixels():
  h, w = 6, 10
  hm = np.zeros((1, 2, h, w), np.float32)
  hm[0, 0, 4, 7] = 1
  hm[0, 1, 0, 9] = 1
  px = dsnt.normalized_to_pixel_coordinates(dsnt.dsnt(jnp.asarray(hm)), (h, w))
  np.testing.assert_allclose(np.asarray(px)[0], [[7, 4], [9, 0]], atol=1e-5)


# ------------------------------------------------------------------------------- eager execution


def _eager_cases():
  """One case per function family: (jax_fn, torch_fn, inputs, differentiate w.r.t.)."""
  rng = np.random.default_rng(99)
  hm = _softmax_heatmaps(rng, (2, 3, 5, 6))
  mu = rng.uniform(-0.9, 0.9, (2, 3, 2))
  other = rng.uniform(-1, 1, (2, 3, 2))
  losses = rng.uniform(0, 2, (2, 3))
  mask = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
  return {
      # The training loss's functions, values and gradients.
      'flat_softmax': (dsnt.flat_softmax, dsntnn.flat_softmax, [hm * 5], (0,)),
      'dsnt': (dsnt.dsnt, dsntnn.dsnt, [hm], (0,)),
      'euclidean_losses': (dsnt.euclidean_losses, dsntnn.euclidean_losses, [mu, other], (0, 1)),
      'js_reg_losses': (lambda h, m: dsnt.js_reg_losses(heatmaps=h, mu_t=m, sigma_t=1.0),  # keyword call
                        lambda h, m: dsntnn.js_reg_losses(heatmaps=h, mu_t=m, sigma_t=1.0), [hm, mu], (0, 1)),
      'average_loss': (dsnt.average_loss, dsntnn.average_loss, [losses, mask], (0, 1)),
      # The rest, values only (their eager gradients cost compile time and share the code paths above).
      'soft_argmax': (lambda h: dsnt.soft_argmax(h, False), lambda h: dsntnn.soft_argmax(h, False), [hm], ()),
      'mse_losses': (dsnt.mse_losses, dsntnn.mse_losses, [mu, other], ()),
      'make_gauss': (lambda m: dsnt.make_gauss(means=m, size=(5, 6), sigma=1.0, normalize=True),
                     lambda m: dsntnn.make_gauss(means=m, size=(5, 6), sigma=1.0, normalize=True), [mu], ()),
      'variance_reg_losses': (lambda h: dsnt.variance_reg_losses(h, 1.0),
                              lambda h: dsntnn.variance_reg_losses(h, 1.0), [hm], ()),
      'normalized_to_pixel_coordinates': (lambda c: dsnt.normalized_to_pixel_coordinates(c, (5, 6)),
                                          lambda c: dsntnn.normalized_to_pixel_coordinates(c, (5, 6)), [mu], ()),
      'pixel_to_normalized_coordinates': (lambda c: dsnt.pixel_to_normalized_coordinates(c, (5, 6)),
                                          lambda c: dsntnn.pixel_to_normalized_coordinates(c, (5, 6)), [mu * 3],
                                          ()),
  }


@pytest.mark.parametrize('name', list(_eager_cases()))
def test_eager_matches_dsntnn(name):
  """The functions also work without jit (every other comparison here runs jitted)."""
  jax_fn, torch_fn, inputs, diff = _eager_cases()[name]
  loose = name == 'variance_reg_losses'  # squared pixel-unit variances: values ~10..100
  _compare(jax_fn, torch_fn, inputs, diff=diff, jit=False, rtol=1e-4 if loose else RTOL,
           atol=1e-4 if loose else ATOL)


# ------------------------------------------------------------------------- NaN safety, gradients


def _all_losses(logits, target, sigma_t=1.0):
  heatmaps = dsnt.flat_softmax(logits)
  coords = dsnt.dsnt(heatmaps)
  total = (dsnt.euclidean_losses(coords, target) + dsnt.l1_losses(coords, target) + dsnt.mse_losses(coords, target)
           + dsnt.js_reg_losses(heatmaps, target, sigma_t) + dsnt.kl_reg_losses(heatmaps, target, sigma_t)
           + dsnt.variance_reg_losses(heatmaps, sigma_t))
  return dsnt.average_loss(total)


_all_losses_value_and_grad = jax.jit(jax.value_and_grad(_all_losses, argnums=(0, 1)))


@pytest.mark.parametrize('peak', [1e2, 1e4, 1e30])
@pytest.mark.parametrize('target_kind', ['elsewhere', 'at_peak', 'exact_coords'])
def test_no_nan_gradient_on_near_one_hot_heatmaps(peak, target_kind):
  h, w = 8, 6
  logits = np.zeros((2, 3, h, w), np.float32)
  cells = [(1, 2), (7, 5), (0, 0), (4, 3), (3, 1), (6, 4)]
  for n, (i, j) in enumerate(cells):
    logits[n // 3, n % 3, i, j] = peak
  logits = jnp.asarray(logits)
  heatmaps = dsnt.flat_softmax(logits)
  coords = dsnt.dsnt(heatmaps)
  if target_kind == 'elsewhere':
    target = jnp.asarray(np.random.default_rng(0).uniform(-0.9, 0.9, (2, 3, 2)), jnp.float32)
  elif target_kind == 'at_peak':
    target = jnp.asarray([[[(2 * j + 1) / w - 1, (2 * i + 1) / h - 1] for i, j in cells[k:k + 3]] for k in (0, 3)],
                         jnp.float32)
  else:
    target = coords  # the prediction itself: Euclidean distance 0
  if peak >= 1e4:
    # Exactly one-hot in float32, so the coords (and a zero distance to them) are exact under any fusion.
    assert float(heatmaps.min()) == 0.0 and float(heatmaps.max()) == 1.0
  loss, (grad, grad_t) = _all_losses_value_and_grad(logits, target)
  assert np.isfinite(float(loss))
  assert np.all(np.isfinite(np.asarray(grad))), 'NaN/inf gradient w.r.t. the logits on near one-hot heatmaps'
  assert np.all(np.isfinite(np.asarray(grad_t))), 'NaN/inf gradient w.r.t. the target'


def test_gradient_through_the_whole_dsnt_chain_matches_dsntnn():
  """flat_softmax -> dsnt -> euclidean + js -> average_loss, d/d logits, against dsntnn autograd."""
  rng = np.random.default_rng(21)
  logits = rng.standard_normal((2, 4, 8, 6)) * 3
  target = rng.uniform(-0.9, 0.9, (2, 4, 2))
  mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.float64)

  def jax_fn(lg, t, m):
    hm = dsnt.flat_softmax(lg)
    return dsnt.average_loss(dsnt.euclidean_losses(dsnt.dsnt(hm), t) + dsnt.js_reg_losses(hm, t, 1.0), m)

  def torch_fn(lg, t, m):
    hm = dsntnn.flat_softmax(lg)
    return dsntnn.average_loss(dsntnn.euclidean_losses(dsntnn.dsnt(hm), t) + dsntnn.js_reg_losses(hm, t, 1.0), m)

  _compare(jax_fn, torch_fn, [logits, target, mask], diff=(0, 1))
