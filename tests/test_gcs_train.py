"""Training with a gs:// workdir, against a local Cloud Storage emulator (the `gcs` fixture, conftest.py):
the same run as on a local disk, on 1 process and on 2 processes x 2 devices, stopped and resumed; a
process killed during a save resumes from the last complete checkpoint; a save the service refuses stops
the run with one error line and leaves the last complete checkpoint, from which a rerun goes on.

Every run is compared with one uninterrupted run on a local disk (test_parallel's `reference`), step by step.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

import gcs_emulator
import train_fixture as fx
from kpjax.inference import checkpoints as ckpt_lib
from kpjax.train import loop as train
from kpjax.train.log import read_metrics
from test_parallel import FIXTURE, REPO, TIMEOUT_S, _launch, reference  # noqa: F401  (reference: a fixture)

_CPP_LOG = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ')  # tensorstore's own log lines


def error_lines(stderr: str) -> list[str]:
  """stderr without the C++ libraries' log lines (tensorstore logs that an emulator needs no credentials)."""
  return [line for line in stderr.strip().splitlines() if line and not _CPP_LOG.match(line)]


def _losses(workdir):
  return [(r['step'], r['train/loss']) for r in read_metrics(f'{workdir}/metrics.jsonl') if 'train/loss' in r]


def _assert_one_uninterrupted_run(workdir, reference, exact: bool):
  """Every step's loss is the reference's, each step logged once, each evaluation once."""
  rows = read_metrics(f'{workdir}/metrics.jsonl')
  train_steps = [r['step'] for r in rows if 'train/loss' in r]
  eval_steps = [r['step'] for r in rows if 'eval/ne' in r]
  assert train_steps == list(range(1, 9)) and len(eval_steps) == len(set(eval_steps)), (train_steps, eval_steps)
  got, want = _losses(workdir), _losses(reference)
  if exact:  # one device, the same computations
    assert got == want
  else:  # 4 devices reduce the gradients in another order
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-4)
  ne = {r['step']: r['eval/ne'] for r in rows if 'eval/ne' in r}
  ref_ne = {r['step']: r['eval/ne'] for r in read_metrics(f'{reference}/metrics.jsonl') if 'eval/ne' in r}
  np.testing.assert_allclose([ne[s] for s in sorted(ref_ne)], [ref_ne[s] for s in sorted(ref_ne)],
                             rtol=1e-6 if exact else 1e-4)


def test_a_gs_workdir_stopped_and_resumed_equals_a_local_run(gcs, reference, monkeypatch):
  workdir = f'{gcs.create_bucket("kpjax-one")}/run'
  fx.install_source(monkeypatch)
  assert train.train_and_evaluate(fx.tiny_config(stop_at_step=3), workdir)['step'] == 3
  assert ckpt_lib.training_steps(f'{workdir}/checkpoints') == [3]
  assert train.train_and_evaluate(fx.tiny_config(), workdir)['step'] == 8  # resumes from step 3 by itself
  _assert_one_uninterrupted_run(workdir, reference, exact=True)
  assert ckpt_lib.training_steps(f'{workdir}/checkpoints') == [3, 4, 8]
  objects = gcs.objects('kpjax-one', 'run/')
  assert 'run/curves.png' in objects and any(o.startswith('run/tensorboard/events.out.tfevents') for o in objects)
  assert 'run/predictions/step_0000008.png' in objects
  assert not [o for o in objects if '.kpjax-write-check' in o or '.tmp-' in o], objects
  got, meta = ckpt_lib.load_model(workdir)
  want, _ = ckpt_lib.load_model(reference)
  assert meta['step'] == 8
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_two_processes_of_two_devices_on_gs_then_one_device(gcs, reference, monkeypatch):
  workdir = f'{gcs.create_bucket("kpjax-two")}/run'
  outs = _launch(workdir, {'stop_at_step': 4}, devices=2, processes=2)
  assert all('devices: 4, processes: 2' in out for out in outs)
  assert ckpt_lib.training_steps(f'{workdir}/checkpoints') == [4]
  fx.install_source(monkeypatch)
  assert train.train_and_evaluate(fx.tiny_config(), workdir)['step'] == 8  # this process alone goes on
  _assert_one_uninterrupted_run(workdir, reference, exact=False)


