"""Side-by-side inference benchmark: kpjax's forward pass (jit) against the PyTorch original (eval, no_grad).

  python benchmarks/inference.py                        # full network, 48x48, batch 2, float32
  python benchmarks/inference.py --size 256 --batch 8

The twin of benchmarks/train_step.py (same flags, same machine-peak measurement and table): the network
maps images to (coords, heatmaps) on both sides; kpjax through the jitted `CoordRegressionNetwork.apply`
that `kpjax.inference.make_predict_fn` wraps, torch eagerly under `torch.no_grad()`. GFLOP/s counts the
forward pass's direct-convolution FLOPs (common.forward_flops).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def kpjax_candidate(args, dtype: str, conv_algorithm: str):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kpjax import train_step as ts  # pylint: disable=g-import-not-at-top
  from kpjax.model import init_variables  # pylint: disable=g-import-not-at-top
  config = train_step.kpjax_config(args, dtype)
  model = ts.build_model(config).clone(conv_algorithm=conv_algorithm, remat=False)
  variables = init_variables(model, jax.random.PRNGKey(0), args.size)
  images, _ = train_step.synthetic_batch(args, model.n_locations)
  images = jnp.asarray(images)
  apply = jax.jit(model.apply)

  def run():
    coords, _ = apply(variables, images)
    coords.block_until_ready()

  return run


def torch_candidate(args, dtype: str, torch, n_locations: int):
  from convert import torch_model  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  net = torch_model.CoordRegression(n_locations, width=args.width, num_stages=args.num_stages).to(device).eval()
  images, _ = train_step.synthetic_batch(args, n_locations)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  autocast = dtype == 'bfloat16'

  def run():
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
      coords, _ = net(x)
    if device == 'cuda':
      torch.cuda.synchronize()
    else:
      coords.sum().item()

  return run


if __name__ == '__main__':
  train_step.main(kind='inference')
