"""Training memory per image of kpjax's real training step, with and without remat, from XLA's analysis.

  python benchmarks/memory.py                         # 256 and 512, direct and auto convs, remat off/on
  python benchmarks/memory.py --sizes 512 --algorithms direct --policies nothing_saveable

Compiles (does not run) `kpjax.train_step.make_train_step` for the full network at each input size,
batch 1 and 2, and reads `compiled.memory_analysis()`: per image = the growth of XLA's temporary
buffers from batch 1 to 2 (activations kept for the backward pass plus per-image workspace); fixed =
parameters, gradients and RMSprop state plus batch-1 workspace. On a CPU the numbers are XLA:CPU's buffer
assignment; XLA:GPU's differs in detail (other fusions, cuDNN workspaces) but keeps the same activations,
so the table is a fair guide to what fits on a GPU: it ends with the batch that would fit in 80 GB.
'direct' is what GPUs/TPUs run; 'auto' picks Winograd convolutions on CPUs (kpjax.conv).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

GB = 1e9


def compiled_memory(size: int, batch: int, algorithm: str, remat: bool, policy: str, dtype: str, args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step as bench  # pylint: disable=g-import-not-at-top
  from kpjax import train_step as ts  # pylint: disable=g-import-not-at-top
  ns = argparse.Namespace(category=args.category, size=size, batch=batch, width=args.width,
                          num_stages=args.num_stages, remat=remat)
  config = bench.kpjax_config(ns, dtype)
  config.remat_policy = policy
  model = ts.build_model(config).clone(conv_algorithm=algorithm)
  state = jax.eval_shape(lambda: ts.create_train_state(config, jax.random.PRNGKey(0), model))
  n = model.n_locations
  batch_shapes = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
                  'target': jax.ShapeDtypeStruct((batch, n, 2), jnp.float32),
                  'mask': jax.ShapeDtypeStruct((batch, n), jnp.float32)}
  step = ts.make_train_step(model, config)
  return step.lower(state, batch_shapes).compile().memory_analysis()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='256,512')
  p.add_argument('--algorithms', default='direct,auto')
  p.add_argument('--policies', default='nothing_saveable', help='remat policies to show (comma-separated)')
  p.add_argument('--dtypes', default='float32', help="compute dtypes (comma-separated; 'bfloat16' as on GPUs)")
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--num-stages', type=int, default=6)
  p.add_argument('--category', default='trousers')
  p.add_argument('--device-gb', type=float, default=80.0, help='device memory for the "fits" column')
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  print(f'# kpjax training memory (XLA memory_analysis of the compiled step) on {jax.default_backend()}, '
        f'width {args.width}, {args.num_stages} stages; {common.machine_description()}')
  rows = []
  variants = [(False, '-')] + [(True, pol) for pol in args.policies.split(',')]
  combos = [(size, dtype, algorithm, remat, policy) for size in [int(s) for s in args.sizes.split(',')]
            for dtype in args.dtypes.split(',') for algorithm in args.algorithms.split(',')
            for remat, policy in variants]
  for size, dtype, algorithm, remat, policy in combos:
    if dtype != 'float32' and algorithm != 'direct':
      continue  # 'auto' is direct for bf16 anyway
    t0 = time.time()
    one = compiled_memory(size, 1, algorithm, remat, policy if remat else 'nothing_saveable', dtype, args)
    two = compiled_memory(size, 2, algorithm, remat, policy if remat else 'nothing_saveable', dtype, args)
    per_image = (two.temp_size_in_bytes - one.temp_size_in_bytes) / GB
    fixed = (one.temp_size_in_bytes - per_image * GB + one.argument_size_in_bytes
             + one.output_size_in_bytes - one.alias_size_in_bytes) / GB
    fits = int((args.device_gb - fixed) // per_image) if per_image > 0 else 0
    rows.append([f'{size}x{size}', dtype, algorithm, 'on' if remat else 'off', policy, f'{per_image:.2f}',
                 f'{fixed:.2f}', f'{(fixed + per_image):.2f}', fits])
    print(f'#   {size} {dtype} {algorithm} remat={remat} {policy}: {per_image:.2f} GB/image '
          f'({time.time() - t0:.0f} s to compile)', flush=True)
  print()
  print(common.format_table(['input', 'dtype', 'convs', 'remat', 'policy', 'GB per image', 'GB fixed', 'GB at batch 1',
                             f'batch in {args.device_gb:.0f} GB'], rows))


if __name__ == '__main__':
  main()
