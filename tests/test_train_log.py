"""kpjax.train.log: metrics.jsonl is read the same way when resuming and when plotting; a damaged line
stops both with its file and line number, a line cut off at the end is taken as unfinished."""

from __future__ import annotations

import json
import os

import pytest

from kpjax.train import log as train_log
from kpjax.inference import drawing as visualize
from kpjax.train import curves


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
