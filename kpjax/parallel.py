"""Devices and processes: the 'data' mesh, batch sharding, multi-host start-up.

kpjax trains data-parallel: parameters replicated on every device, the global batch split along the
mesh's single 'data' axis, each process feeding its own devices' part.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run: explicit flags, or auto-detection on TPU pods / SLURM / Open MPI.

  A single-process run (no flags and nothing to detect) is left alone. CPU collectives across
  processes go through gloo (the CPU backend has none by default; accelerators are unaffected).
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address or num_processes:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return
  import os  # pylint: disable=g-import-not-at-top
  if any(v in os.environ for v in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
                                    'MEGASCALE_COORDINATOR_ADDRESS')):
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:  # e.g. a one-task SLURM job: nothing to join
      if 'already' not in str(e):
        print(f'note: running single-process ({e})')


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's part of the batch -> global arrays sharded along 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree on every device (identical on every process)."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                                       lambda idx: np.asarray(x)[idx]), tree)
