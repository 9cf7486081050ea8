"""COCO keypoints in: synthetic figures and arrows written as COCO files (kpjax.data.synthetic.shapes), built into a
TFDS dataset of one cropped object per record (kpjax.data.build.coco) whose records equal the files, and bad
files refused naming the file, annotation id and image, with nothing written (or skipped and listed)."""

from __future__ import annotations

import collections
import json
import os
import shutil

import numpy as np
import pytest

from kpjax.cli import build as build_cli
from kpjax.cli import synthetic as synthetic_cli
from kpjax.data import build
from kpjax.data import coco
from kpjax.data import images
from kpjax.data import pipeline
from kpjax.data import sources
from kpjax.data.spec import ModelSpec
from kpjax.data import conventions
from kpjax.data.synthetic import shapes
from kpjax.errors import BuildError


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('coco') / 'raw')
  assert synthetic_cli.main(['--format', 'coco', '--out', out, '--num-images', '10', '--num-validation', '4',
                             '--seed', '7']) == 0
  return out


def _files(raw):
  return (os.path.join(raw, 'annotations', 'train.json'), os.path.join(raw, 'annotations', 'validation.json'),
          os.path.join(raw, 'images'))


@pytest.fixture(scope='module')
def built(raw, tmp_path_factory):
  train, val, image_dir = _files(raw)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  summary = build.build_coco_dataset(train, image_dir, 'shapes', data_dir, validation=val, sigmas=0.07,
                                     normalization=('neck', 'hip'))
  return data_dir, summary


def test_synthetic_files_have_every_case_the_build_must_handle(raw):
  train, val, _ = _files(raw)
  anns = [a for path in (train, val) for a in json.load(open(path))['annotations']]
  v = collections.Counter(int(x) for a in anns for x in a['keypoints'][2::3])
  cats = collections.Counter(a['category_id'] for a in anns)
  assert set(cats) == {1, 3} and v[0] and v[1] and v[2]  # unlabelled (out of image), occluded, visible
  assert any(a['iscrowd'] for a in anns) and any(not a['iscrowd'] and a['num_keypoints'] == 0 for a in anns)
  assert max(collections.Counter(a['image_id'] for a in anns).values()) > 1  # several objects per image
  areas = [a['area'] for a in anns if not a['iscrowd']]
  assert min(areas) < 32 ** 2 and max(areas) > 96 ** 2  # small, and large enough for AP_L
  for a in anns:
    assert a['num_keypoints'] == sum(1 for x in a['keypoints'][2::3] if x > 0)
  # The same seed writes the same files.
  again = shapes.generate_coco(os.path.join(os.path.dirname(raw), 'again'), 10, 7, num_validation=4)
  assert open(os.path.join(again, 'annotations', 'train.json')).read() == open(train).read()


def test_records_are_the_files_objects_cropped(raw, built):
  data_dir, summary = built
  train, val, image_dir = _files(raw)
  src = sources.open_tfds_source(data_dir, 'shapes', 'validation')
  kset = src.keypoint_set
  assert kset.name == 'shapes' and kset.category_names == ('figure', 'arrow') and kset.num_keypoints == 10
  assert kset.flip_pairs == (('left_hand', 'right_hand'), ('left_foot', 'right_foot'), ('left_barb', 'right_barb'))
  assert kset.category('figure').skeleton[0] == ('head', 'neck') and kset.category('figure').sigmas == (0.07,) * 7
  assert kset.category('figure').normalization == ('neck', 'hip') and kset.category('arrow').normalization is None
  gt = json.load(open(val))
  kept = {a['id']: a for a in gt['annotations'] if not a['iscrowd'] and a['num_keypoints'] > 0}
  assert summary.num_examples['validation'] == len(kept) == len(src)
  all_anns = json.load(open(train))['annotations'] + gt['annotations']
  assert summary.left_out == {'crowd': sum(a['iscrowd'] for a in all_anns),
                              'no_keypoints': sum(not a['iscrowd'] and a['num_keypoints'] == 0 for a in all_anns)}
  files = {im['id']: im['file_name'] for im in gt['images']}
  for i in range(len(src)):
    r = src[i]
    a = kept[int(r['annotation_id'])]
    original = images.decode_image(open(os.path.join(image_dir, files[a['image_id']]), 'rb').read())
    x0, y0 = -r['crop'][:, 2]
    x0, y0 = int(x0), int(y0)
    crop = images.decode_image(r['image'])
    np.testing.assert_array_equal(crop, original[y0:y0 + r['height'], x0:x0 + r['width']])  # lossless PNG
    # The box grown by 1/8 of its size on each side, cut at the image's edges.
    bx, by, bw, bh = a['bbox']
    assert x0 == max(0, int(np.floor(bx - bw / 8))) and x0 + r['width'] == min(original.shape[1],
                                                                              int(np.ceil(bx + bw * 9 / 8)))
    cat = kset.coco_category(a['category_id']).name
    assert r['category'] == kset.category_index(cat) and r['image_id'] == f'{files[a["image_id"]]}#{a["id"]}'
    idx = kset.keypoint_indices(cat)
    k = np.array(a['keypoints'], np.float64).reshape(-1, 3)
    np.testing.assert_allclose(r['coco_keypoints'][idx], k, atol=1e-4)  # float32 storage
    assert (r['coco_keypoints'][~kset.category_mask(cat)] == 0).all()
    want_v = np.array([{2: 1, 1: 0, 0: -1}[int(v)] for v in k[:, 2]])
    xy = k[:, :2] - (x0, y0)
    inside = (xy >= 0).all(1) & (xy[:, 0] <= r['width']) & (xy[:, 1] <= r['height'])
    want_v = np.where(inside, want_v, -1)
    np.testing.assert_array_equal(r['visibility'][idx], want_v)
    assert (r['visibility'][~kset.category_mask(cat)] == -1).all()
    np.testing.assert_allclose(r['keypoints'][idx][want_v >= 0], xy[want_v >= 0], atol=1e-4)
    assert r['area'] == pytest.approx(a['area']) and r['coco_image_id'] == a['image_id']


