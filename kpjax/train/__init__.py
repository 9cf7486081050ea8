"""Training: the loop (`loop.train_and_evaluate`), its step, the run directory (`workdir`), preemption,
multi-process start-up, config validation (`config_check`, which needs no Flax) and logs.
`python -m kpjax.train` is kpjax.cli.train.

`kpjax.train.train_and_evaluate` is resolved on first use, so that importing `kpjax.train.config_check`
does not import the loop, JAX's model code or Flax.
"""

from __future__ import annotations

from typing import Any

__all__ = ['train_and_evaluate']


def __getattr__(name: str) -> Any:
  if name == 'train_and_evaluate':
    from kpjax.train import loop  # pylint: disable=g-import-not-at-top
    return loop.train_and_evaluate
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
