"""A training run's directory: what lives where in it, and the one place that reads its state back.

    <workdir>/checkpoints/<step>/            training checkpoints (format: kpjax.inference.checkpoints)
    <workdir>/metrics.jsonl                  one JSON object a line (kpjax.train.log)
    <workdir>/tensorboard/                   TensorBoard events mirroring metrics.jsonl
    <workdir>/predictions/step_XXXXXXX.png   validation predictions drawn at each evaluation
    <workdir>/curves.png                     loss and NE (COCO data: AP), plotted at the end of a run
    <workdir>/synthetic/                     generated data (config.data.source = 'synthetic', no synthetic_dir)

The workdir may be a local directory or gs://bucket/... (kpjax.io.paths); its paths are strings either way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from kpjax.data import sources
from kpjax.inference import checkpoints
from kpjax.io import paths


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The paths of one run's directory (`root`, absolute or gs://) and what its checkpoints say."""
  root: str

  @classmethod
  def at(cls, path: str | os.PathLike) -> Workdir:
    return cls(os.fspath(paths.resolve(path)))

  @property
  def checkpoints(self) -> str:
    return paths.join(self.root, checkpoints.CHECKPOINTS_SUBDIR)

  @property
  def metrics(self) -> str:
    return paths.join(self.root, 'metrics.jsonl')

  @property
  def tensorboard(self) -> str:
    return paths.join(self.root, 'tensorboard')

  @property
  def curves(self) -> str:
    return paths.join(self.root, 'curves.png')

  @property
  def synthetic(self) -> str:
    return paths.join(self.root, sources.SYNTHETIC_SUBDIR)

  def predictions(self, step: int) -> str:
    """The drawing of the validation predictions at `step`."""
    return paths.join(self.root, 'predictions', f'step_{step:07d}.png')

  def latest_step(self) -> int | None:
    """The last step checkpointed here, or None for a fresh run."""
    steps = checkpoints.training_steps(self.checkpoints)
    return steps[-1] if steps else None

  def stored_metadata(self) -> dict[str, Any]:
    """The metadata of the latest checkpoint (the model and, since 0.1.0, the run's config)."""
    return checkpoints.read_metadata(self.root)

  def manager(self, keep: int, best_metric: str | None = None, lower_is_better: bool = True):
    """The orbax CheckpointManager of this run's checkpoints (kpjax.inference.checkpoints.training_manager),
    keeping the best by `best_metric` (default: its BEST_METRIC, NE)."""
    return checkpoints.training_manager(self.checkpoints, keep, best_metric or checkpoints.BEST_METRIC,
                                        lower_is_better)
