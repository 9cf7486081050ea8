"""Training: learning, exact resume, device-count invariance, multi-process, NaN guard, CLI errors.

Slim networks on a tiny in-memory dataset (tests/train_fixture.py); each run compiles once (~10 s).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

import train_fixture as fx
from kpjax import train
from kpjax import train_step as ts
from kpjax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'train_fixture.py')


def _run_fixture(workdir, overrides=None, env=None, **popen):
  cmd = [sys.executable, FIXTURE, str(workdir), json.dumps(overrides or {})]
  return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """One full 8-step run, shared by the tests that compare against it."""
  fx.install_source()
  workdir = str(tmp_path_factory.mktemp('full'))
  result = train.train_and_evaluate(fx.tiny_config(), workdir)
  return workdir, result


def test_steps_lower_the_loss_on_a_fixed_batch():
  config = fx.tiny_config(learning_rate=3e-3, warmup_steps=0, schedule='constant')
  model = ts.build_model(config)
  state = ts.create_train_state(config, jax.random.key(0), model)
  step = ts.make_train_step(model, config)
  batch = next(pipeline.train_iterator(config, pipeline.RecordSource(fx.RECORDS['train']), seed=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    assert bool(metrics['finite'])
  assert int(state.step) == 25
  assert losses[-1] < 0.8 * losses[0], losses


def test_run_writes_metrics_checkpoints_and_pictures(uninterrupted):
  workdir, result = uninterrupted
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == list(range(1, 9))
  for key in ('train/loss', 'train/euclidean', 'train/js', 'train/lr', 'train/images_per_s'):
    assert all(np.isfinite(r[key]) for r in records if 'train/loss' in r), key
  evals = [r for r in records if 'eval/ne' in r]
  assert [r['step'] for r in evals] == [0, 4, 8]
  assert all('eval/ne/trousers' in r for r in evals)
  assert result['step'] == 8 and result['eval/ne'] == pytest.approx(evals[-1]['eval/ne'])
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']
  assert os.path.exists(os.path.join(workdir, 'curves.png'))
  assert os.listdir(os.path.join(workdir, 'predictions'))
  assert any(n.startswith('events') for n in os.listdir(os.path.join(workdir, 'tensorboard')))


def test_stopped_and_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  fx.install_source()
  train.train_and_evaluate(fx.tiny_config(stop_at_step=4), str(tmp_path))
  assert max(s for s, _ in fx.train_losses(str(tmp_path))) == 4
  train.train_and_evaluate(fx.tiny_config(), str(tmp_path))  # resumes by itself
  assert fx.train_losses(str(tmp_path)) == fx.train_losses(full_dir)


def test_four_devices_equal_one_device(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  proc = _run_fixture(tmp_path, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert 'devices: 4, processes: 1' in out
  one = np.array([l for _, l in fx.train_losses(full_dir)])
  four = np.array([l for _, l in fx.train_losses(str(tmp_path))])
  np.testing.assert_allclose(four, one, rtol=1e-4)


def test_two_processes_train_together_over_localhost(tmp_path):
  port = portpicker.pick_unused_port()
  procs = [_run_fixture(tmp_path, {'_distributed': {'coordinator': f'localhost:{port}', 'num_processes': 2,
                                                     'process_id': i}}) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
    assert 'devices: 2, processes: 2' in out
  results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
  assert results[0] == results[1]  # one model, evaluated identically in both processes
  assert [s for s, _ in fx.train_losses(str(tmp_path))] == list(range(1, 9))  # one writer
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '8']


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  fx.install_source()
  real = pipeline.train_iterator

  def poisoned(*args, **kwargs):
    it = real(*args, **kwargs)

    class Poisoned:
      def __init__(self):
        self.n = 0

      def __next__(self):
        batch = next(it)
        self.n += 1
        if self.n == 6:
          batch['image'] = np.full_like(batch['image'], np.nan)
        return batch

      def get_state(self):
        return it.get_state()

      def set_state(self, s):
        it.set_state(s)

    return Poisoned()

  monkeypatch.setattr(pipeline, 'train_iterator', poisoned)
  with pytest.raises(train.TrainingError, match=r'not finite at step 6.*step 4'):
    train.train_and_evaluate(fx.tiny_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']


def test_guarded_step_keeps_the_state_on_nan():
  config = fx.tiny_config()
  model = ts.build_model(config)
  state = ts.create_train_state(config, jax.random.key(0), model)
  params = jax.device_get(state.params)
  step = ts.make_train_step(model, config)
  batch = {'image': jnp.full((4, 32, 32, 3), jnp.nan), 'target': jnp.zeros((4, 7, 2)), 'mask': jnp.ones((4, 7))}
  new_state, metrics = step(state, batch)
  assert not bool(metrics['finite'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(new_state.params), params)


@pytest.mark.parametrize('flag, message', [
    ('--config.input_size=30', 'input_size must be a positive multiple of 8'),
    ('--config.optimizer=sgd', "unknown optimizer 'sgd'"),
    ('--config.compute_dtype=float8', "unknown compute_dtype 'float8'"),
])
def test_cli_rejects_bad_config_values_without_traceback(tmp_path, flag, message):
  proc = subprocess.run([sys.executable, '-m', 'kpjax.train', '--config', os.path.join(REPO, 'configs', 'trousers.py'),
                         '--workdir', str(tmp_path / 'w'), flag, f'--config.data.data_dir={tmp_path}'],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr


def test_cli_explains_how_to_build_missing_fashionai_data(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'kpjax.train', '--config', os.path.join(REPO, 'configs', 'skirt.py'),
                         '--workdir', str(tmp_path / 'w'), f'--config.data.data_dir={tmp_path / "tfds"}'],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode != 0
  assert 'python -m kpjax.data.build' in proc.stderr and 'Traceback' not in proc.stderr
