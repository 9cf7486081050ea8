"""The same run on any topology: 1 device, 4 devices and 2 processes x 2 devices train on the same
global batches, evaluate the same images to the same NE, and a run stopped on one resumes on another.

The multi-device and multi-process runs are subprocesses (tests/train_fixture.py): the device count
(XLA_FLAGS) and jax.distributed must be set before JAX starts. Every run is compared with one
uninterrupted run on this process's single device (`reference`), step by step; the validation split has
9 images, which 2 processes and 4 devices cannot share out evenly (padding must be masked, never counted).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import train_fixture as fx
from kpjax.inference import devices
from kpjax.train import distributed
from kpjax.train import loop as train

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_fixture.py')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
# What a SLURM job step of one task sets (srun -n 1); jax would take the job for a cluster of one.
ONE_SLURM_TASK = {'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0',
                  'SLURM_STEP_NODELIST': 'localhost'}


def _launch(workdir, overrides=None, devices=1, processes=1, env=None) -> list[str]:
  """Runs the fixture's training as `processes` processes of `devices` CPU devices each; their outputs."""
  port = fx.free_port()
  procs = []
  for i in range(processes):
    run = dict(overrides or {})
    if processes > 1:
      run['_distributed'] = {'coordinator': f'localhost:{port}', 'num_processes': processes, 'process_id': i}
    procs.append(subprocess.Popen(
        [sys.executable, FIXTURE, str(workdir), json.dumps(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', **(env or {})}))
  outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return outs


def _evals(workdir) -> dict[int, tuple[float, float]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: (r['eval/ne'], r['eval/images']) for r in rows if 'eval/ne' in r}


def _assert_same_run(workdir, reference):
  """Every step's loss and every evaluation (NE and image count) equal the reference run's."""
  got, want = fx.train_losses(str(workdir)), fx.train_losses(reference)
  assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 9))
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-4)
  evals, ref_evals = _evals(workdir), _evals(reference)
  assert sorted(evals) == sorted(ref_evals) and all(evals[s][1] == ref_evals[s][1] == 9 for s in evals), evals
  np.testing.assert_allclose([evals[s][0] for s in sorted(evals)], [ref_evals[s][0] for s in sorted(evals)],
                             rtol=1e-4)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """8 steps on this process's one device: evaluations at 0, 4 and 8, checkpoints at 4 and 8."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  with pytest.MonkeyPatch.context() as mp:
    fx.install_source(mp)
    train.train_and_evaluate(fx.tiny_config(), workdir)
  return workdir


def test_mesh_sharding_and_rows():
  mesh = devices.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == jax.device_count()
  batch = devices.shard_batch({'image': np.arange(24.0).reshape(4, 6)}, mesh)
  assert batch['image'].sharding.spec == PartitionSpec('data')
  np.testing.assert_array_equal(devices.local_rows(batch['image']), np.arange(24.0).reshape(4, 6))
  assert devices.local_batch_size(8, mesh) == 8 and devices.local_batch_size(1, mesh) == 1


def test_two_processes_of_two_devices_then_one_device(reference, tmp_path, monkeypatch):
  # 2 processes x 2 devices, stopped after step 4 (a job slot) ...
  outs = _launch(tmp_path, {'stop_at_step': 4}, devices=2, processes=2)
  assert all('devices: 4, processes: 2' in out for out in outs)
  assert 'step 4: eval/ne' in outs[0] and '(9 images, 4 devices, 2 processes)' in outs[0]
  assert os.listdir(tmp_path / 'checkpoints') == ['4']
  # ... resumed by this process alone, on one device: the run goes on as if nothing had changed.
  fx.install_source(monkeypatch)
  assert train.train_and_evaluate(fx.tiny_config(), str(tmp_path))['step'] == 8
  _assert_same_run(tmp_path, reference)


def test_four_devices_in_a_one_task_slurm_job_then_two_processes(reference, tmp_path):
  # One process of 4 devices in a SLURM job of one task (it trains alone), stopped after step 4; then
  # kpjax.evaluate's sharded evaluation of that checkpoint; then 2 processes x 2 devices finish the run.
  first, = _launch(tmp_path, {'stop_at_step': 4, '_evaluate': True}, devices=4, env=ONE_SLURM_TASK)
  assert 'devices: 4, processes: 1' in first
  scores = json.loads(first.strip().splitlines()[-1])
  assert scores['evaluate/images'] == 9
  assert scores['evaluate/ne'] == pytest.approx(_evals(reference)[4][0], rel=1e-4)
  _launch(tmp_path, devices=2, processes=2)
  _assert_same_run(tmp_path, reference)


def _train_cli(workdir, *flags, env=None):
  return subprocess.run([sys.executable, '-m', 'kpjax.train', '--config', os.path.join(REPO, 'configs', 'trousers.py'),
                         '--workdir', str(workdir), *flags], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                        env={**os.environ, **(env or {})})


def test_a_failed_multi_task_start_stops_with_one_error(tmp_path):
  # A SLURM job of 2 tasks whose coordinator never answers: the error names the job, the cause, no fallback.
  env = dict(ONE_SLURM_TASK, SLURM_NTASKS='2', SLURM_PROCID='1', SLURM_LOCALID='1')
  proc = _train_cli(tmp_path / 'w', '--initialization_timeout=3', env=env)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.startswith('error: the SLURM job (SLURM_JOB_ID=4242, SLURM_NTASKS=2: 2 tasks): the JAX '
                                'distributed runtime stopped the process: DEADLINE_EXCEEDED'), proc.stderr
  assert 'does not fall back to one process' in proc.stderr and 'Traceback' not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not (tmp_path / 'w').exists()
  # Flags that start a multi-process run by hand must all be there.
  proc = _train_cli(tmp_path / 'w', '--coordinator_address=localhost:1234', '--process_id=0')
  assert proc.returncode == 2 and proc.stderr.startswith('error: --num_processes missing'), proc.stderr
  assert not (tmp_path / 'w').exists()


def test_launch_detection():
  assert distributed.detect_launch({}) is None
  assert distributed.detect_launch(ONE_SLURM_TASK).tasks == 1
  assert distributed.detect_launch({'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '8', 'SLURM_STEP_NUM_TASKS': '4'}).tasks == 4
  assert distributed.detect_launch({'OMPI_COMM_WORLD_SIZE': '3'}) == distributed.Launch('Open MPI', 3, 'OMPI_COMM_WORLD_SIZE=3')
  assert distributed.detect_launch({'TPU_WORKER_HOSTNAMES': 'a,b,c,d'}).tasks == 4
  assert distributed.detect_launch({'TPU_WORKER_HOSTNAMES': 'localhost'}).tasks == 1


def _snapshot(workdir):
  return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, files in os.walk(workdir)
          for f in files}


def test_resuming_with_another_model_is_refused_and_touches_nothing(reference):
  before = _snapshot(reference)
  with pytest.MonkeyPatch.context() as mp:
    fx.install_source(mp)
    with pytest.raises(ValueError, match=r"config.model.width: 0.125 when the run started, 0.25 now; "
                                         r"config.seed: 0 when the run started, 1 now"):
      train.train_and_evaluate(fx.tiny_config(**{'model.width': 0.25}, seed=1), reference)
    assert _snapshot(reference) == before
    # What may change between job slots does not stop a resume (the run is finished: nothing to do).
    assert train.train_and_evaluate(fx.tiny_config(log_every_steps=3, keep_checkpoints=5), reference)['step'] == 8
