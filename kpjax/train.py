"""Training: `python -m kpjax.train --config configs/X.py --workdir DIR [--config.FIELD=VALUE ...]`.

Data-parallel over every device of every process, evaluated with FashionAI's NE, checkpointed with
orbax (state, data iterator position, metadata) and resumed from DIR by itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from kpjax import backbone as backbone_lib
from kpjax import checkpoint as ckpt_lib
from kpjax import cli
from kpjax import config_check
from kpjax import parallel
from kpjax import spec as spec_lib
from kpjax import train_step as ts
from kpjax.train_log import MetricWriter, Progress


class TrainingError(cli.RunFailed):
  """Training cannot go on (a diverged loss); the message says why and what is kept."""


def check_devices(config, num_devices: int) -> None:
  """The one check a config needs the machine for: the global batch splits evenly over the devices."""
  if config.batch_size % num_devices:
    raise config_check.ConfigError(
        f'config.batch_size = {config.batch_size}: expected a multiple of the device count ({num_devices}), '
        'since the global batch is split evenly across devices')


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


def _save(manager, step: int, state: ts.TrainState, metadata: dict, data_state: dict, ne: float | None) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state.as_dict()),
      metadata=ocp.args.JsonSave(dict(metadata, step=step)),
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


def _read_init_from(config, spec: spec_lib.ModelSpec, workdir: str) -> Any:
  """The parameters of the converted or exported model config.init_from names (fine-tuning), read and
  checked against the network before the workdir is touched; None without one, or when the workdir
  holds a checkpoint (resuming: it wins)."""
  path = config.init_from
  if not path or ckpt_lib.has_checkpoint(workdir):
    return None
  variables, metadata = ckpt_lib.load_model(path)
  found = ckpt_lib.check_metadata(metadata)
  spec.check_matches(found, spec_lib.NETWORK_FIELDS, theirs=f'init_from {path}')
  if found.preprocessing != spec.preprocessing:
    print(f'note: {path} was trained with preprocessing={found.preprocessing.name!r}, this run uses '
          f'{spec.preprocessing.name!r}; the first steps will adapt the model to the new input conventions')
  ckpt_lib.check_fits(spec.build(), variables, f'init_from {path}')
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), variables['params'])


def _read_backbone(config, workdir: str) -> dict | None:
  """The VGG19 layers config.init_backbone names, read and checked against the network before the
  workdir is touched; None without one, or when the workdir holds a checkpoint (resuming: it wins)."""
  if not config.init_backbone:
    return None
  if ckpt_lib.has_checkpoint(workdir):
    print(f'note: resuming from {workdir}; config.init_backbone is ignored (the checkpoint wins)', flush=True)
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
    # Without JAX's preemption service (jax_enable_preemption_service off), SIGTERM is shared like Ctrl-C.
    self.preemption_service = self.multi and bool(jax.config.jax_enable_preemption_service)
    self.signal: int | None = None
    signals = (signal.SIGINT,) if self.preemption_service else (signal.SIGINT, signal.SIGTERM)
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
    if self.preemption_service and multihost_utils.reached_preemption_sync_point(step):
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


def _evaluate(config, spec: spec_lib.ModelSpec, params, eval_source, step: int, workdir: str,
              writer: MetricWriter, predict_fn, mesh) -> dict[str, float]:
  """Scores `params` (replicated on `mesh`) on the evaluation split, every device and process taking
  its share; logs eval/ne, eval/ne/<category>, eval/pck@.. and eval/images; process 0 draws a grid."""
  from kpjax import inference  # pylint: disable=g-import-not-at-top
  from kpjax import visualize  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline, preprocess  # pylint: disable=g-import-not-at-top
  batches = pipeline.eval_batches(eval_source, spec, config.data,
                                  batch_size=parallel.local_batch_size(int(config.eval_batch_size), mesh),
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  max_images=int(config.data.num_eval_images))
  scores, preds = inference.evaluate_batches(predict_fn, {'params': params}, batches, spec, mesh)
  record = {f'eval/{k}': float(v) for k, v in scores.items()
            if isinstance(v, (int, float, np.floating, np.integer)) and (k == 'ne' or k.startswith(('ne/', 'pck')))}
  record['eval/images'] = float(len(preds['image_id']))
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
  return record


def _check_resumable(config, workdir: str) -> None:
  """Refuses to resume a workdir whose run was started with a config that trains something else,
  before anything in it is touched (see kpjax.config_check.check_resume)."""
  if not ckpt_lib.has_checkpoint(workdir):  # a fresh run
    return
  stored = ckpt_lib.read_metadata(workdir)
  if 'config' not in stored:
    print(f'note: the checkpoints in {workdir} do not record their config; resuming without checking it',
          flush=True)
    return
  config_check.check_resume(stored['config'], config, where=workdir)


def make_train_iterator(config, source, process_index: int = 0, process_count: int = 1):
  """This process's training batches of a validated config's run (kpjax.data.pipeline.train_iterator):
  the global batch of each step from (config.seed, step) alone, this process's rows of it."""
  from kpjax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.train_iterator(source, spec_lib.ModelSpec.from_config(config), config.data,
                                 global_batch_size=int(config.batch_size),
                                 augment=augment_lib.AugmentConfig.from_config(config.augment),
                                 seed=int(config.seed), process_index=process_index, process_count=process_count)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint, and returns a summary.

  The config is validated here (kpjax.config_check), once; what follows gets its parts.
  Returns {'step': the last step trained, 'eval/ne': the last validation NE (None if this call
  evaluated nothing), 'stopped_by': the signal number that stopped the run early, or None}.
  Raises TrainingError on a non-finite loss, ValueError (and subclasses: ConfigError,
  DatasetNotFoundError, CheckpointError, SpecMismatch) for configs, data or checkpoints that cannot be used.
  """
  from kpjax import inference  # pylint: disable=g-import-not-at-top
  from kpjax import visualize  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top

  config_check.check_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = parallel.make_mesh()
  check_devices(config, mesh.devices.size)
  spec = spec_lib.ModelSpec.from_config(config)
  _check_resumable(config, workdir)
  pretrained = _read_backbone(config, workdir)
  initial = _read_init_from(config, spec, workdir)
  process, num_processes = jax.process_index(), jax.process_count()
  print(f'devices: {jax.device_count()}, processes: {num_processes} ({jax.devices()[0].platform}); '
        f'workdir: {workdir}', flush=True)
  train_source = pipeline.get_source(config.data, config.data.train_split, workdir)
  eval_source = pipeline.get_source(config.data, config.data.eval_split, workdir)
  os.makedirs(workdir, exist_ok=True)  # only once the data is there: a run that cannot start writes nothing
  model, optimizer, step_fn = ts.make_training(config, mesh)
  state = ts.create_train_state(model, optimizer, jax.random.key(int(config.seed)), spec.input_size)
  manager = _checkpoint_manager(workdir, config)
  state, data_state = _restore(manager, state)
  start = int(state.step)
  if start == 0 and initial is not None:
    state = state.replace(params=initial, opt_state=optimizer.init(initial))
  if start == 0 and pretrained is not None:
    state = state.replace(params=backbone_lib.copy_into(state.params, pretrained))
    state = state.replace(opt_state=optimizer.init(state.params))
    print(f'backbone: conv1_1 .. conv5_2 from {config.init_backbone}', flush=True)
  train_iter = make_train_iterator(config, train_source, process, num_processes)
  if data_state is not None:
    train_iter.set_state(data_state)
    print(f'resumed from step {start} in {manager.directory}', flush=True)
  state = parallel.replicate(jax.device_get(state), mesh)
  predict_fn = inference.make_predict_fn(model.clone(remat=False), mesh=mesh)
  metadata = spec.metadata(config=config_check.flatten(config))  # resuming checks the config against it

  def evaluate(step: int) -> float:
    record = _evaluate(config, spec, state.params, eval_source, step, workdir, writer, predict_fn, mesh)
    progress.note(f'step {step}: eval/ne {record["eval/ne"]:.4f} ({int(record["eval/images"])} images, '
                  f'{jax.device_count()} devices, {num_processes} processes)')
    return record['eval/ne']

  total = int(config.total_steps)
  end = min(total, int(config.stop_at_step) or total)
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
      eval_now = step % config.eval_every_steps == 0 or step == end  # end: total_steps, or this slot's stop_at_step
      stopping = stop.should_stop(step, share=log)
      # Every evaluation is checkpointed, so that the best by eval/ne is one that was kept.
      save = step % config.checkpoint_every_steps == 0 or step == end or stopping or eval_now
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
      if save:
        _save(manager, step, state, metadata, train_iter.get_state(), last_ne if eval_now else None)
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


def _train(args) -> int:
  parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                  args.initialization_timeout)
  try:
    result = train_and_evaluate(args.config, args.workdir)
  except KeyboardInterrupt:  # a second Ctrl-C: gave up without saving
    return cli.report('interrupted before a checkpoint could be saved; the last saved checkpoint is kept',
                      cli.INTERRUPTED)
  ne = result['eval/ne']
  summary = f'step {result["step"]}' + (f', eval/ne {ne:.4f}' if ne is not None else '')
  if result['stopped_by'] is not None:  # the conventional status of a process ended by a signal
    print(f'stopped: {summary}', flush=True)
    return 128 + int(result['stopped_by'])
  print(f'done: {summary}', flush=True)
  return cli.OK


def main(argv=None) -> int:
  """`python -m kpjax.train --config configs/X.py --workdir DIR [--config.FIELD=VALUE ...]`."""
  parser = cli.ArgumentParser(prog='python -m kpjax.train', description=__doc__.split('\n\n')[0])
  parser.add_config_flag(help_text='the training config, e.g. configs/trousers.py; --config.FIELD=VALUE '
                         'overrides its fields (e.g. --config.batch_size=8)')
  parser.add_argument('--workdir', required=True, help='directory for checkpoints, metrics and pictures '
                      '(rerunning the same command resumes from it)')
  parser.add_argument('--coordinator_address', help='host:port of process 0 (multi-process runs where the '
                      'cluster is not detected: SLURM, Open MPI and TPU pods are)')
  parser.add_argument('--num_processes', type=int, help='number of processes (with --coordinator_address)')
  parser.add_argument('--process_id', type=int, help='this process index (with --coordinator_address)')
  parser.add_argument('--initialization_timeout', type=int, default=parallel.DEFAULT_INITIALIZATION_TIMEOUT_S,
                      help='seconds a multi-process run waits for all its processes to join before it fails')
  args = cli.parse(parser, argv)
  from kpjax import supervise  # pylint: disable=g-import-not-at-top
  if not supervise.is_supervised():
    try:
      run = parallel.requested_run(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
      cli.error(str(e))
    if run is not None:  # JAX's runtime aborts on some failures: a child process runs it, this one reports
      return supervise.run_supervised('kpjax.train', sys.argv[1:] if argv is None else argv, run)
  return cli.run(_train, args)


if __name__ == '__main__':
  sys.exit(main())
