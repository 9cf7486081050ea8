"""A run stopped at step k and rerun in the same workdir equals a run never stopped, step for step."""

import os

import jax
import numpy as np

import train_fixture as fx
from kpjax.inference import checkpoints as ckpt_lib
from kpjax.train import loop as train


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
  fx.install_source(monkeypatch)
  full_dir, split_dir = str(tmp_path / 'full'), str(tmp_path / 'split')
  train.train_and_evaluate(fx.tiny_config(), full_dir)

  first = train.train_and_evaluate(fx.tiny_config(stop_at_step=3), split_dir)  # between two checkpoints
  assert first['step'] == 3 and first['stopped_by'] is None
  assert sorted(os.listdir(os.path.join(split_dir, 'checkpoints'))) == ['3']
  assert max(s for s, _ in fx.train_losses(split_dir)) == 3
  second = train.train_and_evaluate(fx.tiny_config(), split_dir)  # resumes from step 3 by itself
  assert second['step'] == 8

  # Data order, augmentation, optimiser state and schedule all continue: every loss is the same, exactly.
  assert fx.train_losses(split_dir) == fx.train_losses(full_dir)
  full_vars, _ = ckpt_lib.load_model(full_dir)
  split_vars, meta = ckpt_lib.load_model(split_dir)
  assert meta['step'] == 8
  jax.tree_util.tree_map(np.testing.assert_array_equal, split_vars, full_vars)
