"""remat=True (jax.checkpoint around every block) changes memory, not results.

For each supported `remat_policy`, loss, outputs and every gradient leaf of a slim network equal those
without remat (1e-6 relative loss, 1e-5 relative L2 per gradient leaf: only XLA's fusion decisions differ),
with the Winograd convolutions on (32x32; conv4_x and conv5_x have 64 channels: conv_algorithm 'auto' picks
Winograd for them on CPU).
The compiled training step's temporary memory (XLA's memory analysis, no run) is smaller with remat, when
compiled with kpjax.train.xla_options.compiler_options (as make_train_step does: on CPU, XLA would otherwise
merge the recomputation back into the forward pass). No timing is asserted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpjax.model import losses
from kpjax.train import xla_options
from kpjax.model import CoordRegressionNetwork, init_variables
# 'nothing_saveable' (the default) keeps only each block's input; 'dots_with_no_batch_dims_saveable' also
# keeps the outputs of matmuls without batch dimensions (the Winograd products have one, so few).
POLICIES = ('nothing_saveable', 'dots_with_no_batch_dims_saveable')
N_LOCATIONS, WIDTH, STAGES = 4, 0.125, 2


def _grads(model, params, images, target):
  def loss_fn(p):
    coords, heatmaps = model.apply({'params': p}, images)
    return losses.keypoint_loss(coords, heatmaps, target)[0], (coords, heatmaps)
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


@pytest.fixture(scope='module')
def setup():
  model = CoordRegressionNetwork(N_LOCATIONS, width=WIDTH, num_stages=STAGES)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  target = jnp.asarray(rng.uniform(-0.8, 0.8, (2, N_LOCATIONS, 2)), jnp.float32)
  params = init_variables(model, jax.random.key(0), 32)['params']
  return model, params, images, target, _grads(model, params, images, target)


@pytest.mark.parametrize('policy', POLICIES)
def test_remat_same_loss_outputs_and_gradients(setup, policy):
  model, params, images, target, reference = setup
  (loss_ref, aux_ref), grads_ref = reference
  (loss, aux), grads = _grads(model.clone(remat=True, remat_policy=policy), params, images, target)
  assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6)
  for a, b in zip(aux, aux_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  flat_ref = jax.tree_util.tree_leaves_with_path(grads_ref)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  assert [p for p, _ in flat] == [p for p, _ in flat_ref]
  for (path, g), (_, g_ref) in zip(flat, flat_ref):
    norm = float(jnp.linalg.norm(g_ref))
    if norm < 1e-6 * max(float(jnp.linalg.norm(x)) for _, x in flat_ref):
      continue  # the last belief bias: true gradient 0 (the flat softmax ignores a constant shift)
    assert float(jnp.linalg.norm(g - g_ref)) <= 1e-5 * norm, jax.tree_util.keystr(path)


def test_remat_uses_less_memory():
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  target = jax.ShapeDtypeStruct((2, N_LOCATIONS, 2), jnp.float32)
  temp = {}
  for remat in (False, True):
    model = CoordRegressionNetwork(N_LOCATIONS, width=WIDTH, num_stages=STAGES, remat=remat)
    params = jax.eval_shape(lambda m=model: init_variables(m, jax.random.key(0), 64))['params']

    def loss_fn(p, x, t, m=model):
      coords, heatmaps = m.apply({'params': p}, x)
      return losses.keypoint_loss(coords, heatmaps, t)[0]

    step = jax.jit(jax.grad(loss_fn), compiler_options=xla_options.compiler_options(model))
    compiled = step.lower(params, images, target).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[True] < 0.9 * temp[False], temp  # measured 0.83 (the full network at 96x96: 0.38)


def test_unknown_policy_is_rejected():
  model = CoordRegressionNetwork(N_LOCATIONS, width=0.125, num_stages=1, remat=True, remat_policy='no_such_policy')
  with pytest.raises(ValueError, match='unknown remat_policy'):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
