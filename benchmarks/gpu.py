"""GPU figures for docs/performance.md: kpjax's training step and inference on one GPU, against the PyTorch original.

  bash benchmarks/gpu.sh OUT_DIR               # checks what it needs, then runs this (< 8 min on an H100/H200)
  python benchmarks/gpu.py --out OUT_DIR       # the same, directly
  python benchmarks/gpu.py --tiny --out DIR    # the same code on a CPU in a minute: 16/32 px, slim, 1 stage

In this order (OUT_DIR/gpu.json and gpu.md are rewritten after each part, so a run cut short keeps
what it finished):
1. the PyTorch original (convert/torch_model.py, eager) in a child process (benchmarks/gpu_torch.py),
   before JAX allocates anything (so neither allocator holds memory the other needs): inference and a
   training step at 256x256, batch 8, float32 (cuDNN runs its convolutions on TF32 tensor cores, torch's
   default) and bfloat16 autocast;
2. kpjax, the same four (jit, compiled ahead of time; float32 convolutions on TF32, XLA's default), each
   with the fused pool + unpool ('mask', the default) and then, under --unpool both (the default), with
   the 'scatter' form (max_pool_2x2 + max_unpool_2x2, config.model.unpool = 'scatter');
3. the pool + unpool pair alone, mask against scatter, forward and forward + backward, bfloat16 and
   float32, at --pool-shape (default (8, 256, 256, 64): what the first block hands its pool at 256x256,
   batch 8; benchmarks/pool_unpool.py);
4. kpjax's training step at 512x512 in bfloat16 with remat at the largest batch that fits: predicted from
   XLA's memory analysis at batch 1 and 2, then tried (out-of-memory errors caught) within --search-seconds;
   then timed.

MFU = model FLOPs per step (the network's direct-convolution FLOPs, common.train_flops / forward_flops;
remat's recomputation is not credited) / seconds per step / the card's dense data-sheet peak (TF32 for
float32, bf16 for bfloat16), found by device name in common.ACCELERATOR_PEAKS_TFLOPS (H100, H200, ...);
--peak-tflops for another card. kpjax/torch ratio = torch's seconds per step / kpjax's (kpjax with the
mask unpool); scatter/mask ratio = the scatter row's seconds per step / the mask row's. Memory: kpjax rows
give XLA's planned bytes for one step and jax's allocator peak so far (rows run smallest first, a scatter
row right after its mask row, so it is that row's, or its mask row's where that was larger); torch rows
torch.cuda.max_memory_allocated() for that row.

Needs jax with CUDA, flax, optax, ml-collections and numpy for kpjax; torch with CUDA and dsntnn for the
original (--no-torch without). Not grain, TensorFlow Datasets or orbax. JAX allocates as it goes
(XLA_PYTHON_CLIENT_PREALLOCATE=false) up to XLA_PYTHON_CLIENT_MEM_FRACTION of the GPU, 0.95, unless set.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import pool_unpool  # pylint: disable=g-import-not-at-top,wrong-import-position

GB = 1e9
TASK_FLOPS = {'train': common.Workload.train_flops, 'inference': common.Workload.forward_flops}
MEM_FRACTION = '0.95'
# The search's two memory-analysis compilations need XLA's buffer assignment, not the fastest cuDNN
# algorithms: skipping autotuning makes them much quicker (the tries that follow autotune as usual).
ANALYSIS_OPTIONS = {'xla_gpu_autotune_level': 0}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What to run: `small` (x small, batch `batch`) for the side-by-side rows, `large` for the batch search."""
  small: int
  large: int
  batch: int
  width: float
  num_stages: int
  category: str
  repeats: int
  warmup: int
  max_batch: int
  search_seconds: float
  budget_seconds: float
  on_cpu: bool  # --tiny: JAX and torch on the CPU
  memory_bytes: float | None  # the search's memory limit when the device reports none
  unpools: tuple[str, ...]  # kpjax's side-by-side rows run with each (config.model.unpool)
  pool_shape: tuple[int, int, int, int]  # the pool + unpool part's NHWC shape

  def workload(self, **changes) -> common.Workload:
    fields = dict(category=self.category, size=self.small, batch=self.batch, width=self.width,
                  num_stages=self.num_stages)
    fields.update(changes)
    return common.Workload(**fields)

  def side_by_side(self) -> list[tuple[str, common.Workload]]:
    """(task, workload) of the rows both sides run, smallest memory first."""
    return [(task, self.workload(dtype=dtype)) for task in ('inference', 'train') for dtype in ('bfloat16', 'float32')]

  def kpjax_side(self) -> list[tuple[str, common.Workload]]:
    """side_by_side's rows in each of `unpools`' forms, a row's forms one after the other."""
    return [(task, w.replace(unpool=unpool)) for task, w in self.side_by_side() for unpool in self.unpools]

  def searched(self) -> common.Workload:
    return self.workload(size=self.large, batch=1, dtype='bfloat16', remat=True)


