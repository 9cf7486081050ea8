"""kpjax.model.conv: Winograd convolution against XLA's direct convolution, exact in float64, close in float32.

Criteria:
  * the Winograd matrices satisfy F(m, s) exactly (rational arithmetic);
  * float64: values and both gradients equal direct convolution to 1e-12 relative (the algorithm is exact;
    only rounding differs);
  * float32: RMS error against a float64 reference at most 4x direct convolution's for F(4x4, 3x3) (measured
    ~2.7x) and 15x for 7x7 kernels by F(4x4, 4x4) on 2x2 sub-kernels (measured ~8-10x);
  * the whole network with every 3x3/7x7 conv by Winograd, float32, against the PyTorch original: heatmaps
    within 1e-3 relative (direct convolutions: 1e-4, tests/test_model.py), coords within 1e-5, and on a
    case without near-kinks the loss within 2e-3 and every gradient leaf within 2e-3 relative L2, as in
    tests/test_model.py;
  * a stack of Winograd layers trains in no more memory than direct convolution (compiled memory analysis).
"""

from __future__ import annotations

from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpjax.model import conv
from kpjax.model.network import CONV_ALGORITHMS, Conv, CoordRegressionNetwork


@pytest.mark.parametrize('m,s', [(2, 3), (4, 3), (6, 3), (4, 4), (3, 3)])
def test_winograd_matrices_are_exact(m, s):
  bt, g, at = conv.winograd_matrices(m, s)
  a = m + s - 1
  assert len(bt) == a and len(g) == a and len(at) == m
  rng = np.random.default_rng(m * 10 + s)
  for _ in range(5):
    d = [Fraction(int(v), int(q)) for v, q in zip(rng.integers(-9, 9, a), rng.integers(1, 5, a))]
    w = [Fraction(int(v), int(q)) for v, q in zip(rng.integers(-9, 9, s), rng.integers(1, 5, s))]
    gw = [sum(g[i][k] * w[k] for k in range(s)) for i in range(a)]
    bd = [sum(bt[i][k] * d[k] for k in range(a)) for i in range(a)]
    y = [sum(at[i][k] * gw[k] * bd[k] for k in range(a)) for i in range(m)]
    assert y == [sum(w[k] * d[i + k] for k in range(s)) for i in range(m)]


def _random(shape, seed, dtype=np.float64):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


CASES = [  # (batch, H, W, C_in, C_out, kernel)
    (2, 8, 12, 5, 3, 3),
    (1, 16, 8, 7, 4, 7),
    (2, 12, 20, 3, 6, 7),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: 'b{}-{}x{}-c{}-d{}-k{}'.format(*c))
def test_winograd_equals_direct_in_float64(case):
  b, h, w, c, d, k = case
  x, kernel = _random((b, h, w, c), 0), _random((k, k, c, d), 1) / k
  cot = _random((b, h, w, d), 2)
  with jax.enable_x64(True):
    x, kernel, cot = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(cot)
    y_ref, vjp_ref = jax.vjp(conv.direct_conv2d, x, kernel)
    y, vjp = jax.vjp(jax.jit(conv.winograd_conv2d), x, kernel)
    assert y.dtype == jnp.float64 and y.shape == (b, h, w, d)
    scale = float(jnp.abs(y_ref).max())
    assert float(jnp.abs(y - y_ref).max()) <= 1e-12 * scale
    for got, want in zip(vjp(cot), vjp_ref(cot)):
      assert float(jnp.abs(got - want).max()) <= 1e-12 * float(jnp.abs(want).max())


@pytest.mark.parametrize('k,factor', [(3, 4.0), (7, 15.0)])
def test_winograd_float32_error_close_to_direct(k, factor):
  x, kernel = _random((2, 32, 32, 64), 3), _random((k, k, 64, 32), 4) / np.sqrt(k * k * 64)
  with jax.enable_x64(True):
    ref = np.asarray(conv.direct_conv2d(jnp.asarray(x), jnp.asarray(kernel)))
  x32, k32 = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
  rms = lambda y: float(np.sqrt(np.mean(np.square(np.asarray(y, np.float64) - ref))))
  direct, winograd = rms(conv.direct_conv2d(x32, k32)), rms(jax.jit(conv.winograd_conv2d)(x32, k32))
  assert winograd <= factor * direct, (winograd, direct)


def test_choose_algorithm():
  f32 = jnp.float32
  assert conv.choose_algorithm((2, 48, 48, 128), (3, 3, 128, 128), f32, 'cpu') == 'winograd'
  assert conv.choose_algorithm((2, 256, 64, 152), (7, 7, 152, 128), f32, 'cpu') == 'winograd'
  for x_shape, k_shape, dtype, backend in [
      ((2, 48, 48, 128), (3, 3, 128, 128), f32, 'gpu'),  # cuDNN picks its own algorithms
      ((2, 48, 48, 128), (3, 3, 128, 128), jnp.bfloat16, 'cpu'),
      ((2, 48, 48, 128), (3, 3, 128, 128), jnp.float64, 'cpu'),
      ((2, 48, 48, 32), (3, 3, 32, 128), f32, 'cpu'),  # too few channels to pay
      ((2, 24, 48, 128), (3, 3, 128, 128), f32, 'cpu'),  # too small an image to pay
      ((2, 48, 48, 128), (1, 1, 128, 128), f32, 'cpu'),
      ((2, 48, 48, 128), (5, 5, 128, 128), f32, 'cpu'),
  ]:
    assert conv.choose_algorithm(x_shape, k_shape, dtype, backend) == 'direct', (x_shape, k_shape, dtype, backend)


