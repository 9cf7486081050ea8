"""kpjax models on disk: the one module that writes and reads both checkpoint formats.

* A model directory (`save_model`: what the PyTorch converter writes, or any model saved on its own):
  an orbax composite checkpoint with the items `params` (the Flax variables) and `metadata` (JSON).
* A training checkpoint (`save_training`, one per saved step of a run): `<workdir>/checkpoints/<step>/`,
  written by an orbax CheckpointManager (`training_manager`) with the items `state` (`step`, `params`,
  `opt_state`), `metadata` (JSON) and `data` (the input pipeline's position, JSON). Saves are asynchronous:
  `save_training` returns once the arrays are copied off the devices, and orbax writes them in the
  background; the next save, `wait_for_saves` and closing the manager wait for it.

Either may be a local directory or gs://bucket/... (kpjax.io.paths). A checkpoint that was being written
when its process died is never taken for one: locally it is still under orbax's temporary name (renamed
when complete), on an object store it lacks its `commit_success.txt` (written last, by orbax or
kpjax.io.atomic), and `locate`, `training_steps` and the manager skip it.

The metadata is a `kpjax.data.spec.ModelSpec` (category, n_locations, width, num_stages, input_size,
preprocessing: how to rebuild and feed the model) plus where it came from (source, sha256, step, and for
training checkpoints the run's config). `locate` tells the layouts apart by their items, and finds the
training workdir of a step directory; `load_model` and `read_metadata` read either. The rest of a
training workdir (metrics, TensorBoard events, drawings) is kpjax.train.workdir's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kpjax.data.spec import ModelSpec
from kpjax.errors import CheckpointError, SpecMismatch
from kpjax.io import atomic
from kpjax.io import paths

CHECKPOINTS_SUBDIR = 'checkpoints'  # inside a training workdir
MODEL_ITEMS = ('params', 'metadata')
TRAINING_ITEMS = ('state', 'metadata', 'data')
BEST_METRIC = 'eval/ne'  # the training checkpoint kept besides the latest ones: the lowest (COCO data: 'eval/ap')


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


def _abspath(path: str | os.PathLike) -> str:
  return os.fspath(paths.resolve(path))


# ---- Model directories -------------------------------------------------------------------------

def save_model(directory: str, variables, metadata: dict[str, Any], force: bool = False) -> str:
  """Writes a model directory atomically: all of it appears, or nothing does.

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
  directory = _abspath(directory)
  with atomic.staged_dir(directory, replace=force, flag='--force', error=CheckpointError) as new:
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
      checkpointer.save(new, args=ocp.args.Composite(
          params=ocp.args.StandardSave(_to_numpy(variables)), metadata=ocp.args.JsonSave(dict(metadata))))
    finally:
      checkpointer.close()
  return directory


# ---- Training checkpoints ----------------------------------------------------------------------

def training_manager(checkpoints_dir: str, keep: int, best_metric: str = BEST_METRIC,
                     lower_is_better: bool = True) -> ocp.CheckpointManager:
  """The CheckpointManager of a run's `checkpoints_dir`: keeps the latest `keep` checkpoints and the one
  with the best `best_metric` (the lowest BEST_METRIC by default; checkpoints saved without metrics never
  count as the best)."""
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=True,
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=int(keep)),
          policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=lower_is_better, n=1,
                         keep_checkpoints_without_metrics=False),
      ]))
  return ocp.CheckpointManager(_abspath(checkpoints_dir), options=options, item_names=TRAINING_ITEMS)


def save_training(manager: ocp.CheckpointManager, step: int, state: dict[str, Any], metadata: dict[str, Any],
                  data_state: dict[str, Any], best_metric: float | None = None, metric_name: str = BEST_METRIC) -> None:
  """Saves training checkpoint `step` (once; a step already saved is left as it is).

  state: {'step', 'params', 'opt_state'} (arrays); metadata: the model's (ModelSpec.metadata, with the
  run's config), `step` is added; data_state: the input pipeline's position (JSON types);
  best_metric: this step's `metric_name` (the manager's best_metric), when it was evaluated.

  Returns once the arrays are copied to the host (waiting first for the previous save to complete); the
  write goes on in the background (module docstring): `wait_for_saves` waits for it.
  """
  if manager.latest_step() == step:
    return
  with _saving(manager):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        metadata=ocp.args.JsonSave(dict(metadata, step=step)),
        data=ocp.args.JsonSave({'iterator': json.dumps(data_state, sort_keys=True)})),
        metrics=None if best_metric is None else {metric_name: float(best_metric)})


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """Returns when the checkpoint being written in the background (if any) is complete; raises its error."""
  with _saving(manager):
    manager.wait_until_finished()


def close_training(manager: ocp.CheckpointManager) -> None:
  """Waits for the checkpoint being written (if any), then closes the manager."""
  with _saving(manager):
    manager.close()


