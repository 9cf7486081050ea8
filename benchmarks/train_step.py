"""Side-by-side training-step benchmark: kpjax's real training step (jit) against the PyTorch original.

  python benchmarks/train_step.py                      # full network, 48x48, batch 2, float32
  python benchmarks/train_step.py --size 256 --batch 8 --dtype bfloat16   # on a GPU

Both sides train the same network (width, stages, keypoints) on the same batch with the same loss
(Euclidean + Jensen-Shannon, dsntnn's recipe) and optimiser (RMSprop, lr 2.5e-4, alpha 0.9, as KPDEM
was trained): kpjax through `kpjax.train_step.make_train_step` (what `python -m kpjax.train` runs, here
without gradient clipping or warm-up, as the original), torch through `convert/torch_model.py` with
`kpdem_loss`, eagerly, on as many threads as XLA uses. Candidates are timed interleaved, best quiet
sample of several after warm-up (see benchmarks/common.py). Prints seconds per step, images/s, GFLOP/s
(the network's direct-convolution FLOPs: forward + both gradients, see common.train_flops), that rate
as a share of the machine's measured peak, and the kpjax/torch speed ratio (torch's time / kpjax's).

`--compare-direct` adds kpjax with conv_algorithm='direct' (XLA's own convolutions everywhere), to show
what the Winograd convolutions (kpjax.conv, chosen by 'auto' on CPUs) are worth. GFLOP/s counts the
same direct-convolution FLOPs for every row, so a Winograd row's rate is an effective one and can
exceed the measured peak: it does fewer multiplications than it is credited with.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None, description=__doc__):
  p = argparse.ArgumentParser(description=description.split('\n')[0])
  p.add_argument('--size', type=int, default=48, help='square input side in pixels (multiple of 8)')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--width', type=float, default=1.0, help='channel multiplier (1.0 = KPDEM, 36.9 M params)')
  p.add_argument('--num-stages', type=int, default=6)
  p.add_argument('--category', default='trousers', help='sets the number of keypoints (trousers: 7)')
  p.add_argument('--dtype', choices=['float32', 'bfloat16', 'both'], default=None,
                 help='compute dtype (default: float32 on CPU, both on GPU); torch uses autocast for bf16')
  p.add_argument('--remat', action='store_true', help='kpjax with remat=True (jax.checkpoint per block)')
  p.add_argument('--conv-algorithm', default='auto', choices=['auto', 'direct', 'winograd'])
  p.add_argument('--compare-direct', action='store_true', help="also time kpjax with conv_algorithm='direct'")
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--no-peak', action='store_true', help='skip measuring the machine peak')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  return p.parse_args(argv)


def kpjax_config(args, dtype: str):
  """The base config, set to the original's training recipe and the benchmark's sizes."""
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.category = args.category
  config.input_size = args.size
  config.batch_size = args.batch
  config.model.width = args.width
  config.model.num_stages = args.num_stages
  config.compute_dtype = dtype
  config.remat = args.remat
  config.optimizer = 'rmsprop'
  config.learning_rate = 2.5e-4
  config.rmsprop_decay = 0.9
  config.schedule = 'constant'
  config.warmup_steps = 0
  config.grad_clip_norm = 0.0
  config.weight_decay = 0.0
  return config


def synthetic_batch(args, n_locations: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
  target = rng.uniform(-0.9, 0.9, (args.batch, n_locations, 2)).astype(np.float32)
  return images, target


def kpjax_candidate(args, dtype: str, conv_algorithm: str):
  """A zero-argument callable running one real training step (state donated and carried along)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kpjax import train_step as ts  # pylint: disable=g-import-not-at-top
  config = kpjax_config(args, dtype)
  model = ts.build_model(config).clone(conv_algorithm=conv_algorithm)
  images, target = synthetic_batch(args, model.n_locations)
  batch = {'image': jnp.asarray(images), 'target': jnp.asarray(target),
           'mask': jnp.ones(target.shape[:2], jnp.float32)}
  step = ts.make_train_step(model, config)
  box = {'state': ts.create_train_state(config, jax.random.PRNGKey(0), model)}

  def run():
    box['state'], metrics = step(box['state'], batch)
    metrics['loss'].block_until_ready()

  return run


