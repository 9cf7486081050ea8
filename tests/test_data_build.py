"""kpjax.data.build / kpjax.data.build.fashionai: a synthetic set built into array_record and read back with tfds
(no TensorFlow), the hashed validation split, and a clear report for every kind of bad data."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kpjax.data import keypoints as kp
from kpjax.data import build
from kpjax.data import fashionai_csv as csv_io
from kpjax.data.build import fashionai
from kpjax.data import geometry as preprocess
from kpjax.data import synthetic
from rename_faults import fail_renames
from kpjax.data import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST = 30, 4


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp('raw') / 'set'), NUM_TRAIN, seed=5, num_test=NUM_TEST)


@pytest.fixture(scope='module')
def built(raw, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  summary = build.build_dataset(raw, data_dir)
  return data_dir, summary


def _source(data_dir, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(fashionai.NAME, data_dir=data_dir, split=split)


def _as_str(v):
  return v.decode() if isinstance(v, bytes) else str(v)


def test_splits_and_counts(raw, built):
  data_dir, summary = built
  rows = list(csv_io.read_annotations(os.path.join(raw, 'train', 'Annotations', 'train.csv')))
  held = {r.image_id for r in rows if fashionai.validation_hash(r.image_id) < 0.1}
  assert summary.num_examples == {'train': NUM_TRAIN - len(held), 'validation': len(held), 'test': NUM_TEST}
  assert summary.skipped == []
  assert held  # the seed is chosen so that the hold-out is not empty
  val = _source(data_dir, 'validation')
  assert {_as_str(val[i]['image_id']) for i in range(len(val))} == held
  assert os.path.isfile(os.path.join(summary.dataset_dir, 'dataset_info.json'))
  assert not [n for n in os.listdir(data_dir) if n.startswith('.')]  # no temporary directory left


def test_records_equal_the_files(raw, built):
  data_dir, _ = built
  rows = {r.image_id: r for r in csv_io.read_annotations(os.path.join(raw, 'train', 'Annotations', 'train.csv'))}
  seen = set()
  for split in ('train', 'validation'):
    src = _source(data_dir, split)
    for i in range(len(src)):
      rec = src[i]
      image_id = _as_str(rec['image_id'])
      row = rows[image_id]
      with open(os.path.join(raw, 'train', image_id), 'rb') as f:
        assert rec['image'] == f.read()  # stored as released, not re-encoded
      image = images.decode_image(rec['image'])
      assert (int(rec['height']), int(rec['width'])) == image.shape[:2]
      assert int(rec['category']) == kp.CATEGORIES.index(row.category)
      np.testing.assert_array_equal(rec['keypoints'], row.keypoints)
      np.testing.assert_array_equal(rec['visibility'], row.visibility)
      assert rec['keypoints'].dtype == np.float32 and rec['keypoints'].shape == (24, 2)
      assert rec['visibility'].dtype == np.int32 and rec['visibility'].shape == (24,)
      seen.add(image_id)
  assert seen == set(rows)
  test = _source(data_dir, 'test')
  cats = csv_io.read_categories(os.path.join(raw, 'test', 'test.csv'))
  for i in range(len(test)):
    rec = test[i]
    image_id = _as_str(rec['image_id'])
    assert int(rec['category']) == kp.CATEGORIES.index(cats[image_id])
    assert np.all(rec['visibility'] == -1) and np.all(rec['keypoints'] == -1)
    with open(os.path.join(raw, 'test', image_id), 'rb') as f:
      assert rec['image'] == f.read()


def test_builder_from_directory_and_grain(built):
  import grain  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir, summary = built
  builder = tfds.builder_from_directory(summary.dataset_dir)
  assert builder.info.version == fashionai.VERSION
  src = builder.as_data_source(split='train')
  ds = grain.MapDataset.source(src).map(lambda r: int(r['height']) * int(r['width']))
  assert len(list(ds)) == summary.num_examples['train']


def _count_reads(monkeypatch) -> list[str]:
  """Instruments tfds's data sources (array_record): every record read is listed."""
  from tensorflow_datasets.core.data_sources import base  # pylint: disable=g-import-not-at-top
  reads = []
  for name in ('__getitem__', '__getitems__', '__iter__'):
    original = getattr(base.BaseDataSource, name)

    def counted(self, *args, _name=name, _original=original):
      reads.append(_name)
      return _original(self, *args)

    monkeypatch.setattr(base.BaseDataSource, name, counted)
  return reads


