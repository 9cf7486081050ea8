"""The whole COCO path on a non-garment keypoint set (figures of 7 keypoints, arrows of 3, several per image,
crowds, zero-keypoint objects, occluded and out-of-image points): build, train a few steps (configs/coco.py,
a slim network), predict COCO results per box, score them with `kpjax.evaluate --coco-annotations` equal to
pycocotools, score the model over the built split, export it with its keypoint set."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest


from kpjax.cli import evaluate as evaluate_cli
from kpjax.cli import export as export_cli
from kpjax.cli import predict as predict_cli
from kpjax.cli import common
from kpjax.data import build
from kpjax.data.synthetic import shapes
from kpjax.inference import checkpoints
from kpjax.train import loop
from coco_reference import reference  # pycocotools, the reference (a test dependency)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLIM = {'input_size': 16, 'model.width': 0.0625, 'model.num_stages': 1}
# Wide OKS sigmas (the dataset's, and --sigmas), so that a model of four steps matches some objects at some thresholds.
WIDE = 0.5
TRAIN = {'batch_size': 4, 'total_steps': 4, 'eval_every_steps': 4, 'checkpoint_every_steps': 4,
         'log_every_steps': 2, 'warmup_steps': 1, 'eval_batch_size': 8, 'num_vis_images': 2}


def _overrides(data_dir, fields):
  return [f'--config.data.tfds_name=shapes', f'--config.data.data_dir={data_dir}'] + [
      f'--config.{k}={v}' for k, v in fields.items()]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('coco_model')
  raw = shapes.generate_coco(str(root / 'raw'), 10, seed=2, num_validation=6)
  data_dir = str(root / 'tfds')
  build.build_coco_dataset(os.path.join(raw, 'annotations', 'train.json'), os.path.join(raw, 'images'), 'shapes',
                           data_dir, validation=os.path.join(raw, 'annotations', 'validation.json'),
                           normalization=('neck', 'hip'), sigmas=WIDE)
  config = common.load_config(os.path.join(REPO, 'configs', 'coco.py'), _overrides(data_dir, {**SLIM, **TRAIN}))
  workdir = str(root / 'w')
  result = loop.train_and_evaluate(config, workdir)
  return raw, data_dir, workdir, result


def test_trains_with_the_datasets_keypoint_set(trained):
  _, _, workdir, result = trained
  assert result['step'] == 4 and result['eval/ap'] is not None and result['eval/ne'] is not None
  metadata = checkpoints.read_metadata(workdir)
  assert metadata['n_locations'] == 10 and metadata['keypoint_set']['name'] == 'shapes'
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in records if 'eval/ap' in r]
  assert [r['step'] for r in evals] == [0, 4]
  for key in ('eval/ap', 'eval/ap50', 'eval/ap_l', 'eval/ar', 'eval/ap/figure', 'eval/ap/arrow', 'eval/ne/figure'):
    assert key in evals[-1], key
  assert 'eval/ne/arrow' not in evals[-1]  # arrows define no normalising pair
  assert os.path.isfile(os.path.join(workdir, 'predictions', 'step_0000004.png'))


def test_predicts_one_result_per_box_and_scores_them_as_pycocotools(trained, tmp_path, capsys):
  raw, _, workdir, _ = trained
  gt_path = os.path.join(raw, 'annotations', 'validation.json')
  out = str(tmp_path / 'pred.json')
  assert predict_cli.main(['--checkpoint', workdir, '--images', os.path.join(raw, 'images'), '--boxes', gt_path,
                           '--out', out, '--flip']) == 0
  gt = json.load(open(gt_path))
  boxes = [a for a in gt['annotations'] if not a['iscrowd']]
  results = json.load(open(out))
  assert [(r['image_id'], r['category_id']) for r in results] == [(a['image_id'], a['category_id']) for a in boxes]
  for r in results:
    k = np.array(r['keypoints']).reshape(-1, 3)
    assert len(k) == {1: 7, 3: 3}[r['category_id']]
    assert ((k[:, 2] >= 0) & (k[:, 2] <= 1)).all() and r['score'] == pytest.approx(k[:, 2].mean())
  capsys.readouterr()
  assert evaluate_cli.main(['--coco-annotations', gt_path, '--predictions', out, '--sigmas', str(WIDE),
                            '--json', str(tmp_path / 'ap.json')]) == 0
  mine = json.load(open(tmp_path / 'ap.json'))
  want = reference(gt_path, out, {'figure': [WIDE] * 7, 'arrow': [WIDE] * 3})
  for key, value in want.items():
    assert mine[key] == pytest.approx(value, abs=1e-6), key
  assert mine['ap50'] > 0


def test_scores_the_built_split_as_the_file_without_its_ignore_regions(trained, tmp_path, capsys):
  raw, data_dir, workdir, _ = trained
  args = ['--config', os.path.join(REPO, 'configs', 'coco.py'), *_overrides(data_dir, SLIM), '--checkpoint', workdir]
  assert evaluate_cli.main(args + ['--json', str(tmp_path / 'split.json')]) == 0
  assert 'AP50' in capsys.readouterr().out
  split = json.load(open(tmp_path / 'split.json'))
  # The same objects predicted from their boxes, scored against the file less its crowds and objects without
  # keypoints (which the build leaves out): the same figures, up to the records' 32-bit floats.
  gt = json.load(open(os.path.join(raw, 'annotations', 'validation.json')))
  gt['annotations'] = [a for a in gt['annotations'] if not a['iscrowd'] and a['num_keypoints'] > 0]
  (tmp_path / 'gt.json').write_text(json.dumps(gt))
  assert predict_cli.main(['--checkpoint', workdir, '--images', os.path.join(raw, 'images'),
                           '--boxes', str(tmp_path / 'gt.json'), '--out', str(tmp_path / 'pred.json')]) == 0
  want = reference(str(tmp_path / 'gt.json'), str(tmp_path / 'pred.json'),
                          {'figure': [WIDE] * 7, 'arrow': [WIDE] * 3})  # the set's
  for key, value in want.items():
    assert split[key] == pytest.approx(value, abs=1e-5), key
  assert split['ap50'] > 0
  assert split['objects'] == len(gt['annotations']) and 'ne/figure' in split


def test_predicts_whole_images_and_exports_the_set(trained, tmp_path, capsys):
  raw, _, workdir, _ = trained
  image = os.path.join(raw, 'images', 'validation_000000.png')
  out = str(tmp_path / 'whole.json')
  assert predict_cli.main(['--checkpoint', workdir, '--images', image, '--out', out, '--category', 'arrow',
                           '--draw', str(tmp_path / 'drawn')]) == 0
  (result,) = json.load(open(out))
  assert result['image_id'] == 'validation_000000.png' and result['category_id'] == 3
  assert len(result['keypoints']) == 9 and os.path.isfile(tmp_path / 'drawn' / 'validation_000000.png')
  capsys.readouterr()
  assert predict_cli.main(['--checkpoint', workdir, '--images', image, '--out', out]) == 2
  assert 'say the images\' category with --category' in capsys.readouterr().err
  assert export_cli.main(['--checkpoint', workdir, '--format', 'stablehlo',
                          '--out', str(tmp_path / 'm.stablehlo')]) == 0
  info = json.load(open(tmp_path / 'm.stablehlo.json'))
  assert info['n_locations'] == 10 and info['keypoints'][:3] == ['head', 'neck', 'left_hand']
  assert ['left_hand', 'right_hand'] in info['flip_pairs'] and ['left_barb', 'right_barb'] in info['flip_pairs']
  assert ['head', 'neck'] in info['skeleton'] and info['keypoint_set']['categories'][1]['name'] == 'arrow'
