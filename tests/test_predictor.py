"""kpjax.inference.predictor: the jitted forward pass (with and without flip TTA), outputs in CSV order and
in original pixels (against hand-computed affines), and loading a model checked against a config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixture as fx
from kpjax.configs import base
from kpjax.data import conventions
from kpjax.data.spec import ModelSpec
from kpjax.errors import SpecMismatch
from kpjax.inference import checkpoints
from kpjax.inference import predictor
from kpjax.model import network

SIZE = 16
META = {'category': 'trousers', 'n_locations': 7, 'width': 0.0625, 'num_stages': 1, 'input_size': SIZE,
        'preprocessing': 'kpjax'}
# trousers: waistband_left, waistband_right, crotch, bottom_left_in, bottom_left_out, bottom_right_in,
# bottom_right_out; a mirror swaps the left/right twins and keeps the crotch.
TROUSERS_FLIP = [1, 0, 2, 5, 6, 3, 4]
TROUSERS_CSV_COLUMNS = [15, 16, 19, 20, 21, 22, 23]  # their columns among the CSV's 24
# The same network on the same images, in a batch of 2B instead of B: XLA may block the batch
# differently, which reorders float32 sums; coordinates in [-1, 1] then agree to float32 rounding (a
# few ulp of 1 = 1.2e-7).
ROUNDING = 1e-6


@pytest.fixture(scope='module')
def model(random_variables):
  net = network.CoordRegressionNetwork(7, width=0.0625, num_stages=1)
  return net, random_variables(net, seed=3, size=SIZE)


def _images(batch: int) -> np.ndarray:
  return np.random.default_rng(1).normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)


def test_predict_fn_is_the_network_jitted(model):
  net, variables = model
  x = _images(3)
  coords = np.asarray(predictor.make_predict_fn(net)(variables, x))
  assert coords.shape == (3, 7, 2)
  want = jax.jit(lambda v, x: net.apply(v, x)[0])(variables, x)
  np.testing.assert_allclose(coords, want, rtol=0, atol=ROUNDING)
  assert predictor.make_predict_fn(net) is predictor.make_predict_fn(net)  # compiled once per model


def test_flip_views_are_the_images_and_their_mirrors_with_left_and_right_swapped(model):
  net, variables = model
  x = _images(3)
  plain = predictor.make_predict_fn(net)
  both = np.asarray(predictor.make_predict_fn(net, flip=True, category='trousers')(variables, x))
  assert both.shape == (3, 2, 7, 2)
  np.testing.assert_allclose(both[:, 0], plain(variables, x), rtol=0, atol=ROUNDING)
  mirrored = np.asarray(plain(variables, np.ascontiguousarray(x[:, :, ::-1])))
  np.testing.assert_allclose(both[:, 1], mirrored[:, TROUSERS_FLIP], rtol=0, atol=ROUNDING)
  # The random network is not mirror-symmetric, so the second view is not the first one again.
  assert np.abs(both[:, 1] - both[:, 0]).max() > 1000 * ROUNDING


def test_flip_needs_the_models_category(model):
  net, _ = model
  with pytest.raises(ValueError, match='needs the model category'):
    predictor.make_predict_fn(net, flip=True)
  with pytest.raises(ValueError, match='category skirt has 4 keypoints but the model predicts 7'):
    predictor.make_predict_fn(net, flip=True, category='skirt')


def test_to_24_puts_each_keypoint_in_its_csv_column():
  coords = np.arange(2 * 7 * 2, dtype=np.float32).reshape(2, 7, 2)
  out = predictor.to_24(coords, 'trousers')
  assert out.shape == (2, 24, 2) and out.dtype == np.float64
  np.testing.assert_array_equal(out[:, TROUSERS_CSV_COLUMNS], coords)
  others = [j for j in range(24) if j not in TROUSERS_CSV_COLUMNS]
  assert np.isnan(out[:, others]).all()
  np.testing.assert_array_equal(predictor.to_24(np.ones((24, 2)), 'all'), np.ones((24, 2)))
  with pytest.raises(ValueError, match=r'skirt has 4 keypoints; got coordinates of shape \(2, 7, 2\)'):
    predictor.to_24(coords, 'skirt')


def _spec(convention: conventions.IOConvention) -> ModelSpec:
  return ModelSpec('trousers', 0.0625, 1, SIZE, convention)


# A 100 x 50 (W x H) image letterboxed into 16 x 16: scale 0.16, 4 rows of padding above and below;
# pixel edges map to edges (x_in + 0.5 = 0.16 (x + 0.5) + pad), so the offsets are 0.08 - 0.5 + pad.
KPJAX_AFFINE = np.array([[0.16, 0, -0.42], [0, 0.16, 3.58]])
# A 80 x 48 image resized to 16 x 16 the original's way: x_in = x * 16 / 80, y_in = y * 16 / 48.
KPDEM_AFFINE = np.array([[0.2, 0, 0], [0, 1 / 3, 0]])


def test_to_original_kpjax_by_hand():
  spec = _spec(conventions.get('kpjax'))
  # Normalised -1 and 1 are the input's outer edges: the image's left/right edges (-0.5, 99.5) and 25
  # original pixels beyond its top/bottom edges (-0.5, 49.5) (4 input rows of padding / 0.16); 0 is the centre.
  coords = np.array([[[-1, -1], [1, 1], [0, 0], [-0.5, 0.5]]])
  want = np.array([[[-0.5, -25.5], [99.5, 74.5], [49.5, 24.5], [24.5, 49.5]]])
  np.testing.assert_allclose(predictor.to_original(coords, KPJAX_AFFINE[None], spec), want, atol=1e-9)
  # Flip views: the second in the mirrored input (x -> -x), averaged with the first in original pixels.
  pairs = np.array([[[[0, 0], [0, 0]], [[0, 0], [0.5, 0]]]]).transpose(0, 2, 1, 3)  # (B=1, 2 views, L=2, 2)
  np.testing.assert_allclose(predictor.to_original(pairs, KPJAX_AFFINE[None], spec),
                             [[[49.5, 24.5], [0.5 * (49.5 + 24.5), 24.5]]], atol=1e-9)


def test_to_original_kpdem_by_hand():
  exact = _spec(conventions.get('kpdem', kpdem_targets='exact'))
  truncated = _spec(conventions.get('kpdem', kpdem_targets='truncated'))
  coords = np.array([[[0.5, 0.25], [0.0, 0.0]]])
  # 'exact': (c_x W, c_y H).
  np.testing.assert_allclose(predictor.to_original(coords, KPDEM_AFFINE[None], exact), [[[40, 12], [0, 0]]],
                             atol=1e-9)
  # 'truncated': c * 16 is the cell floor(x * 16 / W); cell 8 of 5 px holds x = 40..44 (centre 42), cell 4
  # of 3 px holds y = 12..14 (centre 13); cell 0 holds x = 0..4 and y = 0..2.
  np.testing.assert_allclose(predictor.to_original(coords, KPDEM_AFFINE[None], truncated), [[[42, 13], [2, 1]]],
                             atol=1e-9)
  # Flip views: the second view's x' is in the mirrored original, x = W - 1 - x' (exact: 79 - 40 = 39).
  pairs = np.stack([coords, coords], axis=1)
  np.testing.assert_allclose(predictor.to_original(pairs, KPDEM_AFFINE[None], exact),
                             [[[0.5 * (40 + 39), 12], [0.5 * (0 + 79), 0]]], atol=1e-9)


def _config(**fields):
  """A config of the saved model (META), with `fields` ({'model.width': 0.125, ...}) changed."""
  config = base.get_config()
  config.category, config.input_size, config.model.width, config.model.num_stages = 'trousers', SIZE, 0.0625, 1
  return fx.with_overrides(config, fields)


def test_load_predictor_uses_the_checkpoints_model_and_the_configs_compute(model, tmp_path):
  _, variables = model
  path = checkpoints.save_model(str(tmp_path / 'm'), variables, META)
  built, loaded, spec, metadata = predictor.load_predictor(path)
  assert spec == _spec(conventions.get('kpjax')) and metadata == META
  assert (built.n_locations, built.width, built.num_stages) == (7, 0.0625, 1)
  assert built.dtype == jnp.float32 and built.conv_algorithm == spec.convention.conv_algorithm
  np.testing.assert_array_equal(loaded['params']['hm_conv']['kernel'], variables['params']['hm_conv']['kernel'])
  built, _, _, _ = predictor.load_predictor(path, _config(**{'model.conv_algorithm': 'direct',
                                                             'compute_dtype': 'bfloat16'}))
  assert built.conv_algorithm == 'direct' and built.dtype == jnp.bfloat16


@pytest.mark.parametrize('fields, message', [
    ({'model.width': 0.125}, r'width = 0.125 in the config but 0.0625 in the checkpoint .*--config.model.width=0.0625'),
    ({'model.num_stages': 2}, r'num_stages = 2 in the config but 1 in the checkpoint'),
    ({'input_size': 32}, r'input_size = 32 in the config but 16 in the checkpoint'),
    ({'category': 'skirt'}, r"category = 'skirt' in the config but 'trousers' in the checkpoint .*configs/trousers.py"),
    ({'preprocessing': 'kpdem'}, r"preprocessing = 'kpdem' in the config but 'kpjax' in the checkpoint"),
])
def test_load_predictor_refuses_a_config_of_another_model(model, tmp_path, fields, message):
  path = checkpoints.save_model(str(tmp_path / 'm'), model[1], META)
  with pytest.raises(SpecMismatch, match=message):
    predictor.load_predictor(path, _config(**fields))


def test_a_sharded_predict_fn_gives_the_same_coords(model):
  from kpjax.inference import devices  # pylint: disable=g-import-not-at-top
  net, variables = model
  mesh = devices.make_mesh()
  x = _images(2 * jax.device_count())
  fn = predictor.make_predict_fn(net, mesh=mesh)
  got = devices.local_rows(fn(devices.replicate(variables, mesh), devices.shard_batch({'x': x}, mesh)['x']))
  np.testing.assert_allclose(got, predictor.make_predict_fn(net)(variables, x), rtol=0, atol=ROUNDING)
