"""kpjax.model.pool_unpool against torch's MaxUnpool2d(2, 2)(*MaxPool2d(2, 2, return_indices=True)(x)).

Values and gradients must be bit-identical (compared as raw bits, so the sign of every zero counts too),
on random inputs and on inputs full of ties, where torch keeps the first maximum of each window in
row-major order (top-left, top-right, bottom-left, bottom-right).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kpjax.model import pool_unpool
import torch_reference as tr

SHAPES = [(1, 2, 2, 1), (2, 4, 6, 3), (3, 8, 4, 5), (1, 16, 32, 2), (2, 6, 10, 4)]


def _assert_bitwise_equal(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.float32
  mismatch = actual.view(np.uint32) != expected.view(np.uint32)
  assert not mismatch.any(), (
      f'{mismatch.sum()} of {mismatch.size} elements differ bitwise; first at {np.argwhere(mismatch)[0]}: '
      f'{actual[mismatch][:4]} vs {expected[mismatch][:4]}')


def _check_against_torch(x: np.ndarray, cotangent: np.ndarray, jit: bool = False):
  expected_y, expected_dx = tr.torch_pool_unpool(x, cotangent)
  fn = jax.jit(pool_unpool) if jit else pool_unpool
  y, vjp = jax.vjp(fn, jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(cotangent))
  _assert_bitwise_equal(y, expected_y)
  _assert_bitwise_equal(dx, expected_dx)
  # The gradient goes to exactly one element of each window: the kept one.
  kept = np.asarray(y) != 0
  assert np.array_equal(np.asarray(dx)[kept], cotangent[kept])


@pytest.mark.parametrize('shape,jit', [(s, False) for s in SHAPES[:3]] + [(s, True) for s in SHAPES[3:]])
def test_random_inputs_bitwise(shape, jit):
  rng = np.random.default_rng(sum(shape) + jit)
  x = rng.standard_normal(shape).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  _check_against_torch(x, g, jit)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('values', [(-2, 3), (0, 2), (0, 1)])
def test_small_integer_inputs_ties(shape, values):
  """Small integers: most windows hold repeated values, many share their maximum."""
  rng = np.random.default_rng(100 + sum(shape) + values[1])
  x = rng.integers(*values, size=shape).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  _check_against_torch(x, g)


@pytest.mark.parametrize('fill', [0.0, 1.5, -3.0])
def test_all_equal_windows(fill):
  shape = (2, 4, 6, 3)
  x = np.full(shape, fill, np.float32)
  g = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
  _check_against_torch(x, g)
  # Only the top-left element of each window survives.
  y = np.asarray(pool_unpool(jnp.asarray(x)))
  assert np.all(y[:, 0::2, 0::2] == fill) and np.all(y[:, 1::2] == 0) and np.all(y[:, :, 1::2] == 0)


def _tie_pattern_input(top: float, below: tuple[float, ...]) -> np.ndarray:
  """One 2x2 window per non-empty subset of maximal positions: (1, 2, 2 * 15 * len(below), 1)."""
  windows = []
  for low in below:
    for r in range(1, 5):
      for subset in itertools.combinations(range(4), r):
        w = np.full(4, low, np.float32)
        w[list(subset)] = top
        windows.append(w.reshape(2, 2))
  return np.concatenate(windows, axis=1)[None, :, :, None]


@pytest.mark.parametrize('top,below', [(1.0, (0.0, -1.0)), (0.0, (-2.0,)), (-1.0, (-5.0, -1.5)), (3.0, (2.5,))])
def test_every_tie_position_pattern(top, below):
  """Every set of tied maxima positions: torch keeps the first in row-major order, so must we."""
  x = _tie_pattern_input(top, below)
  g = np.random.default_rng(11).standard_normal(x.shape).astype(np.float32) + 0.5
  _check_against_torch(x, g)
  # Independent expectation: the first maximal position of each window keeps its value.
  y = np.asarray(pool_unpool(jnp.asarray(x)))[0, :, :, 0]
  for k in range(x.shape[2] // 2):
    win = x[0, :, 2 * k:2 * k + 2, 0].ravel()
    first = int(np.argmax(win == win.max()))
    expected = np.zeros(4, np.float32)
    expected[first] = win[first]
    assert np.array_equal(y[:, 2 * k:2 * k + 2].ravel(), expected), (k, win)


def test_signed_zero_ties():
  """Windows of +0 and -0 (equal as numbers): the first is kept with its sign, the rest become +0."""
  signs = np.array(list(itertools.product([0.0, -0.0], repeat=4)), np.float32)  # (16, 4)
  x = np.concatenate([s.reshape(2, 2) for s in signs], axis=1)[None, :, :, None]
  x = np.concatenate([x, -x], axis=-1)  # a second channel with every sign flipped
  g = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
  _check_against_torch(x, g)
  y = np.asarray(pool_unpool(jnp.asarray(x)))
  assert np.array_equal(np.signbit(y[:, 0::2, 0::2]), np.signbit(x[:, 0::2, 0::2]))
  assert not np.signbit(y[:, 1::2]).any() and not np.signbit(y[:, :, 1::2]).any()


def test_bfloat16_values_match_torch():
  rng = np.random.default_rng(5)
  x = rng.integers(-3, 4, size=(2, 6, 8, 3)).astype(np.float32) * 0.5 + rng.standard_normal((2, 6, 8, 3)).astype(
      np.float32).round(1) * (rng.random((2, 6, 8, 3)) < 0.5)
  xb = jnp.asarray(x, jnp.bfloat16)
  y = pool_unpool(xb)
  assert y.dtype == jnp.bfloat16
  pool = torch.nn.MaxPool2d(2, 2, return_indices=True)
  xt = torch.from_numpy(np.array(xb.astype(jnp.float32))).permute(0, 3, 1, 2).contiguous().to(torch.bfloat16)
  expected = torch.nn.MaxUnpool2d(2, 2)(*pool(xt)).float().permute(0, 2, 3, 1).numpy()
  _assert_bitwise_equal(np.asarray(y.astype(jnp.float32)), expected)


def test_under_grad_of_a_scalar_function():
  """jax.grad through pool_unpool inside a larger function equals torch autograd of the same function."""
  rng = np.random.default_rng(9)
  x = rng.integers(-2, 3, size=(2, 4, 4, 3)).astype(np.float32)
  w = rng.standard_normal(x.shape).astype(np.float32)
  dx = jax.jit(jax.grad(lambda a: jnp.sum(jnp.tanh(pool_unpool(a)) * w)))(jnp.asarray(x))
  xt = tr.nhwc_to_torch(x, requires_grad=True)
  pool = torch.nn.MaxPool2d(2, 2, return_indices=True)
  y = torch.nn.MaxUnpool2d(2, 2)(*pool(xt))
  (torch.tanh(y) * tr.nhwc_to_torch(w)).sum().backward()
  np.testing.assert_allclose(np.asarray(dx), xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('shape', [(1, 3, 4, 2), (1, 4, 5, 2), (2, 7, 9, 1), (1, 1, 2, 1)])
def test_odd_sizes_raise(shape):
  with pytest.raises(ValueError, match=r'even H and W.*H=\d+, W=\d+'):
    pool_unpool(jnp.zeros(shape))


@pytest.mark.parametrize('shape', [(4, 4, 3), (2, 1, 4, 4, 3), (4, 4)])
def test_wrong_rank_raises(shape):
  with pytest.raises(ValueError, match=r'NHWC.*\(B, H, W, C\)'):
    pool_unpool(jnp.zeros(shape))


def test_negative_zero_cotangent_gives_equal_gradient():
  """A -0 cotangent: torch's gradient is 0 + (-0) = +0 at the kept element, ours passes -0 through.

  Equal as numbers (np.array_equal); the only bitwise difference we know of, and harmless to any optimiser.
  """
  x = np.random.default_rng(2).standard_normal((1, 4, 4, 2)).astype(np.float32)
  g = np.full(x.shape, -0.0, np.float32)
  _, expected_dx = tr.torch_pool_unpool(x, g)
  _, vjp = jax.vjp(pool_unpool, jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(g))
  assert np.array_equal(np.asarray(dx), expected_dx) and not np.asarray(dx).any()
