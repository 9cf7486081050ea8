"""Shared pytest setup: make the repository root (kpjax, convert) and tests/ helpers importable; fixtures
every test module may use (`random_variables`).

Also lets torch's idle OpenMP threads sleep instead of spin (unless the caller chose otherwise): on a
small CPU, spinning torch workers between torch calls steal the cores XLA needs, and the suite's tests
interleave the two constantly (measured: ~40 % more CPU time for the model tests on 2 cores).
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # must precede the first `import torch`

# Many tests (and their subprocesses, which inherit the environment) compile the same slim networks:
# JAX's persistent compilation cache lets each compilation happen once per suite run. Must precede
# the first `import jax`.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax-compilation-cache'))

_TESTS = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(_TESTS), _TESTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)


# ---- Shared fixtures ---------------------------------------------------------------------------

def _random_variables(net, seed: int, spread: float = 4.0, size: int = 16) -> dict:
  """Variables for a CoordRegressionNetwork `net`, drawn with numpy: He-normal kernels (N(0, 2 / fan_in)),
  biases N(0, 0.05^2), and hm_conv scaled so that each heatmap's logits have std `spread` on a random
  `size` x `size` image. Flax's own initialisation takes seconds to compile on a CPU (only the shapes
  are taken from it), and leaves a deep random network's heatmaps nearly flat, which would put every
  keypoint at the image centre and make any comparison of coordinates weak."""
  import jax  # pylint: disable=g-import-not-at-top  (after JAX_COMPILATION_CACHE_DIR above)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kpjax.model import network  # pylint: disable=g-import-not-at-top
  template = jax.eval_shape(lambda: network.init_variables(net, jax.random.key(0), 8))
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if len(leaf.shape) == 1:
      return rng.normal(0, 0.05, leaf.shape).astype(np.float32)
    return (rng.normal(0, 1, leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))).astype(np.float32)

  variables = jax.tree_util.tree_map(draw, template)
  probe = rng.normal(size=(1, size, size, 3)).astype(np.float32)
  logits = jax.jit(lambda v, x: net.apply(v, x, method=lambda m, x: m.hm_conv(m.fcn(x))))(variables, probe)
  variables['params']['hm_conv']['kernel'] *= np.float32(spread / float(np.std(logits)))
  return variables


@pytest.fixture(scope='session')
def random_variables():
  """`make(net, seed, spread=4.0, size=16)`: numpy-drawn variables with peaked heatmaps (_random_variables)."""
  return _random_variables


@pytest.fixture(scope='session')
def gcs():
  """A local Cloud Storage emulator (tests/gcs_emulator.py: fake-gcs-server on 127.0.0.1), started once per
  test process, with this process's environment pointing at it as a user's would (its subprocesses inherit
  it); stopped at the end. Each test makes its own bucket with `gcs.create_bucket(name)`."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  emulator = gcs_emulator.Emulator.start()
  saved = {k: os.environ.get(k) for k in emulator.env()}
  os.environ.update(emulator.env())
  try:
    yield emulator
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    emulator.stop()
