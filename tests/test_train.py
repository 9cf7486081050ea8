"""Training: learning, logs and checkpoints, best-checkpoint policy, NaN guard, init_from, the CLI
(config overrides, errors, SIGTERM and resume). Resume equality: test_train_resume.py; devices and
processes: test_parallel.py.

Slim networks on a tiny in-memory dataset (tests/train_fixture.py); the CLI tests use a few dozen
synthetic garments.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixture as fx
from kpjax.inference import checkpoints as ckpt_lib
from kpjax.train import loop as train

from kpjax.data import pipeline
from kpjax import errors
from kpjax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One full 8-step run (evaluations at 0, 4, 8; checkpoints at 4, 8), shared by the tests that read it."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  with pytest.MonkeyPatch.context() as mp:
    fx.install_source(mp)
    result = train.train_and_evaluate(fx.tiny_config(), workdir)
  return workdir, result


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_the_config_chooses_the_networks_unpool():
  from kpjax.train import step as ts  # pylint: disable=g-import-not-at-top
  assert ts.build_model(fx.tiny_config()).unpool == 'mask'
  assert ts.build_model(fx.tiny_config(**{'model.unpool': 'scatter'})).unpool == 'scatter'


def test_steps_lower_the_loss_on_a_fixed_batch():
  config = fx.tiny_config(learning_rate=3e-3, warmup_steps=0, schedule='constant')
  step, state = fx.step_and_state(config)
  batch = next(fx.train_batches(config, sources.RecordSource(fx.RECORDS['train'])))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    assert bool(metrics['finite'])
  assert int(state.step) == 25
  assert losses[-1] < 0.8 * losses[0], losses


def test_guarded_step_keeps_the_state_on_nan():
  config = fx.tiny_config()
  step, state = fx.step_and_state(config)
  params = jax.device_get(state.params)
  batch = {'image': jnp.full((4, 32, 32, 3), jnp.nan), 'target': jnp.zeros((4, 7, 2)), 'mask': jnp.ones((4, 7))}
  new_state, metrics = step(state, batch)
  assert not bool(metrics['finite'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(new_state.params), params)


def test_run_writes_metrics_checkpoints_and_pictures(trained):
  workdir, result = trained
  records = _records(workdir)
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == list(range(1, 9))
  for key in ('train/loss', 'train/euclidean', 'train/js', 'train/lr', 'train/images_per_s'):
    assert all(np.isfinite(r[key]) for r in records if 'train/loss' in r), key
  lrs = [r['train/lr'] for r in records if 'train/lr' in r]
  assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-3)  # warmup from 0 to the peak, then cosine
  evals = [r for r in records if 'eval/ne' in r]
  assert [r['step'] for r in evals] == [0, 4, 8]
  assert all('eval/ne/trousers' in r for r in evals)
  assert result == {'step': 8, 'eval/ne': pytest.approx(evals[-1]['eval/ne']), 'stopped_by': None}
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']
  _, meta = ckpt_lib.load_model(workdir)  # what kpjax.evaluate/predict read
  assert meta['step'] == 8 and meta['category'] == 'trousers' and meta['input_size'] == 32
  assert os.path.exists(os.path.join(workdir, 'curves.png'))
  assert sorted(os.listdir(os.path.join(workdir, 'predictions'))) == [
      'step_0000000.png', 'step_0000004.png', 'step_0000008.png']
  assert any(n.startswith('events') for n in os.listdir(os.path.join(workdir, 'tensorboard')))


def test_keeps_the_latest_and_the_best_checkpoint_by_eval_ne(tmp_path, monkeypatch):
  fx.install_source(monkeypatch)
  scripted = {0: 1.0, 2: 0.2, 4: 0.5, 6: 0.6, 8: 0.7}  # eval/ne by step: the best is step 2
  monkeypatch.setattr(train, '_evaluate', lambda config, spec, params, source, step, *a: {
      'eval/ne': scripted[step], 'eval/images': 8.0})
  # Evaluations every 2 steps, checkpoints every 4: every evaluation is checkpointed all the same, and
  # rotation (keep 1) keeps the latest and the best.
  train.train_and_evaluate(fx.tiny_config(eval_every_steps=2, checkpoint_every_steps=4, keep_checkpoints=1),
                           str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints'), key=int) == ['2', '8']


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  fx.install_source(monkeypatch)
  real = pipeline.train_iterator

  class Poisoned:
    """The real iterator, but the 6th batch's images are NaN."""

    def __init__(self, it):
      self.it, self.n = it, 0

    def __next__(self):
      batch = next(self.it)
      self.n += 1
      if self.n == 6:
        batch['image'] = np.full_like(batch['image'], np.nan)
      return batch

    def get_state(self):
      return self.it.get_state()

    def set_state(self, s):
      self.it.set_state(s)

    def close(self):
      self.it.close()

  monkeypatch.setattr(pipeline, 'train_iterator', lambda *a, **k: Poisoned(real(*a, **k)))
  with pytest.raises(errors.TrainingError, match=r'not finite at step 6.*last good checkpoint \(step 4\)'):
    train.train_and_evaluate(fx.tiny_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']
  variables, _ = ckpt_lib.load_model(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(variables))
  assert max(s for s, _ in fx.train_losses(str(tmp_path))) == 5  # nothing logged for the bad step


def test_init_from_starts_from_a_saved_model_and_checks_it_fits(trained, tmp_path, monkeypatch):
  source_dir, source_result = trained
  fx.install_source(monkeypatch)
  result = train.train_and_evaluate(fx.tiny_config(init_from=source_dir, total_steps=1), str(tmp_path / 'ft'))
  assert result['step'] == 1
  step0 = [r for r in _records(str(tmp_path / 'ft')) if r['step'] == 0 and 'eval/ne' in r]
  assert step0[0]['eval/ne'] == pytest.approx(source_result['eval/ne'], rel=1e-5)  # the loaded weights
  with pytest.raises(ValueError, match=r'num_stages = 2 in the config but 1 in init_from .*--config.model.num_stages=1'):
    train.train_and_evaluate(fx.tiny_config(init_from=source_dir, **{'model.num_stages': 2}),
                             str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad').exists()  # refused before the workdir is made
  # Metadata that describes this model over arrays that do not fit it (a damaged or hand-made file).
  variables, metadata = ckpt_lib.load_model(source_dir)
  kernel = variables['params']['fcn']['model1_0_0']['conv1_1']['kernel']
  variables['params']['fcn']['model1_0_0']['conv1_1']['kernel'] = kernel[:, :, :, :-1]
  ckpt_lib.save_model(str(tmp_path / 'tampered'), variables, metadata)
  with pytest.raises(ckpt_lib.CheckpointError, match=r'does not hold the network its metadata describes: .*conv1_1.*kernel.* is \(3, 3, 3, 7\) in the checkpoint, \(3, 3, 3, 8\) expected'):
    train.train_and_evaluate(fx.tiny_config(init_from=str(tmp_path / 'tampered')), str(tmp_path / 'bad2'))
  assert not (tmp_path / 'bad2').exists()


def _cli(workdir, *overrides, config='demo.py'):
  return [sys.executable, '-m', 'kpjax.train', '--config', os.path.join(REPO, 'configs', config),
          '--workdir', str(workdir), *overrides]


# A demo run shrunk by command-line overrides: 60 synthetic garments, a 32x32 input, one stage.
_SMALL_DEMO = ['--config.data.synthetic_num_images=60', '--config.input_size=32', '--config.model.num_stages=1',
               '--config.batch_size=4', '--config.log_every_steps=1', '--config.eval_every_steps=1000000',
               '--config.checkpoint_every_steps=1000000', '--config.data.num_eval_images=8',
               '--config.num_vis_images=2', '--config.warmup_steps=2']


def test_cli_overrides_sigterm_saves_and_a_rerun_resumes(tmp_path):
  workdir = tmp_path / 'demo'
  proc = subprocess.Popen(_cli(workdir, *_SMALL_DEMO, '--config.total_steps=1000'), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:  # wait for a few logged steps, then preempt
    if os.path.exists(workdir / 'metrics.jsonl') and len(fx.train_losses(str(workdir))) >= 3:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert 'devices: 1, processes: 1' in out
  stopped = max(s for s, _ in fx.train_losses(str(workdir)))
  assert f'stopped by SIGTERM after step {stopped}' in out
  assert os.listdir(workdir / 'checkpoints') == [str(stopped)]
  _, meta = ckpt_lib.load_model(str(workdir))  # the overrides reached the model
  assert (meta['category'], meta['input_size'], meta['num_stages'], meta['step']) == ('all', 32, 1, stopped)
  assert os.path.isdir(workdir / 'synthetic' / 'tfds')  # the demo made its data in the workdir

  rerun = subprocess.run(_cli(workdir, *_SMALL_DEMO, '--config.total_steps=1000', f'--config.stop_at_step={stopped + 2}'),
                         cwd=REPO,
                         capture_output=True, text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f'resumed from step {stopped}' in rerun.stdout and f'done: step {stopped + 2}' in rerun.stdout
  assert [s for s, _ in fx.train_losses(str(workdir))] == list(range(1, stopped + 3))
  evals = [r for r in _records(str(workdir)) if 'eval/ne' in r]
  assert [r['step'] for r in evals] == [0, stopped + 2]
  assert {k for k in evals[-1] if k.startswith('eval/ne/')} <= {f'eval/ne/{c}' for c in
                                                                 ('blouse', 'dress', 'outwear', 'skirt', 'trousers')}


@pytest.mark.parametrize('flag, message', [
    ('--config.input_size=31', 'config.input_size = 31: expected a positive even number of pixels'),
    ('--config.optimizer=sgd', "config.optimizer = 'sgd': expected one of adam, rmsprop"),
    ('--config.compute_dtype=float8', "config.compute_dtype = 'float8': expected one of"),
    ('--config.compute_dtype=float16', 'use bfloat16'),
    ('--config.nonsense=1', 'the config has no field nonsense'),
])
def test_cli_rejects_bad_config_values_without_traceback(tmp_path, flag, message):
  proc = subprocess.run(_cli(tmp_path / 'w', flag, f'--config.data.data_dir={tmp_path}', config='trousers.py'),
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2
  assert message in proc.stderr, proc.stderr
  assert proc.stderr.startswith('error: ') and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert 'Traceback' not in proc.stderr and not os.path.exists(tmp_path / 'w')


def test_cli_explains_how_to_build_missing_fashionai_data(tmp_path):
  proc = subprocess.run(_cli(tmp_path / 'w', f'--config.data.data_dir={tmp_path / "tfds"}', config='skirt.py'),
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2
  assert 'python -m kpjax.data.build' in proc.stderr and 'Traceback' not in proc.stderr