@contextlib.contextmanager
def _saving(manager: ocp.CheckpointManager):
  """A storage failure of a (background) save names the run's checkpoints directory (kpjax.io.paths)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    _raise_storage_failure(e, os.fspath(manager.directory))
    raise


def restore_training(manager: ocp.CheckpointManager, like: dict[str, Any]) -> tuple[dict[str, Any], dict] | None:
  """(state, data_state) of the latest training checkpoint, restored with the shapes, dtypes and
  shardings of `like` ({'step', 'params', 'opt_state'}); None when there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return dict(restored['state']), json.loads(restored['data']['iterator'])


def training_steps(checkpoints_dir: str) -> list[int]:
  """The steps saved (completely) in a run's checkpoints directory, ascending ([] when there is none)."""
  directory = paths.resolve(checkpoints_dir)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _items(p) == 'training')


# ---- Finding and reading a model ---------------------------------------------------------------

def _items(path) -> str | None:
  """'model' or 'training' for a (complete) directory holding that format's items, else None."""
  path = paths.resolve(path)
  if not path.joinpath('metadata').is_dir() or not paths.is_complete(path):
    return None
  if path.joinpath('params').is_dir():
    return 'model'
  if path.joinpath('state').is_dir():
    return 'training'
  return None


def _raise_storage_failure(e: Exception, where: str) -> None:
  """Raises the kpjax error for a storage failure (kpjax.io.paths) rather than call the checkpoint damaged."""
  failure = paths.storage_failure(e, where)
  if failure is not None:
    raise failure from None


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a model's items are.

  directory: the directory holding `metadata` and `params` or `state`; kind: 'model' or 'training';
  workdir: the training workdir it belongs to (None for a model directory); step: the training step
  (None for a model directory).
  """
  directory: str
  kind: str
  workdir: str | None = None
  step: int | None = None


def locate(path: str, step: int | None = None) -> Location:
  """The model at `path`: a model directory, a training workdir (its latest checkpoint, or `step`), its
  checkpoints directory, or one step directory of it. Raises CheckpointError saying what was found."""
  where = paths.resolve(path)
  path = os.fspath(where)
  if not where.exists():
    raise CheckpointError(f'checkpoint {path} does not exist; expected a kpjax model directory or a training workdir')
  if not where.is_dir():
    raise CheckpointError(f'{path} is a file; expected a kpjax model directory or a training workdir '
                          '(convert a PyTorch file first with python -m convert.torch_to_flax)')
  kind = _items(where)
  if kind == 'model':
    return Location(path, 'model')
  if kind == 'training':
    parent = where.parent
    workdir = os.fspath(parent.parent) if parent.name == CHECKPOINTS_SUBDIR else None
    return Location(path, 'training', workdir, int(where.name) if where.name.isdigit() else None)
  if where.joinpath(CHECKPOINTS_SUBDIR).is_dir():
    workdir, checkpoints_dir = path, os.fspath(where.joinpath(CHECKPOINTS_SUBDIR))
  elif where.name == CHECKPOINTS_SUBDIR or any(p.name.isdigit() for p in where.iterdir()):
    workdir, checkpoints_dir = os.fspath(where.parent), path
  else:
    raise CheckpointError(f'{path} is not a kpjax checkpoint: expected a model directory (params/ + metadata/) '
                          f'or a training workdir ({CHECKPOINTS_SUBDIR}/<step>/)')
  steps = training_steps(checkpoints_dir)
  if not steps:
    raise CheckpointError(f'{checkpoints_dir} holds no finished checkpoint yet')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'{checkpoints_dir} has no checkpoint of step {step}; it has steps {steps}')
  return Location(paths.join(checkpoints_dir, str(step)), 'training', workdir, step)


def read_metadata(path: str, step: int | None = None) -> dict[str, Any]:
  """The JSON metadata of a model directory or a workdir's latest (or given) checkpoint, without
  reading its arrays; CheckpointError if there is none."""
  where = locate(path, step).directory
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = checkpointer.restore(where, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for damaged files
    _raise_storage_failure(e, where)
    raise CheckpointError(f'cannot read the metadata in {where}: {type(e).__name__}: {e}') from None
  finally:
    checkpointer.close()
  return dict(restored['metadata'])


def load_model(path: str, step: int | None = None) -> tuple[dict, dict[str, Any]]:
  """Loads (variables, metadata) from a model directory or a training workdir (see `locate`).

  The metadata describes a model (`check_metadata(metadata)` is its ModelSpec). Variables come back
  as numpy arrays on the host ({'params': ...}).
  """
  location = locate(path, step)
  item = 'params' if location.kind == 'model' else 'state'
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = checkpointer.restore(location.directory, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore()}, metadata=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for damaged files
    _raise_storage_failure(e, location.directory)
    raise CheckpointError(f'cannot read the checkpoint in {location.directory}: {type(e).__name__}: {e}') from None
  finally:
    checkpointer.close()
  metadata = dict(restored['metadata'])
  check_metadata(metadata, where=f'{location.directory}/metadata')
  tree = restored[item]
  variables = {'params': tree['params']} if item == 'state' else tree
  if 'params' not in variables:
    raise CheckpointError(f'{location.directory}/{item} holds no params')
  return _to_numpy(variables), metadata
