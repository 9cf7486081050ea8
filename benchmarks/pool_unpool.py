"""The pool + unpool pair alone: kpjax's fused 'mask' form against the 'scatter' form, forward and backward.

  python benchmarks/pool_unpool.py                               # (8, 256, 256, 64) float32
  python benchmarks/pool_unpool.py --shape 2,48,48,64 --dtype both

'mask' is kpjax.model.pool_unpool (one elementwise pass that keeps each 2x2 window's first maximum where
it is); 'scatter' is max_unpool_2x2(*max_pool_2x2(x), (H, W)) (the pool's values and torch's flat
indices, then a lax.scatter back), what config.model.unpool = 'scatter' runs. Both give the same bits.
The default shape is what KPDEM's first block hands its pool at 256x256, batch 8 (64 channels, NHWC).
'forward' returns the unpooled array; 'forward + backward' returns it and the gradient for a fixed
cotangent (jax.vjp), as a training step needs both. Each is jitted and compiled ahead of time, timed
interleaved (benchmarks/common.py; a sample repeats calls shorter than 0.1 s); GB/s counts the arrays
read and written once (forward: x and the output; forward + backward: also the cotangent and the
gradient), a lower bound on the memory traffic.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

PASSES = ('forward', 'forward + backward')
DEFAULT_SHAPE = (8, 256, 256, 64)


def nhwc_shape(text: str) -> tuple[int, int, int, int]:
  """argparse type: B,H,W,C, positive, H and W even."""
  parts = text.split(',')
  if len(parts) != 4:
    raise argparse.ArgumentTypeError(f'expected B,H,W,C (e.g. 8,256,256,64); got {text!r}')
  b, h, w, c = (common.positive_int(p) for p in parts)
  if h % 2 or w % 2:
    raise argparse.ArgumentTypeError(f'H and W must be even (2x2 windows, stride 2); got {text}')
  return b, h, w, c


def parse_args(argv=None):
  p = common.ArgumentParser(__doc__)
  p.add_argument('--shape', type=nhwc_shape, default=DEFAULT_SHAPE, help='B,H,W,C (default 8,256,256,64)')
  p.add_argument('--dtype', choices=common.DTYPES + ('both',), default='float32', help='(default float32)')
  common.add_timing_args(p, warmup=1)
  return p.parse_args(argv)


def candidates(shape: tuple[int, int, int, int], dtype: str, seed: int = 0) -> dict[tuple[str, str], object]:
  """{(unpool, pass): zero-argument callable that runs it once and blocks}, compiled ahead of time."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kpjax.model import pooling  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  g = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  out = {}
  for unpool in common.UNPOOLS:
    f = pooling.pool_unpool_fn(unpool)

    def forward_backward(x, g, f=f):
      y, vjp = jax.vjp(f, x)
      return y, vjp(g)[0]

    forward = jax.jit(f).lower(x).compile()
    both = jax.jit(forward_backward).lower(x, g).compile()
    out[(unpool, PASSES[0])] = lambda forward=forward: forward(x).block_until_ready()
    out[(unpool, PASSES[1])] = lambda both=both: jax.block_until_ready(both(x, g))
  return out


def rows_and_ratios(shape, dtype: str, timings: dict) -> tuple[list[dict], list[dict]]:
  """Report rows ({unpool, pass, dtype, shape, s_best, s_median, gb_per_s}) and per pass the scatter/mask
  time ratios (best and median) from {(unpool, pass): common.Timing}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  itemsize = 2 if dtype == 'bfloat16' else 4
  array_gb = float(np.prod(shape)) * itemsize / 1e9
  rows, ratios = [], []
  for (unpool, what), t in timings.items():
    arrays = 2 if what == PASSES[0] else 4
    rows.append({'unpool': unpool, 'pass': what, 'dtype': dtype, 'shape': list(shape), 's_best': t.best,
                 's_median': t.median, 'gb_per_s': arrays * array_gb / t.best})
  for what in PASSES:
    mask, scatter = timings[('mask', what)], timings[('scatter', what)]
    ratios.append({'pass': what, 'dtype': dtype, 'scatter_over_mask_best': scatter.best / mask.best,
                   'scatter_over_mask_median': scatter.median / mask.median})
  return rows, ratios


def measure(shape, dtype: str, *, repeats: int, warmup: int, min_quiet: int, quiet_wait_s: float,
            verbose: bool = True) -> tuple[list[dict], list[dict]]:
  """Times both forms, both passes, interleaved (calls shorter than 0.1 s repeated within a sample); (rows,
  ratios) as rows_and_ratios gives them."""
  fns = candidates(shape, dtype)
  timed = common.time_interleaved({f'{u} {p}': fn for (u, p), fn in fns.items()}, repeats=repeats, warmup=warmup,
                                  min_quiet=min_quiet, min_sample_s=0.1, quiet_wait_s=quiet_wait_s, verbose=verbose)
  return rows_and_ratios(shape, dtype, {key: timed[f'{key[0]} {key[1]}'] for key in fns})


def table(rows: list[dict]) -> str:
  return common.format_table(['unpool', 'pass', 'dtype', 's/call (best)', 's/call (median)', 'GB/s'],
                             [[r['unpool'], r['pass'], r['dtype'], f"{r['s_best']:.4g}", f"{r['s_median']:.4g}",
                               f"{r['gb_per_s']:.3g}"] for r in rows])


def ratio_lines(ratios: list[dict], where: str) -> list[str]:
  return [f"pool/unpool {r['pass']} ({r['dtype']}) on {where}: scatter/mask time ratio "
          f"{r['scatter_over_mask_best']:.2f}x best, {r['scatter_over_mask_median']:.2f}x median" for r in ratios]


def main(argv=None) -> None:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  where = common.machine_description() if backend == 'cpu' else jax.devices()[0].device_kind
  shape = 'x'.join(str(s) for s in args.shape)
  print(f'# kpjax pool + unpool alone, NHWC {shape}: mask (fused) vs scatter; jax {jax.__version__} on {backend}; '
        f'machine: {where}')
  rows, ratios = [], []
  for dtype in common.DTYPES if args.dtype == 'both' else (args.dtype,):
    r, q = measure(args.shape, dtype, repeats=args.repeats, warmup=args.warmup, min_quiet=args.min_quiet,
                   quiet_wait_s=args.quiet_wait_s)
    rows += r
    ratios += q
  print()
  print(f'Pool + unpool alone, NHWC {shape}, on {where}:')
  print()
  print(table(rows))
  print()
  print('\n'.join(ratio_lines(ratios, where)))


if __name__ == '__main__':
  main()
