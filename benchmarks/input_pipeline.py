"""Input pipeline throughput: training batches exactly as `python -m kpjax.train` makes them, per CPU core.

  python benchmarks/input_pipeline.py --size 256 --workers 0 --json r256.json
  python benchmarks/input_pipeline.py --size 512 --workers 2 --synthetic-dir /tmp/kp-garments
  python benchmarks/input_pipeline.py --data-dir ~/tensorflow_datasets --size 512   # the FashionAI release
  python benchmarks/input_pipeline.py --table r256.json r512.json   # the cores each accelerator needs

The pipeline is kpjax.data.pipeline's, as kpjax.train builds it: `get_source` (the TFDS array_record
dataset) and `train_iterator` (shuffle -> decode JPEG -> augment: scale, rotation, translation, flip,
colour jitter -> normalise -> batch, in --threads threads, in --workers grain worker processes), for
configs/base.py with this category, size, batch, config.data.worker_count and config.data.num_threads.
Without --data-dir it reads synthetic garments (kpjax.data.synthetic: JPEGs of up to 512x512 like
FashionAI's, 30% exactly 512x512), generated and built once into --synthetic-dir (default: a temporary
directory, removed at the end).

After --warmup batches it times --batches batches (default: as many as --seconds allow) and prints
images/s and images/s per core. Cores = CPU seconds spent by this process and all its descendants
(grain's workers) during the timed window / its wall seconds, from /proc: what the pipeline used, not
what the machine has (printed beside it). --json OUT writes {"images_per_s", "images_per_s_per_core",
"size", "workers", "cores", "cpu"} (cpu: the CPU model name).

--table FILE... reads such JSON files (one per input size) and prints, for accelerators training the
full network in bfloat16 at 40% of their dense data-sheet peak, the images/s each consumes and so the
cores each needs; with no files, the accelerator columns alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from kpjax.data import sources

JSON_KEYS = ('images_per_s', 'images_per_s_per_core', 'size', 'workers', 'cores', 'cpu')
MFU = 0.4  # share of the dense bf16 peak a training step is assumed to reach
ACCELERATORS = (('H100 / H200', 989.0), ('TPU v5e', 197.0), ('TPU v5p', 459.0))  # dense bf16 TFLOP/s
HOST_ACCELERATORS = 8


def parse_args(argv=None):
  p = common.ArgumentParser(__doc__)
  p.add_argument('--data-dir', default=None,
                 help='TFDS data_dir holding a built fashionai_keypoints (python -m kpjax.data.build)')
  p.add_argument('--synthetic-dir', default=None,
                 help='without --data-dir: where to generate and build (or find) the synthetic garments; '
                      'default a temporary directory')
  p.add_argument('--num-images', type=common.positive_int, default=300, help='synthetic garments to make (300)')
  p.add_argument('--category', default='all', choices=common.categories(),
                 help='the records a model of this category trains on (default all)')
  p.add_argument('--size', type=common.input_size, default=256, help='input side in pixels, even')
  p.add_argument('--batch', type=common.positive_int, default=32, help='images per batch (default 32)')
  p.add_argument('--workers', type=common.non_negative_int, default=0,
                 help='grain worker processes, config.data.worker_count (default 0: in this process)')
  p.add_argument('--threads', type=common.non_negative_int, default=0,
                 help="config.data.num_threads (default 0: the pipeline's own choice)")
  p.add_argument('--warmup', type=common.non_negative_int, default=5, help='untimed batches first (default 5)')
  p.add_argument('--batches', type=common.non_negative_int, default=0,
                 help='time this many batches (default 0: as many as --seconds allow)')
  p.add_argument('--seconds', type=common.positive_float, default=20.0, help='time at least this long (default 20)')
  p.add_argument('--seed', type=int, default=0, help='config.seed (shuffling and augmentation)')
  p.add_argument('--json', default=None, metavar='OUT', help='write the figures as JSON')
  p.add_argument('--table', nargs='*', default=None, metavar='FILE',
                 help='print the accelerator table from --json files (no measurement)')
  args = p.parse_args(argv)
  if args.data_dir and args.synthetic_dir:
    p.error('--data-dir and --synthetic-dir exclude each other')
  if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
    p.error(f'--json {args.json}: no such directory')
  return args


# ---- The pipeline -----------------------------------------------------------------------------------


def pipeline_config(args, synthetic_dir: str | None = None):
  """configs/base.py with the benchmark's category, size, batch, workers, threads, seed and data."""
  from kpjax.configs import base
  config = base.get_config()
  config.category = args.category
  config.input_size = args.size
  config.batch_size = args.batch
  config.seed = args.seed
  config.data.worker_count = args.workers
  config.data.num_threads = args.threads
  if args.data_dir:
    config.data.source = 'tfds'
    config.data.data_dir = args.data_dir
  else:
    config.data.source = 'synthetic'
    config.data.synthetic_dir = synthetic_dir or args.synthetic_dir
    config.data.synthetic_num_images = args.num_images
  return config


