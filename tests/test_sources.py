"""kpjax.data.sources: records normalised from any source, categories read without images, the newest TFDS
version found, and missing datasets or splits explained."""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest

from kpjax.data import keypoints as kp
from kpjax.data import sources
from kpjax.errors import DatasetNotFoundError


def _raw(i: int, category: str) -> dict:
  """A raw record as a TFDS data source returns it (numpy scalars and bytes; the image is never decoded here)."""
  return {'image': np.array(b'not decoded %d' % i, dtype=object),
          'image_id': np.array(f'Images/{category}/{i}.jpg'.encode()),
          'category': np.int64(kp.category_index(category)), 'keypoints': np.arange(48, dtype=np.float64) + i,
          'visibility': np.ones(24, np.int64), 'height': np.int64(64), 'width': np.int64(48)}


class Counting:
  """A random-access source that counts its reads, with __getitems__ as TFDS's array_record sources have."""

  def __init__(self, records, batched=True):
    self.records, self.reads = records, []
    if not batched:
      self.__getitems__ = None

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads.append([i])
    return self.records[i]

  def __getitems__(self, indices):
    self.reads.append(list(indices))
    return [self.records[i] for i in indices]


def test_records_are_normalised_to_plain_types():
  record = sources.RecordSource([_raw(3, 'skirt')], name='raw')[0]
  assert set(record) == set(sources.RECORD_KEYS)
  assert record['image'] == b'not decoded 3' and record['image_id'] == 'Images/skirt/3.jpg'
  assert record['category'] == 3 and type(record['category']) is int
  assert record['keypoints'].shape == (24, 2) and record['keypoints'].dtype == np.float32
  np.testing.assert_array_equal(record['keypoints'][1], [5, 6])  # (x, y) pairs in CSV order
  assert record['visibility'].dtype == np.int32 and (record['height'], record['width']) == (64, 48)
  pixels = np.zeros((4, 5, 3), np.uint8)  # a builder that stores decoded pixels keeps them
  np.testing.assert_array_equal(sources.normalize_record(dict(_raw(0, 'skirt'), image=pixels))['image'], pixels)
  raw = dict(_raw(0, 'skirt'), image=np.frombuffer(b'\xff\xd8jpeg', np.uint8), image_id='plain str')
  record = sources.normalize_record(raw)
  assert record['image'] == b'\xff\xd8jpeg' and record['image_id'] == 'plain str'


@pytest.mark.parametrize('batched', [True, False])
def test_categories_are_read_in_chunks_once(batched, monkeypatch):
  monkeypatch.setattr(sources, '_CATEGORY_CHUNK', 4)
  cats = ['skirt', 'blouse', 'trousers', 'skirt', 'dress', 'outwear', 'skirt', 'blouse', 'trousers', 'skirt']
  raw = Counting([_raw(i, c) for i, c in enumerate(cats)], batched)
  source = sources.RecordSource(raw, name='counting')
  assert len(source) == 10 and repr(source) == 'RecordSource(counting, 10 records)'
  want = np.array([kp.category_index(c) for c in cats], np.int32)
  np.testing.assert_array_equal(source.categories(), want)
  assert source.categories().dtype == np.int32
  if batched:
    assert raw.reads == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  else:
    assert raw.reads == [[i] for i in range(10)]
  reads = len(raw.reads)
  source.categories()
  assert len(raw.reads) == reads  # cached
  np.testing.assert_array_equal(sources.example_indices(source, 'skirt'), [0, 3, 6, 9])
  np.testing.assert_array_equal(sources.example_indices(source, 'all'), np.arange(10))
  assert sources.example_indices(source, 'skirt').dtype == np.int64


def test_a_plain_list_of_records_works_too():
  records = [sources.normalize_record(_raw(i, c)) for i, c in enumerate(['dress', 'skirt', 'dress'])]
  np.testing.assert_array_equal(sources.source_categories(records), [1, 3, 1])
  np.testing.assert_array_equal(sources.example_indices(records, 'dress'), [0, 2])
  assert sources.example_indices(records, 'trousers').size == 0


def test_record_sources_pickle_with_their_source():
  source = sources.RecordSource([_raw(0, 'skirt'), _raw(1, 'dress')], name='two')
  copy = pickle.loads(pickle.dumps(source))
  assert copy.name == 'two' and copy[1]['image_id'] == 'Images/dress/1.jpg'


def _version(root, *parts):
  path = root.joinpath(*parts)
  path.mkdir(parents=True)
  (path / 'dataset_info.json').write_text('{}')
  return str(path)


def test_find_tfds_dir_picks_the_newest_built_version(tmp_path):
  assert sources.find_tfds_dir(str(tmp_path), 'fashionai_keypoints') is None
  _version(tmp_path, 'fashionai_keypoints', '1.2.0')
  newest = _version(tmp_path, 'fashionai_keypoints', '1.10.0')  # numerically newer than 1.2.0 (not as text)
  _version(tmp_path, 'fashionai_keypoints', '1.9.1')
  (tmp_path / 'fashionai_keypoints' / '2.0.0').mkdir()  # still being built: no dataset_info.json
  _version(tmp_path, 'other_dataset', '9.0.0')
  assert sources.find_tfds_dir(str(tmp_path), 'fashionai_keypoints') == newest
  # Builder configs add a level: name/config/version.
  assert sources.find_tfds_dir(str(tmp_path / 'c'), 'coco') is None
  newest = _version(tmp_path, 'c', 'coco', 'person', '3.1.0')
  _version(tmp_path, 'c', 'coco', 'person', '3.0.0')
  assert sources.find_tfds_dir(str(tmp_path / 'c'), 'coco') == newest


def test_a_missing_dataset_says_how_to_build_it(tmp_path):
  with pytest.raises(DatasetNotFoundError) as e:
    sources.open_tfds_source(str(tmp_path), 'fashionai_keypoints', 'train')
  assert str(e.value) == (
      f"TFDS dataset 'fashionai_keypoints' is not built in {tmp_path} (no fashionai_keypoints/<version>/"
      f'dataset_info.json); build it with: python -m kpjax.data.build --manual-dir <where the FashionAI '
      f'archives were extracted> --data-dir {tmp_path}')


def test_a_missing_split_names_the_splits_there_are(tmp_path, monkeypatch):
  built = _version(tmp_path, 'fashionai_keypoints', '1.0.0')
  opened = []

  def builder_from_directory(path):  # what tfds reads from a built directory: its splits
    opened.append(path)
    return types.SimpleNamespace(info=types.SimpleNamespace(splits={'validation': 9, 'train': 16}, metadata=None),
                                 as_data_source=lambda split: [_raw(0, 'skirt')] * {'train': 16}[split])

  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', types.SimpleNamespace(
      builder_from_directory=builder_from_directory))
  with pytest.raises(DatasetNotFoundError, match=rf"^TFDS dataset 'fashionai_keypoints' in {built} has no split "
                                                 r"'test'; it has train, validation$"):
    sources.open_tfds_source(str(tmp_path), 'fashionai_keypoints', 'test')
  source = sources.open_tfds_source(str(tmp_path), 'fashionai_keypoints', 'train')
  assert opened == [built, built] and len(source) == 16 and source.name == 'fashionai_keypoints:train'
