"""What the benchmark scripts share: flags, the workload and kpjax config they time, synthetic batches,
timing that notices a busy machine, FLOP counts, machine peaks, and the kpjax-vs-PyTorch comparison driver.

Each script declares only what it times: train_step.py and inference.py their kpjax and torch
candidates (a `Candidate` built from a `Workload`), memory.py a compile-only step, gpu.py its plan,
input_pipeline.py the grain pipeline. `run_comparison` is the driver the first two share: it parses
nothing itself, prints the header, the machine peak, a table and the kpjax/torch ratio lines.

Every CPU timing here:

* interleaves the candidates (a, b, a, b, ...) after warm-up, so a slow minute hurts both alike;
* records, for every sample, how much CPU *other* processes used meanwhile (from /proc/stat minus this
  process's own CPU time), and prefers the samples where the machine was otherwise quiet;
* reports the best (minimum) clean sample, the usual estimator for "what this code costs" on a shared box.

Nothing here is used by kpjax itself; torch is imported only when a script asks for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import time
from typing import Callable, Sequence

from kpjax.cli import common as cli
from kpjax.model import layers
from kpjax.model.layers import CONV_ALGORITHMS  # the network's: 'auto', 'direct', 'winograd', 'direct-pooled'

BUSY_CORES = 0.15
DTYPES = ('float32', 'bfloat16')
UNPOOLS = ('mask', 'scatter')  # kpjax.model.pooling.UNPOOLS (not imported here: that would import JAX)


# ---- Flags ------------------------------------------------------------------------------------------


fail = cli.error  # the project's convention for a user's mistake: one `error: ...` line, exit status 2


class ArgumentParser(cli.ArgumentParser):
  """kpjax's CLI parser (usage errors as one `error:` line); --help prints the script's whole docstring."""

  def __init__(self, doc: str, **kwargs):
    super().__init__(description=doc, **kwargs)


def input_size(text: str) -> int:
  """argparse type: a square input side in pixels the network takes (kpjax.model.layers.INPUT_SIDE_RULE)."""
  value = positive_int(text)
  if not layers.valid_side(value):
    raise argparse.ArgumentTypeError(f'must be {layers.INPUT_SIDE_RULE}; got {text}')
  return value


def _number(kind, test, expected: str):
  """An argparse type: `kind(text)` where `test` holds, else an error saying `expected`."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected {expected}; got {text!r}') from None
    if not test(value):
      raise argparse.ArgumentTypeError(f'expected {expected}; got {text}')
    return value
  return parse


positive_int = _number(int, lambda v: v > 0, 'a positive integer')
non_negative_int = _number(int, lambda v: v >= 0, 'an integer >= 0')
positive_float = _number(float, lambda v: v > 0 and not math.isinf(v), 'a positive number')
non_negative_float = _number(float, lambda v: v >= 0 and not math.isinf(v), 'a number >= 0')


def num_stages(text: str) -> int:
  value = positive_int(text)
  if value > 6:
    raise argparse.ArgumentTypeError(f'KPDEM has stages 1..6; got {text}')
  return value


def categories() -> tuple[str, ...]:
  from kpjax.data import keypoints
  return keypoints.CATEGORIES + (keypoints.ALL,)


def add_network_args(p: argparse.ArgumentParser, *, size: int = 48, batch: int = 2) -> None:
  """The flags that say which network, input and batch to time (see `Workload`)."""
  p.add_argument('--size', type=input_size, default=size,
                 help=f'square input side in pixels, even (default {size})')
  p.add_argument('--batch', type=positive_int, default=batch, help=f'images per step (default {batch})')
  p.add_argument('--width', type=positive_float, default=1.0,
                 help='channel multiplier (1.0 = KPDEM, 36.9 M parameters)')
  p.add_argument('--num-stages', type=num_stages, default=6, help='CPM stages 1..6 (6 = KPDEM)')
  p.add_argument('--category', default='trousers', choices=categories(),
                 help='sets the number of keypoints (trousers: 7, all: 24)')


