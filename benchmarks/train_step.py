"""Side-by-side training-step benchmark: kpjax's real training step (jit) against the PyTorch original.

  python benchmarks/train_step.py                      # full network, 48x48, batch 2, float32
  python benchmarks/train_step.py --compare-direct     # plus kpjax with XLA's own convolutions
  python benchmarks/train_step.py --size 64 --compare direct,direct-pooled   # converted models' choices
  python benchmarks/train_step.py --size 256 --batch 8 --dtype bfloat16   # on a GPU

Both sides train the same network (width, stages, keypoints) on the same batch with the same loss
(Euclidean + Jensen-Shannon, dsntnn's recipe) and optimiser (RMSprop, lr 2.5e-4, alpha 0.9, as KPDEM
was trained): kpjax through `kpjax.train.step.make_train_step` (what `python -m kpjax.train` runs, here
without gradient clipping or warm-up, as the original), torch through `convert/torch_model.py` with
`kpdem_loss`, eagerly, on as many threads as XLA uses. Candidates are timed interleaved, best quiet
sample of several after warm-up (see benchmarks/common.py). Prints seconds per step, images/s, GFLOP/s
(the network's direct-convolution FLOPs: forward + both gradients, see common.train_flops), that rate
as a share of the machine's measured peak, the table's machine (CPU model), and the kpjax/torch speed
ratio (torch's time / kpjax's).

`--compare-direct` adds kpjax with conv_algorithm='direct' (XLA's own convolutions everywhere), to show
what the Winograd convolutions (kpjax.model.conv, chosen by 'auto' on CPUs) are worth; `--compare A,B`
adds one kpjax row per conv_algorithm named (e.g. direct,direct-pooled). GFLOP/s counts the
same direct-convolution FLOPs for every row, so a Winograd row's rate is an effective one and can
exceed the measured peak: it does fewer multiplications than it is credited with. `--remat` times
kpjax's step with jax.checkpoint per block (the FLOPs credited stay those without recomputation).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def kpjax_candidate(w: common.Workload) -> common.Candidate:
  """One real training step of kpjax (compiled ahead of time; the state is donated and carried along)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kpjax.train import step as ts
  _, _, step = ts.make_training(common.kpjax_config(w))
  images, target = common.synthetic_batch(w)
  batch = {'image': jnp.asarray(images), 'target': jnp.asarray(target),
           'mask': jnp.ones(target.shape[:2], jnp.float32)}
  box = {'state': common.initial_train_state(w)}
  step, compile_s = common.compile_timed(step, box['state'], batch)

  def run():
    box['state'], metrics = step(box['state'], batch)
    metrics['loss'].block_until_ready()

  return common.Candidate(run, compile_s=compile_s, xla_bytes=common.xla_step_bytes(step))


def torch_candidate(w: common.Workload, torch, device: str) -> common.Candidate:
  """One training step of the PyTorch original (eager; bfloat16 under autocast; no remat: it has none)."""
  from convert import torch_model  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = torch_model.CoordRegression(w.n_locations, width=w.width, num_stages=w.num_stages).to(device).train()
  optimizer = torch.optim.RMSprop(net.parameters(), lr=2.5e-4, alpha=0.9)
  images, target = common.synthetic_batch(w)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  t = torch.from_numpy(target).to(device)
  autocast = w.dtype == 'bfloat16'

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

  return common.Candidate(run)


def main(argv=None) -> None:
  args = common.comparison_parser(__doc__, remat=True).parse_args(argv)
  common.run_comparison(args, task='training step', flops=common.Workload.train_flops,
                        kpjax_candidate=kpjax_candidate, torch_candidate=torch_candidate)


if __name__ == '__main__':
  main()
