"""Max-pool ties on flat images: converted models decide them as PyTorch does (their convention's
conv_algorithm, 'direct', kpjax.data.conventions.KpdemConvention).

Plain synthetic garments (one colour on one colour, saturated bands, constant patches) make whole 2x2
windows of the first pool tie exactly; a network whose output depends on the image then moves with
every tie decided differently. The bound is torch's own variation, measured here on the same images:
torch float32 with oneDNN (its CPU default) against torch without oneDNN and against torch float64;
kpjax may differ from torch as much as the larger of those (three float32 implementations, XLA's,
oneDNN's and torch's GEMM, each break ~1% of the near-ties differently at full width).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kpjax.model import network as model_lib
from kpjax.data import conventions
from kpjax.data.spec import ModelSpec
import pool_ties_reference as ref
import torch_reference as tr

SIDE = 512  # the originals' side: coordinate differences are reported in its pixels
N_LOCATIONS = 7


@pytest.fixture(scope='module')
def inputs():
  _, x = ref.flat_region_images(4, seed=0, side=SIDE)
  return x


@pytest.fixture(scope='module')
def slim(inputs):
  """A slim network (width 0.25, 2 stages: the shapes, not the tie behaviour, are slim) and torch's runs."""
  net = ref.image_dependent_torch_model(N_LOCATIONS, 0.25, 2, seed=0)
  runs = {'reference': ref.torch_first_pool(net, inputs),
          'no oneDNN': ref.torch_first_pool(net, inputs, onednn=False),
          'float64': ref.torch_first_pool(net, inputs, dtype=torch.float64)}
  return tr.torch_state_dict_to_flax(net.state_dict()), runs


DEFAULT = conventions.get('kpdem').conv_algorithm  # what converted models run


def test_converted_models_default_to_direct_convolutions_everywhere():
  kpdem_spec = ModelSpec('trousers', 0.25, 2, 64, conventions.get('kpdem'))
  assert DEFAULT == 'direct' and kpdem_spec.build().conv_algorithm == 'direct'
  assert all(model_lib.block_conv_algorithm(DEFAULT, pooled) == 'direct' for pooled in (True, False))
  assert ModelSpec('trousers', 0.25, 2, 64, conventions.get('kpjax')).build().conv_algorithm == 'auto'
  for asked in ('direct-pooled', 'winograd', 'auto'):
    assert kpdem_spec.build(conv_algorithm=asked).conv_algorithm == asked  # the user's choice stands
  with pytest.raises(ValueError, match='conv_algorithm must be one of'):
    jax.eval_shape(lambda: model_lib.init_variables(kpdem_spec.build(conv_algorithm='fft'), jax.random.key(0), 8))
  assert [model_lib.block_conv_algorithm('direct-pooled', pooled) for pooled in (True, False)] == ['direct', 'auto']
  assert model_lib.block_conv_algorithm('auto', True) == 'auto'


def test_default_keeps_the_elements_torch_keeps_within_torchs_own_variation(slim, inputs):
  variables, runs = slim
  reference = runs['reference']
  live = ref.compare(reference, reference, SIDE)['of']
  # The images tie (a third of the live windows or more) and the network follows the image.
  assert ref.tied_windows(reference[1]) > live / 3
  assert (reference[0].std(0) * SIDE).mean() > 10
  own = [ref.compare(reference, runs[k], SIDE) for k in ('no oneDNN', 'float64')]
  assert min(v['windows'] for v in own) > 0, own  # torch itself is not immune, so the bound is not zero
  ours = ref.compare(reference, ref.kpjax_first_pool(variables, inputs, N_LOCATIONS, 0.25, 2,
                                                     DEFAULT), SIDE)
  assert ours['windows'] <= max(v['windows'] for v in own), (ours, own)
  assert ours['px_max'] <= max(v['px_max'] for v in own), (ours, own)


def test_winograd_before_the_first_pool_breaks_ties_at_full_width(inputs):
  """The first block at the original width (64 channels: 'auto' is Winograd there, on a CPU): the default
  ('direct') stays within torch's own variation, Winograd is far outside it, so the images expose what they
  guard."""
  if jax.default_backend() != 'cpu':
    pytest.skip("'auto' is Winograd on CPUs only")
  net = ref.image_dependent_torch_model(N_LOCATIONS, 1.0, 1, seed=1)
  block = net.fcn.model1_0_0

  def torch_block(dtype=torch.float32, onednn=True):
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
      with torch.no_grad():
        out = copy.deepcopy(block).to(dtype)(tr.nhwc_to_torch(inputs).to(dtype))
    finally:
      torch.backends.mkldnn.enabled = previous
    return out.double().permute(0, 2, 3, 1).numpy()

  params = tr.torch_state_dict_to_flax(block.state_dict())['params']

  def kpjax_block(algorithm):
    layers = model_lib.BACKBONE[0][1]
    module = model_lib.ConvBlock(layers, conv_algorithm=model_lib.block_conv_algorithm(algorithm, pooled=True))
    return np.asarray(jax.jit(module.apply)({'params': params}, jnp.asarray(inputs)), np.float64)

  reference = torch_block()
  ref_kept, ref_max = ref.kept_element(reference)
  live = ref_max > 0

  def differing(block_out):
    return int(((ref.kept_element(block_out)[0] != ref_kept) & live).sum())

  own = max(differing(torch_block(onednn=False)), differing(torch_block(torch.float64)))
  default = differing(kpjax_block(DEFAULT))
  winograd = differing(kpjax_block('auto'))
  assert default <= own, (default, own)
  assert own > 0 and winograd > 10 * own and winograd > 0.05 * live.sum(), (
      f'Winograd changed {winograd} kept elements, torch its own {own}: if Winograd became tie-preserving, '
      "'auto' could be the converted models' default again")


def test_direct_pooled_is_direct_through_the_last_pool_and_close_after(inputs, slim):
  """Bit-identical to 'direct' up to the third pool's input, then Winograd (continuous): close, not equal."""
  variables, _ = slim

  def run(algorithm):
    net = model_lib.CoordRegressionNetwork(N_LOCATIONS, width=0.25, num_stages=2, conv_algorithm=algorithm)
    keep = ('model1_0_2', 'model1_0_3')
    (coords, _), state = jax.jit(lambda v, x: net.apply(
        v, x, capture_intermediates=lambda m, _: m.name in keep))(variables, jnp.asarray(inputs))
    blocks = {k: np.asarray(state['intermediates']['fcn'][k]['__call__'][0]) for k in keep}
    return np.asarray(coords), blocks

  direct, pooled = run('direct'), run('direct-pooled')
  last_pooled = (direct[1]['model1_0_2'], pooled[1]['model1_0_2'])
  assert np.array_equal(last_pooled[0].view(np.uint32), last_pooled[1].view(np.uint32))
  after = (direct[1]['model1_0_3'], pooled[1]['model1_0_3'])
  assert not np.array_equal(*after)  # Winograd runs after the pools (conv4_1 has 64 input channels here)
  np.testing.assert_allclose(after[1], after[0], rtol=0, atol=1e-4 * np.abs(after[0]).max())
  np.testing.assert_allclose(pooled[0], direct[0], rtol=0, atol=1e-4)
