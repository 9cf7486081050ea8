"""Training: `python -m kpjax.train --config configs/X.py --workdir DIR [--config.FIELD=VALUE ...]`.

Data-parallel over every device of every process, evaluated with FashionAI's NE, checkpointed with
orbax (state, data iterator position, metadata) and resumed from DIR by itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import numpy as np
from ml_collections import config_flags

from kpjax import backbone as backbone_lib
from kpjax import checkpoint as ckpt_lib
from kpjax import keypoints
from kpjax import parallel
from kpjax import train_step as ts
from kpjax.train_log import MetricWriter, Progress

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and pictures.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (multi-process runs).')


class TrainingError(RuntimeError):
  """Training cannot go on (a diverged loss); the message says why and what is kept."""


def check_config(config, num_devices: int) -> None:
  """Raises ValueError with the offending field for configs that cannot train."""
  keypoints.check_category(config.category)
  if config.input_size <= 0 or config.input_size % 8:
    raise ValueError(f'config.input_size must be a positive multiple of 8; got {config.input_size}')
  if config.batch_size <= 0 or config.batch_size % num_devices:
    raise ValueError(f'config.batch_size ({config.batch_size}) must be a positive multiple of the device count '
                     f'({num_devices}): the global batch is split evenly across devices')
  if config.total_steps <= 0:
    raise ValueError(f'config.total_steps must be positive; got {config.total_steps}')
  for field in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    if config[field] <= 0:
      raise ValueError(f'config.{field} must be positive; got {config[field]}')
  if config.preprocessing not in ('kpjax', 'kpdem'):
    raise ValueError(f"config.preprocessing must be 'kpjax' or 'kpdem'; got {config.preprocessing!r}")
  ts.make_optimizer(config)  # raises for an unknown optimizer or schedule
  ts.build_model(config)  # raises for an unknown compute_dtype
  if config.remat and not hasattr(jax.checkpoint_policies, config.remat_policy):
    raise ValueError(f'unknown config.remat_policy {config.remat_policy!r}; expected a jax.checkpoint_policies name')
  if config.init_backbone and config.init_from:
    raise ValueError('config.init_backbone and config.init_from are both set: start from the VGG19 backbone '
                     '(init_backbone) or from a whole converted model (init_from), not both')


def _checkpoint_manager(workdir: str, config):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False,
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=int(config.keep_checkpoints)),
          policies.BestN(get_metric_fn=lambda m: m['eval/ne'], reverse=True, n=1,
                         keep_checkpoints_without_metrics=False),
      ]))
  return ocp.CheckpointManager(os.path.join(workdir, ckpt_lib.CHECKPOINTS_SUBDIR), options=options,
                               item_names=('state', 'metadata', 'data'))


def _save(manager, step: int, state: ts.TrainState, config, data_state: dict, ne: float | None) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state.as_dict()),
      metadata=ocp.args.JsonSave(ckpt_lib.model_metadata(config, step=step)),
      data=ocp.args.JsonSave({'iterator': pipeline.state_to_json(data_state)})),
      metrics=None if ne is None else {'eval/ne': float(ne)})
  manager.wait_until_finished()


def _restore(manager, state: ts.TrainState) -> tuple[ts.TrainState, dict | None]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  step = manager.latest_step()
  if step is None:
    return state, None
  target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state.as_dict())
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return ts.TrainState(**restored['state']), pipeline.state_from_json(restored['data']['iterator'])


def _init_from(path: str, config, state: ts.TrainState) -> ts.TrainState:
  """Replaces the fresh parameters by those of a converted or exported model (fine-tuning)."""
  variables, meta = ckpt_lib.load_model(path)
  want = ckpt_lib.model_metadata(config)
  for key in ('n_locations', 'width', 'num_stages'):
    if float(meta[key]) != float(want[key]):
      raise ValueError(f'init_from {path}: the checkpoint has {key}={meta[key]} but the config gives {want[key]}; '
                       f'use a config of the same category and model size')
  if meta['category'] != want['category']:
    raise ValueError(f'init_from {path}: the checkpoint is a {meta["category"]} model but the config trains '
                     f'{want["category"]}')
  if meta['preprocessing'] != config.preprocessing:
    print(f'note: {path} was trained with preprocessing={meta["preprocessing"]!r}, this run uses '
          f'{config.preprocessing!r}; the first steps will adapt the model to the new input conventions')
  fresh = jax.tree_util.tree_structure(state.params)
  if jax.tree_util.tree_structure(variables['params']) != fresh:
    raise ValueError(f'init_from {path}: its parameter tree differs from this model\'s')
  return state.replace(params=jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), variables['params']))


def _read_backbone(config, workdir: str) -> dict | None:
  """The VGG19 layers config.init_backbone names, read and checked against the network before the
  workdir is touched; None without one, or when the workdir holds a checkpoint (resuming: it wins)."""
  if not config.init_backbone:
    return None
  checkpoints = os.path.join(workdir, ckpt_lib.CHECKPOINTS_SUBDIR)
  if os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)):
    print(f'note: resuming from {checkpoints}; config.init_backbone is ignored (the checkpoint wins)', flush=True)
    return None
  return backbone_lib.read_for_model(config.init_backbone, ts.build_model(config))


class _StopRequest:
  """Ctrl-C / SIGTERM (preemption): finish the step in flight, save a checkpoint, exit.

  One process: Python handlers for SIGINT and SIGTERM. Several processes must stop after the same
  step (saving is collective): SIGTERM is left to JAX's preemption service (started by
  jax.distributed.initialize), which agrees on a step (`reached_preemption_sync_point`, asked every
  step), and a Ctrl-C seen by any process is shared with the others at every log step (an all-gather).
  A second Ctrl-C gives up at once (KeyboardInterrupt; the last saved checkpoint stays).
  """

  def __init__(self, num_processes: int):
    self.multi = num_processes > 1
    self.signal: int | None = None
    signals = (signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM)
    self._previous = {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
      self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:
      raise KeyboardInterrupt
    self.signal = signum

  def should_stop(self, step: int, share: bool) -> bool:
    """Whether to stop after `step`; every process calls it at every step (`share`: at log steps)."""
    if not self.multi:
      return self.signal is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      preempted = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
      preempted = False
    if preempted:
      self.signal = self.signal or signal.SIGTERM
      return True
    if share and np.any(multihost_utils.process_allgather(np.int32(self.signal is not None))):
      self.signal = self.signal or signal.SIGINT
      return True
    return False

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}


def _evaluate(config, model, params, eval_source, step: int, workdir: str, writer: MetricWriter,
              predict_fn) -> float:
  from kpjax import inference  # pylint: disable=g-import-not-at-top
  from kpjax import visualize  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline, preprocess  # pylint: disable=g-import-not-at-top
  del model
  batches = pipeline.eval_batches(config, eval_source, batch_size=int(config.eval_batch_size),
                                  max_images=int(config.data.num_eval_images))
  scores, preds = inference.evaluate_batches(predict_fn, {'params': params}, batches, config.category,
                                             config.preprocessing, int(config.input_size))
  record = {f'eval/{k}': float(v) for k, v in scores.items()
            if isinstance(v, (int, float, np.floating, np.integer)) and (k == 'ne' or k.startswith(('ne/', 'pck')))}
  writer.write(step, record)
  n_vis = min(int(config.num_vis_images), len(preds['image_id']))
  if n_vis and jax.process_index() == 0:
    ids = {str(i): k for k, i in enumerate(preds['image_id'][:n_vis])}
    images = [None] * n_vis
    for index in range(len(eval_source)):
      record_i = eval_source[index]
      k = ids.get(str(record_i['image_id']))
      if k is not None:
        images[k] = preprocess.decode_image(record_i['image'], str(record_i['image_id']))
        if all(im is not None for im in images):
          break
    visualize.save_prediction_grid(os.path.join(workdir, 'predictions', f'step_{step:07d}.png'), images,
                                   preds['pred'][:n_vis], preds['category'][:n_vis], preds['keypoints'][:n_vis],
                                   preds['visibility'][:n_vis])
  return float(scores['ne'])


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint, and returns a summary.

  Returns {'step': the last step trained, 'eval/ne': the last validation NE (None if this call
  evaluated nothing), 'stopped_by': the signal number that stopped the run early, or None}.
  Raises TrainingError on a non-finite loss, ValueError (and subclasses: DatasetNotFoundError,
  CheckpointError) for configs, data or checkpoints that cannot be used.
  """
  from kpjax import inference  # pylint: disable=g-import-not-at-top
  from kpjax import visualize  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = parallel.make_mesh()
  check_config(config, mesh.devices.size)
  pretrained = _read_backbone(config, workdir)
  process, num_processes = jax.process_index(), jax.process_count()
  print(f'devices: {jax.device_count()}, processes: {num_processes} ({jax.devices()[0].platform}); '
        f'workdir: {workdir}', flush=True)
  os.makedirs(workdir, exist_ok=True)

  train_source = pipeline.get_source(config, config.data.train_split, workdir)
  eval_source = pipeline.get_source(config, config.data.eval_split, workdir)
  model = ts.build_model(config)
  optimizer = ts.make_optimizer(config)
  state = ts.create_train_state(config, jax.random.key(int(config.seed)), model, optimizer)
  manager = _checkpoint_manager(workdir, config)
  state, data_state = _restore(manager, state)
  start = int(state.step)
  if start == 0 and config.init_from:
    state = _init_from(config.init_from, config, state)
    state = state.replace(opt_state=optimizer.init(state.params))
  if start == 0 and pretrained is not None:
    state = state.replace(params=backbone_lib.copy_into(state.params, pretrained))
    state = state.replace(opt_state=optimizer.init(state.params))
    print(f'backbone: conv1_1 .. conv5_2 from {config.init_backbone}', flush=True)
  train_iter = pipeline.train_iterator(config, train_source, seed=int(config.seed), shard_index=process,
                                       shard_count=num_processes)
  if data_state is not None:
    train_iter.set_state(data_state)
    print(f'resumed from step {start} in {manager.directory}', flush=True)
  state = parallel.replicate(jax.device_get(state), mesh)
  step_fn = ts.make_train_step(model, config, mesh, optimizer)
  eval_model = model.clone(remat=False)
  predict_fn = inference.make_predict_fn(eval_model, config.preprocessing, int(config.input_size))

  def evaluate(step: int) -> float:
    return _evaluate(config, eval_model, jax.device_get(state.params), eval_source, step, workdir, writer,
                     predict_fn)

  total = int(config.total_steps)
  end = min(total, int(config.get('stop_at_step', 0)) or total)
  writer = MetricWriter(workdir, enabled=process == 0, resume_step=start)
  progress = Progress(total, start, enabled=process == 0)
  stop = _StopRequest(num_processes)
  last_ne = None
  step = start
  window = _TrainWindow(int(config.batch_size))
  try:
    if start == 0:
      last_ne = evaluate(0)
    pending = None  # (step, metrics) of the step in flight: read after the next one is dispatched
    while step < end:
      batch = parallel.shard_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      if pending is not None:
        window.add(*pending, manager)
      pending = (step, metrics)
      log = step % config.log_every_steps == 0 or step == end
      eval_now = step % config.eval_every_steps == 0 or step == total
      stopping = stop.should_stop(step, share=log)
      save = step % config.checkpoint_every_steps == 0 or step == end or stopping
      if not (log or eval_now or save):
        continue
      window.add(*pending, manager)  # every boundary reads its own step's metrics before acting
      pending = None
      if log:
        record = window.flush()
        writer.write(step, record)
        progress.update(step, record['train/loss'], record['train/images_per_s'])
      paused = time.perf_counter()
      if eval_now:
        last_ne = evaluate(step)
        progress.note(f'step {step}: eval/ne {last_ne:.4f}')
      if save:
        _save(manager, step, state, config, train_iter.get_state(), last_ne if eval_now else None)
      window.exclude(time.perf_counter() - paused)  # images/s counts training time only
      if stopping:
        progress.note(f'stopped by {signal.Signals(stop.signal).name} after step {step}; checkpoint saved '
                      f'in {manager.directory}: rerun the same command to resume')
        break
  finally:
    stop.restore()
    progress.close()
    writer.close()
    close = getattr(train_iter, 'close', None)
    if close:
      close()
    manager.close()
  if process == 0 and os.path.exists(writer.path) and stop.signal is None:
    visualize.plot_curves(writer.path, os.path.join(workdir, 'curves.png'))
  return {'step': step, 'eval/ne': last_ne, 'stopped_by': stop.signal}