def test_selecting_a_category_reads_no_record(built, tmp_path, monkeypatch, capsys):
  """The build stores each split's category index in the dataset's metadata.json (tfds MetadataDict), so a
  category model's start-up reads none of the (image-carrying) records; a dataset without the index (as
  kpjax 0.1.0 built them) is read once per split, with one note."""
  from kpjax.data import sources  # pylint: disable=g-import-not-at-top
  data_dir, summary = built
  splits = sorted(summary.num_examples)
  truth = {split: np.array([int(r['category']) for r in _source(data_dir, split)]) for split in splits}
  with open(os.path.join(summary.dataset_dir, 'metadata.json')) as f:
    assert json.load(f)[sources.CATEGORY_INDEX_KEY] == {split: truth[split].tolist() for split in splits}
  old = tmp_path / 'old' / fashionai.NAME / fashionai.VERSION
  shutil.copytree(summary.dataset_dir, old)
  with open(old / 'metadata.json') as f:
    metadata = json.load(f)
  del metadata[sources.CATEGORY_INDEX_KEY]
  (old / 'metadata.json').write_text(json.dumps(metadata))

  reads = _count_reads(monkeypatch)
  for directory, read in ((data_dir, False), (str(tmp_path / 'old'), True)):
    for split in splits:
      source = sources.open_tfds_source(directory, fashionai.NAME, split)
      for category in kp.CATEGORIES:
        np.testing.assert_array_equal(sources.example_indices(source, category),
                                      np.flatnonzero(truth[split] == kp.category_index(category)))
    assert bool(reads) == read, (directory, reads)
  err = capsys.readouterr().err
  assert err.count('note: ') == 1 and f'{old} has no category index (built by kpjax 0.1.0)' in err, err


def test_validation_fraction_and_existing_dataset(raw, built, tmp_path):
  data_dir, _ = built
  with pytest.raises(build.BuildError, match='already exists'):
    build.build_dataset(raw, data_dir)
  half = build.build_dataset(raw, str(tmp_path), validation_fraction=0.5)
  rows = list(csv_io.read_annotations(os.path.join(raw, 'train', 'Annotations', 'train.csv')))
  assert half.num_examples['validation'] == sum(fashionai.validation_hash(r.image_id) < 0.5 for r in rows)
  none = build.build_dataset(raw, str(tmp_path), validation_fraction=0.0, overwrite=True)
  assert none.num_examples == {'train': NUM_TRAIN, 'test': NUM_TEST}
  with pytest.raises(build.BuildError, match='validation_fraction'):
    build.build_dataset(raw, str(tmp_path / 'x'), validation_fraction=1.0)


# ---- Bad data ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def small_raw(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp('small') / 'set'), 6, seed=11, num_test=1)


def _files(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(directory, name), 'rb') as f:
        out[os.path.relpath(os.path.join(directory, name), root)] = f.read()
  return out


def _csv_rows(root):
  with open(os.path.join(root, 'train', 'Annotations', 'train.csv'), newline='') as f:
    return list(csv.reader(f))


def _write_rows(root, rows):
  with open(os.path.join(root, 'train', 'Annotations', 'train.csv'), 'w', newline='') as f:
    csv.writer(f, lineterminator='\n').writerows(rows)


def _visible_column(row):
  return next(j for j, c in enumerate(row) if j >= 2 and c.endswith('_1'))


def _break(root, case):
  """Makes one thing bad in the copy at root; returns (image id, expected message fragment)."""
  rows = _csv_rows(root)
  row = rows[2]  # data row 2 = CSV row 3
  image_id = row[0]
  path = os.path.join(root, 'train', image_id)
  if case == 'missing image':
    os.remove(path)
    return image_id, 'is missing'
  if case == 'corrupt image':
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 3])
    return image_id, 'cannot decode image'
  if case == 'not an image':
    with open(path, 'wb') as f:
      f.write(b'<html>404</html>')
    return image_id, 'cannot decode image'
  if case == 'malformed cell':
    row[_visible_column(row)] = '12_abc_1'
    expect = "malformed keypoint cell '12_abc_1'"
  elif case == 'column count':
    del row[-1]
    expect = 'has 25 columns; expected 26'
  elif case == 'unknown category':
    row[1] = 'hat'
    expect = "unknown category 'hat'"
  elif case == 'keypoint outside':
    j = _visible_column(row)
    row[j] = '5000_' + row[j].split('_', 1)[1]
    expect = f'keypoint {kp.KEYPOINT_NAMES[j - 2]} at (5000,'
  else:
    raise AssertionError(case)
  _write_rows(root, rows)
  return image_id, expect


CASES = ('missing image', 'corrupt image', 'not an image', 'malformed cell', 'column count', 'unknown category',
         'keypoint outside')


def test_overwrite_keeps_the_old_dataset_when_the_new_one_fails(small_raw, tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'data')
  old = build.build_dataset(small_raw, data_dir, validation_fraction=0.0)
  before = _files(old.dataset_dir)
  broken = str(tmp_path / 'broken')
  shutil.copytree(small_raw, broken)
  _, expect = _break(broken, 'malformed cell')
  with pytest.raises(build.BuildError, match=expect):  # the new build fails
    build.build_dataset(broken, data_dir, overwrite=True)
  assert _files(old.dataset_dir) == before
  with monkeypatch.context() as m:  # the new one is complete, but moving it in fails
    fail_renames(m, old.dataset_dir, {2})
    with pytest.raises(OSError, match='injected'):
      build.build_dataset(small_raw, data_dir, validation_fraction=0.5, overwrite=True)
  assert _files(old.dataset_dir) == before
  assert os.listdir(os.path.dirname(old.dataset_dir)) == [fashionai.VERSION]  # no staging or aside left
  assert len(_source(data_dir, 'train')) == old.num_examples['train'] == 6
  new = build.build_dataset(small_raw, data_dir, validation_fraction=0.5, overwrite=True)
  assert new.num_examples['train'] < 6 and len(_source(data_dir, 'train')) == new.num_examples['train']


