"""Devices: the one-axis 'data' mesh over every device of every process, batch sharding and gathering.

kpjax trains and evaluates data-parallel: parameters replicated on every device, each batch split
along the mesh's single 'data' axis, each process feeding (and reading back) its own devices' rows.
Starting a multi-process run is kpjax.train.distributed's job.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device of every process, axis 'data'."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def local_batch_size(batch_size: int, mesh: Mesh) -> int:
  """Rows this process feeds for a global batch of about `batch_size`: its share, rounded up to a
  multiple of its devices on the mesh (so that every device gets whole rows)."""
  local_devices = len(mesh.local_devices)
  share = math.ceil(batch_size / jax.process_count())
  return max(1, math.ceil(share / local_devices)) * local_devices


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's part of the batch -> global arrays sharded along 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded along 'data' (the inverse of shard_batch), in order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree on every device (identical on every process)."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                                       lambda idx: np.asarray(x)[idx]), tree)


def gather_rows(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows, concatenated in process order (arrays of the same shape on every process)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in local.items()}
