"""Side-by-side inference benchmark: kpjax's forward pass (jit) against the PyTorch original (eval, no_grad).

  python benchmarks/inference.py                        # full network, 48x48, batch 2, float32
  python benchmarks/inference.py --compare-direct       # plus kpjax with XLA's own convolutions
  python benchmarks/inference.py --size 64 --compare direct,direct-pooled   # converted models' choices
  python benchmarks/inference.py --size 256 --batch 8

The network maps images (B, S, S, 3) to (coords, heatmaps) on both sides: kpjax through the jitted
`CoordRegressionNetwork.apply` (what kpjax.inference's predict function runs), torch eagerly under
`torch.no_grad()`. Same machine-peak measurement, interleaved timing and table as
benchmarks/train_step.py; GFLOP/s counts the forward pass's direct-convolution FLOPs
(common.forward_flops). There is no --remat: a forward pass keeps nothing for a backward one.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def kpjax_candidate(w: common.Workload) -> common.Candidate:
  """kpjax's forward pass on a synthetic batch (compiled ahead of time)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kpjax.train import step as ts
  model = ts.build_model(common.kpjax_config(w.replace(remat=False)))
  variables = {'params': common.initial_train_state(w).params}
  images, _ = common.synthetic_batch(w)
  images = jnp.asarray(images)
  apply, compile_s = common.compile_timed(jax.jit(model.apply), variables, images)

  def run():
    coords, _ = apply(variables, images)
    coords.block_until_ready()

  return common.Candidate(run, compile_s=compile_s, xla_bytes=common.xla_step_bytes(apply))


def torch_candidate(w: common.Workload, torch, device: str) -> common.Candidate:
  """The PyTorch original's forward pass (eval mode, no_grad; bfloat16 under autocast)."""
  from convert import torch_model  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = torch_model.CoordRegression(w.n_locations, width=w.width, num_stages=w.num_stages).to(device).eval()
  images, _ = common.synthetic_batch(w)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  autocast = w.dtype == 'bfloat16'

  def run():
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
      coords, _ = net(x)
    if device == 'cuda':
      torch.cuda.synchronize()
    else:
      coords.sum().item()

  return common.Candidate(run)


def main(argv=None) -> None:
  args = common.comparison_parser(__doc__, remat=False).parse_args(argv)
  common.run_comparison(args, task='inference (forward)', flops=common.Workload.forward_flops,
                        kpjax_candidate=kpjax_candidate, torch_candidate=torch_candidate)


if __name__ == '__main__':
  main()