# ---- What is timed ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
  """One network, input and batch to time: what every candidate builds from.

  size: square input side in pixels; batch: images per step; dtype: kpjax's compute dtype (torch runs
  bfloat16 under autocast); remat: kpjax's jax.checkpoint per block (torch has none); unpool: kpjax's
  config.model.unpool, 'mask' (the fused pool_unpool) or 'scatter' (max_pool_2x2 + max_unpool_2x2).
  """
  category: str = 'trousers'
  size: int = 48
  batch: int = 2
  width: float = 1.0
  num_stages: int = 6
  dtype: str = 'float32'
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  conv_algorithm: str = 'auto'
  unpool: str = 'mask'

  @property
  def n_locations(self) -> int:
    from kpjax.data import keypoints
    return keypoints.num_keypoints(self.category)

  def replace(self, **changes) -> Workload:
    return dataclasses.replace(self, **changes)

  def train_flops(self) -> float:
    """Direct-convolution FLOPs of one training step (see `train_flops`)."""
    return train_flops(self.n_locations, (self.size, self.size), self.batch, self.width, self.num_stages)

  def forward_flops(self) -> float:
    return forward_flops(self.n_locations, (self.size, self.size), self.batch, self.width, self.num_stages)

  def describe(self) -> str:
    stages = f'{self.num_stages} stage' + ('s' if self.num_stages != 1 else '')
    return (f'width {self.width:g}, {stages}, {self.n_locations} keypoints, '
            f'{self.size}x{self.size}, batch {self.batch}')


def workload_from_args(args, **changes) -> Workload:
  """The Workload of add_network_args' flags (plus conv_algorithm/remat where the script has them)."""
  fields = dict(category=args.category, size=args.size, batch=args.batch, width=args.width,
                num_stages=args.num_stages, remat=bool(getattr(args, 'remat', False)),
                conv_algorithm=getattr(args, 'conv_algorithm', 'auto'))
  fields.update(changes)
  return Workload(**fields)


def kpjax_config(w: Workload):
  """configs/base.py set to the original's training recipe (RMSprop lr 2.5e-4, alpha 0.9, constant, no
  clipping, warm-up or weight decay) and the workload's network, input and batch."""
  from kpjax.configs import base
  config = base.get_config()
  config.category = w.category
  config.input_size = w.size
  config.batch_size = w.batch
  config.model.width = w.width
  config.model.num_stages = w.num_stages
  config.model.conv_algorithm = w.conv_algorithm
  config.model.unpool = w.unpool
  config.compute_dtype = w.dtype
  config.remat = w.remat
  config.remat_policy = w.remat_policy
  config.optimizer = 'rmsprop'
  config.learning_rate = 2.5e-4
  config.rmsprop_decay = 0.9
  config.schedule = 'constant'
  config.warmup_steps = 0
  config.grad_clip_norm = 0.0
  config.weight_decay = 0.0
  return config