def test_a_process_killed_during_a_save_resumes_from_the_last_complete_checkpoint(gcs, reference, monkeypatch):
  workdir = f'{gcs.create_bucket("kpjax-kill")}/run'
  proxy = gcs_emulator.FaultProxy.start(gcs.url)
  try:
    held = proxy.fail('*', r'run/checkpoints/8/', None)  # step 8's save starts and never finishes
    proc = subprocess.Popen([sys.executable, FIXTURE, workdir, '{}'], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **gcs.env(proxy.url)})
    deadline = time.monotonic() + TIMEOUT_S
    while not held.hits and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.1)
    assert held.hits and proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
  finally:
    proxy.clear()
    proxy.stop()
  assert ckpt_lib.training_steps(f'{workdir}/checkpoints') == [4]  # 8 was cut: it never reads as complete
  assert 'run/checkpoints/8/commit_success.txt' not in gcs.objects('kpjax-kill', 'run/')
  assert max(s for s, _ in _losses(workdir)) == 8  # its log had reached step 8
  fx.install_source(monkeypatch)
  assert train.train_and_evaluate(fx.tiny_config(), workdir)['step'] == 8
  _assert_one_uninterrupted_run(workdir, reference, exact=True)
  assert ckpt_lib.training_steps(f'{workdir}/checkpoints') == [4, 8]


# The demo config shrunk: 24 synthetic garments (built into the bucket, read back by array_record), 4 steps.
_SMALL_DEMO = ['--config', os.path.join(REPO, 'configs', 'demo.py'), '--config.data.synthetic_num_images=24',
               '--config.input_size=32', '--config.model.num_stages=1', '--config.batch_size=4',
               '--config.total_steps=4', '--config.checkpoint_every_steps=2', '--config.eval_every_steps=1000000',
               '--config.log_every_steps=1', '--config.data.num_eval_images=4', '--config.eval_batch_size=4',
               '--config.num_vis_images=0', '--config.warmup_steps=1']


def test_a_save_the_service_refuses_stops_the_run_and_a_rerun_resumes(gcs):
  bucket = gcs.create_bucket('kpjax-cli')
  workdir = f'{bucket}/demo'
  proxy = gcs_emulator.FaultProxy.start(gcs.url)
  try:
    # The last object of step 4's checkpoint (written after all its arrays): a server error the client
    # libraries do not retry (507), standing for one that outlasted their retries.
    proxy.fail('POST', r'name=demo/checkpoints/4/commit_success\.txt', 507)
    failed = subprocess.run([sys.executable, '-m', 'kpjax.train', *_SMALL_DEMO, '--workdir', workdir], cwd=REPO,
                            capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, **gcs.env(proxy.url)})
  finally:
    proxy.stop()
  assert failed.returncode == 1, failed.stdout + failed.stderr
  lines = error_lines(failed.stderr)  # besides orbax's warnings (absl), one error line and no traceback
  assert [line for line in lines if not line.startswith('WARNING:absl:')] == [
      f'error: {workdir}/checkpoints: the storage service failed (HTTP 507: Insufficient storage, 507), after the '
      f"client libraries' retries; the last complete checkpoint (step 2) is kept in {workdir}/checkpoints: rerun "
      'the same command to resume from it'], failed.stderr
  assert ckpt_lib.training_steps(f'{workdir}/checkpoints') == [2]
  assert ckpt_lib.load_model(workdir)[1]['step'] == 2
  rerun = subprocess.run([sys.executable, '-m', 'kpjax.train', *_SMALL_DEMO, '--workdir', workdir], cwd=REPO,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert 'resumed from step 2' in rerun.stdout and 'done: step 4' in rerun.stdout
  assert [s for s, _ in _losses(workdir)] == [1, 2, 3, 4]
  assert ckpt_lib.training_steps(f'{workdir}/checkpoints') == [2, 4]
  objects = gcs.objects('kpjax-cli', 'demo/synthetic/')  # the data it trained on: built once, into the bucket
  assert 'demo/synthetic/commit_success.txt' in objects
  assert any(o.endswith('dataset_info.json') for o in objects) and any('.array_record' in o for o in objects)
