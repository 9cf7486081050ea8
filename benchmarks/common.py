"""Shared benchmark helpers: thread setup, interleaved timing that notices a busy machine, FLOP counts, peak.

The benchmarks compare kpjax (jit) with the PyTorch original on one machine, so every timing here:

* interleaves the candidates (a, b, a, b, ...) after warm-up, so a slow minute hurts both alike;
* records, for every sample, how much CPU *other* processes used meanwhile (from /proc/stat minus this
  process's own CPU time), and prefers the samples where the machine was otherwise quiet;
* reports the best (minimum) clean sample, the usual estimator for "what this code costs" on a shared box.

Nothing here is used by kpjax itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from typing import Callable, Sequence

# Samples where other processes used more than this many cores on average are "busy".
BUSY_CORES = 0.15


def cpu_threads() -> int:
  """Cores this process may run on (what XLA's CPU client and torch should both use)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def setup_torch(threads: int | None = None):
  """Imports torch with `threads` intra-op threads (default: as many as XLA uses) and returns it."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads or cpu_threads())
  return torch


# ---- Machine load -----------------------------------------------------------------------------------

_TICK = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100


def _system_busy_ticks() -> int | None:
  try:
    with open('/proc/stat') as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user/nice
  return sum(fields) - idle - guest


def _own_ticks() -> int:
  t = os.times()
  return int(round((t.user + t.system + t.children_user + t.children_system) * _TICK))


class LoadMeter:
  """Average cores used by *other* processes over an interval (None where /proc/stat is missing)."""

  def start(self):
    self._t, self._sys, self._own = time.perf_counter(), _system_busy_ticks(), _own_ticks()

  def stop(self) -> float | None:
    elapsed = time.perf_counter() - self._t
    sys_ticks = _system_busy_ticks()
    if sys_ticks is None or self._sys is None or elapsed <= 0:
      return None
    foreign = (sys_ticks - self._sys) - (_own_ticks() - self._own)
    return max(0.0, foreign / _TICK / elapsed)


def wait_until_quiet(max_wait_s: float = 120.0, probe_s: float = 1.0, verbose: bool = True) -> float | None:
  """Waits (up to max_wait_s) until other processes use < BUSY_CORES; returns the last reading."""
  meter, deadline, load = LoadMeter(), time.time() + max_wait_s, None
  announced = False
  while True:
    meter.start()
    time.sleep(probe_s)
    load = meter.stop()
    if load is None or load < BUSY_CORES or time.time() > deadline:
      return load
    if verbose and not announced:
      print(f'# machine busy ({load:.2f} cores used by other processes); waiting up to {max_wait_s:.0f} s',
            flush=True)
      announced = True


# ---- Timing -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
  """Samples of one candidate: seconds per call and the foreign load during each."""
  name: str
  seconds: list[float] = dataclasses.field(default_factory=list)
  loads: list[float | None] = dataclasses.field(default_factory=list)

  def clean(self) -> list[float]:
    return [s for s, l in zip(self.seconds, self.loads) if l is None or l < BUSY_CORES]

  @property
  def best(self) -> float:
    """Fastest quiet sample (fastest of all when none was quiet)."""
    return min(self.clean() or self.seconds)

  @property
  def median(self) -> float:
    return statistics.median(self.clean() or self.seconds)

  @property
  def quiet(self) -> int:
    return len(self.clean())


def time_interleaved(candidates: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1,
                     min_quiet: int = 2, max_repeats: int | None = None, min_sample_s: float = 0.0,
                     quiet_wait_s: float = 60.0, verbose: bool = True) -> dict[str, Timing]:
  """Times each zero-argument callable (which must block until its result is ready), interleaved.

  Each sample calls a candidate `n` times in a row, with n chosen after warm-up so that a sample lasts at
  least `min_sample_s` (short calls are batched, so the load reading means something), and records the
  per-call time. Rounds continue past `repeats` (up to `max_repeats`) until every candidate has
  `min_quiet` samples taken while the rest of the machine was quiet.
  """
  max_repeats = max_repeats or 3 * repeats
  for fn in candidates.values():
    for _ in range(warmup):
      fn()
  calls = {}
  for name, fn in candidates.items():
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    calls[name] = max(1, math.ceil(min_sample_s / max(once, 1e-6)))
  timings = {name: Timing(name) for name in candidates}
  meter = LoadMeter()
  for r in range(max_repeats):
    if r >= repeats and all(t.quiet >= min_quiet for t in timings.values()):
      break
    wait_until_quiet(quiet_wait_s, verbose=verbose)
    for name, fn in candidates.items():
      n = calls[name]
      meter.start()
      t0 = time.perf_counter()
      for _ in range(n):
        fn()
      seconds = (time.perf_counter() - t0) / n
      load = meter.stop()
      timings[name].seconds.append(seconds)
      timings[name].loads.append(load)
      if verbose:
        busy = '' if load is None or load < BUSY_CORES else f'  (busy: {load:.2f} other cores)'
        print(f'#   round {r + 1}: {name:24s} {seconds:9.4f} s{busy}', flush=True)
  return timings


# ---- FLOPs ------------------------------------------------------------------------------------------


def conv_layers(n_locations: int, width: float = 1.0, num_stages: int = 6) -> list[tuple[str, int, int, int]]:
  """(name, in channels, out channels, kernel) of every conv of CoordRegressionNetwork, in order."""
  from kpjax import model  # pylint: disable=g-import-not-at-top
  layers, cin = [], 3
  specs = list(model.BACKBONE) + [model.STAGE1]
  for name_block, block in specs:
    del name_block
    for name, channels, kernel in block:
      cout = model.scaled_channels(channels, width)
      layers.append((name, cin, cout, kernel))
      cin = cout
  features = layers[len([l for _, b in model.BACKBONE for l in b]) - 1][2]
  for i in range(2, num_stages + 1):
    _, block = model.refinement_stage(i)
    cin = model.HEATMAP_CHANNELS + features
    for name, channels, kernel in block:
      cout = model.scaled_channels(channels, width)
      layers.append((name, cin, cout, kernel))
      cin = cout
  layers.append(('hm_conv', model.HEATMAP_CHANNELS, n_locations, 1))
  return layers


def forward_flops(n_locations: int, image_hw: tuple[int, int], batch: int, width: float = 1.0,
                  num_stages: int = 6) -> float:
  """Multiply-add FLOPs (2 per MAC) of the network's convolutions for one forward pass."""
  pixels = image_hw[0] * image_hw[1] * batch
  return sum(2.0 * pixels * cin * cout * k * k for _, cin, cout, k in conv_layers(n_locations, width, num_stages))


def train_flops(n_locations: int, image_hw: tuple[int, int], batch: int, width: float = 1.0,
                num_stages: int = 6) -> float:
  """Forward + backward conv FLOPs of one training step: every conv's forward, weight gradient and input
  gradient, except the first conv's input gradient (nobody needs d loss / d image). The softmax, DSNT,
  loss, ReLUs, pool/unpool and optimizer add well under 1%, and are not counted."""
  layers = conv_layers(n_locations, width, num_stages)
  pixels = image_hw[0] * image_hw[1] * batch
  per_layer = [2.0 * pixels * cin * cout * k * k for _, cin, cout, k in layers]
  return 3 * sum(per_layer) - per_layer[0]


# ---- Machine peak -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Peak:
  """A machine's peak in GFLOP/s: measured (CPU: best of a big matmul and a big conv, per framework) or
  from the accelerator's data sheet (`by_dtype`, dense tensor-core figures)."""
  results: dict[str, float]
  by_dtype: dict[str, float] | None = None

  @property
  def gflops(self) -> float:
    return max(self.results.values())

  def for_dtype(self, dtype: str) -> float:
    """The peak a `dtype` run is measured against (CPUs: the measured float32 peak for every dtype)."""
    if self.by_dtype and dtype in self.by_dtype:
      return self.by_dtype[dtype]
    return self.gflops

  def describe(self) -> str:
    scale = 1e3 if self.by_dtype else 1.0
    return ', '.join(f'{k} {v / scale:.0f}' for k, v in self.results.items())


# Dense peak TFLOP/s per device from the vendors' data sheets: (float32 as XLA/cuDNN run it by default,
# i.e. TF32 tensor cores on NVIDIA; bfloat16). Matched by substring of jax's device_kind, first match wins.
ACCELERATOR_PEAKS_TFLOPS = (
    ('H100 PCIe', 378.0, 756.0),
    ('H100', 494.0, 989.0),  # SXM
    ('H200', 494.0, 989.0),
    ('A100', 156.0, 312.0),
    ('L4', 60.0, 121.0),
    ('TPU v4', 275.0, 275.0),
    ('TPU v5 lite', 197.0, 197.0),
    ('TPU v5', 459.0, 459.0),
    ('TPU v6 lite', 918.0, 918.0),
)


def accelerator_peak(device_kind: str) -> Peak | None:
  """The data-sheet peak of a GPU/TPU (None for an unknown device: the table then shows no share)."""
  for name, f32, bf16 in ACCELERATOR_PEAKS_TFLOPS:
    if name.lower() in device_kind.lower():
      return Peak({'float32': f32 * 1e3, 'bfloat16': bf16 * 1e3}, {'float32': f32 * 1e3, 'bfloat16': bf16 * 1e3})
  return None


def measure_peak(torch_module=None, repeats: int = 4, verbose: bool = False) -> Peak:
  """The machine's measured float32 matmul/conv peak: a 2048^3 matmul, a 3x3 512->512 conv and a 7x7
  128->128 conv on 2x48x48 (the network's two dominant shapes), each in XLA and in torch (forward, direct
  convolution), best of `repeats` samples, interleaved; the peak is the best of them all."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n = 2048
  a = rng.standard_normal((n, n), np.float32)
  b = rng.standard_normal((n, n), np.float32)
  convs = {'conv3x3': (3, 512), 'conv7x7': (7, 128)}
  inputs = {name: (rng.standard_normal((2, 48, 48, c), np.float32),
                   rng.standard_normal((k, k, c, c), np.float32) * 0.02) for name, (k, c) in convs.items()}
  flops = {'xla matmul': 2.0 * n ** 3}
  jmm = jax.jit(jnp.matmul)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  candidates = {'xla matmul': lambda: jmm(ja, jb).block_until_ready()}
  jconv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  for name, (x, w) in inputs.items():
    k, c = convs[name]
    jx, jw = jnp.asarray(x), jnp.asarray(w)
    candidates[f'xla {name}'] = lambda jx=jx, jw=jw: jconv(jx, jw).block_until_ready()
    flops[f'xla {name}'] = flops[f'torch {name}'] = 2.0 * 2 * 48 * 48 * c * c * k * k
  if torch_module is not None:
    torch = torch_module
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def tmm():
      with torch.no_grad():
        torch.matmul(ta, tb)

    candidates['torch matmul'] = tmm
    flops['torch matmul'] = flops['xla matmul']
    for name, (x, w) in inputs.items():
      tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
      tw = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))

      def tconv(tx=tx, tw=tw):
        with torch.no_grad():
          torch.nn.functional.conv2d(tx, tw, padding=tw.shape[-1] // 2)

      candidates[f'torch {name}'] = tconv
  timings = time_interleaved(candidates, repeats=repeats, warmup=1, min_sample_s=0.5, verbose=verbose)
  return Peak({k: flops[k] / t.best / 1e9 for k, t in timings.items()})


def machine_description() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return f'{cpu}, {cpu_threads()} threads'


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub-markdown table (printed as is, so it can be pasted into the README)."""
  cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(row, widths)) + ' |' for row in cells]
  lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(lines)
