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
