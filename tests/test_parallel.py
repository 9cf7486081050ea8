"""Data parallelism: 4 devices give the 1-device losses; two processes train one model over localhost.

The multi-device and multi-process runs are subprocesses (tests/train_fixture.py): the device count
(XLA_FLAGS) and jax.distributed must be set before JAX starts.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import PartitionSpec

import train_fixture as fx
from kpjax import parallel
from kpjax import train

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_fixture.py')


def _run_fixture(workdir, overrides=None, env=None):
  cmd = [sys.executable, FIXTURE, str(workdir), json.dumps(overrides or {})]
  return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_mesh_and_batch_sharding():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == jax.device_count()
  batch = parallel.shard_batch({'image': np.arange(24.0).reshape(4, 6)}, mesh)
  assert batch['image'].sharding.spec == PartitionSpec('data')
  np.testing.assert_array_equal(np.asarray(batch['image']), np.arange(24.0).reshape(4, 6))


def test_four_devices_equal_one_device(tmp_path, monkeypatch):
  proc = _run_fixture(tmp_path / 'four', env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  fx.install_source(monkeypatch)  # meanwhile, the same run on this process's one device
  train.train_and_evaluate(fx.tiny_config(), str(tmp_path / 'one'))
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert 'devices: 4, processes: 1' in out
  one = fx.train_losses(str(tmp_path / 'one'))
  four = fx.train_losses(str(tmp_path / 'four'))
  assert [s for s, _ in four] == [s for s, _ in one] == list(range(1, 9))
  np.testing.assert_allclose([l for _, l in four], [l for _, l in one], rtol=1e-4)


def test_two_processes_train_together_over_localhost(tmp_path):
  port = fx.free_port()
  procs = [_run_fixture(tmp_path, {'_distributed': {'coordinator': f'localhost:{port}', 'num_processes': 2,
                                                     'process_id': i}}) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
    assert 'devices: 2, processes: 2' in out
  results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
  assert results[0] == results[1]  # one model, evaluated identically in both processes
  assert results[0]['step'] == 8
  assert [s for s, _ in fx.train_losses(str(tmp_path))] == list(range(1, 9))  # one writer
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4', '8']
