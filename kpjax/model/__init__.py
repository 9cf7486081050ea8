"""The network and its math: layer tables, Flax modules, pool/unpool, convolutions, DSNT, losses, VGG19.

    kpjax.model.CoordRegressionNetwork(n_locations, width=1.0, num_stages=6)   # the network
    kpjax.model.pool_unpool(x)                                                 # torch's pool + unpool pair
    kpjax.model.max_pool_2x2(x) -> (values, indices)                           # torch's MaxPool2d(2, 2) with indices
    kpjax.model.max_unpool_2x2(values, indices, (H, W))                        # torch's MaxUnpool2d(2, 2), a scatter

The names are resolved on first use, so that `kpjax.model.layers` (plain tables) imports without Flax.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    'CoordRegressionNetwork': 'kpjax.model.network',
    'KeyPointsModel': 'kpjax.model.network',
    'init_variables': 'kpjax.model.network',
    'max_pool_2x2': 'kpjax.model.pooling',
    'max_unpool_2x2': 'kpjax.model.pooling',
    'pool_unpool': 'kpjax.model.pooling',
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_PUBLIC))
