"""Model checkpoints on disk: exported models (converted or final) and training workdirs.

Two layouts, one loader:

* an exported model directory (written by `save_model`, e.g. by the PyTorch converter): an orbax
  composite checkpoint with items `params` (the Flax variables) and `metadata` (JSON);
* a training workdir: `DIR/checkpoints/<step>/` from an orbax CheckpointManager with items `state`
  (`params`, `opt_state`, `step`, `rng`), `metadata` (JSON) and `data` (the input iterator state).

The metadata is a `kpjax.spec.ModelSpec` (category, n_locations, width, num_stages, input_size,
preprocessing: how to rebuild and feed the model) plus where it came from (source, sha256, step).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kpjax import atomic
from kpjax.spec import ModelSpec, SpecMismatch

CHECKPOINTS_SUBDIR = 'checkpoints'  # inside a training workdir


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable or not a kpjax model; the message says which and why."""


def check_metadata(metadata: dict[str, Any], where: str = 'metadata') -> ModelSpec:
  """The ModelSpec the metadata describes, or CheckpointError if it describes no model kpjax can build."""
  try:
    return ModelSpec.from_metadata(metadata, where=where)
  except SpecMismatch as e:
    raise CheckpointError(str(e)) from None


def check_fits(model, variables: Any, where: str) -> None:
  """Raises CheckpointError unless `variables` has exactly the parameters (paths and shapes) `model`
  (a CoordRegressionNetwork) needs, naming the first that differs: metadata that describes the model
  over arrays that do not fit it (a damaged or hand-made checkpoint)."""

  def shapes(tree):
    return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}

  want = shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 8, 8, 3), np.float32))))
  got = shapes(variables)
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      raise CheckpointError(f'{where} does not hold the network its metadata describes: {key} is '
                            f'{got.get(key, "missing")} in the checkpoint, {want.get(key, "not a parameter")} expected')


def _to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def save_model(directory: str, variables, metadata: dict[str, Any], force: bool = False) -> str:
  """Writes an exported model directory atomically: all of it appears, or nothing does.

  Args:
    directory: the directory to create.
    variables: the Flax variables, {'params': ...}.
    metadata: model metadata (`ModelSpec.metadata()` plus JSON-serialisable extras).
    force: replace an existing directory (only once the new one is complete; if that fails, the old
      one stays). Without it an existing directory raises CheckpointError.

  Returns:
    The absolute path written.
  """
  check_metadata(metadata)
  directory = os.path.abspath(os.path.expanduser(directory))
  with atomic.staged_dir(directory, replace=force, flag='--force', error=CheckpointError) as new:
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
      checkpointer.save(new, args=ocp.args.Composite(
          params=ocp.args.StandardSave(_to_numpy(variables)), metadata=ocp.args.JsonSave(dict(metadata))))
    finally:
      checkpointer.close()
  return directory


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'metadata')) and (
      os.path.isdir(os.path.join(path, 'params')) or os.path.isdir(os.path.join(path, 'state')))


def _latest_step_dir(checkpoints_dir: str, step: int | None) -> str:
  steps = sorted(int(n) for n in os.listdir(checkpoints_dir) if n.isdigit())
  if not steps:
    raise CheckpointError(f'{checkpoints_dir} holds no finished checkpoint yet')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'{checkpoints_dir} has no checkpoint of step {step}; it has steps {steps}')
  return os.path.join(checkpoints_dir, str(step))


def resolve_model_dir(path: str, step: int | None = None) -> str:
  """The directory holding a model's `metadata` item: an exported model, a workdir's latest (or
  given) step, or a step directory itself."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint {path} does not exist; expected a converted model directory or a training workdir')
  if not os.path.isdir(path):
    raise CheckpointError(f'{path} is a file; expected a kpjax model directory or a training workdir '
                          '(convert a PyTorch file first with python -m convert.torch_to_flax)')
  if _is_step_dir(path):
    return path
  if os.path.isdir(os.path.join(path, CHECKPOINTS_SUBDIR)):
    return _latest_step_dir(os.path.join(path, CHECKPOINTS_SUBDIR), step)
  if any(n.isdigit() for n in os.listdir(path)):  # the checkpoints/ directory itself
    return _latest_step_dir(path, step)
  raise CheckpointError(f'{path} is not a kpjax checkpoint: expected an exported model (params/ + metadata/) '
                        f'or a training workdir ({CHECKPOINTS_SUBDIR}/<step>/)')


def has_checkpoint(workdir: str) -> bool:
  """Whether a training workdir holds a checkpoint to resume from."""
  checkpoints = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINTS_SUBDIR)
  return os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))


def read_metadata(path: str, step: int | None = None) -> dict[str, Any]:
  """The JSON metadata of a model directory or a workdir's latest (or given) checkpoint, without
  reading its arrays; CheckpointError if there is none."""
  model_dir = resolve_model_dir(path, step)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = checkpointer.restore(model_dir, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(f'cannot read the metadata in {model_dir}: {type(e).__name__}: {e}') from None
  finally:
    checkpointer.close()
  return dict(restored['metadata'])


def load_model(path: str, step: int | None = None) -> tuple[dict, dict[str, Any]]:
  """Loads (variables, metadata) from an exported model directory or a training workdir.

  The metadata describes a model (`check_metadata(metadata)` is its ModelSpec). Variables come back
  as numpy arrays on the host ({'params': ...}); a workdir gives its latest
  checkpoint unless `step` is set.
  """
  model_dir = resolve_model_dir(path, step)
  item = 'params' if os.path.isdir(os.path.join(model_dir, 'params')) else 'state'
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = checkpointer.restore(model_dir, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore()}, metadata=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(f'cannot read the checkpoint in {model_dir}: {type(e).__name__}: {e}') from None
  finally:
    checkpointer.close()
  metadata = dict(restored['metadata'])
  check_metadata(metadata, where=f'{model_dir}/metadata')
  tree = restored[item]
  variables = {'params': tree['params']} if item == 'state' else tree
  if 'params' not in variables:
    raise CheckpointError(f'{model_dir}/{item} holds no params')
  return _to_numpy(variables), metadata