def peak_tflops_arg(text: str) -> dict[str, float]:
  """--peak-tflops F32,BF16 -> {'float32': F32, 'bfloat16': BF16} (dense TFLOP/s)."""
  parts = text.split(',')
  if len(parts) != 2:
    raise argparse.ArgumentTypeError(f'expected FLOAT32,BFLOAT16 in TFLOP/s (e.g. 494.5,989); got {text!r}')
  f32, bf16 = (common.positive_float(p) for p in parts)
  return {'float32': f32, 'bfloat16': bf16}


def parse_args(argv=None):
  p = common.ArgumentParser(__doc__)
  p.add_argument('--out', default='gpu_figures', help='directory for gpu.json and gpu.md (default gpu_figures)')
  p.add_argument('--tiny', action='store_true', help='16/32 px, width 1/16, 1 stage, on the CPU: checks the script')
  p.add_argument('--no-torch', action='store_true', help='kpjax only')
  p.add_argument('--peak-tflops', type=peak_tflops_arg, default=None,
                 help='dense peak FLOAT32,BFLOAT16 in TFLOP/s, for a card not in the table (or a CPU)')
  p.add_argument('--batch', type=common.positive_int, default=None, help='side-by-side batch (default 8; tiny 2)')
  p.add_argument('--max-batch', type=common.positive_int, default=None, help='search at most (default 256; tiny 4)')
  p.add_argument('--search-seconds', type=common.positive_float, default=180.0,
                 help='the batch search starts no try it expects to end later than this (default 180)')
  p.add_argument('--budget-seconds', type=common.positive_float, default=450.0,
                 help='parts not started by then are skipped, and said so (default 450)')
  p.add_argument('--repeats', type=common.positive_int, default=None, help='timed samples per row (default 5; tiny 2)')
  p.add_argument('--unpool', choices=common.UNPOOLS + ('both',), default='both',
                 help="kpjax's pool + unpool form in the side-by-side rows: mask, scatter or both (default)")
  p.add_argument('--pool-shape', type=pool_unpool.nhwc_shape, default=None,
                 help='B,H,W,C of the pool + unpool part (default 8,256,256,64; tiny 2,16,16,4)')
  args = p.parse_args(argv)
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    p.error(f'--out {args.out} exists and is not a directory')
  return args


def make_plan(args) -> Plan:
  unpools = common.UNPOOLS if args.unpool == 'both' else (args.unpool,)
  if args.tiny:
    return Plan(small=16, large=32, batch=args.batch or 2, width=1 / 16, num_stages=1, category='trousers',
                repeats=args.repeats or 2, warmup=1, max_batch=args.max_batch or 4,
                search_seconds=args.search_seconds, budget_seconds=args.budget_seconds, on_cpu=True,
                memory_bytes=1 * GB, unpools=unpools, pool_shape=args.pool_shape or (2, 16, 16, 4))
  return Plan(small=256, large=512, batch=args.batch or 8, width=1.0, num_stages=6, category='trousers',
              repeats=args.repeats or 5, warmup=2, max_batch=args.max_batch or 256,
              search_seconds=args.search_seconds, budget_seconds=args.budget_seconds, on_cpu=False,
              memory_bytes=None, unpools=unpools, pool_shape=args.pool_shape or pool_unpool.DEFAULT_SHAPE)


