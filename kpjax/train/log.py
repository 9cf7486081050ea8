"""Training logs: `metrics.jsonl` (one JSON object a line), TensorBoard events, a progress line."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

from kpjax.errors import MetricsFileError
from kpjax.io import atomic
from kpjax.io import paths


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file, one JSON object a line.

  Blank lines are skipped, and so is an unparsable last line without a newline (a line still being
  written, or cut off when a run was killed). Any other bad line raises MetricsFileError naming it:
  plotting and resuming refuse a damaged log rather than guess what it held.
  """
  text = paths.resolve(path).read_text(encoding='utf-8')
  lines = text.split('\n')  # json.dumps never writes a newline inside a record
  records = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      reason = None if isinstance(record, dict) else f'a JSON {type(record).__name__}'
    except json.JSONDecodeError as e:
      if n == len(lines):  # the last line has no newline yet: being written
        break
      reason = e.msg
    if reason is not None:
      raise MetricsFileError(f'{os.fspath(path)}:{n}: not a JSON object ({reason}); repair or delete that line')
    records.append(record)
  return records


class MetricWriter:
  """Appends {'step': s, **scalars} lines to a run's metrics.jsonl and mirrors them to TensorBoard events.

  Only one process of a multi-process run writes (enabled=False elsewhere). The file reads as one
  uninterrupted run: a fresh run (`resume_step` None) starts both logs empty, discarding what a run that
  saved no checkpoint left; a resumed run drops the lines of steps after the checkpoint it resumed from,
  and rewrites the TensorBoard events from the lines it keeps (event files cannot be cut), so neither log
  shows a step twice. A damaged line stops it with MetricsFileError (see read_metrics).

  On an object store (gs://), which cannot append, the writer keeps the lines and rewrites the whole object
  (kpjax.io.atomic), at most every `rewrite_every_s` seconds, at `flush()` (the loop flushes before each
  checkpoint, so that a resumed run finds every line up to its step) and at `close()`. TensorBoard events
  are then written to a local temporary directory and uploaded (each event file as one object) at the same
  times. (tensorboardX can write gs:// itself, but its writer uploads again whenever it is garbage
  collected, after the run too, and its background flushes fail without telling the run.)
  """

  def __init__(self, path: str, tensorboard_dir: str, enabled: bool = True, resume_step: int | None = None,
               rewrite_every_s: float = 30.0):
    self.path = path
    self.enabled = enabled
    self._tb = None
    self._written = False
    self._remote = paths.is_remote(path)
    self._lines: list[str] = []  # gs://: every line of the object
    self._rewrite_every_s, self._rewritten, self._pending = rewrite_every_s, time.monotonic(), False
    if not enabled:
      return
    kept = []
    exists = paths.resolve(self.path).exists()
    if resume_step is not None and exists:
      kept = [r for r in read_metrics(self.path) if r.get('step', 0) <= resume_step]
    self._lines = [json.dumps(r) + '\n' for r in kept]
    if kept or exists:
      atomic.write_text(self.path, ''.join(self._lines))
    self._written = bool(kept)
    tensorboard = paths.resolve(tensorboard_dir)
    if tensorboard.is_dir():
      tensorboard.rmtree()
    self._tb_remote = os.fspath(tensorboard) if self._remote else None
    self._tb_local = tempfile.mkdtemp(prefix='kpjax-tensorboard-') if self._remote else tensorboard_dir
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (a dependency: no silent fallback)
    self._tb = SummaryWriter(self._tb_local)
    for record in kept:
      self._add_scalars(record['step'], {k: v for k, v in record.items() if k != 'step'})

  def _add_scalars(self, step: int, scalars: dict) -> None:
    for k, v in scalars.items():
      if isinstance(v, (int, float)) and math.isfinite(float(v)):
        self._tb.add_scalar(k, float(v), int(step))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    line = json.dumps(record) + '\n'
    if self._remote:
      self._lines.append(line)
      self._pending = True
      if time.monotonic() - self._rewritten >= self._rewrite_every_s:
        self.flush()
    else:
      with open(self.path, 'a') as f:
        f.write(line)
    self._written = True
    if self._tb is not None:
      self._add_scalars(step, scalars)

  def flush(self) -> None:
    """Makes every line written so far durable (gs://: rewrites the object; local lines already are)."""
    if self.enabled and self._pending:
      atomic.write_text(self.path, ''.join(self._lines))
      if self._tb is not None:
        self._tb.flush()
        paths.upload_tree(self._tb_local, self._tb_remote)
      self._pending, self._rewritten = False, time.monotonic()

  def has_records(self) -> bool:
    """Whether the metrics file holds a record (this process writes it)."""
    return self.enabled and self._written

  def close(self) -> None:
    try:
      self.flush()
    finally:
      if self._tb is not None:
        self._tb.close()
        if self._remote:
          shutil.rmtree(self._tb_local, ignore_errors=True)


class Progress:
  """A progress display: step, loss, images/s and ETA.

  On a terminal, one line redrawn in place at every update; elsewhere (logs, CI) quiet: a plain line
  at most every `quiet_interval_s` seconds and at the last step. Notes (evaluations, stops) always print.
  """

  def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None,
               quiet_interval_s: float = 60.0):
    self.total, self.start = total, start
    self.stream = stream or sys.stdout
    self.enabled = enabled
    self.tty = enabled and self.stream.isatty()
    self.t0 = time.perf_counter()
    self.quiet_interval_s = quiet_interval_s
    self._last_line = -math.inf
    self._open_line = False

  def update(self, step: int, loss: float, images_per_s: float) -> None:
    if not self.enabled:
      return
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / done * (self.total - step) if done > 0 else float('nan')
    text = (f'step {step}/{self.total}  loss {loss:.4f}  {images_per_s:.1f} img/s  '
            f'ETA {_duration(eta)}')
    if self.tty:
      self.stream.write('\r' + text.ljust(78))
      self._open_line = True
    else:
      now = time.perf_counter()
      if now - self._last_line < self.quiet_interval_s and step < self.total:
        return
      self._last_line = now
      self.stream.write(text + '\n')
    self.stream.flush()

  def note(self, text: str) -> None:
    if not self.enabled:
      return
    if self._open_line:
      self.stream.write('\n')
      self._open_line = False
    self.stream.write(text + '\n')
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self._open_line:
      self.stream.write('\n')
      self.stream.flush()
    self._open_line = False


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '--'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'
