"""Multi-process start-up: which launcher started the job, and joining its processes.

A multi-process run is started by `initialize_distributed`, which never falls back to one process
when the environment says the job has several: N hosts that each believed they were alone would
train N models into one workdir.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

from kpjax.errors import DistributedStartupError
DEFAULT_INITIALIZATION_TIMEOUT_S = 300  # jax.distributed.initialize's own default
# The end of every message about a multi-process run that could not start or went on without a peer.
NO_FALLBACK = ('kpjax does not fall back to one process (each would train its own model into the same workdir): '
               'check that every process was started, that they reach each other, or pass --coordinator_address, '
               '--num_processes and --process_id')


@dataclasses.dataclass(frozen=True)
class Launch:
  """What the environment says about how the job was launched.

  name: 'SLURM', 'Open MPI' or 'TPU pod'; tasks: how many processes the job has (None: several, the
  count not given); evidence: the variables that say so (for messages).
  """
  name: str
  tasks: int | None
  evidence: str


def _int(value: str | None) -> int | None:
  try:
    return int(value) if value is not None else None
  except ValueError:
    return None


def detect_launch(env: Mapping[str, str] | None = None) -> Launch | None:
  """The launcher the environment variables name (SLURM, Open MPI, a TPU pod slice), or None."""
  env = os.environ if env is None else env
  if 'SLURM_JOB_ID' in env:  # srun sets the step's task count; sbatch the job's
    for var in ('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'SLURM_NPROCS'):
      if var in env:
        return Launch('SLURM', _int(env[var]), f'SLURM_JOB_ID={env["SLURM_JOB_ID"]}, {var}={env[var]}')
    return Launch('SLURM', None, f'SLURM_JOB_ID={env["SLURM_JOB_ID"]} without SLURM_NTASKS')
  if 'OMPI_COMM_WORLD_SIZE' in env:
    size = env['OMPI_COMM_WORLD_SIZE']
    return Launch('Open MPI', _int(size), f'OMPI_COMM_WORLD_SIZE={size}')
  if 'MEGASCALE_COORDINATOR_ADDRESS' in env:
    return Launch('TPU pod', None, f'MEGASCALE_COORDINATOR_ADDRESS={env["MEGASCALE_COORDINATOR_ADDRESS"]}')
  for var in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):
    if env.get(var):
      hosts = [h for h in env[var].split(',') if h.strip()]
      return Launch('TPU pod', len(hosts), f'{var} lists {len(hosts)} host(s)')
  return None


def requested_run(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None) -> str | None:
  """What multi-process run the flags or the environment ask for, in words ('the SLURM job (...: 4
  tasks)'), or None for one process: no flags and no launcher, or a launcher whose job provably has
  one task (SLURM_NTASKS=1, a one-host TPU slice...). Incomplete flags raise ValueError naming the
  missing one."""
  launch = detect_launch()
  given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
           '--process_id': process_id}
  if any(v is not None for v in given.values()):
    missing = [flag for flag, value in given.items() if value is None]
    if missing and (launch is None or launch.tasks == 1):  # nothing to fill them in
      raise ValueError(f'{" and ".join(missing)} missing: a multi-process run started by hand needs '
                       '--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I on every process')
    return f'the {num_processes or "multi"}-process run at {coordinator_address or "the detected coordinator"}'
  if launch is None or launch.tasks == 1:
    return None
  tasks = f'{launch.tasks} tasks' if launch.tasks else 'several tasks'
  return f'the {launch.name} job ({launch.evidence}: {tasks})'


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None,
                           initialization_timeout_s: int = DEFAULT_INITIALIZATION_TIMEOUT_S) -> str | None:
  """Joins the multi-process run the flags or SLURM / Open MPI / a TPU pod slice ask for (requested_run).

  One process (no flags, nothing detected, or a job of one task) is left alone. Where several are
  asked for and jax.distributed.initialize() fails, raises DistributedStartupError naming both; it
  never falls back to one process. (Failures that JAX's C++ runtime turns into an abort instead,
  such as a peer that never registers, are reported by kpjax.cli.supervise.) CPU collectives
  across processes go through gloo (the CPU backend has none by default; accelerators are unaffected).

  Returns requested_run's description (None for one process).
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  where = requested_run(coordinator_address, num_processes, process_id)
  if where is None:
    return None
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=int(initialization_timeout_s))
  except Exception as e:  # pylint: disable=broad-except  (jax raises many types; all end the run)
    if 'already initialized' in str(e) or 'should only be called once' in str(e):
      return where
    cause = ' '.join(str(e).split()) or type(e).__name__
    raise DistributedStartupError(
        f'could not join {where}: jax.distributed.initialize() failed: {type(e).__name__}: {cause}. '
        + NO_FALLBACK) from None
  return where