# ---- Figures ----------------------------------------------------------------------------------------


def figures(task: str, side: str, w: common.Workload, seconds: float, median: float,
            peak_tflops: dict[str, float] | None) -> dict:
  """One row: the workload, seconds per step, images/s, model TFLOP per step and per second, and MFU
  (model FLOPs / seconds / dense peak for the dtype; None without a peak). unpool: kpjax's form (None for
  torch)."""
  flops = TASK_FLOPS[task](w)
  mfu = None if peak_tflops is None else flops / seconds / (peak_tflops[w.dtype] * 1e12)
  return {'task': task, 'side': side, 'size': w.size, 'batch': w.batch, 'dtype': w.dtype, 'remat': w.remat,
          'unpool': w.unpool if side == 'kpjax' else None, 'width': w.width, 'num_stages': w.num_stages,
          's_per_step': seconds, 's_per_step_median': median,
          'images_per_s': w.batch / seconds, 'tflop_per_step': flops / 1e12,
          'tflop_per_s': flops / seconds / 1e12, 'mfu': mfu}


def _key(r: dict) -> tuple:
  return (r['task'], r['size'], r['batch'], r['dtype'], r['remat'])


def _kpjax_rows(rows: list[dict], unpool: str) -> dict[tuple, dict]:
  return {_key(r): r for r in rows if r['side'] == 'kpjax' and r.get('unpool', 'mask') == unpool and 's_per_step' in r}


def ratios(rows: list[dict]) -> list[dict]:
  """torch's s/step / kpjax's (the mask unpool's) for every (task, size, batch, dtype) both sides ran."""
  kpjax = _kpjax_rows(rows, 'mask')
  out = []
  for r in rows:
    if r['side'] == 'torch' and 's_per_step' in r and _key(r) in kpjax:
      k = kpjax[_key(r)]
      out.append({'task': r['task'], 'size': r['size'], 'batch': r['batch'], 'dtype': r['dtype'],
                  'kpjax_over_torch': r['s_per_step'] / k['s_per_step']})
  return out


def unpool_ratios(rows: list[dict]) -> list[dict]:
  """kpjax's scatter s/step / its mask s/step (best and median) for every workload run both ways."""
  mask = _kpjax_rows(rows, 'mask')
  return [{'task': r['task'], 'size': r['size'], 'batch': r['batch'], 'dtype': r['dtype'],
           'scatter_over_mask': r['s_per_step'] / mask[_key(r)]['s_per_step'],
           'scatter_over_mask_median': r['s_per_step_median'] / mask[_key(r)]['s_per_step_median']}
          for key, r in _kpjax_rows(rows, 'scatter').items() if key in mask]


def is_out_of_memory(error: BaseException) -> bool:
  """An XLA/CUDA allocation failure (compiling or running), as opposed to a bug."""
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def largest_fitting_batch(fits: Callable[[int], bool], first: int, *, max_batch: int, budget_s: float,
                          grow: float = 1.1, clock: Callable[[], float] = time.monotonic) -> tuple[int, list[dict]]:
  """The largest batch b <= max_batch with fits(b), searched from `first`; returns (b or 0, tries).

  After a fit it grows by `grow` until something fails, then bisects; after a failure before any fit it
  shrinks by 10%. Stops when the gap between the largest fit and the smallest failure is within 1/8 of
  the fit (or 1), or when the next try, expected to take as long as the last, would end after budget_s.
  tries: [{'batch', 'fits', 'seconds'}] in order.
  """
  lo, hi = 0, max_batch + 1  # lo fits (0: none yet), hi does not
  batch = min(max(1, first), max_batch)
  tries, start = [], clock()
  while True:
    t0 = clock()
    ok = bool(fits(batch))
    took = clock() - t0
    tries.append({'batch': batch, 'fits': ok, 'seconds': round(took, 2)})
    lo, hi = (batch, hi) if ok else (lo, batch)
    if hi - lo <= max(1, math.ceil(lo / 8)) or clock() - start + took > budget_s:
      return lo, tries
    if lo == 0:
      batch = max(1, min(hi - 1, int(hi * 0.9)))
    elif hi > max_batch:
      batch = min(max_batch, max(lo + 1, math.ceil(lo * grow)))
    else:
      batch = (lo + hi) // 2