def test_the_pipeline_reads_the_set(built):
  data_dir, _ = built
  src = sources.open_tfds_source(data_dir, 'shapes', 'train')
  for category, n in (('all', 10), ('figure', 7), ('arrow', 3)):
    spec = ModelSpec(category, 0.0625, 1, 16, conventions.get('kpjax'), src.keypoint_set)
    data = type('D', (), {'worker_count': 0, 'worker_buffer_size': 1, 'num_threads': 1})()
    batch = next(pipeline.train_iterator(src, spec, data, global_batch_size=4, augment=None, seed=0))
    assert batch['target'].shape == (4, n, 2) and batch['mask'].shape == (4, n)
    evals = next(pipeline.eval_batches(src, spec, data, batch_size=4))
    assert evals['keypoints'].shape == (4, 10, 2) and evals['coco_keypoints'].shape == (4, 10, 3)
    assert evals['crop'].shape == (4, 2, 3) and evals['area'].dtype == np.float64
  # A flip swaps each figure's hands and feet and each arrow's barbs (keypoint_sets' flip pairs).
  names = src.keypoint_set.keypoint_names('figure')
  perm = src.keypoint_set.flip_permutation('figure')
  assert [names[i] for i in perm] == ['head', 'neck', 'right_hand', 'left_hand', 'hip', 'right_foot', 'left_foot']


def _labelled(a) -> bool:
  return not a['iscrowd'] and a['num_keypoints'] > 0


def _break(root: str, case: str) -> tuple[int, str, str, int]:
  """Breaks one labelled object of root's train.json in the way `case` says; (annotation id, image, expected
  message, labelled objects lost)."""
  path = os.path.join(root, 'annotations', 'train.json')
  data = json.load(open(path))
  a = next(a for a in data['annotations'] if not a['iscrowd'] and a['num_keypoints'] > 1 and a['category_id'] == 1)
  image = next(im for im in data['images'] if im['id'] == a['image_id'])
  lost = 1
  if case == 'missing image':
    os.remove(os.path.join(root, 'images', image['file_name']))
    expect = 'is missing'
    lost = sum(_labelled(b) for b in data['annotations'] if b['image_id'] == a['image_id'])
  elif case == 'keypoints not 3K':
    a['keypoints'] = a['keypoints'][:-3]
    expect = 'keypoints must be 3 x 7 = 21 numbers'
  elif case == 'v outside 0-2':
    a['keypoints'][2] = 3
    expect = 'keypoint visibility 3; expected v in {0, 1, 2}'
  elif case == 'box outside its image':
    a['bbox'][0] = image['width'] + 5.0
    expect = f'lies outside its {image["width"]}x{image["height"]} image'
  elif case == 'unknown category':
    a['category_id'] = 99
    expect = 'unknown category 99'
  elif case == 'repeated id':
    other = next(b for b in data['annotations'] if b is not a and _labelled(b))
    a['id'] = other['id']
    expect = f'annotation id {other["id"]} is used twice'
  json.dump(data, open(path, 'w'))
  return a['id'], image['file_name'], expect, lost


CASES = ('missing image', 'keypoints not 3K', 'v outside 0-2', 'box outside its image', 'unknown category',
         'repeated id')


@pytest.mark.parametrize('case', CASES)
def test_a_bad_file_is_refused_naming_file_annotation_and_image(raw, tmp_path, case):
  root = str(tmp_path / 'raw')
  shutil.copytree(raw, root)
  train, _, image_dir = _files(root)
  ann_id, file_name, expect, lost = _break(root, case)
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(BuildError) as e:
    build.build_coco_dataset(train, image_dir, 'shapes', data_dir)
  message = str(e.value)
  assert message.startswith(f'{train}: annotation {ann_id} (image {file_name}): ') and expect in message, message
  assert not os.path.exists(data_dir) or os.listdir(data_dir) == []  # nothing written
  summary = build.build_coco_dataset(train, image_dir, 'shapes', data_dir, skip_bad=True, validation_fraction=0.0)
  assert [m for m in summary.skipped if expect in m and f'annotation {ann_id} ' in m], summary.skipped
  good = build.build_coco_dataset(_files(raw)[0], _files(raw)[2], 'good', data_dir, validation_fraction=0.0)
  assert summary.num_examples['train'] == good.num_examples['train'] - lost


