"""Shared pytest setup: make the repository root (kpjax, convert) and tests/ helpers importable.

Also lets torch's idle OpenMP threads sleep instead of spin (unless the caller chose otherwise): on a
small CPU, spinning torch workers between torch calls steal the cores XLA needs, and the suite's tests
interleave the two constantly (measured: ~40 % more CPU time for the model tests on 2 cores).
"""

from __future__ import annotations

import os
import sys

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


import pytest  # noqa: E402  (after the environment set-up above)


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
