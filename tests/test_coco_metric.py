"""COCO's keypoint AP (kpjax.metrics.oks, `kpjax.evaluate --coco-annotations`) against pycocotools' COCOeval on the
same files, each category with its own keypoints and sigmas; a hand-computed case; refused results files."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from kpjax.cli import evaluate as evaluate_cli
from kpjax.data.synthetic import shapes
from kpjax.inference import coco_evaluation
from kpjax.metrics import oks
from coco_reference import reference  # pycocotools, the reference (a test dependency)


def noisy_results(gt: dict, seed: int) -> list[dict]:
  """Up to two detections per object (crowds too), its keypoints moved by noise of 1-40% of sqrt(area), random
  scores with ties, and false detections of random keypoints."""
  rng = np.random.default_rng(seed)
  out = []
  for a in gt['annotations']:
    k = np.array(a['keypoints'], np.float64).reshape(-1, 3)
    if not (k[:, 2] > 0).any():  # an object without keypoints: somewhere in its box
      k[:, :2] = np.array(a['bbox'][:2]) + rng.random((len(k), 2)) * np.array(a['bbox'][2:])
    for _ in range(int(rng.integers(1, 3))):
      xy = k[:, :2] + rng.normal(0, rng.uniform(0.01, 0.4) * math.sqrt(a['area']), k[:, :2].shape)
      out.append({'image_id': a['image_id'], 'category_id': a['category_id'],
                  'keypoints': np.concatenate([xy, rng.random((len(k), 1))], 1).reshape(-1).tolist(),
                  'score': float(rng.choice([0.5, rng.random()]))})
  for im in gt['images'][:3]:
    out.append({'image_id': im['id'], 'category_id': 3, 'keypoints': (rng.random(9) * 50).tolist(), 'score': 0.9})
  return out


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('metric')
  raw = shapes.generate_coco(str(root / 'raw'), 14, seed=11, num_validation=0)
  gt_path = os.path.join(raw, 'annotations', 'train.json')
  results = str(root / 'results.json')
  with open(results, 'w') as f:
    json.dump(noisy_results(json.load(open(gt_path)), seed=3), f)
  return gt_path, results, root


def test_equals_pycocotools_with_the_same_sigmas(files, tmp_path, capsys):
  gt_path, results, _ = files
  sigmas = {'figure': [0.03, 0.05, 0.07, 0.07, 0.09, 0.1, 0.1], 'arrow': [0.04, 0.06, 0.06]}
  (tmp_path / 'sigmas.json').write_text(json.dumps(sigmas))
  assert evaluate_cli.main(['--coco-annotations', gt_path, '--predictions', results,
                            '--sigmas', str(tmp_path / 'sigmas.json'), '--json', str(tmp_path / 'ap.json')]) == 0
  out = capsys.readouterr().out
  assert 'figure' in out and 'arrow' in out and 'AP_L' in out
  mine = json.load(open(tmp_path / 'ap.json'))
  want = reference(gt_path, results, sigmas)
  for key, value in want.items():
    assert mine[key] == pytest.approx(value, abs=1e-6), key
  assert 0.05 < mine['ap'] < 0.95 and mine['ap_l/figure'] > -1  # a real spread of matches, large objects present
  gt = json.load(open(gt_path))
  assert mine['objects'] == sum(1 for a in gt['annotations'] if not a['iscrowd'] and a['num_keypoints'] > 0)
  # One number for every keypoint.
  same = coco_evaluation.evaluate_coco_files(gt_path, results, 0.08)
  want = reference(gt_path, results, {'figure': [0.08] * 7, 'arrow': [0.08] * 3})
  assert all(same[k] == pytest.approx(v, abs=1e-6) for k, v in want.items())


def test_a_hand_computed_case():
  # One object of area 100 with two labelled keypoints and one unlabelled; a detection exact on the first and
  # 5 px off on the second: OKS = (1 + exp(-25 / (2 * 100 * (2 * 0.1)^2))) / 2 = (1 + e^-3.125) / 2 = 0.522,
  # a match at the 0.50 threshold only: AP50 = AR50 = 1, AP = AR = 1/10.
  gt = oks.GroundTruth(image_ids=np.array([1]), ids=np.array([5]),
                       keypoints=np.array([[[10.0, 10.0, 2], [20.0, 10.0, 1], [0.0, 0.0, 0]]]),
                       bbox=np.array([[5.0, 5.0, 20.0, 10.0]]), area=np.array([100.0]), iscrowd=np.array([False]),
                       num_keypoints=np.array([2]))
  dt = oks.Detections(image_ids=np.array([1]), keypoints=np.array([[[10.0, 10.0], [23.0, 14.0], [99.0, 99.0]]]),
                      scores=np.array([0.7]))
  value = oks.oks(gt.keypoints, gt.bbox, gt.area, dt.keypoints, np.full(3, 0.1))
  assert value[0, 0] == pytest.approx((1 + math.exp(-3.125)) / 2, rel=1e-12)
  m = oks.keypoint_ap([oks.Category('c', np.full(3, 0.1), gt, dt)], [1, 2])
  assert (m['ap50'], m['ar50'], m['ap75']) == (pytest.approx(1.0), 1.0, 0.0)
  assert m['ap'] == pytest.approx(0.1) and m['ar'] == pytest.approx(0.1)
  assert m['ap_m'] == -1 and m['ap_l'] == -1  # an area of 100 is neither medium nor large: nothing to score


def test_results_that_do_not_fit_are_refused(files, tmp_path, capsys):
  gt_path, results, _ = files
  good = json.load(open(results))
  cases = [(dict(good[0], image_id=424242), 'image id 424242 is not in the ground truth'),
           (dict(good[0], category_id=2), 'category 2 is not a keypoint category'),
           (dict(good[0], keypoints=good[0]['keypoints'][:-3]), 'keypoints must be 3 x'),
           (dict(good[0], score='high'), "score 'high'")]
  for result, message in cases:
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps([result] + good[1:]))
    assert evaluate_cli.main(['--coco-annotations', gt_path, '--predictions', str(path),
                              '--json', str(tmp_path / 'out.json')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and 'result 0' in err, err
    assert not (tmp_path / 'out.json').exists()
  path.write_text('[]')
  assert evaluate_cli.main(['--coco-annotations', gt_path, '--predictions', str(path)]) == 2
  assert 'holds no results' in capsys.readouterr().err