def synthetic_batch(w: Workload, seed: int = 0):
  """(images float32 (B, S, S, 3) standard normal, targets float32 (B, L, 2) in [-0.9, 0.9]), numpy."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((w.batch, w.size, w.size, 3)).astype(np.float32)
  target = rng.uniform(-0.9, 0.9, (w.batch, w.n_locations, 2)).astype(np.float32)
  return images, target


def initial_train_state(w: Workload, seed: int = 0):
  """A TrainState for `w`'s network as fresh device buffers (a training step donates its state).

  Its structure is `kpjax.train.step.create_train_state`'s (via jax.eval_shape, nothing compiled);
  kernels are drawn from a fan-in-scaled normal, biases, step and RMSprop's accumulators are zeros
  (what optax.rmsprop's init makes). Timing does not depend on the values, and compiling kpjax's own
  initialisation takes longer than a small network's step (~15 s of CPU for a 1-stage network).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kpjax.train import step as ts
  config = kpjax_config(w)
  model, optimizer, _ = ts.make_training(config)
  shapes = jax.eval_shape(lambda: ts.create_train_state(model, optimizer, jax.random.PRNGKey(0), w.size))
  rng = np.random.default_rng(seed)

  def param(leaf):
    if len(leaf.shape) < 2:  # biases
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = math.prod(leaf.shape[:-1])  # HWIO kernels
    return (rng.standard_normal(leaf.shape, np.float32) / math.sqrt(fan_in)).astype(leaf.dtype)

  zeros = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
  return jax.device_put(zeros.replace(params=jax.tree_util.tree_map(param, shapes.params)))


@dataclasses.dataclass
class Candidate:
  """One thing to time: `run()` does one step and blocks until its result is ready.

  compile_s: seconds XLA took to compile it (kpjax; 0 for torch). xla_bytes: XLA's planned device memory
  for one step (arguments + outputs - donated + temporaries; None where XLA gives no analysis).
  """
  run: Callable[[], object]
  compile_s: float = 0.0
  xla_bytes: int | None = None


def compile_timed(jitted, *args):
  """(compiled executable, seconds to compile) of `jitted` for these arguments (ahead of time, so the
  first timed call is not a compilation)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def xla_step_bytes(compiled) -> int | None:
  """Device bytes one call of a compiled executable needs by XLA's buffer assignment (None if unknown)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
             + analysis.temp_size_in_bytes)


# ---- Torch ------------------------------------------------------------------------------------------


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


def torch_device(torch) -> str:
  """Where the torch side runs: the GPU when torch sees one (as kpjax then runs on it too), else the CPU."""
  return 'cuda' if torch.cuda.is_available() else 'cpu'


# ---- Machine load -----------------------------------------------------------------------------------

CLOCK_TICKS_PER_S = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100


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
  return int(round((t.user + t.system + t.children_user + t.children_system) * CLOCK_TICKS_PER_S))


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
    return max(0.0, foreign / CLOCK_TICKS_PER_S / elapsed)


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
  `min_quiet` samples taken while the rest of the machine was quiet. Before each round it waits up to
  `quiet_wait_s` for the machine to calm down (0: does not wait or probe; an accelerator's timing does not
  suffer from a busy host the way a CPU's does).
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
    if quiet_wait_s > 0:
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
  from kpjax.model import network as model
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
    ('H100 NVL', 417.5, 835.5),
    ('H100', 494.5, 989.0),  # SXM
    ('H200', 494.5, 989.0),
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


def cpu_model() -> str:
  """The CPU's model name: /proc/cpuinfo's 'model name', else lscpu's 'Model name', else what Python knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  try:
    import subprocess  # pylint: disable=g-import-not-at-top
    out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10, check=False).stdout
    for line in out.splitlines():
      if line.strip().startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return platform.processor() or platform.machine()


def machine_description() -> str:
  return f'{cpu_model()}, {cpu_threads()} threads'


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub-markdown table (printed as is, so it can be pasted into docs/performance.md)."""
  cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(row, widths)) + ' |' for row in cells]
  lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(lines)


# ---- The kpjax-vs-PyTorch comparison (train_step.py, inference.py) ---------------------------------