class _TrainWindow:
  """Training metrics since the last log line: checks each step's for NaN/inf and averages them."""
  KEYS = ('loss', 'euclidean', 'js', 'grad_norm')

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.restart()

  def restart(self) -> None:
    self.t0, self.steps, self.sums, self.lr = time.perf_counter(), 0, dict.fromkeys(self.KEYS, 0.0), 0.0
    self.excluded = 0.0

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (evaluation, checkpointing) out of the images/s of this window."""
    self.excluded += seconds

  def add(self, step: int, metrics, manager) -> None:
    metrics = jax.device_get(metrics)
    if not metrics['finite']:
      kept = manager.latest_step()
      raise TrainingError(
          f'training diverged: the loss or its gradient is not finite at step {step} (loss {metrics["loss"]}); '
          + (f'the last good checkpoint (step {kept}) is kept in {manager.directory}' if kept is not None
             else 'no checkpoint was written') + '. Lower config.learning_rate or config.grad_clip_norm.')
    self.steps += 1
    for k in self.KEYS:
      self.sums[k] += float(metrics[k])
    self.lr = float(metrics['lr'])

  def flush(self) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
    n = max(self.steps, 1)
    record = {f'train/{k}': v / n for k, v in self.sums.items()}
    record['train/lr'] = self.lr
    record['train/images_per_s'] = self.steps * self.batch_size / elapsed
    self.restart()
    return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  absl_logging.set_verbosity(absl_logging.WARNING)
  if _WORKDIR.value is None:
    _fail('--workdir is required (the directory for checkpoints and metrics)')
  from kpjax.data.pipeline import DatasetNotFoundError  # pylint: disable=g-import-not-at-top
  try:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (DatasetNotFoundError, ckpt_lib.CheckpointError, ValueError, TrainingError) as e:
    _fail(str(e))
  except KeyboardInterrupt:
    _fail('interrupted before a checkpoint could be saved; the last saved checkpoint is kept', 130)
  ne = result['eval/ne']
  summary = f'step {result["step"]}' + (f', eval/ne {ne:.4f}' if ne is not None else '')
  if result['stopped_by'] is not None:  # the conventional status of a process ended by a signal
    print(f'stopped: {summary}', flush=True)
    sys.exit(128 + int(result['stopped_by']))
  print(f'done: {summary}', flush=True)


def _fail(message: str, status: int = 1) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def run() -> None:
  flags.mark_flags_as_required(['config'])
  app.run(main)


if __name__ == '__main__':
  run()
