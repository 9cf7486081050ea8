"""kpjax.train.log: metrics.jsonl is read the same way when resuming and when plotting; a damaged line
stops both with its file and line number, a line cut off at the end is taken as unfinished. Through
train_and_evaluate: a fresh run over leftover logs and a resumed one leave metrics.jsonl and the
TensorBoard events (read back here from their TFRecord framing) showing each step once."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

import train_fixture as fx
from kpjax.train import curves
from kpjax.train import log as train_log
from kpjax.train import loop


def _write(path, steps, tail=''):
  path.write_text(''.join(json.dumps({'step': s, 'train/loss': 1.0 / s}) + '\n' for s in steps) + tail)


def test_resume_drops_the_steps_after_the_checkpoint_and_a_cut_off_last_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  _write(path, [1, 2, 3, 4], tail='{"step": 5, "train/lo')  # killed while writing step 5
  assert [r['step'] for r in curves.read_metrics(path)] == [1, 2, 3, 4]
  writer = train_log.MetricWriter(str(path), str(tmp_path / 'tensorboard'), resume_step=2)
  writer.write(3, {'train/loss': 0.5})
  writer.close()
  assert [(r['step'], r['train/loss']) for r in curves.read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
  assert 'metrics.jsonl' in os.listdir(tmp_path) and not [n for n in os.listdir(tmp_path) if n.startswith('.')]


@pytest.mark.parametrize('bad, why', [('not json', 'Expecting value'), ('[1, 2]', 'a JSON list'),
                                      ('{"step": 2, "train', 'Unterminated string')])
def test_a_damaged_line_stops_resuming_and_plotting_alike(tmp_path, bad, why):
  path = tmp_path / 'metrics.jsonl'
  _write(path, [1], tail=bad + '\n' + json.dumps({'step': 3}) + '\n')  # line 2 is complete but no object
  text = path.read_text()
  message = rf'metrics.jsonl:2: not a JSON object \({why}.*\); repair or delete that line'
  with pytest.raises(train_log.MetricsFileError, match=message):
    train_log.MetricWriter(str(path), str(tmp_path / 'tensorboard'), resume_step=3)
  assert path.read_text() == text  # nothing dropped
  with pytest.raises(train_log.MetricsFileError, match=message):
    curves.read_metrics(path)
  with pytest.raises(ValueError, match=message):  # the CLIs report ValueErrors as one error: line
    curves.plot_curves(path, tmp_path / 'curves.png')
  assert not (tmp_path / 'curves.png').exists()


def test_a_bad_last_line_that_ends_with_a_newline_is_damage_too(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  _write(path, [1], tail='not json\n')
  for read in (lambda: train_log.MetricWriter(str(path), str(tmp_path / 'tensorboard'), resume_step=1), lambda: curves.read_metrics(path)):
    with pytest.raises(train_log.MetricsFileError, match='metrics.jsonl:2: not a JSON object'):
      read()


def read_events(directory) -> list[tuple[str, int, float]]:
  """(tag, step, value) of every scalar in the TensorBoard event files under `directory`, in file order.

  Event files are TFRecords: uint64 length, uint32 masked CRC-32C of the length, the serialized
  tensorboard Event, uint32 masked CRC-32C of it (all little-endian); the CRCs are checked.
  """
  scalars = []
  for name in sorted(os.listdir(directory)):
    data = (directory / name).read_bytes()
    assert 'tfevents' in name, name
    at = 0
    while at < len(data):
      header = data[at:at + 8]
      (length,), (length_crc,) = struct.unpack('<Q', header), struct.unpack('<I', data[at + 8:at + 12])
      body = data[at + 12:at + 12 + length]
      (body_crc,) = struct.unpack('<I', data[at + 12 + length:at + 16 + length])
      assert length_crc == masked_crc32c(header) and body_crc == masked_crc32c(body), (name, at)
      at += 16 + length
      event = event_pb2.Event.FromString(body)
      scalars += [(v.tag, int(event.step), v.simple_value) for v in event.summary.value]
  return scalars


def _assert_events_mirror_the_metrics(workdir):
  """Every finite scalar of metrics.jsonl appears once in the TensorBoard events, with its value (float32),
  and the events hold nothing else."""
  records = curves.read_metrics(workdir / 'metrics.jsonl')
  # TensorBoard tags allow [-/\w.]: tensorboardX writes 'eval/pck@0.1' as 'eval/pck_0.1'.
  want = sorted((re.sub(r'[^-/\w.]', '_', k), r['step'], float(np.float32(v))) for r in records
                for k, v in r.items() if k != 'step' and np.isfinite(v))
  got = read_events(workdir / 'tensorboard')
  assert len({(tag, step) for tag, step, _ in got}) == len(got), 'a (tag, step) appears twice'
  assert sorted(got) == want
  return records


def test_a_fresh_run_over_leftovers_starts_both_logs_empty(tmp_path, monkeypatch):
  """A workdir without checkpoints but with a run's leftover logs (it saved no checkpoint): the new run's
  metrics.jsonl and TensorBoard events hold only its own steps, each once."""
  fx.install_source(monkeypatch)
  _write(tmp_path / 'metrics.jsonl', [1, 2, 3])
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': 0, 'eval/ne': 0.5}) + '\n')
  stale = SummaryWriter(str(tmp_path / 'tensorboard'))
  for step in range(4):
    stale.add_scalar('train/loss', 9.0, step)
    stale.add_scalar('eval/ne', 9.0, step)
  stale.close()
  loop.train_and_evaluate(fx.tiny_config(total_steps=2, eval_every_steps=2, checkpoint_every_steps=2), str(tmp_path))
  records = _assert_events_mirror_the_metrics(tmp_path)
  assert [r['step'] for r in records if 'eval/ne' in r] == [0, 2]
  assert [r['step'] for r in records if 'train/loss' in r] == [1, 2]


def test_a_resumed_run_shows_each_step_once(tmp_path, monkeypatch):
  """A run killed after logging steps its last checkpoint does not hold (here: checkpoint 8 lost) resumes
  from checkpoint 4 and logs 5..8 again: both logs show each (tag, step) once, the rerun's values."""
  fx.install_source(monkeypatch)
  loop.train_and_evaluate(fx.tiny_config(), str(tmp_path))
  first = _assert_events_mirror_the_metrics(tmp_path)
  shutil.rmtree(tmp_path / 'checkpoints' / '8')
  with open(tmp_path / 'metrics.jsonl', 'a') as f:  # the lost run had got further still
    f.write(json.dumps({'step': 9, 'train/loss': 1.0}) + '\n')
  assert loop.train_and_evaluate(fx.tiny_config(), str(tmp_path))['step'] == 8
  again = _assert_events_mirror_the_metrics(tmp_path)
  assert [(r['step'], sorted(r)) for r in again] == [(r['step'], sorted(r)) for r in first]
  assert [r['train/loss'] for r in again if 'train/loss' in r] == [r['train/loss'] for r in first if 'train/loss' in r]