def open_pipeline(config):
  """(the training source, kpjax's training batch iterator): what kpjax.train makes, for one process."""
  from kpjax.train import loop as train
  from kpjax.data import pipeline
  source = sources.get_source(config.data, config.data.train_split)
  return source, train.make_train_iterator(config, source)


def mean_image_size(source, samples: int = 200) -> tuple[float, float]:
  """Mean (width, height) in pixels of up to `samples` records spread over the source."""
  step = max(1, len(source) // samples)
  records = [source[i] for i in range(0, len(source), step)]
  return (sum(r['width'] for r in records) / len(records), sum(r['height'] for r in records) / len(records))


# ---- CPU time of a process tree ---------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
  """pid -> (parent pid, CPU seconds: user + system of all its threads) of every process in /proc."""
  table = {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        text = f.read()
    except OSError:  # exited meanwhile
      continue
    fields = text[text.rindex(')') + 2:].split()  # after "pid (comm) "; comm may hold spaces
    table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / common.CLOCK_TICKS_PER_S)
  return table


def tree_cpu_seconds(root: int | None = None) -> dict[int, float]:
  """CPU seconds of `root` (default: this process) and each of its descendants, by pid."""
  if not os.path.exists('/proc/self/stat'):
    raise ValueError("counting the CPU time of grain's worker processes needs Linux's /proc")
  root = os.getpid() if root is None else root
  table = _proc_table()
  children = {}
  for pid, (ppid, _) in table.items():
    children.setdefault(ppid, []).append(pid)
  out, todo = {}, [root]
  while todo:
    pid = todo.pop()
    if pid in table and pid not in out:
      out[pid] = table[pid][1]
      todo += children.get(pid, [])
  return out


@dataclasses.dataclass
class Throughput:
  """Timed window: images delivered, wall seconds, CPU seconds of this process and of its descendants."""
  images: int
  batches: int
  seconds: float
  own_cpu_s: float
  children_cpu_s: float

  @property
  def images_per_s(self) -> float:
    return self.images / self.seconds

  @property
  def cores(self) -> float:
    """Cores used: CPU seconds of the whole process tree per wall second."""
    return (self.own_cpu_s + self.children_cpu_s) / self.seconds

  @property
  def images_per_s_per_core(self) -> float:
    return self.images / (self.own_cpu_s + self.children_cpu_s)


def time_pipeline(batches: Iterator[dict], *, warmup: int, num_batches: int, seconds: float) -> Throughput:
  """Pulls `warmup` batches, then times `num_batches` (0: until `seconds` have passed, at least one)."""
  for _ in range(warmup):
    next(batches)
  me = os.getpid()
  before, own_before = tree_cpu_seconds(me), time.process_time()
  t0 = time.perf_counter()
  images = count = 0
  while True:
    images += len(next(batches)['image'])
    count += 1
    elapsed = time.perf_counter() - t0
    if (num_batches and count >= num_batches) or (not num_batches and elapsed >= seconds):
      break
  own = time.process_time() - own_before  # this process, all threads, at the clock's full resolution
  after = tree_cpu_seconds(me)
  children = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items() if pid != me)
  return Throughput(images=images, batches=count, seconds=elapsed, own_cpu_s=own, children_cpu_s=children)


def measure(args) -> dict:
  """Builds the pipeline, times it and returns the JSON figures (printing what it does)."""
  tmp = None
  synthetic_dir = None
  if not args.data_dir and not args.synthetic_dir:
    tmp = tempfile.mkdtemp(prefix='kpjax-input-pipeline-')
    synthetic_dir = os.path.join(tmp, 'garments')
  try:
    config = pipeline_config(args, synthetic_dir)
    if config.data.source == 'synthetic':
      print(f'# synthetic garments in {config.data.synthetic_dir} (generated and built unless there; '
            f'{args.num_images} images)', flush=True)
    t0 = time.perf_counter()
    source, batches = open_pipeline(config)
    width, height = mean_image_size(source)
    print(f'# {source!r}: {len(source)} records, mean image {width:.0f}x{height:.0f} px '
          f'({time.perf_counter() - t0:.0f} s to open)', flush=True)
    try:
      result = time_pipeline(batches, warmup=args.warmup, num_batches=args.batches, seconds=args.seconds)
    finally:
      batches.close()
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  threads = args.threads or 'default'
  print(f'# {args.category}, {args.size}x{args.size}, batch {args.batch}, workers {args.workers}, threads {threads}: '
        f'{result.batches} batches in {result.seconds:.1f} s; CPU {result.own_cpu_s:.1f} s in this process, '
        f'{result.children_cpu_s:.1f} s in its workers; {common.cpu_threads()} cores available')
  print(f'{result.images_per_s:.1f} images/s on {result.cores:.2f} cores used: {result.images_per_s_per_core:.1f} '
        f'images/s per core ({common.cpu_model()})')
  return {'images_per_s': result.images_per_s, 'images_per_s_per_core': result.images_per_s_per_core,
          'size': args.size, 'workers': args.workers, 'cores': result.cores, 'cpu': common.cpu_model()}


