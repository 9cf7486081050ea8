"""Stopping a run cleanly: Ctrl-C or SIGTERM (preemption) ends it after the step in flight, with a checkpoint."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class StopRequest:
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