@pytest.mark.parametrize('case', CASES)
def test_bad_data_is_named_and_stops_or_is_skipped(small_raw, tmp_path, case):
  root = str(tmp_path / 'raw')
  shutil.copytree(small_raw, root)
  image_id, expect = _break(root, case)
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(build.BuildError) as info:
    build.build_dataset(root, data_dir)
  message = str(info.value)
  assert expect in message and image_id in message and 'row 3' in message, message
  assert not os.path.exists(data_dir) or os.listdir(data_dir) == []  # nothing half-built left behind
  summary = build.build_dataset(root, data_dir, skip_bad=True)
  assert len(summary.skipped) == 1 and image_id in summary.skipped[0] and expect in summary.skipped[0]
  assert summary.num_examples['train'] + summary.num_examples.get('validation', 0) == 5
  assert sorted(os.listdir(data_dir)) == [fashionai.NAME]


def test_missing_annotations_and_duplicates(small_raw, tmp_path):
  with pytest.raises(build.BuildError, match='found no annotations'):
    build.build_dataset(str(tmp_path), str(tmp_path / 'tfds'))
  assert not os.path.exists(tmp_path / 'tfds')
  root = str(tmp_path / 'raw')
  shutil.copytree(small_raw, root)
  rows = _csv_rows(root)
  _write_rows(root, rows + [rows[1]])
  with pytest.raises(build.BuildError, match='listed twice'):
    build.build_dataset(root, str(tmp_path / 'tfds'))


def test_round_two_and_warm_up_layouts(small_raw, tmp_path):
  """annotations.csv (round 2) and a warm-up folder beside train are merged into the labelled splits."""
  root = tmp_path / 'raw'
  shutil.copytree(os.path.join(small_raw, 'train'), root / 'train')
  os.rename(root / 'train' / 'Annotations' / 'train.csv', root / 'train' / 'Annotations' / 'annotations.csv')
  shutil.copytree(os.path.join(small_raw, 'train'), root / 'train_warm_up')
  summary = build.build_dataset(str(root), str(tmp_path / 'tfds'), validation_fraction=0.0)
  assert summary.num_examples == {'train': 12}


def _run(args, **kw):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_cli_and_no_tensorflow(small_raw, tmp_path):
  root = str(tmp_path / 'raw')
  shutil.copytree(small_raw, root)
  data_dir = str(tmp_path / 'tfds')
  ok = _run(['-m', 'kpjax.data.build', '--manual-dir', root, '--data-dir', data_dir])
  assert ok.returncode == 0, ok.stderr
  assert 'wrote ' in ok.stdout and 'train' in ok.stdout
  # Build and read back in one fresh process: TensorFlow is never imported.
  code = (
      'import sys, json\n'
      'from kpjax.data import build\n'
      'import tensorflow_datasets as tfds\n'
      f's = build.build_dataset({root!r}, {str(tmp_path / "tfds2")!r})\n'
      f'src = tfds.data_source("fashionai_keypoints", data_dir={str(tmp_path / "tfds2")!r}, split="train")\n'
      'rec = src[0]\n'
      'print(json.dumps({"n": len(src), "tf": "tensorflow" in sys.modules, "h": int(rec["height"])}))\n')
  res = _run(['-c', code])
  assert res.returncode == 0, res.stderr
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out['tf'] is False and out['n'] > 0 and out['h'] >= synthetic.MIN_SIDE
  # A bad image: exit 2 (a user's data), one clear message, no traceback, nothing written; --skip-bad lists and counts.
  image_id, expect = _break(root, 'corrupt image')
  bad_dir = str(tmp_path / 'tfds3')
  res = _run(['-m', 'kpjax.data.build', '--manual-dir', root, '--data-dir', bad_dir])
  assert res.returncode == 2 and res.stderr.startswith('error: ') and 'Traceback' not in res.stderr
  assert len(res.stderr.strip().splitlines()) == 1, res.stderr
  assert image_id in res.stderr and expect in res.stderr and '--skip-bad' in res.stderr
  assert not os.path.exists(bad_dir) or os.listdir(bad_dir) == []
  res = _run(['-m', 'kpjax.data.build', '--manual-dir', root, '--data-dir', bad_dir, '--skip-bad'])
  assert res.returncode == 0, res.stderr
  assert 'skipped: ' in res.stderr and image_id in res.stderr and 'skipped 1 bad' in res.stderr