# ---- Cores per accelerator --------------------------------------------------------------------------


def image_train_flops(size: int, category: str = 'all') -> float:
  """FLOPs of one image in the full network's training step (forward + both gradients): 3 x 73.8 MFLOP/pixel."""
  return common.Workload(category=category, size=size, batch=1).train_flops()


def accelerator_rows(per_core: dict[int, float], sizes=(256, 512)) -> list[dict]:
  """For each accelerator: {'name', 'peak_tflops', 'images_per_s': {size: ...}, 'cores': {size: ... or None}}.

  images/s = MFU x dense bf16 peak / training FLOPs per image; cores = images/s / measured images/s per core.
  """
  rows = []
  for name, peak in ACCELERATORS:
    consumed = {s: MFU * peak * 1e12 / image_train_flops(s) for s in sizes}
    rows.append({'name': name, 'peak_tflops': peak, 'images_per_s': consumed,
                 'cores': {s: consumed[s] / per_core[s] if s in per_core else None for s in sizes}})
  return rows


def accelerator_table(per_core: dict[int, float], cpu: str = '') -> str:
  """docs/performance.md's table (markdown) for the measured sizes, and what to set on a host with HOST_ACCELERATORS
  of the fastest; with nothing measured, the accelerator columns at 256 and 512."""
  measured = tuple(sorted(per_core))
  sizes = measured or (256, 512)
  rows = accelerator_rows(per_core, sizes)
  header = ['accelerator', 'dense bf16 TFLOP/s'] + [f'images/s at {MFU:.0%}, {s}x{s}' for s in sizes]
  header += [f'cores needed, {s}x{s}' for s in measured]
  cells = [[r['name'], f"{r['peak_tflops']:g}"] + [f"{r['images_per_s'][s]:.1f}" for s in sizes]
           + [f"{r['cores'][s]:.2f}" for s in measured] for r in rows]
  lines = []
  if measured:
    figures = ', '.join(f'{per_core[s]:.1f} images/s per core at {s}x{s}' for s in measured)
    lines += [f'Input pipeline on {cpu or "this CPU"}: {figures}.', '']
  lines.append(common.format_table(header, cells))
  fastest = rows[0]
  for s in measured:
    need = HOST_ACCELERATORS * fastest['cores'][s]
    lines.append(f"\n{HOST_ACCELERATORS} x {fastest['name']} at {s}x{s}: {need:.1f} cores of input pipeline -> "
                 f'config.data.worker_count={max(1, math.ceil(need))}, config.data.num_threads=0 (2 threads per '
                 'worker: twice the cores needed, as headroom)')
  return '\n'.join(lines)


def per_core_from_files(paths: list[str]) -> tuple[dict[int, float], str]:
  """{size: images/s per core} and the CPU name from --json files (the last file of a size wins)."""
  per_core, cpus = {}, []
  for path in paths:
    with open(path) as f:
      figures = json.load(f)
    if not isinstance(figures, dict) or any(k not in figures for k in JSON_KEYS):
      raise ValueError(f'{path}: not a benchmarks/input_pipeline.py --json file (keys {", ".join(JSON_KEYS)})')
    per_core[int(figures['size'])] = float(figures['images_per_s_per_core'])
    if figures['cpu'] not in cpus:
      cpus.append(figures['cpu'])
  return per_core, ' / '.join(cpus)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    if args.table is not None:
      per_core, cpu = per_core_from_files(args.table)
      print(accelerator_table(per_core, cpu))
      return 0
    figures = measure(args)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(figures, f, indent=1)
        f.write('\n')
  except ValueError as e:  # a missing dataset, a bad config or --json file (json's errors are ValueErrors)
    common.fail(str(e))
  except OSError as e:
    common.fail(f'{e.filename}: {e.strerror}' if e.filename else str(e))
  return 0

if __name__ == '__main__':
  sys.exit(main())