# ---- The PyTorch side (a child process) -------------------------------------------------------------


def run_torch_side(plan: Plan, timeout_s: float) -> dict:
  """Runs benchmarks/gpu_torch.py on the side-by-side workloads; its result, or {'error': why}."""
  spec = {'device': 'cpu' if plan.on_cpu else 'cuda', 'repeats': plan.repeats, 'warmup': plan.warmup,
          'workloads': [{'task': task, 'workload': dataclasses.asdict(w)} for task, w in plan.side_by_side()]}
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_torch.py')
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, out_path = os.path.join(tmp, 'spec.json'), os.path.join(tmp, 'out.json')
    with open(spec_path, 'w') as f:
      json.dump(spec, f)
    env = dict(os.environ)
    if plan.on_cpu:
      env['CUDA_VISIBLE_DEVICES'] = ''
    try:
      proc = subprocess.run([sys.executable, script, spec_path, out_path], capture_output=True, text=True,
                            timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
      return {'error': f'the torch side took over {timeout_s:.0f} s and was stopped'}
    if proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['(no output)']
      return {'error': f'the torch side failed (exit {proc.returncode}): {tail[0]}'}
    with open(out_path) as f:
      return json.load(f)


def torch_rows(result: dict, peak_tflops: dict[str, float] | None) -> list[dict]:
  """gpu_torch.py's rows as report rows (figures and MFU against `peak_tflops`)."""
  rows = []
  for r in result.get('rows', []):
    w = common.Workload(**r['workload'])
    if 'error' in r:
      rows.append({'task': r['task'], 'side': 'torch', 'size': w.size, 'batch': w.batch, 'dtype': w.dtype,
                   'remat': False, 'error': r['error']})
      continue
    row = figures(r['task'], 'torch', w, r['s_per_step'], r['s_per_step_median'], peak_tflops)
    row['device_peak_gb'] = None if r['peak_bytes'] is None else r['peak_bytes'] / GB
    rows.append(row)
  return rows


# ---- The kpjax side ---------------------------------------------------------------------------------


def kpjax_candidate(task: str, w: common.Workload) -> common.Candidate:
  from benchmarks import inference, train_step  # pylint: disable=g-import-not-at-top
  return (train_step if task == 'train' else inference).kpjax_candidate(w)


def device_peak_gb(device) -> float | None:
  stats = device.memory_stats()
  return None if not stats or 'peak_bytes_in_use' not in stats else stats['peak_bytes_in_use'] / GB


def kpjax_row(task: str, w: common.Workload, candidate: common.Candidate, device, peak_tflops, *, repeats: int,
              warmup: int) -> dict:
  """Times `candidate` (best of `repeats` samples after `warmup` calls) into a report row."""
  timing = common.time_interleaved({'kpjax': candidate.run}, repeats=repeats, warmup=warmup, min_quiet=0,
                                   quiet_wait_s=0, verbose=False)['kpjax']
  row = figures(task, 'kpjax', w, timing.best, timing.median, peak_tflops)
  row.update(compile_s=candidate.compile_s, xla_gb=None if candidate.xla_bytes is None else candidate.xla_bytes / GB,
             device_peak_gb=device_peak_gb(device))
  return row


def memory_per_image_and_fixed(w: common.Workload, on_gpu: bool, notes: list[str]) -> tuple[float, float]:
  """benchmarks/memory.py's (bytes per image, fixed bytes), compiled without autotuning on a GPU."""
  from benchmarks import memory  # pylint: disable=g-import-not-at-top
  if on_gpu:
    try:
      return memory.per_image_and_fixed(w, ANALYSIS_OPTIONS)
    except Exception as e:  # pylint: disable=broad-except  (an XLA that rejects the option: say so, go on)
      notes.append(f'memory analysis with {ANALYSIS_OPTIONS} failed ({str(e).splitlines()[0][:200]}); '
                   'compiled with autotuning instead')
  return memory.per_image_and_fixed(w)


def search_and_time(plan: Plan, device, peak_tflops, budget_s: float, notes: list[str]) -> tuple[dict, dict | None]:
  """(the search's report, the timed row at the largest batch that fits, or None)."""
  w = plan.searched()
  t0 = time.monotonic()
  stats = device.memory_stats() or {}
  limit = stats.get('bytes_limit') or plan.memory_bytes
  per_image, fixed = memory_per_image_and_fixed(w, device.platform == 'gpu', notes)
  predicted = int((limit - fixed) // per_image) if limit and per_image > 0 else None
  report = {'size': w.size, 'dtype': w.dtype, 'remat': w.remat, 'memory_limit_gb': limit / GB if limit else None,
            'per_image_gb': per_image / GB, 'fixed_gb': fixed / GB, 'predicted_batch': predicted,
            'analysis_s': time.monotonic() - t0}
  held = {}

  def fits(batch: int) -> bool:
    candidate, out_of_memory = None, False
    try:
      candidate = kpjax_candidate('train', w.replace(batch=batch))
      candidate.run()
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      out_of_memory = True
    if out_of_memory:  # outside the except clause, so the traceback no longer holds the try's buffers
      candidate = None
      gc.collect()
      return False
    held['best'] = (batch, candidate)  # the previous best is freed
    return True

  first = predicted if predicted and predicted > 0 else 1
  largest, tries = largest_fitting_batch(fits, first, max_batch=plan.max_batch, grow=1.1 if predicted else 2.0,
                                         budget_s=max(0.0, budget_s - (time.monotonic() - t0)))
  report.update(largest_batch=largest, tries=tries, max_batch=plan.max_batch)
  if not largest:
    return report, None
  batch, candidate = held.pop('best')  # its step has run once already: no more warm-up; few, long samples
  row = kpjax_row('train', w.replace(batch=batch), candidate, device, peak_tflops, repeats=min(3, plan.repeats),
                  warmup=0)
  report['seconds'] = time.monotonic() - t0
  return report, row


# ---- Output -----------------------------------------------------------------------------------------


def _fmt(value, spec: str, empty: str = '-') -> str:
  return empty if value is None else format(value, spec)


def markdown(report: dict) -> str:
  """docs/performance.md's GPU table, its ratio lines, the pool + unpool table and the batch search, from the
  JSON report."""
  lines = [f"kpjax and the PyTorch original on {report['device']} ({report['date']}; jax {report['jax']}"
           + (f", torch {report['torch']}" if report.get('torch') else '') + '). MFU: model FLOPs / time / '
           + ('dense data-sheet peak ' + ', '.join(f'{k} {v:g}' for k, v in report['peak_tflops'].items())
              + ' TFLOP/s' if report['peak_tflops'] else 'no peak known for this device') + '.', '']
  rows = []
  for r in report['rows']:
    remat = 'on' if r['remat'] else 'off'
    unpool = r.get('unpool') or '-'
    if 'error' in r:
      rows.append([r['task'], r['side'], unpool, f"{r['size']}x{r['size']}", r['batch'], r['dtype'], remat,
                   r['error'], '', '', '', '', ''])
      continue
    rows.append([r['task'], r['side'], unpool, f"{r['size']}x{r['size']}", r['batch'], r['dtype'], remat,
                 f"{r['s_per_step']:.4f}", f"{r['images_per_s']:.1f}", f"{r['tflop_per_s']:.1f}",
                 _fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f') + ('%' if r['mfu'] is not None else ''),
                 _fmt(r.get('xla_gb'), '.2f'), _fmt(r.get('device_peak_gb'), '.2f')])
  lines.append(common.format_table(['task', 'side', 'unpool', 'input', 'batch', 'dtype', 'remat', 's/step',
                                    'images/s', 'TFLOP/s', 'MFU', 'XLA plan GB', 'peak GB'], rows))
  lines.append('')
  for r in report['ratios']:
    lines.append(f"{r['task']} {r['size']}x{r['size']} batch {r['batch']} {r['dtype']}: kpjax/torch speed ratio "
                 f"{r['kpjax_over_torch']:.2f}x")
  for r in report.get('unpool_ratios', []):
    lines.append(f"{r['task']} {r['size']}x{r['size']} batch {r['batch']} {r['dtype']}: kpjax scatter/mask unpool "
                 f"time ratio {r['scatter_over_mask']:.2f}x (median {r['scatter_over_mask_median']:.2f}x)")
  part = report.get('pool_unpool')
  if part:
    shape = 'x'.join(str(s) for s in part['shape'])
    lines += ['', f'The pool + unpool pair alone, NHWC {shape}:', '', pool_unpool.table(part['rows']), '']
    lines += pool_unpool.ratio_lines(part['ratios'], report['device'])
  search = report.get('batch_search')
  if search:
    tries = ', '.join(f"{t['batch']} {'fits' if t['fits'] else 'does not fit'}" for t in search['tries'])
    lines.append(f"{search['size']}x{search['size']} {search['dtype']} with remat: largest batch that fits "
                 f"{search['largest_batch'] or 'none'} (predicted {search['predicted_batch']} from XLA's memory "
                 f"analysis: {search['per_image_gb']:.2f} GB per image + {search['fixed_gb']:.2f} GB in "
                 f"{_fmt(search['memory_limit_gb'], '.1f')} GB; tried {tries})")
  for note in report['notes']:
    lines.append(f'Note: {note}')
  return '\n'.join(lines) + '\n'


def write(out_dir: str, report: dict) -> None:
  """gpu.json and gpu.md, each replaced in one step (a reader never sees half a file)."""
  report['ratios'] = ratios(report['rows'])
  report['unpool_ratios'] = unpool_ratios(report['rows'])
  for name, text in (('gpu.json', json.dumps(report, indent=1) + '\n'), ('gpu.md', markdown(report))):
    tmp = os.path.join(out_dir, f'.{name}.tmp')
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, os.path.join(out_dir, name))


# ---- Main -------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
  args = parse_args(argv)
  plan = make_plan(args)
  if not args.no_torch:
    missing = [m for m in ('torch', 'dsntnn') if importlib.util.find_spec(m) is None]
    if missing:
      common.fail(f'the PyTorch side needs {" and ".join(missing)} (install them, or pass --no-torch)')
  # JAX takes GPU memory only as it needs it (torch runs meanwhile), up to MEM_FRACTION of the card.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', MEM_FRACTION)
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices('cpu')[0] if plan.on_cpu else jax.devices()[0]
  if not plan.on_cpu and device.platform != 'gpu':
    common.fail(f'JAX sees no GPU (its device is {device.platform}); use --tiny to check the script on a CPU')
  os.makedirs(args.out, exist_ok=True)
  start = time.monotonic()
  report = {'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), 'tiny': args.tiny,
            'device': device.device_kind, 'jax': jax.__version__, 'torch': None,
            'cpu': common.machine_description(), 'python': platform.python_version(), 'peak_tflops': None,
            'env': {k: os.environ.get(k) for k in ('XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
                                                   'XLA_FLAGS')},
            'rows': [], 'ratios': [], 'unpool_ratios': [], 'pool_unpool': None, 'batch_search': None, 'notes': [],
            'seconds': None}

  def elapsed() -> float:
    return time.monotonic() - start

  torch_result = None
  if not args.no_torch:  # before JAX allocates anything on the GPU
    print('# the PyTorch original (child process) ...', flush=True)
    torch_result = run_torch_side(plan, timeout_s=max(60.0, plan.budget_seconds / 2))
    if 'error' in torch_result:
      report['notes'].append(torch_result['error'])
      print(f'# {torch_result["error"]}', file=sys.stderr, flush=True)
    report.update(torch=torch_result.get('torch'), cudnn_allow_tf32=torch_result.get('cudnn_allow_tf32'))

  peak = args.peak_tflops
  if peak is None and not plan.on_cpu:
    known = common.accelerator_peak(device.device_kind)
    peak = None if known is None else {k: v / 1e3 for k, v in known.by_dtype.items()}
    if peak is None:
      report['notes'].append(f'no data-sheet peak known for {device.device_kind}: pass --peak-tflops for MFU')
  report['peak_tflops'] = peak
  if torch_result is not None:
    report['rows'] += torch_rows(torch_result, peak)
  write(args.out, report)

  with jax.default_device(device):
    for task, w in plan.kpjax_side():
      if elapsed() > plan.budget_seconds:
        report['notes'].append(f'kpjax {task} {w.size}x{w.size} {w.dtype} {w.unpool} unpool skipped: past '
                               '--budget-seconds')
        continue
      print(f'# kpjax {task} {w.size}x{w.size} batch {w.batch} {w.dtype} {w.unpool} unpool ...', flush=True)
      try:
        report['rows'].append(kpjax_row(task, w, kpjax_candidate(task, w), device, peak, repeats=plan.repeats,
                                        warmup=plan.warmup))
      except Exception as e:  # pylint: disable=broad-except
        if not is_out_of_memory(e):
          raise
        report['rows'].append({'task': task, 'side': 'kpjax', 'unpool': w.unpool, 'size': w.size, 'batch': w.batch,
                               'dtype': w.dtype, 'remat': w.remat,
                               'error': f'out of memory: {str(e).splitlines()[0][:200]}'})
      gc.collect()
      write(args.out, report)
    if elapsed() > plan.budget_seconds:
      report['notes'].append('the pool + unpool part skipped: past --budget-seconds')
    else:
      print(f'# pool + unpool alone {plan.pool_shape}, mask vs scatter ...', flush=True)
      part = {'shape': list(plan.pool_shape), 'rows': [], 'ratios': []}
      for dtype in ('bfloat16', 'float32'):
        rows, pair_ratios = pool_unpool.measure(plan.pool_shape, dtype, repeats=plan.repeats, warmup=plan.warmup,
                                                min_quiet=0, quiet_wait_s=0, verbose=False)
        part['rows'] += rows
        part['ratios'] += pair_ratios
      report['pool_unpool'] = part
      gc.collect()
      write(args.out, report)
    remaining = min(plan.search_seconds, plan.budget_seconds - elapsed())
    if remaining <= 0:
      report['notes'].append(f'the {plan.large}x{plan.large} batch search skipped: past --budget-seconds')
    else:
      print(f'# kpjax train {plan.large}x{plan.large} bfloat16 remat: largest batch (<= {remaining:.0f} s) ...',
            flush=True)
      search, row = search_and_time(plan, device, peak, remaining, report['notes'])
      report['batch_search'] = search
      if row is None:
        report['notes'].append(f'no batch of the {plan.large}x{plan.large} step fits in memory')
      else:
        report['rows'].append(row)
  report['seconds'] = elapsed()
  write(args.out, report)
  print(markdown(report))
  return report


if __name__ == '__main__':
  main()