def comparison_parser(doc: str, *, remat: bool) -> ArgumentParser:
  """The flags of a side-by-side benchmark; `--remat` only where kpjax's step can honour it (training)."""
  p = ArgumentParser(doc)
  add_network_args(p)
  p.add_argument('--dtype', choices=['float32', 'bfloat16', 'both'], default=None,
                 help='compute dtype (default: float32 on CPU, both on GPU); torch uses autocast for bf16')
  if remat:
    p.add_argument('--remat', action='store_true',
                   help='kpjax with remat=True (jax.checkpoint per block); torch runs without (the original has none)')
  p.add_argument('--conv-algorithm', default='auto', choices=CONV_ALGORITHMS)
  p.add_argument('--compare-direct', action='store_true', help="also time kpjax with conv_algorithm='direct'")
  p.add_argument('--compare', type=conv_algorithms, default=(), metavar='A,B',
                 help=f'also time kpjax with each of these conv_algorithms (of {", ".join(CONV_ALGORITHMS)}), '
                 'interleaved with the rest')
  p.add_argument('--unpool', choices=UNPOOLS + ('both',), default='mask',
                 help="kpjax's pool + unpool pairs: 'mask' (fused, the default), 'scatter' (max_pool_2x2 + "
                      "max_unpool_2x2), or 'both' (one row each, and their ratio)")
  p.add_argument('--no-torch', action='store_true', help='time kpjax only')
  p.add_argument('--no-peak', action='store_true', help='skip measuring the machine peak')
  add_timing_args(p)
  return p


def add_timing_args(p: argparse.ArgumentParser, *, warmup: int = 2) -> None:
  """The flags of time_interleaved: --repeats, --warmup, --min-quiet, --quiet-wait-s."""
  p.add_argument('--repeats', type=positive_int, default=5, help='timed rounds at least (default 5)')
  p.add_argument('--warmup', type=non_negative_int, default=warmup, help=f'untimed calls first (default {warmup})')
  p.add_argument('--min-quiet', type=non_negative_int, default=2,
                 help='extra rounds (up to 3x --repeats) until each candidate has this many quiet samples')
  p.add_argument('--quiet-wait-s', type=non_negative_float, default=60.0,
                 help='before each round wait up to this long for other processes to go quiet (0: do not)')


def conv_algorithms(text: str) -> tuple[str, ...]:
  """'direct,direct-pooled' -> ('direct', 'direct-pooled'); each must be one of CONV_ALGORITHMS."""
  names = tuple(n.strip() for n in text.split(',') if n.strip())
  unknown = [n for n in names if n not in CONV_ALGORITHMS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f'expected conv_algorithms separated by commas, each one of '
                                     f'{", ".join(CONV_ALGORITHMS)}; got {text!r}')
  return names


def kpjax_row_name(w: Workload, run_algorithm: str = 'auto') -> str:
  """'kpjax', with what differs from the run's own kpjax in brackets: its convolutions when not
  `run_algorithm` ('direct convs' for 'direct'), the scatter unpool, remat: 'kpjax (direct convs, remat)'."""
  conv = [] if w.conv_algorithm == run_algorithm else ['direct convs' if w.conv_algorithm == 'direct'
                                                        else w.conv_algorithm]
  notes = conv + (['scatter unpool'] if w.unpool == 'scatter' else []) + (['remat'] if w.remat else [])
  return 'kpjax' + (f' ({", ".join(notes)})' if notes else '')


def dtypes_to_time(requested: str | None, backend: str) -> list[str]:
  if requested == 'both':
    return list(DTYPES)
  if requested:
    return [requested]
  return ['float32'] if backend == 'cpu' else list(DTYPES)


