"""The PyTorch side of benchmarks/gpu.py, in a process of its own.

  python benchmarks/gpu_torch.py SPEC.json OUT.json

gpu.py runs this before JAX starts, so that torch's caching allocator and JAX's never hold the same GPU
at once (each would see the other's memory as gone) and each side's peak memory is its own. SPEC:
{"device": "cuda" | "cpu", "repeats": int, "warmup": int, "workloads": [{"task": "train" | "inference",
"workload": {common.Workload fields}}, ...]}. OUT: {"torch": version, "cudnn_allow_tf32": bool, "rows":
[{"task", "workload", "s_per_step", "s_per_step_median", "peak_bytes"} or {"task", "workload", "error"}]}
in the spec's order; a row that fails (out of memory, say) says why and the others still run.
"""

from __future__ import annotations

import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import inference  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

CANDIDATES = {'train': train_step.torch_candidate, 'inference': inference.torch_candidate}


def time_row(torch, device: str, task: str, w: common.Workload, repeats: int, warmup: int) -> dict:
  """One workload's best and median seconds per step and (on a GPU) torch's peak allocated bytes."""
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  candidate = CANDIDATES[task](w, torch, device)
  timing = common.time_interleaved({'torch': candidate.run}, repeats=repeats, warmup=warmup, min_quiet=0,
                                   quiet_wait_s=0, verbose=False)['torch']
  peak = int(torch.cuda.max_memory_allocated()) if device == 'cuda' else None
  return {'s_per_step': timing.best, 's_per_step_median': timing.median, 'peak_bytes': peak}


def run(spec: dict) -> dict:
  torch = common.setup_torch()
  device = spec['device']
  if device == 'cuda' and not torch.cuda.is_available():
    raise RuntimeError(f'torch {torch.__version__} sees no CUDA device (a CPU-only build?)')
  rows = []
  for item in spec['workloads']:
    w = common.Workload(**item['workload'])
    row = {'task': item['task'], 'workload': item['workload']}
    try:
      row.update(time_row(torch, device, item['task'], w, int(spec['repeats']), int(spec['warmup'])))
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
      row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    rows.append(row)
    gc.collect()
    if device == 'cuda':
      torch.cuda.empty_cache()
  return {'torch': torch.__version__, 'cudnn_allow_tf32': bool(torch.backends.cudnn.allow_tf32), 'rows': rows}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2:
    print('error: usage: python benchmarks/gpu_torch.py SPEC.json OUT.json', file=sys.stderr)
    return 2
  with open(argv[0]) as f:
    spec = json.load(f)
  result = run(spec)
  with open(argv[1], 'w') as f:
    json.dump(result, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
