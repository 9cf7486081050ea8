"""kpjax.model's pool/unpool against torch's MaxPool2d(2, 2, return_indices=True) and MaxUnpool2d(2, 2).

pool_unpool (the fused form), max_pool_2x2 (values and torch's flat indices) and max_unpool_2x2 (a
scatter) must be bit-identical to torch (compared as raw bits, so the sign of every zero counts too),
values, indices and gradients, on random inputs and on inputs full of ties, where torch keeps the first
maximum of each window in row-major order (top-left, top-right, bottom-left, bottom-right), and on NaN,
where it keeps the window's last NaN. And pool_unpool must equal max_unpool_2x2(*max_pool_2x2(x), (H, W))
bit for bit, values and gradients, in float32 and bfloat16.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kpjax.model import max_pool_2x2, max_unpool_2x2, pool_unpool
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


# ---- max_pool_2x2 / max_unpool_2x2 (the scatter form): torch, and pool_unpool bit for bit ----------------

DTYPES = {'float32': (jnp.float32, torch.float32, np.uint32), 'bfloat16': (jnp.bfloat16, torch.bfloat16, np.uint16)}
KINDS = ('normal', 'few values', 'equal windows', 'zero planes', 'signed zeros', 'infinities', 'nan')
INF, NAN = np.float32(np.inf), np.float32(np.nan)


def _input(kind: str, shape, seed: int) -> np.ndarray:
  """float32 NHWC test input of one kind: random, or ties of every sort (few values, whole windows equal,
  all-zero planes of +0 and of -0, +0 against -0, +-inf), or NaNs of both signs among them."""
  rng = np.random.default_rng(seed)
  b, h, w, c = shape
  if kind == 'normal':
    return rng.standard_normal(shape).astype(np.float32)
  if kind == 'few values':
    return rng.choice(np.float32([-1, 0, 2]), shape)
  if kind == 'equal windows':
    windows = rng.choice(np.float32([-1.5, 0, 3]), (b, h // 2, w // 2, c))
    return np.repeat(np.repeat(windows, 2, axis=1), 2, axis=2)
  if kind == 'zero planes':
    x = rng.standard_normal(shape).astype(np.float32)
    plane = rng.integers(0, 3, (b, 1, 1, c))  # 0: random, 1: all +0, 2: all -0
    return np.where(plane == 1, np.float32(0), np.where(plane == 2, np.float32(-0.0), x))
  if kind == 'signed zeros':
    return rng.choice(np.float32([0.0, -0.0]), shape)
  if kind == 'infinities':
    return rng.choice(np.float32([-INF, INF, -0.0, 0.0, 1.0]), shape)
  assert kind == 'nan'
  return rng.choice(np.float32([NAN, -NAN, 1.0, 0.0, -INF, INF]), shape)


def _jax_array(x: np.ndarray, dtype: str) -> jax.Array:
  return jnp.asarray(x, DTYPES[dtype][0])


def _bits(a) -> np.ndarray:
  """The raw bits of a JAX or torch float array (NHWC or NCHW as given) as unsigned integers."""
  if isinstance(a, torch.Tensor):
    a = a.detach()
    return a.view(torch.int16).numpy().view(np.uint16) if a.dtype == torch.bfloat16 else a.numpy().view(np.uint32)
  a = np.asarray(a)
  return a.view(np.uint16) if a.dtype == jnp.bfloat16 else a.view(np.uint32)


def _to_torch(a: jax.Array) -> torch.Tensor:
  """NHWC JAX float array -> contiguous NCHW torch tensor with the same bits (NaN payloads included)."""
  bits = torch.from_numpy(_bits(a).view(np.int16 if a.dtype == jnp.bfloat16 else np.int32).copy())
  t = bits.view(torch.bfloat16 if a.dtype == jnp.bfloat16 else torch.float32)
  return t.permute(0, 3, 1, 2).contiguous()


def _float32(a) -> np.ndarray:
  return a.detach().float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
  return t.permute(0, 2, 3, 1).contiguous()


def _assert_same_bits(actual, expected, what: str, any_nan: bool = False):
  """Raw bits equal; with `any_nan`, NaNs need only be NaN in the same places (torch's bfloat16 kernels
  round through float32 and return every NaN as the canonical 0x7fc0, where kpjax keeps the element's)."""
  a, e = _bits(actual), _bits(expected)
  assert a.shape == e.shape and a.dtype == e.dtype, (what, a.shape, e.shape, a.dtype, e.dtype)
  mismatch = a != e
  if any_nan:
    a_nan, e_nan = np.isnan(np.asarray(actual, np.float32)), np.isnan(_float32(expected))
    mismatch = np.where(a_nan & e_nan, False, mismatch)
  assert not mismatch.any(), f'{what}: {mismatch.sum()} of {mismatch.size} differ; first at {np.argwhere(mismatch)[0]}'


def _composed(x):
  return max_unpool_2x2(*max_pool_2x2(x), x.shape[1:3])


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('kind', KINDS)
def test_pool_indices_unpool_and_gradients_match_torch(kind, dtype):
  """Values and indices (exactly), the unpooled output, d/dx of the pair and d/dvalues of the unpool."""
  pool, unpool = torch.nn.MaxPool2d(2, 2, return_indices=True), torch.nn.MaxUnpool2d(2, 2)
  for n, shape in enumerate(SHAPES):
    x = _jax_array(_input(kind, shape, seed=n), dtype)
    g = _jax_array(np.random.default_rng(50 + n).standard_normal(shape) + 0.1, dtype)
    xt = _to_torch(x).requires_grad_(True)
    vt, it = pool(xt)
    vt.retain_grad()
    yt = unpool(vt, it)
    yt.backward(_to_torch(g))

    values, indices = max_pool_2x2(x)
    assert values.dtype == x.dtype and indices.dtype == jnp.int32
    _assert_same_bits(values, _nhwc(vt), f'{shape} values', any_nan=dtype == 'bfloat16')
    np.testing.assert_array_equal(np.asarray(indices), _nhwc(it).numpy(), err_msg=f'{shape} indices')
    y, unpool_vjp = jax.vjp(lambda v: max_unpool_2x2(v, indices, shape[1:3]), values)
    _assert_same_bits(y, _nhwc(yt), f'{shape} unpooled', any_nan=dtype == 'bfloat16')
    _assert_same_bits(unpool_vjp(g)[0], _nhwc(vt.grad), f'{shape} d/dvalues')
    _, pair_vjp = jax.vjp(_composed, x)
    _assert_same_bits(pair_vjp(g)[0], _nhwc(xt.grad), f'{shape} d/dx')


def test_nan_windows_keep_their_last_nan_as_torch():
  """torch's CPU scan moves on at a larger element or a NaN: a window with NaNs keeps its last one."""
  windows = np.array(list(itertools.product([NAN, 1.0, -INF], repeat=4)), np.float32)  # (81, 4)
  x = np.concatenate([w.reshape(2, 2) for w in windows], axis=1)[None, :, :, None]
  _, indices = max_pool_2x2(jnp.asarray(x))
  for k, w in enumerate(windows):
    nan = np.flatnonzero(np.isnan(w))
    position = nan[-1] if nan.size else int(np.argmax(w == w.max()))
    assert int(indices[0, 0, k, 0]) == (position // 2) * x.shape[2] + 2 * k + position % 2, w
  _, it = torch.nn.MaxPool2d(2, 2, return_indices=True)(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(np.asarray(indices), _nhwc(it).numpy())
  assert np.isnan(np.asarray(pool_unpool(jnp.asarray(x)))).sum() == np.isnan(windows).any(axis=1).sum()


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('kind', KINDS)
def test_pool_unpool_equals_the_scatter_composition_bit_for_bit(kind, dtype):
  """pool_unpool(x) == max_unpool_2x2(*max_pool_2x2(x), (H, W)): values, jax.vjp with random cotangents and
  jax.grad of a scalar function, eager and jitted."""
  for n, shape in enumerate([(2, 4, 6, 3), (1, 16, 32, 2), (3, 8, 4, 5)]):
    x = _jax_array(_input(kind, shape, seed=10 + n), dtype)
    g = _jax_array(np.random.default_rng(20 + n).standard_normal(shape), dtype)
    w = np.random.default_rng(30 + n).standard_normal(shape).astype(np.float32)
    for jit in (False, True):
      results = []
      for f in (pool_unpool, _composed):
        f = jax.jit(f) if jit else f
        y, vjp = jax.vjp(f, x)
        grad = jax.grad(lambda a, f=f: jnp.sum(f(a).astype(jnp.float32) * w))(x)
        results.append((y, vjp(g)[0], grad))
      for what, fused, scattered in zip(('values', 'vjp', 'grad'), *results):
        _assert_same_bits(scattered, fused, f'{shape} jit={jit} {what}')


def test_a_negative_zero_cotangent_is_the_one_difference_between_the_forms():
  """A -0 cotangent at a kept element: the scatter form (like torch) gives +0, pool_unpool passes -0 on.
  Equal as numbers; no optimiser can tell."""
  x = jnp.asarray(_input('few values', (2, 4, 6, 3), seed=4))
  g = jnp.full(x.shape, -0.0, jnp.float32)
  (fused,) = jax.vjp(pool_unpool, x)[1](g)
  (scattered,) = jax.vjp(_composed, x)[1](g)
  assert np.array_equal(np.asarray(fused), np.asarray(scattered)) and not np.asarray(fused).any()
  _, expected = tr.torch_pool_unpool(np.asarray(x), np.asarray(g))
  _assert_same_bits(scattered, expected, 'scatter form against torch')


def test_unpool_to_an_odd_size_as_torch():
  """max_unpool_2x2 scatters any plane's flat indices: torch's pool of an odd input (floor mode) unpooled
  back to that size."""
  xt = torch.from_numpy(_input('few values', (2, 5, 7, 3), seed=6)).permute(0, 3, 1, 2).contiguous()
  vt, it = torch.nn.MaxPool2d(2, 2, return_indices=True)(xt)
  expected = torch.nn.MaxUnpool2d(2, 2)(vt, it, output_size=(5, 7))
  y = max_unpool_2x2(jnp.asarray(_nhwc(vt).numpy()), jnp.asarray(_nhwc(it).numpy()), (5, 7))
  _assert_same_bits(y, _nhwc(expected), 'odd unpool')


def test_unpool_output_sizes_as_torch_accepts_them():
  """output_size within 1 of twice the pooled size, as torch's MaxUnpool2d(2, 2) allows; others raise."""
  values = np.ones((1, 2, 3, 1), np.float32)
  indices = np.zeros(values.shape, np.int64)
  unpool = torch.nn.MaxUnpool2d(2, 2)
  for size in itertools.product(range(1, 8), range(3, 9)):
    try:
      unpool(torch.from_numpy(values).permute(0, 3, 1, 2), torch.from_numpy(indices).permute(0, 3, 1, 2), size)
      torch_accepts = True
    except (ValueError, RuntimeError):
      torch_accepts = False
    if torch_accepts:
      assert max_unpool_2x2(jnp.asarray(values), jnp.asarray(indices), size).shape == (1, *size, 1)
    else:
      with pytest.raises(ValueError, match=r'output_size must be within 1 of twice the pooled size 2x3'):
        max_unpool_2x2(jnp.asarray(values), jnp.asarray(indices), size)


def test_unpool_drops_indices_outside_the_plane():
  """torch raises for an index outside [0, H*W); a scatter cannot, so such values are dropped."""
  values = jnp.asarray(np.arange(1, 5, dtype=np.float32).reshape(1, 1, 4, 1))
  indices = jnp.asarray(np.array([-1, 3, 16, 9], np.int32).reshape(1, 1, 4, 1))
  y = np.asarray(max_unpool_2x2(values, indices, (2, 8)))[0, :, :, 0].ravel()
  expected = np.zeros(16, np.float32)
  expected[3], expected[9] = 2, 4
  np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize('values,indices,size,match', [
    ((2, 3, 1), (2, 3, 1), (4, 6), r'NHWC values \(B, h, w, C\)'),
    ((1, 2, 3, 1), (1, 2, 3, 2), (4, 6), r'integer indices of the values\' shape'),
    ((1, 2, 3, 1), 'float', (4, 6), r'integer indices of the values\' shape'),
    ((1, 2, 3, 1), (1, 2, 3, 1), (1, 4, 6), r'output_size must be \(H, W\); got \(1, 4, 6\)'),
])
def test_unpool_bad_arguments_raise(values, indices, size, match):
  v = jnp.zeros(values)
  i = jnp.zeros(values, jnp.float32) if indices == 'float' else jnp.zeros(indices, jnp.int32)
  with pytest.raises(ValueError, match=match):
    max_unpool_2x2(v, i, size)


@pytest.mark.parametrize('shape,match', [((1, 3, 4, 2), r'even H and W.*H=3, W=4'), ((2, 4, 5, 1), r'H=4, W=5'),
                                         ((4, 4, 3), r'NHWC.*\(B, H, W, C\)')])
def test_max_pool_bad_shapes_raise(shape, match):
  with pytest.raises(ValueError, match=r'max_pool_2x2 .*' + match):
    max_pool_2x2(jnp.zeros(shape))