def test_conv2d_dispatch_and_errors():
  x, kernel = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 2))
  np.testing.assert_allclose(conv.conv2d(x, kernel, 'winograd'), conv.conv2d(x, kernel, 'direct'), rtol=1e-6)
  one = jnp.ones((1, 1, 4, 2))
  np.testing.assert_array_equal(conv.conv2d(x, one, 'winograd'), conv.direct_conv2d(x, one))  # no 1x1 Winograd
  with pytest.raises(ValueError, match='conv algorithm must be one of'):
    conv.conv2d(x, kernel, 'fft')
  with pytest.raises(ValueError, match='multiples of 4'):
    conv.winograd_conv2d(jnp.ones((1, 6, 8, 4)), kernel)
  with pytest.raises(ValueError, match='square, odd'):
    conv.winograd_conv2d(x, jnp.ones((2, 2, 4, 2)))
  with pytest.raises(ValueError, match='conv_algorithm must be one of'):
    CoordRegressionNetwork(4, width=0.125, num_stages=1, conv_algorithm='fft').init(jax.random.key(0), x[..., :3])


def test_parameter_tree_is_the_same_for_every_algorithm():
  """Same names, shapes, dtypes for every algorithm, and the same initial values (the parameters are
  created before any convolution runs, with nn.Conv's initialisers)."""
  shapes = []
  for algorithm in CONV_ALGORITHMS:
    model = CoordRegressionNetwork(4, width=0.125, num_stages=2, conv_algorithm=algorithm)
    shapes.append(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert len(shapes) == 4 and all(s == shapes[0] for s in shapes)
  # kpjax.model.network.Conv initialises exactly as the nn.Conv it replaced.
  x = jnp.zeros((1, 8, 8, 5))
  ours = Conv(features=6, kernel_size=3).init(jax.random.key(1), x)
  flax_conv = nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), param_dtype=jnp.float32).init(jax.random.key(1), x)
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(flax_conv)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(flax_conv)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _torch_case(n_locations, width, num_stages, h, w, seed):
  import torch_reference as tr  # pylint: disable=g-import-not-at-top
  net = tr.make_torch_model(n_locations, width=width, num_stages=num_stages, seed=seed, hm_gain=10.0)
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((1, h, w, 3)).astype(np.float32)
  target = rng.uniform(-0.8, 0.8, (1, n_locations, 2)).astype(np.float32)
  model = CoordRegressionNetwork(n_locations, width=width, num_stages=num_stages, conv_algorithm='winograd')
  return tr, net, images, target, model, tr.torch_state_dict_to_flax(net.state_dict())


def test_network_forward_with_winograd_matches_torch():
  """Every 3x3 and 7x7 conv by Winograd (28 of them), 32x32, width 0.25 (up to 128 channels)."""
  tr, net, images, _, model, variables = _torch_case(4, 0.25, 2, 32, 32, seed=24)
  margins = tr.decision_margins(net, images)
  assert margins.pool >= 1e-4, f'test data has a pooling near-tie ({margins}); pick another seed'
  coords_t, heatmaps_t = tr.torch_forward(net, images)
  with jax.default_matmul_precision('highest'):
    coords, heatmaps = jax.jit(model.apply)(variables, jnp.asarray(images))
  assert np.log(heatmaps_t).std(axis=(-1, -2)).min() > 0.25  # peaked maps: the test has teeth
  np.testing.assert_allclose(np.asarray(heatmaps), heatmaps_t, rtol=1e-3, atol=0)
  np.testing.assert_allclose(np.asarray(coords), coords_t, rtol=0, atol=1e-5)


def test_network_gradients_with_winograd_match_torch():
  """A tiny case whose ReLUs and pools are all far from a float32 flip (as in tests/test_model.py)."""
  from kpjax.model import losses
  tr, net, images, target, model, variables = _torch_case(4, 0.125, 2, 8, 8, seed=8)
  margins = tr.decision_margins(net, images)
  assert margins.relu >= 1e-4 and margins.pool >= 1e-4, f'pick another seed: {margins}'
  loss_t, grads_t, _, _ = tr.torch_loss_and_grads(net, images, target)

  def loss_fn(params):
    coords, heatmaps = model.apply({'params': params}, jnp.asarray(images))
    return losses.keypoint_loss(coords, heatmaps, jnp.asarray(target))[0]

  with jax.default_matmul_precision('highest'):
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  assert float(loss) == pytest.approx(loss_t, rel=2e-3)
  grads = tr.flax_grads_to_torch_layout(grads)
  assert grads.keys() == grads_t.keys()
  for key, want in grads_t.items():
    if key == 'fcn.model2.Mconv7_stage2.bias':  # true gradient 0: the flat softmax ignores a constant shift
      continue
    err = np.linalg.norm(grads[key] - want) / np.linalg.norm(want)
    assert err <= 2e-3, (key, err)


def _grad_temp_bytes(algorithm: str, layers: int, k: int) -> int:
  x = jax.ShapeDtypeStruct((1, 64, 64, 64), jnp.float32)
  kernels = [jax.ShapeDtypeStruct((k, k, 64, 64), jnp.float32)] * layers

  def f(x, kernels):
    for kernel in kernels:
      x = jax.nn.relu(conv.conv2d(x, kernel, algorithm))
    return x.sum()

  compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, kernels).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('k', [3, 7])
def test_winograd_training_memory_per_layer_not_above_direct(k):
  """The transformed inputs/filters (4x-16x a layer's input or kernel) are recomputed, not kept: each extra
  layer costs no more memory than with direct convolution (plus one layer's transient workspace)."""
  per_layer = {alg: (_grad_temp_bytes(alg, 4, k) - _grad_temp_bytes(alg, 1, k)) / 3 for alg in ('direct', 'winograd')}
  assert per_layer['winograd'] <= 1.05 * per_layer['direct'], per_layer
