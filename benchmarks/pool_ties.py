"""How far kpjax's max-pool decisions and coordinates are from the PyTorch original's on flat images.

  python benchmarks/pool_ties.py                      # the full network, 6 plain garments (10 min on the busy 2 cores)
  python benchmarks/pool_ties.py --width 0.25 --num-stages 2 --images 4

KPDEM's 2x2 max-pools keep the first largest element of each window; flat image regions make whole
windows tie exactly, so the element kept depends on the last bits of the convolutions before the pool
(see kpjax.data.conventions.KpdemConvention.conv_algorithm). This runs one network whose output depends on the image
(He init, conv1_1 x 255 for the original's [0, 1/255] input, hm_conv x 10) on plain synthetic garments
512 x 512 (one colour on one colour, half with a saturated band and a constant patch), resized as the
original did to 64 x 64, and compares with torch float32 (oneDNN, torch's CPU default):

* torch against itself: without oneDNN (im2col + GEMM), and in float64;
* kpjax with each conv_algorithm: 'auto' (Winograd on a CPU), 'direct' (what converted models run by
  default), and 'direct-pooled' ('direct' up to the last pool, 'auto' after it).

For each: the first-pool windows (all channels, positive maximum) whose kept element differs, and the
largest and mean coordinate distance in pixels of the 512 x 512 original. Uses the test suite's
reference helpers (tests/pool_ties_reference.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch: idle torch threads must not spin

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

SIDE = 512
N_LOCATIONS = 7


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--images', type=int, default=6)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--num-stages', type=int, default=6)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', metavar='OUT', help='also write the figures as JSON')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  torch = common.setup_torch()
  import pool_ties_reference as ref  # pylint: disable=g-import-not-at-top
  import torch_reference as tr  # pylint: disable=g-import-not-at-top

  _, inputs = ref.flat_region_images(args.images, seed=args.seed, side=SIDE)
  net = ref.image_dependent_torch_model(N_LOCATIONS, args.width, args.num_stages, seed=args.seed)
  variables = tr.torch_state_dict_to_flax(net.state_dict())
  runs = {
      'torch float32 (reference)': lambda: ref.torch_first_pool(net, inputs),
      'torch float32, no oneDNN': lambda: ref.torch_first_pool(net, inputs, onednn=False),
      'torch float64': lambda: ref.torch_first_pool(net, inputs, dtype=torch.float64),
  }
  for algorithm in ('auto', 'direct', 'direct-pooled'):
    runs[f"kpjax '{algorithm}'"] = (lambda a=algorithm: ref.kpjax_first_pool(
        variables, inputs, N_LOCATIONS, args.width, args.num_stages, a))
  results = {}
  reference = None
  for name, run in runs.items():
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    if reference is None:
      reference = out
      spread = float((out[0].std(0) * SIDE).mean())
      print(f'{args.images} images, width {args.width}, {args.num_stages} stages: '
            f'{ref.tied_windows(out[1])} of {ref.compare(out, out, SIDE)["of"]} live first-pool windows tie exactly; '
            f'coordinates spread {spread:.1f} px (std over images)')
      continue
    results[name] = dict(ref.compare(reference, out, SIDE), seconds=round(seconds, 1))
  print(f'{"against torch float32":28s} {"windows differing":>18s} {"px max":>8s} {"px mean":>8s}')
  for name, r in results.items():
    print(f'{name:28s} {r["windows"]:>8d} of {r["of"]:<7d} {r["px_max"]:8.1f} {r["px_mean"]:8.1f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'images': args.images, 'width': args.width, 'num_stages': args.num_stages, 'results': results},
                f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