def _status(main, argv) -> int:
  try:
    return main(argv)
  except SystemExit as e:  # argparse-level mistakes exit from the parser
    return e.code


def test_the_cli_reports_one_line_and_writes_nothing(raw, tmp_path, capsys):
  root = str(tmp_path / 'raw')
  shutil.copytree(raw, root)
  train, val, image_dir = _files(root)
  ann_id, file_name, expect, _ = _break(root, 'v outside 0-2')
  args = ['--format', 'coco', '--annotations', train, '--images', image_dir, '--name', 'shapes',
          '--data-dir', str(tmp_path / 'tfds')]
  assert build_cli.main(args) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and err.startswith('error: ') and expect in err and file_name in err
  assert not (tmp_path / 'tfds').exists() or not os.listdir(tmp_path / 'tfds')
  assert build_cli.main(args + ['--skip-bad', '--validation', val, '--flip-pairs', 'none']) == 0
  captured = capsys.readouterr()
  assert f'skipped: {train}: annotation {ann_id}' in captured.err and 'left out (not trained on): ' in captured.err
  assert 'wrote ' in captured.out and 'validation' in captured.out
  assert sources.open_tfds_source(str(tmp_path / 'tfds'), 'shapes', 'train').keypoint_set.flip_pairs == ()
  for bad, message in ((['--format', 'coco', '--data-dir', 'd'], '--format coco needs --annotations, --images, --name'),
                       (['--manual-dir', 'm', '--data-dir', 'd', '--name', 'x'], '--name need --format coco'),
                       (args[:-2] + ['--name', 'fashionai_keypoints', '--data-dir', 'd'], "FashionAI dataset's name"),
                       (args + ['--sigmas', 'wide'], "--sigmas 'wide': expected a number")):
    assert _status(build_cli.main, bad) == 2
    assert message in capsys.readouterr().err


def test_crop_window_and_visibility_mapping():
  # A 10x20 box at (5, 6) in a 100x100 image: 1.25 and 2.5 px more on each side, at whole pixels.
  assert coco.crop_window([5, 6, 10, 20], 100, 100) == (3, 3, 17, 29)
  assert coco.crop_window([0, 0, 40, 40], 30, 30) == (0, 0, 30, 30)  # cut at the image's edges
  kps = np.array([[4.0, 5.0, 2], [9.0, 9.0, 1], [0.0, 0.0, 0], [50.0, 4.0, 2]])
  xy, v = coco.training_keypoints(kps, coco.crop_affine(3, 3), (26, 14))
  np.testing.assert_array_equal(v, [1, 0, -1, -1])  # visible, occluded, unlabelled, outside the crop
  np.testing.assert_array_equal(xy, [[1, 2], [6, 6], [-1, -1], [-1, -1]])


def test_a_keypoint_set_written_by_hand(raw, tmp_path, capsys):
  train, _, image_dir = _files(raw)
  figure = shapes.CATEGORIES[0]['keypoints']
  defined = {'name': 'mine', 'keypoints': figure + ['tip', 'left_barb', 'right_barb'],
             'flip_pairs': [['left_barb', 'right_barb']],  # figures not flipped: say their hands are not twins
             'categories': [{'name': 'figure', 'keypoints': figure, 'sigmas': [0.1] * 7,
                             'normalization': ['head', 'hip']},
                            {'name': 'arrow', 'keypoints': ['tip', 'left_barb', 'right_barb'],
                             'skeleton': [['tip', 'left_barb']]}]}
  path = tmp_path / 'set.json'
  path.write_text(json.dumps(defined))
  args = ['--format', 'coco', '--annotations', train, '--images', image_dir, '--name', 'shapes',
          '--data-dir', str(tmp_path / 'tfds'), '--keypoint-set', str(path)]
  assert build_cli.main(args) == 0
  kset = sources.open_tfds_source(str(tmp_path / 'tfds'), 'shapes', 'train').keypoint_set
  assert kset.name == 'shapes' and kset.flip_pairs == (('left_barb', 'right_barb'),) and kset.scored_by_oks
  assert kset.category('figure').sigmas == (0.1,) * 7 and kset.category('figure').normalization == ('head', 'hip')
  assert kset.category('figure').skeleton[0] == ('head', 'neck')  # the file's, where the set gives none
  assert kset.category('arrow').skeleton == (('tip', 'left_barb'),) and kset.category('arrow').coco_id == 3
  defined['categories'][1]['keypoints'] = ['tip', 'right_barb', 'left_barb']
  path.write_text(json.dumps(defined))
  assert build_cli.main(args[:-4] + ['--data-dir', str(tmp_path / 'tfds2'), '--keypoint-set', str(path)]) == 2
  err = capsys.readouterr().err
  assert "category 'arrow' has the keypoints ['tip', 'right_barb', 'left_barb'] in the keypoint set" in err
  assert not (tmp_path / 'tfds2').exists() or not os.listdir(tmp_path / 'tfds2')
