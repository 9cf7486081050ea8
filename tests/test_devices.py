"""kpjax.inference.devices on 4 forced CPU devices (a subprocess: the device count is fixed when JAX starts).

The child reports what it sees as JSON; the expectations are written here by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent('''
    import json
    import jax
    import numpy as np
    from kpjax.inference import devices

    mesh = devices.make_mesh()
    rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    batch = devices.shard_batch({'x': rows, 'id': np.arange(8)}, mesh)
    x = batch['x']
    params = {'w': np.arange(5.0, dtype=np.float32), 'b': np.float32(2.0)}
    replicated = devices.replicate(params, mesh)
    two = devices.make_mesh(jax.devices()[:2])
    print(json.dumps({
        'devices': jax.device_count(),
        'axis_names': list(mesh.axis_names),
        'mesh_shape': list(mesh.devices.shape),
        'spec': list(x.sharding.spec),
        'shard_rows': [[int(s.index[0].start or 0), int(s.index[0].stop or 8)] for s in
                       sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)],
        'shard_devices': len({s.device for s in x.addressable_shards}),
        'local_rows': devices.local_rows(x).tolist(),
        'local_ids': devices.local_rows(batch['id']).tolist(),
        'local_batch_size': {n: devices.local_batch_size(n, mesh) for n in (1, 4, 6, 8, 9)},
        'two_device_local_batch_size': devices.local_batch_size(3, two),
        'replicated_full': [bool(all(np.array_equal(np.asarray(s.data), params[k]) for s in v.addressable_shards))
                            for k, v in sorted(replicated.items())],
        'replicated_copies': [len(v.addressable_shards) for _, v in sorted(replicated.items())],
        'replicated_spec': list(replicated['w'].sharding.spec),
        'gathered': devices.gather_rows({'x': rows})['x'].tolist(),
    }))
''')


def test_mesh_sharding_and_rows_on_four_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  rows = [[3.0 * i, 3.0 * i + 1, 3.0 * i + 2] for i in range(8)]
  assert got['devices'] == 4
  assert got['axis_names'] == ['data'] and got['mesh_shape'] == [4]
  assert got['spec'] == ['data']
  assert got['shard_rows'] == [[0, 2], [2, 4], [4, 6], [6, 8]] and got['shard_devices'] == 4  # 2 rows a device
  assert got['local_rows'] == rows and got['local_ids'] == list(range(8))  # back in order
  # One process feeds the whole global batch, rounded up to whole rows for each of its 4 devices.
  assert got['local_batch_size'] == {'1': 4, '4': 4, '6': 8, '8': 8, '9': 12}
  assert got['two_device_local_batch_size'] == 4
  assert got['replicated_full'] == [True, True] and got['replicated_copies'] == [4, 4]
  assert got['replicated_spec'] == []
  assert got['gathered'] == rows  # one process: its own rows
