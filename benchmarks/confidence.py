"""Does a keypoint's confidence mean something? AUROC of kpjax's per-keypoint confidence
(kpjax.inference.confidence: the heatmap's mass within 3 px of its own mean) for visible keypoints against
occluded and cropped-off ones, on synthetic garments the model has not seen.

  python benchmarks/confidence.py --checkpoint workdir/demo                 # the demo model (make demo)
  python benchmarks/confidence.py --checkpoint workdir/demo --flip --json confidence.json

Garments are drawn by kpjax.data.synthetic (its renderer, a --seed the demo's training set does not use)
and predicted as kpjax.predict predicts (the model's convention, make_predict_fn with confidence; --flip
for flip TTA). Each keypoint of an image's category is one sample, labelled by the renderer's visibility:
visible (v = 1), occluded (v = 0: under another part of the garment or an object lying on it), cropped off
(v = -1 and part of the garment, outside the image) or absent (v = -1, not part of this garment: a
sleeveless top's cuffs). AUROC = the probability that a random visible keypoint gets a higher confidence
than a random keypoint of the other group (Mann-Whitney; ties count half): 0.5 is chance, 1 a perfect
separation.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

GROUPS = ('visible', 'occluded', 'cropped off', 'absent')
COMPARISONS = (('occluded or cropped off', ('occluded', 'cropped off')), ('occluded', ('occluded',)),
               ('cropped off', ('cropped off',)), ('absent', ('absent',)))


def auroc(positives, negatives) -> float:
  """P(a positive scores above a negative), ties counted half (the Mann-Whitney U statistic / (n_pos n_neg))."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  positives, negatives = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
  if not len(positives) or not len(negatives):
    return float('nan')
  ranks = stats.rankdata(np.concatenate([positives, negatives]))  # average ranks for ties
  u = ranks[:len(positives)].sum() - len(positives) * (len(positives) + 1) / 2
  return float(u / (len(positives) * len(negatives)))


def garments_with_labels(num_images: int, seed: int):
  """[(category, uint8 image, {keypoint name: group})] of synthetic garments (kpjax.data.synthetic)."""
  from kpjax.data import keypoints as kp  # pylint: disable=g-import-not-at-top
  from kpjax.data.synthetic import garments  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(num_images):
    rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
    category = kp.CATEGORIES[int(rng.integers(len(kp.CATEGORIES)))]
    # render() draws the garment's shape first, from the same stream: a copy of it says which keypoints
    # the garment has (a sleeveless top has no cuffs), and so which v = -1 ones were cropped off.
    shape = garments.garment_shape(category, copy.deepcopy(rng))
    example = garments.render(category, rng)
    labels = {}
    for name in kp.keypoint_names(category):
      v = example.visibility[kp.KEYPOINT_NAMES.index(name)]
      labels[name] = ('visible' if v == 1 else 'occluded' if v == 0 else
                      'cropped off' if name in shape.points else 'absent')
    out.append((category, example.image, labels))
  return out


def confidences(checkpoint: str, samples, flip: bool, batch: int = 32) -> list[dict[str, float]]:
  """Each sample's {keypoint name: confidence}, predicted as kpjax.predict predicts."""
  import jax  # pylint: disable=g-import-not-at-top
  from kpjax.data import keypoints as kp  # pylint: disable=g-import-not-at-top
  from kpjax.inference import devices  # pylint: disable=g-import-not-at-top
  from kpjax.inference import predictor  # pylint: disable=g-import-not-at-top
  model, variables, spec, _ = predictor.load_predictor(checkpoint)
  mesh = devices.make_mesh()
  variables = devices.replicate(variables, mesh)
  fn = predictor.make_predict_fn(model, flip=flip, category=spec.category, mesh=mesh, confidence=True)
  rows = devices.local_batch_size(batch, mesh)
  names = kp.keypoint_names(spec.category)
  out = []
  for start in range(0, len(samples), rows):
    chunk = samples[start:start + rows]
    inputs = np.zeros((rows, spec.input_size, spec.input_size, 3), np.float32)
    inputs[:len(chunk)] = [spec.convention.prepare(image, spec.input_size)[0] for _, image, _ in chunk]
    _, conf = fn(variables, devices.shard_batch({'x': inputs}, mesh)['x'])
    conf = devices.local_rows(jax.block_until_ready(conf))[:len(chunk)]
    out += [{n: float(c[names.index(n)]) for n in labels} for (_, _, labels), c in zip(chunk, conf)]
  return out


def summarise(samples, scores) -> dict:
  """Counts, mean confidence per group, AUROC of visible against each other group (module docstring)."""
  by_group = {g: [] for g in GROUPS}
  for (_, _, labels), conf in zip(samples, scores):
    for name, group in labels.items():
      by_group[group].append(conf[name])
  visible = by_group['visible']
  return {
      'counts': {g: len(v) for g, v in by_group.items()},
      'mean_confidence': {g: (float(np.mean(v)) if v else None) for g, v in by_group.items()},
      'auroc': {label: auroc(visible, [c for g in groups for c in by_group[g]]) for label, groups in COMPARISONS},
  }


def parse_args(argv=None):
  p = common.ArgumentParser(__doc__)
  p.add_argument('--checkpoint', required=True, help='a model directory or training workdir (e.g. workdir/demo)')
  p.add_argument('--num-images', type=common.positive_int, default=1000, help='garments to draw (default 1000)')
  p.add_argument('--seed', type=common.non_negative_int, default=20_000,
                 help='their seed (default 20000; the demo trains on seed 0)')
  p.add_argument('--flip', action='store_true', help='flip TTA: the mean of the two views\' confidences')
  p.add_argument('--json', metavar='OUT', help='also write the figures as JSON')
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  samples = garments_with_labels(args.num_images, args.seed)
  result = summarise(samples, confidences(args.checkpoint, samples, args.flip))
  result.update(checkpoint=args.checkpoint, num_images=args.num_images, seed=args.seed, flip=args.flip,
                cpu=common.cpu_model(), date=time.strftime('%Y-%m-%d'))
  print(f'# confidence of {args.checkpoint} on {args.num_images} synthetic garments (seed {args.seed}'
        f'{", flip TTA" if args.flip else ""}), {common.machine_description()}, {result["date"]}, '
        f'{time.perf_counter() - start:.0f} s')
  print()
  print(common.format_table(['keypoints', 'count', 'mean confidence', 'AUROC visible vs them'], [
      [g, result['counts'][g], '' if result['mean_confidence'][g] is None else f'{result["mean_confidence"][g]:.3f}',
       '' if g == 'visible' else f'{result["auroc"][g]:.3f}'] for g in GROUPS]))
  print(f'\nAUROC visible vs occluded or cropped off: {result["auroc"]["occluded or cropped off"]:.3f}')
  if args.json:
    from kpjax.io import atomic  # pylint: disable=g-import-not-at-top
    atomic.write_text(args.json, json.dumps(result, indent=1) + '\n')
  return result


if __name__ == '__main__':
  main()
