"""kpjax.evaluate: scoring submission files (hand-computed), its error cases, and scoring a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kpjax.inference import evaluation as evaluate
from kpjax.data import keypoints as kp
from kpjax.cli import evaluate as evaluate_cli
from kpjax.inference import scoring
from kpjax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = 'image_id,image_category,' + ','.join(kp.KEYPOINT_NAMES) + '\n'


def _row(image_id, category, cells: dict[str, str]) -> str:
  return ','.join([image_id, category] + [cells.get(n, '-1_-1_-1') for n in kp.KEYPOINT_NAMES]) + '\n'


# Ground truth: a skirt (waistband 100 px apart) and a blouse (armpits 50 px apart).
GT_ROWS = [
    _row('Images/skirt/a.jpg', 'skirt', {'waistband_left': '100_100_1', 'waistband_right': '200_100_1',
                                         'hemline_left': '90_300_1', 'hemline_right': '210_300_0'}),
    _row('Images/blouse/b.jpg', 'blouse', {'armpit_left': '50_100_1', 'armpit_right': '100_100_1',
                                           'neckline_left': '60_20_1', 'cuff_left_in': '-1_-1_-1'}),
]
# Predictions: skirt errors 0, 10, 20 (hemline_right occluded: not scored) -> /100; blouse 5, 0, 25 -> /50.
PRED_ROWS = [
    _row('Images/skirt/a.jpg', 'skirt', {'waistband_left': '100_100_1', 'waistband_right': '200_110_1',
                                         'hemline_left': '110_300_1', 'hemline_right': '0_0_1'}),
    _row('Images/blouse/b.jpg', 'blouse', {'armpit_left': '53_104_1', 'armpit_right': '100_100_1',
                                           'neckline_left': '60_45_1', 'cuff_left_in': '500_500_1'}),
]
SKIRT = [0.0, 0.1, 0.2]
BLOUSE = [0.1, 0.0, 0.5]


def _files(tmp_path, gt_rows=GT_ROWS, pred_rows=PRED_ROWS):
  gt, pred = tmp_path / 'gt.csv', tmp_path / 'pred.csv'
  gt.write_text(HEADER + ''.join(gt_rows))
  pred.write_text(HEADER + ''.join(pred_rows))
  return str(gt), str(pred)


def test_scores_hand_computed_files(tmp_path, capsys):
  gt, pred = _files(tmp_path)
  out = tmp_path / 'sub' / 'ne.json'
  assert evaluate_cli.main(['--annotations', gt, '--predictions', pred, '--json', str(out)]) == 0
  table = capsys.readouterr().out
  m = json.loads(out.read_text())
  assert m['ne'] == pytest.approx(np.mean(SKIRT + BLOUSE))
  assert m['ne/skirt'] == pytest.approx(np.mean(SKIRT)) and m['ne/blouse'] == pytest.approx(np.mean(BLOUSE))
  assert (m['count'], m['count/skirt'], m['count/blouse']) == (6, 3, 3)
  assert 'ne/dress' not in m
  lines = table.splitlines()
  assert lines[0].split()[:4] == ['category', 'images', 'keypoints', 'NE']
  overall = next(l for l in lines if l.startswith('overall')).split()
  assert overall[1:4] == ['2', '6', f'{np.mean(SKIRT + BLOUSE):.4f}']
  skirt = next(l for l in lines if l.startswith('skirt')).split()
  assert skirt[1:4] == ['1', '3', f'{np.mean(SKIRT):.4f}']
  # Row order does not matter.
  gt2, pred2 = _files(tmp_path, pred_rows=PRED_ROWS[::-1])
  assert evaluate.evaluate_files(gt2, pred2)[0] == evaluate.evaluate_files(gt, pred)[0]


@pytest.mark.parametrize('pred_rows,message', [
    ([PRED_ROWS[0]], 'no prediction for annotated image Images/blouse/b.jpg'),
    (PRED_ROWS + [PRED_ROWS[1]], 'Images/blouse/b.jpg.*(twice|more than once)'),
    (PRED_ROWS + [_row('Images/skirt/zzz.jpg', 'skirt', {})], 'Images/skirt/zzz.jpg'),
    ([PRED_ROWS[0], PRED_ROWS[1].replace(',blouse,', ',outwear,')], 'Images/blouse/b.jpg.*blouse.*outwear'),
    ([PRED_ROWS[0], PRED_ROWS[1].replace('60_45_1', '-1_-1_-1')], 'Images/blouse/b.jpg.*neckline_left'),
])
def test_mismatched_files_are_errors_naming_the_image(tmp_path, capsys, pred_rows, message):
  gt, pred = _files(tmp_path, pred_rows=pred_rows)
  out = tmp_path / 'ne.json'
  assert evaluate_cli.main(['--annotations', gt, '--predictions', pred, '--json', str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and len(err.strip().splitlines()) == 1
  assert __import__('re').search(message, err), err
  assert not out.exists()


def test_predicted_cells_outside_the_category_are_ignored_and_counted(tmp_path, capsys):
  """A 24-output model fills every cell; FashionAI's scorers read only each category's visible ground-truth
  keypoints, so such cells change nothing and are counted. Annotations stay strict."""
  def fill(row, category):
    cells = row.rstrip('\n').split(',')
    outside = [2 + j for j in range(kp.NUM_KEYPOINTS) if not kp.category_mask(category)[j]]
    for n, j in enumerate(outside):
      cells[j] = f'{7 + n}_{9 + n}_1'
    return ','.join(cells) + '\n', len(outside)

  (skirt, n_skirt), (blouse, n_blouse) = fill(PRED_ROWS[0], 'skirt'), fill(PRED_ROWS[1], 'blouse')
  assert (n_skirt, n_blouse) == (20, 11)
  gt, pred = _files(tmp_path, pred_rows=[skirt, blouse])
  out = tmp_path / 'ne.json'
  assert evaluate_cli.main(['--annotations', gt, '--predictions', pred, '--json', str(out)]) == 0
  captured = capsys.readouterr()
  assert 'note: 31 predicted cells of keypoints outside their image\'s category were ignored' in captured.err
  m = json.loads(out.read_text())
  (tmp_path / 'plain').mkdir()
  plain = evaluate.evaluate_files(*_files(tmp_path / 'plain'))[0]
  assert m['ignored_cells'] == 31 and plain['ignored_cells'] == 0
  assert {k: v for k, v in m.items() if k != 'ignored_cells'} == {
      k: v for k, v in plain.items() if k != 'ignored_cells'}
  assert m['ne'] == pytest.approx(np.mean(SKIRT + BLOUSE))
  # A malformed cell is an error wherever it is; an annotation of a keypoint outside the category too.
  gt, pred = _files(tmp_path, pred_rows=[skirt.replace('7_9_1', '7_9'), blouse])
  assert evaluate_cli.main(['--annotations', gt, '--predictions', pred]) == 2
  assert 'malformed keypoint cell' in capsys.readouterr().err
  gt, pred = _files(tmp_path, gt_rows=[GT_ROWS[0], blouse], pred_rows=[skirt, blouse])
  assert evaluate_cli.main(['--annotations', gt, '--predictions', pred]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'gt.csv: row 3' in err and 'blouse has no keypoint waistline_left' in err


def test_unnormalisable_images_are_reported(tmp_path, capsys):
  gt_rows = [GT_ROWS[0], GT_ROWS[1].replace(',100_100_1,', ',-1_-1_-1,')]  # blouse armpit_right absent
  assert gt_rows[1].split(',')[2 + kp.KEYPOINT_NAMES.index('armpit_right')] == '-1_-1_-1'
  gt, pred = _files(tmp_path, gt_rows=gt_rows)
  assert evaluate_cli.main(['--annotations', gt, '--predictions', pred]) == 0
  captured = capsys.readouterr()
  assert 'Images/blouse/b.jpg' in captured.err and 'not scored' in captured.err
  assert '1 images not scored' in captured.out


def test_usage_errors(tmp_path, capsys):
  gt, pred = _files(tmp_path)
  with pytest.raises(SystemExit) as e:
    evaluate_cli.main(['--annotations', gt])
  assert e.value.code == 2
  with pytest.raises(SystemExit):
    evaluate_cli.main(['--annotations', gt, '--predictions', pred, '--checkpoint', 'x'])
  capsys.readouterr()
  assert evaluate_cli.main(['--annotations', gt, '--predictions', str(tmp_path / 'missing.csv')]) == 2
  assert 'missing.csv' in capsys.readouterr().err
  (tmp_path / 'bad.csv').write_text('image_id,image_category\nx,skirt\n')
  assert evaluate_cli.main(['--annotations', gt, '--predictions', str(tmp_path / 'bad.csv')]) == 2
  assert 'bad.csv' in capsys.readouterr().err


def test_cli_process(tmp_path):
  gt, pred = _files(tmp_path, pred_rows=[PRED_ROWS[0]])
  proc = subprocess.run([sys.executable, '-m', 'kpjax.evaluate', '--annotations', gt, '--predictions', pred],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip() == 'error: no prediction for annotated image Images/blouse/b.jpg'


def test_evaluate_batches_scores_a_model_that_finds_the_keypoints(tmp_path):
  """The colour-blob checkpoint of test_predict over hand-made eval batches: NE is tiny, padding ignored."""
  import dataclasses
  from kpjax.inference import predictor as inference
  import test_predict as tp

  net_vars = tp.colour_detector_variables((0, 1, 2, 0))
  ckpt = tp._save(tmp_path, 'blob', net_vars, 'skirt')
  model, variables, spec, _ = inference.load_predictor(ckpt)
  batches = []
  for h, w, centres in tp.BLOB_CASES[:3]:
    image = tp.blob_image(h, w, centres, sigma=max(h, w) / tp.SIZE * 1.5)
    x, affine = spec.convention.prepare(image, tp.SIZE)
    gt = np.zeros((24, 2))
    gt[kp.keypoint_indices('skirt')] = [centres[0], centres[1], centres[2], centres[0]]
    vis = np.where(kp.category_mask('skirt'), 1, -1)
    batches.append({'image': x, 'affine': affine, 'keypoints': gt, 'visibility': vis,
                    'category': kp.category_index('skirt'), 'image_id': f'img{len(batches)}',
                    'index': len(batches), 'valid': True})
  # Batches of two, the last padded with a copy marked invalid.
  padded = batches + [dict(batches[0], valid=False, image_id='pad', index=-1)]
  stacked = [{k: np.stack([b[k] for b in padded[i:i + 2]]) for k in padded[0]} for i in (0, 2)]
  predict_fn = inference.make_predict_fn(model)
  scores, preds = scoring.evaluate_batches(predict_fn, variables, stacked, spec)
  assert list(preds['image_id']) == ['img0', 'img1', 'img2']
  assert preds['pred'].shape == (3, 24, 2) and np.isnan(preds['pred'][:, ~kp.category_mask('skirt')]).all()
  # Normalised by the waistband (red-green distance): errors under one input pixel are a few percent.
  assert scores['count'] == 12 and scores['ne'] < 0.05 and scores['pck@0.1'] == 1.0
  direct = inference.to_original(predict_fn(variables, stacked[0]['image'])[:2], stacked[0]['affine'][:2], spec)
  np.testing.assert_array_equal(preds['pred'][:2, kp.keypoint_indices('skirt')], direct)
  with pytest.raises(ValueError, match='a blouse model cannot score image img0 of category skirt'):
    blouse = tp.model_lib.CoordRegressionNetwork(13, width=0.125, num_stages=1)
    scoring.evaluate_batches(inference.make_predict_fn(blouse), tp._init(blouse, 0), stacked,
                               dataclasses.replace(spec, category='blouse'))


def test_scores_a_model_on_a_dataset_split(tmp_path, monkeypatch, capsys):
  """--config/--checkpoint: the colour-blob checkpoint over a split of blob images (plus a trousers
  record a skirt model must leave out) scores near zero, with every visible keypoint counted."""
  import io
  from PIL import Image
  from kpjax.data import pipeline
  import test_predict as tp

  records = []
  for n, (h, w, centres) in enumerate(tp.BLOB_CASES[:3]):
    buf = io.BytesIO()
    Image.fromarray(tp.blob_image(h, w, centres, sigma=max(h, w) / tp.SIZE * 1.5)).save(buf, format='PNG')
    xy = np.full((24, 2), -1, np.float32)
    xy[kp.keypoint_indices('skirt')] = [centres[0], centres[1], centres[2], centres[0]]
    vis = np.where(kp.category_mask('skirt'), 1, -1).astype(np.int32)
    records.append(dict(image=buf.getvalue(), image_id=f'Images/skirt/{n}.png', category=kp.category_index('skirt'),
                        keypoints=xy, visibility=vis, height=h, width=w))
  records.append(dict(records[0], image_id='Images/trousers/t.png', category=kp.category_index('trousers')))
  seen = {}

  def get_source(data, split, workdir=None):
    seen['split'] = split
    return sources.RecordSource(records, split)

  monkeypatch.setattr(sources, 'get_source', get_source)
  ckpt = tp._save(tmp_path, 'blob', tp.colour_detector_variables((0, 1, 2, 0)), 'skirt')
  out = tmp_path / 'ne.json'
  argv = ['--config', os.path.join(ROOT, 'configs/skirt.py'), f'--config.input_size={tp.SIZE}',
          *tp.SLIM, '--checkpoint', ckpt, '--split', 'validation', '--batch-size', '2', '--json', str(out)]
  assert evaluate_cli.main(argv) == 0, capsys.readouterr().err
  m = json.loads(out.read_text())
  assert seen['split'] == 'validation'
  assert m['count'] == m['count/skirt'] == 12 and m['images'] == 3 and 'ne/trousers' not in m
  assert m['ne'] < 0.05 and m['pck@0.1'] == 1.0
  assert evaluate_cli.main(argv[:-2] + ['--flip']) == 0
  assert 'overall' in capsys.readouterr().out
  # A config that disagrees with the checkpoint is an error, not a different model.
  assert evaluate_cli.main(argv[:2] + tp.SLIM + ['--checkpoint', ckpt]) == 2
  assert 'input_size' in capsys.readouterr().err


def test_scores_a_step_directory_of_a_synthetic_data_run(tmp_path, capsys):
  """A run on config.data.source='synthetic' keeps its data in <workdir>/synthetic: --checkpoint of one of
  its step directories finds the run (kpjax.inference.checkpoints.locate) and so the data, and scores
  that step as --checkpoint <workdir> --step N does."""
  import train_fixture as fx  # pylint: disable=g-import-not-at-top
  from kpjax.train import loop  # pylint: disable=g-import-not-at-top
  overrides = {'category': 'all', 'data.source': 'synthetic', 'data.synthetic_num_images': 20, 'total_steps': 2,
               'eval_every_steps': 100, 'checkpoint_every_steps': 1, 'num_vis_images': 0, 'data.num_eval_images': 4}
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(fx.tiny_config(**overrides), str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2'] and (workdir / 'synthetic' / 'tfds').is_dir()
  flags = [f'--config.{k}={v}' for k, v in dict(overrides, input_size=32, **{'model.width': 0.125,
                                                                            'model.num_stages': 1}).items()]
  scores = {}
  for name, where in (('step', ['--checkpoint', str(workdir / 'checkpoints' / '1')]),
                      ('workdir', ['--checkpoint', str(workdir), '--step', '1'])):
    out = tmp_path / f'{name}.json'
    argv = ['--config', os.path.join(ROOT, 'configs/demo.py'), *flags, *where, '--json', str(out)]
    assert evaluate_cli.main(argv) == 0, capsys.readouterr().err
    scores[name] = json.loads(out.read_text())
  assert scores['step']['images'] > 0 and scores['step'] == scores['workdir']
  assert sorted(os.listdir(tmp_path)) == ['run', 'step.json', 'workdir.json']  # no second copy of the data
