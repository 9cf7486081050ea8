"""The training loop: `train_and_evaluate(config, workdir)`, what `python -m kpjax.train` runs.

Data-parallel over every device of every process, evaluated with FashionAI's NE (and, on COCO-format data,
COCO's keypoint AP: kpjax.inference.scoring), checkpointed with orbax (state, data iterator position,
metadata; asynchronously: the steps go on while a checkpoint is written) and resumed from the workdir by
itself. The model's outputs, masks and flips are the keypoint set of the data the config names
(kpjax.data.sources.dataset_keypoint_set). The workdir may be gs://bucket/... (kpjax.io.paths).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import jax
import numpy as np

from kpjax.data import sources
from kpjax.data import spec as spec_lib
from kpjax.errors import ConfigError, StorageAccessError, StorageFailed, TrainingError
from kpjax.inference import checkpoints
from kpjax.inference import devices
from kpjax.io import paths
from kpjax.model import vgg19
from kpjax.train import config_check
from kpjax.train import step as ts
from kpjax.train.log import MetricWriter, Progress
from kpjax.train.preemption import StopRequest
from kpjax.train.workdir import Workdir


def check_devices(config, num_devices: int) -> None:
  """The one check a config needs the machine for: the global batch splits evenly over the devices."""
  if config.batch_size % num_devices:
    raise ConfigError(
        f'config.batch_size = {config.batch_size}: expected a multiple of the device count ({num_devices}), '
        'since the global batch is split evenly across devices')


def _read_init_from(config, spec: spec_lib.ModelSpec) -> Any:
  """The parameters of the model directory config.init_from names (fine-tuning), read and checked
  against the network before the workdir is touched; None without one."""
  path = config.init_from
  if not path:
    return None
  variables, metadata = checkpoints.load_model(path)
  found = checkpoints.check_metadata(metadata)
  spec.check_matches(found, spec_lib.NETWORK_FIELDS, theirs=f'init_from {path}')
  if found.convention != spec.convention:
    print(f'note: {path} was trained with preprocessing={found.convention.name!r}, this run uses '
          f'{spec.convention.name!r}; the first steps will adapt the model to the new input conventions')
  checkpoints.check_fits(spec.build(), variables, f'init_from {path}')
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), variables['params'])


def _check_resumable(config, workdir: Workdir) -> None:
  """Refuses to resume a workdir whose run was started with a config that trains something else,
  before anything in it is touched (see kpjax.train.config_check.check_resume)."""
  stored = workdir.stored_metadata()
  if 'config' not in stored:
    print(f'note: the checkpoints in {workdir.root} do not record their config; resuming without checking it',
          flush=True)
    return
  config_check.check_resume(stored['config'], config, where=workdir.root)


def _logged(key: str, oks: bool) -> bool:
  """Whether training logs the evaluation figure `key`: NE and PCK (overall and per category), and for a set
  scored with OKS also AP and AR."""
  return key == 'ne' or key.startswith(('ne/', 'pck')) or (oks and key.startswith(('ap', 'ar')))


def _evaluate(config, spec: spec_lib.ModelSpec, params, eval_source, step: int, workdir: Workdir,
              writer: MetricWriter, predict_fn, mesh) -> dict[str, float]:
  """Scores `params` (replicated on `mesh`) on the evaluation split, every device and process taking
  its share; logs eval/ne, eval/ne/<category>, eval/pck@.. (and for COCO data eval/ap, eval/ap50, ...,
  eval/ap/<category>) and eval/images; process 0 draws a grid."""
  from kpjax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from kpjax.inference import drawing  # pylint: disable=g-import-not-at-top
  from kpjax.inference import scoring  # pylint: disable=g-import-not-at-top
  batches = pipeline.eval_batches(eval_source, spec, config.data,
                                  batch_size=devices.local_batch_size(int(config.eval_batch_size), mesh),
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  max_images=int(config.data.num_eval_images))
  scores, preds = scoring.evaluate_batches(predict_fn, {'params': params}, batches, spec, mesh)
  record = {f'eval/{k}': float(v) for k, v in scores.items()
            if isinstance(v, (int, float, np.floating, np.integer)) and _logged(k, spec.keypoint_set.scored_by_oks)}
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
        images[k] = images_lib.decode_image(record_i['image'], str(record_i['image_id']))
        if all(im is not None for im in images):
          break
    drawing.save_prediction_grid(workdir.predictions(step), images, preds['pred'][:n_vis], preds['category'][:n_vis],
                                 preds['keypoints'][:n_vis], preds['visibility'][:n_vis],
                                 keypoint_set=spec.keypoint_set)
  return record


def make_train_iterator(config, source, process_index: int = 0, process_count: int = 1, start_step: int = 0):
  """This process's training batches of a validated config's run (kpjax.data.pipeline.train_iterator),
  from `start_step` on: the global batch of each step from (config.seed, step) alone, this process's
  rows of it."""
  from kpjax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  from kpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  spec = spec_lib.ModelSpec.from_config(config, sources.source_keypoint_set(source))
  return pipeline.train_iterator(source, spec, config.data,
                                 global_batch_size=int(config.batch_size),
                                 augment=augment_lib.AugmentConfig.from_config(config.augment),
                                 seed=int(config.seed), process_index=process_index, process_count=process_count,
                                 start_batch=start_step)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint, and returns a summary.

  The config is validated here (kpjax.train.config_check), once; what follows gets its parts.
  Returns {'step': the last step trained, 'eval/ne': the last validation NE (None if this call
  evaluated nothing, or the data defines no NE), 'stopped_by': the signal number that stopped the run
  early, or None}, and for COCO-format data 'eval/ap' (the last validation AP, or None).
  Raises TrainingError on a non-finite loss, StorageFailed when the storage kept failing (kpjax.io.paths),
  ValueError (and subclasses: ConfigError, DatasetNotFoundError, CheckpointError, SpecMismatch,
  StorageAccessError) for configs, data, checkpoints or storage that cannot be used.
  """
  try:
    return _train_and_evaluate(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    failure = e if isinstance(e, (StorageAccessError, StorageFailed)) else paths.storage_failure(e, default=workdir)
    if failure is None:
      raise
    try:
      kept = _kept(Workdir.at(workdir))
    except Exception:  # pylint: disable=broad-except  (the storage that failed may fail again)
      kept = None
    raise (type(failure)(f'{failure}; {kept}') if kept else failure) from None


def _train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  from kpjax.data import sources  # pylint: disable=g-import-not-at-top
  from kpjax.inference import predictor  # pylint: disable=g-import-not-at-top
  from kpjax.inference import scoring  # pylint: disable=g-import-not-at-top
  from kpjax.train import curves  # pylint: disable=g-import-not-at-top

  config_check.check_config(config)
  workdir = Workdir.at(workdir)
  mesh = devices.make_mesh()
  check_devices(config, mesh.devices.size)
  spec = spec_lib.ModelSpec.from_config(config, sources.dataset_keypoint_set(config.data))
  main, lower_is_better = scoring.main_metric(spec.keypoint_set)
  resume_step = workdir.latest_step()  # None: a fresh run
  paths.check_writable(workdir.root)  # gs://: the bucket takes writes and deletes, before anything is done
  pretrained = initial = None
  if resume_step is not None:
    _check_resumable(config, workdir)
    for field in ('init_backbone', 'init_from'):
      if config[field]:
        print(f'note: resuming from {workdir.root}; config.{field} is ignored (the checkpoint wins)', flush=True)
  else:  # read and checked before the workdir is touched
    pretrained = (vgg19.read_for_model(config.init_backbone, ts.build_model(config, spec.keypoint_set))
                  if config.init_backbone else None)
    initial = _read_init_from(config, spec)
  process, num_processes = jax.process_index(), jax.process_count()
  print(f'devices: {jax.device_count()}, processes: {num_processes} ({jax.devices()[0].platform}); '
        f'workdir: {workdir.root}', flush=True)
  train_source = sources.get_source(config.data, config.data.train_split, workdir.root)
  eval_source = sources.get_source(config.data, config.data.eval_split, workdir.root)
  model, optimizer, step_fn = ts.make_training(config, mesh, spec.keypoint_set)
  state = ts.create_train_state(model, optimizer, jax.random.key(int(config.seed)), spec.input_size)
  # Creates the workdir: only once the data is there.
  manager = workdir.manager(int(config.keep_checkpoints), f'eval/{main}', lower_is_better)
  restored = checkpoints.restore_training(manager, state.as_dict()) if resume_step is not None else None
  if restored is not None:
    state = ts.TrainState(**restored[0])
  start = int(state.step)
  if start == 0 and initial is not None:
    state = state.replace(params=initial, opt_state=optimizer.init(initial))
  if start == 0 and pretrained is not None:
    state = state.replace(params=vgg19.copy_into(state.params, pretrained))
    state = state.replace(opt_state=optimizer.init(state.params))
    print(f'backbone: conv1_1 .. conv5_2 from {config.init_backbone}', flush=True)
  train_iter = make_train_iterator(config, train_source, process, num_processes, start_step=start)
  if restored is not None:
    train_iter.set_state(restored[1])  # where the saved step's input stream stood (its step count)
    print(f'resumed from step {start} in {manager.directory}', flush=True)
  state = devices.replicate(jax.device_get(state), mesh)
  predict_fn = predictor.make_predict_fn(model.clone(remat=False), mesh=mesh,
                                         confidence=spec.keypoint_set.scored_by_oks)
  metadata = spec.metadata(config=config_check.flatten(config))  # resuming checks the config against it
  last = {'eval/ne': None, f'eval/{main}': None}

  def evaluate(step: int) -> float:
    record = _evaluate(config, spec, state.params, eval_source, step, workdir, writer, predict_fn, mesh)
    last.update({k: record.get(k) for k in last})
    progress.note(f'step {step}: eval/{main} {record[f"eval/{main}"]:.4f} ({int(record["eval/images"])} images, '
                  f'{jax.device_count()} devices, {num_processes} processes)')
    return record[f'eval/{main}']

  total = int(config.total_steps)
  end = min(total, int(config.stop_at_step) or total)
  writer = MetricWriter(workdir.metrics, workdir.tensorboard, enabled=process == 0,
                        resume_step=start if restored is not None else None)
  progress = Progress(total, start, enabled=process == 0)
  stop = StopRequest(num_processes)
  last_best = None
  step = start
  window = _TrainWindow(int(config.batch_size))
  try:
    if start == 0:
      last_best = evaluate(0)
    pending = None  # (step, metrics) of the step in flight: read after the next one is dispatched
    while step < end:
      batch = devices.shard_batch(next(train_iter), mesh)
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
        last_best = evaluate(step)
      if save:
        writer.flush()  # the lines up to this step are durable before its checkpoint can be
        checkpoints.save_training(manager, step, state.as_dict(), metadata, train_iter.get_state(),
                                  last_best if eval_now else None, metric_name=f'eval/{main}')
      window.exclude(time.perf_counter() - paused)  # images/s counts training time only
      if stopping:
        checkpoints.wait_for_saves(manager)
        progress.note(f'stopped by {signal.Signals(stop.signal).name} after step {step}; checkpoint saved '
                      f'in {manager.directory}: rerun the same command to resume')
        break
  finally:
    stop.restore()
    progress.close()
    writer.close()
    train_iter.close()
    checkpoints.close_training(manager)  # waits for the checkpoint being written
  if process == 0 and writer.has_records() and stop.signal is None:
    curves.plot_curves(workdir.metrics, workdir.curves, ne_key=f'eval/{main}')
  return {'step': step, **last, 'stopped_by': stop.signal}


def _kept(workdir: Workdir) -> str | None:
  """What a failed run leaves, for a message: its last complete checkpoint (None: none)."""
  steps = checkpoints.training_steps(workdir.checkpoints)
  if not steps:
    return None
  return f'the last complete checkpoint (step {steps[-1]}) is kept in {workdir.checkpoints}: rerun the same command ' \
         'to resume from it'


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
      checkpoints.wait_for_saves(manager)
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
