"""A multi-process CLI run whose JAX runtime aborts still ends with one `error:` line.

JAX's distributed runtime does not raise when a process cannot join its job (the coordinator never
answers, a peer never registers) or loses it later (a peer died): its C++ client logs a fatal
message with a stack trace and aborts the process. `run_supervised` runs the command in a child
process, relays its output, and turns such an abort into one `error:` line that names the job and
the runtime's reason, with exit status 1. Anything else passes through unchanged (the child's own
exit status, its error lines, signals forwarded to it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from typing import Sequence

from kpjax.cli import common
from kpjax.train import distributed

_SUPERVISED = 'KPJAX_SUPERVISED'  # set in the child: it runs the command itself
_FATAL = re.compile(r'^F\d{4} [\d:.]+\s+\d+ \S+\] (.*)$')  # absl's LOG(FATAL) line
_TRACE = ('*** Check failure stack trace', '    @ ')


def is_supervised() -> bool:
  return os.environ.get(_SUPERVISED) == '1'


def _reason(fatal: str, following: list[str]) -> str:
  """The runtime's own reason from a fatal log line and the lines after it (its absl::Status)."""
  text = ' '.join([fatal] + [line.strip() for line in following if line.strip()])
  status = re.search(r'absl::Status: (.*)', text)
  return ' '.join((status.group(1) if status else text).split())


def run_supervised(module: str, argv: Sequence[str], what: str) -> int:
  """Runs `python -m module *argv` as a child and returns its exit status (1 after a runtime abort,
  reported as `error: <what>: ...`)."""
  # Its own process group: a terminal's Ctrl-C reaches this process only, which forwards it once (a
  # second SIGINT would make the child give up without saving).
  child = subprocess.Popen([sys.executable, '-m', module, *argv], stderr=subprocess.PIPE, text=True,
                           env={**os.environ, _SUPERVISED: '1'}, process_group=0)
  forwarded = {s: signal.signal(s, lambda signum, _: child.send_signal(signum))
               for s in (signal.SIGTERM, signal.SIGINT)}
  fatal: list[str] = []

  def relay():
    for line in child.stderr:
      match = _FATAL.match(line)
      if match or fatal:
        fatal.append(match.group(1) if match and not fatal else line.rstrip('\n'))
      elif not line.startswith(_TRACE):
        sys.stderr.write(line)
        sys.stderr.flush()

  reader = threading.Thread(target=relay, daemon=True)
  reader.start()
  try:
    status = child.wait()
  finally:
    for s, handler in forwarded.items():
      signal.signal(s, handler)
  reader.join(timeout=10)
  if status < 0 and fatal:  # the runtime aborted the child
    following = [line for line in fatal[1:] if not line.startswith(_TRACE)]
    return common.report(f'{what}: the JAX distributed runtime stopped the process: {_reason(fatal[0], following)}. '
                      + distributed.NO_FALLBACK, common.RUN_FAILED)
  return status if status >= 0 else 128 - status
