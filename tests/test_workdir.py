"""kpjax.train.workdir: where a run keeps what, and what its checkpoints say (read back without training)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kpjax.errors import CheckpointError
from kpjax.inference import checkpoints
from kpjax.train.workdir import Workdir

META = {'category': 'skirt', 'n_locations': 4, 'width': 0.0625, 'num_stages': 1, 'input_size': 16,
        'preprocessing': 'kpjax'}


def _save(workdir: Workdir, steps, config=None) -> None:
  manager = workdir.manager(keep=5)
  try:
    for step in steps:
      state = {'step': np.asarray(step, np.int32), 'params': {'w': np.full((2,), step, np.float32)},
               'opt_state': {}}
      checkpoints.save_training(manager, step, state, dict(META, config=config or {}), {'batches': step})
  finally:
    manager.close()


def test_paths(tmp_path, monkeypatch):
  w = Workdir.at(tmp_path / 'run')
  root = str(tmp_path / 'run')
  assert w.root == root
  assert w.checkpoints == f'{root}/checkpoints'
  assert w.metrics == f'{root}/metrics.jsonl'
  assert w.tensorboard == f'{root}/tensorboard'
  assert w.curves == f'{root}/curves.png'
  assert w.synthetic == f'{root}/synthetic'
  assert w.predictions(40) == f'{root}/predictions/step_0000040.png'
  assert w.predictions(12345678) == f'{root}/predictions/step_12345678.png'
  monkeypatch.chdir(tmp_path)
  assert Workdir.at('run') == w  # relative paths are made absolute, once
  monkeypatch.setenv('HOME', str(tmp_path))
  assert Workdir.at('~/run') == w
  assert not os.path.exists(root)  # naming the paths creates nothing


def test_latest_step_of_fresh_and_saved_runs(tmp_path):
  w = Workdir.at(tmp_path / 'run')
  assert w.latest_step() is None  # no directory at all
  os.makedirs(w.checkpoints)
  assert w.latest_step() is None  # an empty checkpoints directory: still a fresh run
  _save(w, [3, 10, 7])
  assert w.latest_step() == 10  # numerically: '7' sorts after '10' as text
  manager = w.manager(keep=5)
  try:
    assert str(manager.directory) == w.checkpoints and manager.latest_step() == 10
  finally:
    manager.close()


def test_stored_metadata_is_the_latest_checkpoints(tmp_path):
  w = Workdir.at(tmp_path / 'run')
  with pytest.raises(CheckpointError, match='does not exist'):
    w.stored_metadata()
  _save(w, [2], config={'seed': 0})
  _save(w, [4], config={'seed': 1})
  assert w.stored_metadata() == dict(META, config={'seed': 1}, step=4)
