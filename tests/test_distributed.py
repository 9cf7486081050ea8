"""kpjax.train.distributed: which multi-process run the flags and the environment ask for, and joining it,
with the launchers' variables set by hand (nothing here starts a second process)."""

from __future__ import annotations

import os

import jax
import pytest

from kpjax.errors import DistributedStartupError
from kpjax.train import distributed

LAUNCHER_PREFIXES = ('SLURM_', 'OMPI_', 'MEGASCALE_', 'TPU_')


@pytest.fixture
def env(monkeypatch):
  """os.environ without any launcher's variables; returns a setter for the test's own."""
  for name in list(os.environ):
    if name.startswith(LAUNCHER_PREFIXES):
      monkeypatch.delenv(name)

  def set_env(**variables):
    for name, value in variables.items():
      monkeypatch.setenv(name, value)

  return set_env


def test_one_process_without_flags_or_launcher(env):
  assert distributed.requested_run() is None


@pytest.mark.parametrize('variables, want', [
    # Several tasks, count unknown: a SLURM job without its task count, a TPU pod named by its coordinator.
    ({'SLURM_JOB_ID': '77'}, 'the SLURM job (SLURM_JOB_ID=77 without SLURM_NTASKS: several tasks)'),
    ({'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.2:8080'},
     'the TPU pod job (MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080: several tasks)'),
    ({'SLURM_JOB_ID': '77', 'SLURM_NTASKS': 'many'},
     'the SLURM job (SLURM_JOB_ID=77, SLURM_NTASKS=many: several tasks)'),
    # Counted: srun's step count first, then the job's.
    ({'SLURM_JOB_ID': '77', 'SLURM_NTASKS': '8', 'SLURM_STEP_NUM_TASKS': '2'},
     'the SLURM job (SLURM_JOB_ID=77, SLURM_STEP_NUM_TASKS=2: 2 tasks)'),
    ({'SLURM_JOB_ID': '77', 'SLURM_NPROCS': '3'}, 'the SLURM job (SLURM_JOB_ID=77, SLURM_NPROCS=3: 3 tasks)'),
    ({'OMPI_COMM_WORLD_SIZE': '4'}, 'the Open MPI job (OMPI_COMM_WORLD_SIZE=4: 4 tasks)'),
    ({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3'}, 'the TPU pod job (TPU_WORKER_HOSTNAMES lists 4 host(s): 4 tasks)'),
    ({'TPU_PROCESS_ADDRESSES': 'a:1, b:1'}, 'the TPU pod job (TPU_PROCESS_ADDRESSES lists 2 host(s): 2 tasks)'),
    # Provably one task: one process.
    ({'SLURM_JOB_ID': '77', 'SLURM_NTASKS': '1'}, None),
    ({'OMPI_COMM_WORLD_SIZE': '1'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),
    ({'TPU_WORKER_HOSTNAMES': ''}, None),  # set but empty: nothing detected
])
def test_the_environment_alone(env, variables, want):
  env(**variables)
  assert distributed.requested_run() == want


def test_complete_flags_ask_for_that_run(env):
  assert distributed.requested_run('host:1234', 2, 0) == 'the 2-process run at host:1234'
  env(SLURM_JOB_ID='77', SLURM_NTASKS='1')  # flags win over a one-task job
  assert distributed.requested_run('host:1234', 3, 2) == 'the 3-process run at host:1234'


@pytest.mark.parametrize('flags, missing', [
    (('host:1234', None, None), '--num_processes and --process_id missing'),
    (('host:1234', 2, None), '--process_id missing'),
    ((None, 2, 0), '--coordinator_address missing'),
    ((None, None, 1), '--coordinator_address and --num_processes missing'),
])
def test_incomplete_flags_without_a_launcher_to_fill_them_in(env, flags, missing):
  with pytest.raises(ValueError, match=rf'^{missing}: a multi-process run started by hand needs '
                                       r'--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I'):
    distributed.requested_run(*flags)
  env(SLURM_JOB_ID='77', SLURM_NTASKS='1')  # a one-task job fills in nothing either
  with pytest.raises(ValueError, match=missing):
    distributed.requested_run(*flags)


def test_incomplete_flags_in_a_job_of_several_tasks_leave_the_rest_to_jax(env):
  env(SLURM_JOB_ID='77', SLURM_NTASKS='4')
  assert distributed.requested_run('host:1234') == 'the multi-process run at host:1234'
  assert distributed.requested_run(num_processes=4) == 'the 4-process run at the detected coordinator'
  env(SLURM_NTASKS='1', MEGASCALE_COORDINATOR_ADDRESS='x')  # SLURM is looked at first
  with pytest.raises(ValueError, match='--coordinator_address and --process_id missing'):
    distributed.requested_run(num_processes=4)


@pytest.fixture
def fake_initialize(monkeypatch):
  """jax.distributed.initialize replaced by a recorder that raises `errors[0]` when set; restores the CPU
  collectives option initialize_distributed sets."""
  calls, errors = [], []

  def initialize(**kwargs):
    calls.append(kwargs)
    if errors:
      raise errors[0]

  monkeypatch.setattr(jax.distributed, 'initialize', initialize)
  option = 'jax_cpu_collectives_implementation'
  before = getattr(jax.config, option)
  yield calls, errors
  jax.config.update(option, before)


def test_one_process_is_left_alone(env, fake_initialize):
  calls, _ = fake_initialize
  assert distributed.initialize_distributed() is None
  env(SLURM_JOB_ID='77', SLURM_NTASKS='1')
  assert distributed.initialize_distributed() is None
  assert calls == []


def test_several_processes_join_or_fail_without_falling_back(env, fake_initialize):
  calls, errors = fake_initialize
  env(SLURM_JOB_ID='77')
  where = 'the SLURM job (SLURM_JOB_ID=77 without SLURM_NTASKS: several tasks)'
  assert distributed.initialize_distributed(initialization_timeout_s=7) == where
  assert calls == [{'coordinator_address': None, 'num_processes': None, 'process_id': None,
                    'initialization_timeout': 7}]
  errors.append(RuntimeError('distributed.initialize should only be called once.'))
  assert distributed.initialize_distributed() == where  # joined already: fine
  errors[0] = RuntimeError('DEADLINE_EXCEEDED:\n  Barrier timed out')
  with pytest.raises(DistributedStartupError) as e:
    distributed.initialize_distributed()
  assert str(e.value) == (f'could not join {where}: jax.distributed.initialize() failed: RuntimeError: '
                          f'DEADLINE_EXCEEDED: Barrier timed out. {distributed.NO_FALLBACK}')
  errors[0] = ValueError('')
  with pytest.raises(DistributedStartupError, match=r'failed: ValueError: ValueError\. kpjax does not fall back'):
    distributed.initialize_distributed('h:1', 2, 1)
  assert calls[-1] == {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1,
                       'initialization_timeout': distributed.DEFAULT_INITIALIZATION_TIMEOUT_S}
