"""kpjax.train.preemption.StopRequest in one process: the first Ctrl-C or SIGTERM asks the run to stop after
its step, a second Ctrl-C gives up at once, and the process's own handlers come back afterwards."""

from __future__ import annotations

import signal
import threading

import jax
import pytest

from kpjax.train.preemption import StopRequest


@pytest.fixture
def stop():
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  request = StopRequest(num_processes=1)
  yield request
  request.restore()
  assert {s: signal.getsignal(s) for s in before} == before


def test_nothing_asked_nothing_stops(stop):
  assert stop.signal is None
  assert not stop.should_stop(1, share=True) and not stop.should_stop(2, share=False)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_to_stop_after_the_step(stop, signum):
  signal.raise_signal(signum)  # handled here, between bytecodes: no exception
  assert stop.signal == signum
  assert stop.should_stop(7, share=False) and stop.should_stop(8, share=True)


@pytest.mark.parametrize('first', [signal.SIGTERM, signal.SIGINT])
def test_a_second_ctrl_c_gives_up_at_once(stop, first):
  signal.raise_signal(first)
  with pytest.raises(KeyboardInterrupt):
    signal.raise_signal(signal.SIGINT)
  assert stop.signal == first  # the first request is what the run reports


def test_restore_puts_the_previous_handlers_back():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  try:
    request = StopRequest(num_processes=1)
    assert signal.getsignal(signal.SIGTERM) != previous
    request.restore()
    signal.raise_signal(signal.SIGTERM)
    assert seen == [signal.SIGTERM] and request.signal is None
    request.restore()  # twice is harmless
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_no_handler_is_installed():
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  made = []
  thread = threading.Thread(target=lambda: made.append(StopRequest(num_processes=1)))
  thread.start()
  thread.join()
  assert {s: signal.getsignal(s) for s in before} == before
  assert not made[0].should_stop(1, share=True)
  made[0].restore()


def test_several_processes_leave_sigterm_to_jaxs_preemption_service():
  """With several processes SIGTERM is JAX's (its service agrees on a step); without the service, it is
  handled here like Ctrl-C."""
  option = 'jax_enable_preemption_service'
  enabled = getattr(jax.config, option)
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for service, handled in ((True, {signal.SIGINT}), (False, {signal.SIGINT, signal.SIGTERM})):
      jax.config.update(option, service)
      request = StopRequest(num_processes=2)
      try:
        assert request.multi and request.preemption_service == service
        assert {s for s in before if signal.getsignal(s) != before[s]} == handled
      finally:
        request.restore()
      assert {s: signal.getsignal(s) for s in before} == before
  finally:
    jax.config.update(option, enabled)
