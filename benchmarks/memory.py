"""Training memory per image of kpjax's real training step, with and without remat, from XLA's analysis.

  python benchmarks/memory.py                         # 256 and 512, direct and auto convs, remat off/on
  python benchmarks/memory.py --sizes 512 --algorithms direct --policies nothing_saveable

Compiles (does not run) `kpjax.train.step.make_train_step` for the full network at each input size,
batch 1 and 2, and reads `compiled.memory_analysis()`: per image = the growth of XLA's temporary
buffers from batch 1 to 2 (activations kept for the backward pass plus per-image workspace); fixed =
parameters, gradients and RMSprop state plus batch-1 workspace. On a CPU the numbers are XLA:CPU's buffer
assignment; XLA:GPU's differs in detail (other fusions, cuDNN workspaces) but keeps the same activations,
so the table is a fair guide to what fits on a GPU: it ends with the batch that would fit in 80 GB.
'direct' is what GPUs/TPUs run; 'auto' picks Winograd convolutions on CPUs (kpjax.model.conv).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

GB = 1e9


def compiled_memory(w: common.Workload, compiler_options: dict | None = None):
  """XLA's memory analysis of kpjax's training step for `w`, compiled (not run: the state is abstract)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kpjax.train import step as ts
  model, optimizer, step = ts.make_training(common.kpjax_config(w))
  state = jax.eval_shape(lambda: ts.create_train_state(model, optimizer, jax.random.PRNGKey(0), w.size))
  n = model.n_locations
  batch_shapes = {'image': jax.ShapeDtypeStruct((w.batch, w.size, w.size, 3), jnp.float32),
                  'target': jax.ShapeDtypeStruct((w.batch, n, 2), jnp.float32),
                  'mask': jax.ShapeDtypeStruct((w.batch, n), jnp.float32)}
  return step.lower(state, batch_shapes).compile(compiler_options).memory_analysis()


def per_image_and_fixed(w: common.Workload, compiler_options: dict | None = None) -> tuple[float, float]:
  """(bytes per image, fixed bytes) of `w`'s training step, from its compilations at batch 1 and 2.

  per image = growth of XLA's temporary buffers from batch 1 to 2 (activations kept for the backward pass
  plus per-image workspace); fixed = parameters, gradients, optimiser state and batch-1 workspace.
  """
  one = compiled_memory(w.replace(batch=1), compiler_options)
  two = compiled_memory(w.replace(batch=2), compiler_options)
  per_image = float(two.temp_size_in_bytes - one.temp_size_in_bytes)
  fixed = float(one.temp_size_in_bytes - per_image + one.argument_size_in_bytes + one.output_size_in_bytes
                - one.alias_size_in_bytes)
  return per_image, fixed


def comma_list(kind, allowed=None):
  """argparse type: a comma-separated list of `kind` values (each in `allowed` when given)."""

  def parse(text: str):
    values = [kind(v) for v in text.split(',') if v.strip()]
    if not values:
      raise argparse.ArgumentTypeError(f'expected a comma-separated list; got {text!r}')
    if allowed is not None:
      bad = [v for v in values if v not in allowed]
      if bad:
        raise argparse.ArgumentTypeError(f'{", ".join(map(str, bad))} not in {", ".join(allowed)}')
    return values

  return parse


def remat_policies() -> list[str]:
  import jax  # pylint: disable=g-import-not-at-top
  return [name for name in dir(jax.checkpoint_policies) if not name.startswith('_')]


def main(argv=None):
  p = common.ArgumentParser(__doc__)
  p.add_argument('--sizes', type=comma_list(common.input_size), default=[256, 512],
                 help='input sides, comma-separated even numbers (default 256,512)')
  p.add_argument('--algorithms', type=comma_list(str, ('direct', 'auto', 'winograd')), default=['direct', 'auto'])
  p.add_argument('--policies', type=comma_list(str), default=['nothing_saveable'],
                 help='remat policies to show (comma-separated jax.checkpoint_policies names)')
  p.add_argument('--dtypes', type=comma_list(str, common.DTYPES), default=['float32'],
                 help="compute dtypes (comma-separated; 'bfloat16' as on GPUs)")
  p.add_argument('--width', type=common.positive_float, default=1.0)
  p.add_argument('--num-stages', type=common.num_stages, default=6)
  p.add_argument('--category', default='trousers', choices=common.categories())
  p.add_argument('--device-gb', type=common.positive_float, default=80.0,
                 help='device memory for the "fits" column')
  args = p.parse_args(argv)
  unknown = [pol for pol in args.policies if pol not in remat_policies()]
  if unknown:
    p.error(f'argument --policies: {", ".join(unknown)} not in jax.checkpoint_policies')
  import jax  # pylint: disable=g-import-not-at-top
  print(f'# kpjax training memory (XLA memory_analysis of the compiled step) on {jax.default_backend()}, '
        f'width {args.width}, {args.num_stages} stages; {common.machine_description()}')
  rows = []
  variants = [(False, '-')] + [(True, pol) for pol in args.policies]
  combos = [(size, dtype, algorithm, remat, policy) for size in args.sizes for dtype in args.dtypes
            for algorithm in args.algorithms for remat, policy in variants]
  for size, dtype, algorithm, remat, policy in combos:
    if dtype != 'float32' and algorithm != 'direct':
      continue  # 'auto' is direct for bf16 anyway
    t0 = time.time()
    w = common.Workload(category=args.category, size=size, width=args.width, num_stages=args.num_stages,
                        dtype=dtype, remat=remat, remat_policy=policy if remat else 'nothing_saveable',
                        conv_algorithm=algorithm)
    per_image, fixed = (b / GB for b in per_image_and_fixed(w))
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