def run_comparison(args, *, task: str, flops: Callable[[Workload], float],
                   kpjax_candidate: Callable[[Workload], Candidate],
                   torch_candidate: Callable[[Workload, object, str], Candidate]) -> None:
  """Times kpjax (in each `--unpool` form, each also with the `--compare-direct`/`--compare` convolutions,
  and torch unless `--no-torch`) on `args`' workload; prints a header, the machine peak, a markdown table
  (first column titled `task`), and per dtype one kpjax/torch ratio line (kpjax as run, in the first
  --unpool form) and, with `--unpool both`, one scatter/mask line; each names the machine.
  flops(workload): the FLOPs one call is credited with."""
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  device = jax.devices()[0]
  torch = None if args.no_torch else setup_torch()
  base = workload_from_args(args)
  step_flops = flops(base)
  machine = machine_description() if backend == 'cpu' else f'{device.device_kind} (host: {machine_description()})'
  print(f'# kpjax {task} vs PyTorch: {base.describe()}, {step_flops / 1e9:.1f} GFLOP per step (direct convolutions)')
  versions = f'jax {jax.__version__} on {backend}' + (f', torch {torch.__version__} on {torch.get_num_threads()} '
                                                    'threads' if torch else '')
  print(f'# {versions}; machine: {machine}')
  if base.remat:
    print(f'# kpjax with remat=True (policy {base.remat_policy}); torch without (the original has no remat)')

  peak = None
  if not args.no_peak:
    if backend == 'cpu':
      peak = measure_peak(torch)
      print(f'# measured float32 peak (GFLOP/s): {peak.describe()} -> {peak.gflops:.0f}')
    else:
      peak = accelerator_peak(device.device_kind)
      if peak:
        print(f'# {device.device_kind} peak (TFLOP/s, dense): {peak.describe()}')
      else:
        print(f'# no data-sheet peak known for {device.device_kind}: the % of peak column stays empty')

  unpools = list(UNPOOLS) if args.unpool == 'both' else [args.unpool]
  others = (('direct',) if args.compare_direct else ()) + tuple(getattr(args, 'compare', ()))
  others = tuple(dict.fromkeys(a for a in others if a != base.conv_algorithm))
  kpjax_name = kpjax_row_name(base.replace(unpool=unpools[0]), base.conv_algorithm)
  if base.conv_algorithm != 'auto' or others:
    print(f'# {kpjax_name}: conv_algorithm {base.conv_algorithm!r}')
  title = f'{task[0].upper()}{task[1:]}'
  rows, ratios = [], []
  for dtype in dtypes_to_time(args.dtype, backend):
    candidates = {}
    for unpool in unpools:
      w = base.replace(dtype=dtype, unpool=unpool)
      candidates[kpjax_row_name(w, base.conv_algorithm)] = kpjax_candidate(w)
      for algorithm in others:
        other = w.replace(conv_algorithm=algorithm)
        candidates[kpjax_row_name(other, base.conv_algorithm)] = kpjax_candidate(other)
    if torch is not None:
      candidates['torch'] = torch_candidate(w, torch, torch_device(torch))
    timings = time_interleaved({name: c.run for name, c in candidates.items()}, repeats=args.repeats,
                               warmup=args.warmup, min_quiet=args.min_quiet, quiet_wait_s=args.quiet_wait_s)
    for name, t in timings.items():
      gflops = step_flops / t.best / 1e9
      share = '' if peak is None else f'{100 * gflops / peak.for_dtype(dtype):.0f}%'
      rows.append([name, dtype, f'{t.best:.4g}', f'{t.median:.4g}', f'{w.batch / t.best:.2f}', f'{gflops:.0f}',
                   share, f'{t.quiet}/{len(t.seconds)}'])
    if 'torch' in timings:
      kp, tt = timings[kpjax_name].best, timings['torch'].best
      ratios.append(f'{title} on {machine}: kpjax/torch speed ratio ({dtype}): {tt / kp:.2f}x '
                    f'(kpjax {kp:.4g} s/step, torch {tt:.4g} s/step).')
    if len(unpools) == 2:
      mask, scatter = (timings[kpjax_row_name(base.replace(unpool=u), base.conv_algorithm)] for u in UNPOOLS)
      ratios.append(f'{title} on {machine}: scatter/mask unpool time ratio ({dtype}): '
                    f'{scatter.best / mask.best:.2f}x best, {scatter.median / mask.median:.2f}x median '
                    f'(mask {mask.best:.4g} s/step best, {mask.median:.4g} median; scatter {scatter.best:.4g} '
                    f'best, {scatter.median:.4g} median).')
  print()
  print(f'{title}, {base.describe()}, on {machine}; {versions}:')
  print()
  print(format_table([task, 'dtype', 's/step (best)', 's/step (median)', 'images/s', 'GFLOP/s', '% of peak',
                      'quiet samples'], rows))
  print()
  for line in ratios:
    print(line)