def torch_candidate(args, dtype: str, torch, n_locations: int):
  from convert import torch_model  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  net = torch_model.CoordRegression(n_locations, width=args.width, num_stages=args.num_stages).to(device).train()
  optimizer = torch.optim.RMSprop(net.parameters(), lr=2.5e-4, alpha=0.9)
  images, target = synthetic_batch(args, n_locations)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  t = torch.from_numpy(target).to(device)
  autocast = dtype == 'bfloat16'

  def run():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
      coords, heatmaps = net(x)
    loss = torch_model.kpdem_loss(coords.float(), heatmaps.float(), t)
    loss.backward()
    optimizer.step()
    if device == 'cuda':
      torch.cuda.synchronize()
    else:
      loss.item()

  return run


def default_dtypes(args, backend: str) -> list[str]:
  if args.dtype == 'both':
    return ['float32', 'bfloat16']
  if args.dtype:
    return [args.dtype]
  return ['float32'] if backend == 'cpu' else ['float32', 'bfloat16']


def main(argv=None, *, kind='train'):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from kpjax import keypoints  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  torch = None if args.no_torch else common.setup_torch()
  n_locations = keypoints.num_keypoints(args.category)
  hw = (args.size, args.size)
  if kind == 'train':
    flops = common.train_flops(n_locations, hw, args.batch, args.width, args.num_stages)
    make_kpjax, make_torch = kpjax_candidate, torch_candidate
  else:
    from benchmarks import inference  # pylint: disable=g-import-not-at-top
    flops = common.forward_flops(n_locations, hw, args.batch, args.width, args.num_stages)
    make_kpjax, make_torch = inference.kpjax_candidate, inference.torch_candidate

  print(f'# kpjax {kind} vs PyTorch: width {args.width}, {args.num_stages} stages, {n_locations} keypoints, '
        f'{args.size}x{args.size}, batch {args.batch}, {flops / 1e9:.1f} GFLOP per step (direct convolutions)')
  device = jax.devices()[0]
  print(f'# jax {jax.__version__} on {backend} ({device.device_kind}); '
        + (f'torch {torch.__version__}, {torch.get_num_threads()} threads; ' if torch else '')
        + f'machine: {common.machine_description()}')
  if args.remat:
    print('# kpjax with remat=True')

  peak = None
  if not args.no_peak:
    if backend == 'cpu':
      peak = common.measure_peak(torch)
      print(f'# measured float32 peak (GFLOP/s): {peak.describe()} -> {peak.gflops:.0f}')
    else:
      peak = common.accelerator_peak(device.device_kind)
      if peak:
        print(f'# {device.device_kind} peak (TFLOP/s, dense): {peak.describe()}')

  rows, summary = [], []
  for dtype in default_dtypes(args, backend):
    candidates = {'kpjax': make_kpjax(args, dtype, args.conv_algorithm)}
    if args.compare_direct and args.conv_algorithm != 'direct':
      candidates['kpjax (direct convs)'] = make_kpjax(args, dtype, 'direct')
    if torch is not None:
      candidates['torch'] = make_torch(args, dtype, torch, n_locations)
    timings = common.time_interleaved(candidates, repeats=args.repeats, warmup=args.warmup)
    for name, t in timings.items():
      gflops = flops / t.best / 1e9
      share = '' if peak is None else f'{100 * gflops / peak.for_dtype(dtype):.0f}%'
      rows.append([name, dtype, f'{t.best:.3f}', f'{t.median:.3f}', f'{args.batch / t.best:.2f}', f'{gflops:.0f}',
                   share, f'{t.quiet}/{len(t.seconds)}'])
    if 'torch' in timings:
      ratio = timings['torch'].best / timings['kpjax'].best
      summary.append(f'kpjax/torch speed ratio ({dtype}): {ratio:.2f}x '
                     f'(kpjax {timings["kpjax"].best:.3f} s/step, torch {timings["torch"].best:.3f} s/step)')
  print()
  print(common.format_table(['', 'dtype', 's/step (best)', 's/step (median)', 'images/s', 'GFLOP/s',
                             '% of peak', 'quiet samples'], rows))
  print()
  for line in summary:
    print(line)


if __name__ == '__main__':
  main()
