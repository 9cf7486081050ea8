"""kpjax.cli.supervise.run_supervised with a stand-in child (a tiny Python module, no JAX): an abort by JAX's
runtime becomes one `error:` line with its reason, anything else passes through, signals are forwarded."""

from __future__ import annotations

import signal
import textwrap
import threading
import time

import pytest

from kpjax.cli import common
from kpjax.cli import supervise
from kpjax.train import distributed

# What JAX's C++ client writes before it aborts a process whose peer died (absl LOG(FATAL) + stack trace).
FATAL = ('F1204 02:49:10.123456    4242 client.cc:77] Terminating process because the JAX distributed service '
         'detected fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending '
         'heartbeats):')
CHILD = textwrap.dedent(f'''
    import os, signal, sys, time
    mode = sys.argv[1]
    sys.stdout.write('supervised: ' + os.environ.get('KPJAX_SUPERVISED', '') + '\\n')
    sys.stdout.flush()
    sys.stderr.write('step 1/4  loss 1.0\\n')
    sys.stderr.flush()
    if mode == 'abort':
      sys.stderr.write({FATAL!r} + '\\n/job:jax_worker/replica:0/task:1\\n'
                       '*** Check failure stack trace: ***\\n    @     0x7f3a2b abort\\n    @     0x7f3a2c main\\n')
      sys.stderr.flush()
      os.abort()
    elif mode == 'exit':
      sys.stderr.write('error: config.batch_size = 3: expected a multiple of 2\\n')
      sys.exit(2)
    elif mode == 'killed':
      os.kill(os.getpid(), signal.SIGKILL)
    elif mode == 'wait':
      signal.signal(signal.SIGTERM, lambda *_: sys.exit(43))  # a status only this handler gives
      open(sys.argv[2], 'w').close()
      time.sleep(60)
''')
WHAT = 'the SLURM job (SLURM_JOB_ID=7, SLURM_NTASKS=2: 2 tasks)'


@pytest.fixture
def child(tmp_path, monkeypatch):
  (tmp_path / 'stand_in_child.py').write_text(CHILD)
  monkeypatch.setenv('PYTHONPATH', str(tmp_path))
  monkeypatch.delenv('KPJAX_SUPERVISED', raising=False)
  return 'stand_in_child'


def _handlers():
  return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def test_a_runtime_abort_is_one_error_line_with_its_reason(child, capfd):
  before = _handlers()
  assert supervise.run_supervised(child, ['abort'], WHAT) == common.RUN_FAILED
  out, err = capfd.readouterr()
  assert out == 'supervised: 1\n'  # the child knows it is the supervised one
  assert err.splitlines() == [
      'step 1/4  loss 1.0',  # the child's own lines before the abort are relayed
      f'error: {WHAT}: the JAX distributed runtime stopped the process: UNAVAILABLE: The following tasks are '
      'unhealthy (stopped sending heartbeats): /job:jax_worker/replica:0/task:1. ' + distributed.NO_FALLBACK]
  assert _handlers() == before


def test_other_endings_pass_through(child, capfd):
  assert supervise.run_supervised(child, ['exit'], WHAT) == 2
  _, err = capfd.readouterr()
  assert err == 'step 1/4  loss 1.0\nerror: config.batch_size = 3: expected a multiple of 2\n'
  assert supervise.run_supervised(child, ['killed'], WHAT) == 128 + signal.SIGKILL  # no runtime message: a signal
  _, err = capfd.readouterr()
  assert err == 'step 1/4  loss 1.0\n'


def test_sigterm_is_forwarded_to_the_child(child, tmp_path, capfd):
  ready = tmp_path / 'ready'

  def terminate_when_ready():
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
      time.sleep(0.01)
    # To the main thread, which waits for the child (a signal only interrupts the thread it is delivered to).
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

  before = _handlers()
  sender = threading.Thread(target=terminate_when_ready)
  sender.start()
  try:
    status = supervise.run_supervised(child, ['wait', str(ready)], WHAT)
  finally:
    sender.join()
  assert status == 43  # the child's SIGTERM handler ran: the signal reached it, not this process
  assert _handlers() == before


def test_is_supervised_reads_the_childs_marker(monkeypatch):
  monkeypatch.delenv('KPJAX_SUPERVISED', raising=False)
  assert not supervise.is_supervised()
  monkeypatch.setenv('KPJAX_SUPERVISED', '1')
  assert supervise.is_supervised()
