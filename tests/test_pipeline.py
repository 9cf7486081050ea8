"""kpjax.data.pipeline: batches, targets and masks, determinism, resumption, sharding, eval padding, sources."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import train_fixture as fx
from kpjax.train import config_check
from kpjax.data import keypoints as kp
from kpjax.configs import base
from kpjax.data import conventions
from kpjax.data import pipeline
from kpjax.data import geometry as preprocess
from kpjax.data.spec import ModelSpec
from kpjax.data import images
from kpjax import errors
from kpjax.data import sources

SIZE = 64
NUM_RECORDS = 30


def _png(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'PNG')
  return buf.getvalue()


def _id_value(i):
  return 10 + 7 * i  # a distinct grey level per record (PNG keeps it exact)


def make_records(n=NUM_RECORDS, seed=0):
  """Records as a TFDS data source returns them (image_id as bytes): record i is a flat grey image of
  level _id_value(i), of category i % 5, with that category's keypoints at random positions."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    height, width = (int(v) for v in rng.integers(40, 90, 2))
    category = kp.CATEGORIES[i % len(kp.CATEGORIES)]
    visibility = np.where(kp.category_mask(category), rng.choice([1, 0], 24), -1).astype(np.int32)
    if i % 3 == 0:  # an absent keypoint inside the category
      visibility[kp.keypoint_indices(category)[0]] = -1
    points = rng.uniform(0, [width - 1, height - 1], (24, 2)).round()
    points = np.where(visibility[:, None] >= 0, points, -1).astype(np.float32)
    image = np.full((height, width, 3), _id_value(i), np.uint8)
    records.append({'image': _png(image), 'image_id': f'Images/{category}/{i:03d}.jpg'.encode(),
                    'category': np.int64(kp.CATEGORIES.index(category)), 'keypoints': points,
                    'visibility': visibility, 'height': height, 'width': width})
  return records


@pytest.fixture(scope='module')
def source():
  return sources.RecordSource(make_records())


def _config(category='all', batch_size=4, augment=True, preprocessing='kpjax'):
  config = base.get_config()
  config.category = category
  config.input_size = SIZE
  config.batch_size = batch_size
  config.preprocessing = preprocessing
  config.augment.enabled = augment
  config.data.num_threads = 2
  return config


def _record_ids(batch):
  """The record behind each row, from its grey level at the (always covered) input centre."""
  level = np.round(batch['image'][:, SIZE // 2, SIZE // 2, 0] * preprocess.STDDEV_RGB[0] + preprocess.MEAN_RGB[0])
  ids = (level - 10) / 7
  assert np.allclose(ids, np.round(ids))
  return np.round(ids).astype(int)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize('category', ['all', 'blouse', 'trousers'])
def test_train_batch_shapes_and_ranges(source, category):
  config = _config(category)
  batch = next(fx.train_batches(config, source, seed=0))
  n = kp.num_keypoints(category)
  assert batch['image'].shape == (4, SIZE, SIZE, 3) and batch['image'].dtype == np.float32
  assert batch['target'].shape == (4, n, 2) and batch['target'].dtype == np.float32
  assert batch['mask'].shape == (4, n) and batch['mask'].dtype == np.float32
  assert np.all(np.isfinite(batch['target'])) and set(np.unique(batch['mask'])) <= {0.0, 1.0}
  assert np.all(np.abs(batch['target']) <= 1.0)  # dsntnn coords of points inside the input
  assert np.all(batch['target'][batch['mask'] == 0] == 0)


def test_same_seed_same_batches_and_other_seed_differs(source):
  config = _config()
  a = _take(fx.train_batches(config, source, seed=3), 4)
  b = _take(fx.train_batches(config, source, seed=3), 4)
  c = _take(fx.train_batches(config, source, seed=4), 4)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_resume_from_state_gives_the_following_batches(source):
  config = _config()
  it = fx.train_batches(config, source, seed=1)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = _take(it, 5)  # crosses the epoch boundary (30 records / 4 per batch)
  fresh = fx.train_batches(config, source, seed=1)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 5), expected)


def test_resume_with_worker_processes_and_a_changed_worker_count(source):
  """The state is the stream position alone, so a run resumes with any number of grain workers."""
  reference = _take(fx.train_batches(_config(augment=False), source, seed=2), 6)
  config = _config(augment=False)
  config.data.worker_count = 2
  it = fx.train_batches(config, source, seed=2)
  try:
    states = [it.get_state()]
    first = []
    for _ in range(3):
      first.append(next(it))
      states.append(json.loads(json.dumps(it.get_state())))
  finally:
    it.close()
  _assert_batches_equal(first, reference[:3])  # worker processes do not change the stream
  assert states == [{'batches': k} for k in range(4)]  # nothing of grain's own, private, state
  fresh = fx.train_batches(config, source, seed=2)  # the same worker count
  try:
    fresh.set_state(states[2])
    _assert_batches_equal(_take(fresh, 2), reference[2:4])
  finally:
    fresh.close()
  single = fx.train_batches(_config(augment=False), source, seed=2)  # 2 workers -> in-process
  single.set_state(states[3])
  _assert_batches_equal(_take(single, 2), reference[3:5])
  assert single.get_state()['batches'] == 5
  config.data.worker_count = 1  # in-process -> 1 worker
  one = fx.train_batches(config, source, seed=2)
  try:
    one.set_state(single.get_state())
    _assert_batches_equal(_take(one, 1), reference[5:6])
  finally:
    one.close()
  old = fx.train_batches(config, source, seed=2)  # a state kpjax 0.1.0 saved, with grain's own in it
  try:
    old.set_state({'batches': 4, 'worker_count': 2, 'grain': {'next_index_in_cycle': 0}})
    _assert_batches_equal(_take(old, 1), reference[4:5])
  finally:
    old.close()
  with pytest.raises(ValueError, match='batches'):
    single.set_state({'next_index': 3})


def test_epochs_are_reshuffled_permutations(source):
  config = _config(batch_size=5, augment=False)
  ids = np.concatenate([_record_ids(b) for b in _take(fx.train_batches(config, source, seed=0), 12)])
  first, second = ids[:NUM_RECORDS], ids[NUM_RECORDS:]
  assert sorted(first) == list(range(NUM_RECORDS)) and sorted(second) == list(range(NUM_RECORDS))
  assert not np.array_equal(first, second)


def test_processes_load_their_rows_of_the_global_batch(source):
  config = _config(batch_size=6, augment=True)  # 3 processes of 2 rows each
  config.augment.color_jitter = 0.0  # keeps _record_ids' grey levels
  whole = _take(fx.train_batches(config, source, seed=0), 6)
  seen = []
  for process in range(3):
    batches = _take(fx.train_batches(config, source, seed=0, process_index=process, process_count=3), 6)
    assert all(b['image'].shape[0] == 2 for b in batches)
    rows = slice(2 * process, 2 * process + 2)
    _assert_batches_equal(batches, [{k: v[rows] for k, v in b.items()} for b in whole])  # augmentation too
    seen.append(np.concatenate([_record_ids(b) for b in batches[:5]]))  # the first epoch: 5 steps of 6
  epoch = np.concatenate(seen)
  assert sorted(epoch) == list(range(NUM_RECORDS))  # disjoint rows that cover the data
  with pytest.raises(ValueError, match='multiple'):
    fx.train_batches(_config(batch_size=5), source, seed=0, process_count=2)


def test_a_resumed_stream_may_change_its_number_of_processes(source):
  config = _config(batch_size=4)
  whole = _take(fx.train_batches(config, source, seed=5), 5)
  one = fx.train_batches(config, source, seed=5)
  _take(one, 2)
  state = json.loads(json.dumps(one.get_state()))
  halves = []
  for process in range(2):  # resumed by 2 processes: each continues with its half of step 3, 4, 5
    it = fx.train_batches(config, source, seed=5, process_index=process, process_count=2)
    it.set_state(state)
    halves.append(_take(it, 3))
  for k in range(3):
    joined = {key: np.concatenate([halves[0][k][key], halves[1][k][key]]) for key in whole[0]}
    _assert_batches_equal([joined], [whole[2 + k]])


def test_category_filter_reads_no_image(source):
  config = _config('skirt', batch_size=3, augment=False)
  ids = np.concatenate([_record_ids(b) for b in _take(fx.train_batches(config, source, seed=0), 4)])
  skirt = kp.category_index('skirt')
  assert set(ids) == {i for i in range(NUM_RECORDS) if i % 5 == skirt}
  broken = make_records(10)
  for r in broken:
    r['image'] = b'not an image'
  np.testing.assert_array_equal(sources.example_indices(sources.RecordSource(broken), 'skirt'), [3, 8])
  np.testing.assert_array_equal(sources.example_indices(broken, 'dress'), [1, 6])  # a plain list works too


def test_masks_of_absent_and_pushed_out_keypoints(source):
  # No augmentation: mask is exactly v >= 0 (every annotated point lies inside the letterboxed input).
  config = _config(augment=False, batch_size=NUM_RECORDS)
  batch = next(fx.train_batches(config, source, seed=0))
  ids = _record_ids(batch)
  records = make_records()
  visibility = np.stack([records[i]['visibility'] for i in ids])
  np.testing.assert_array_equal(batch['mask'], (visibility >= 0).astype(np.float32))
  # Targets are the letterboxed keypoints in dsntnn coordinates.
  for row, i in enumerate(ids):
    affine = preprocess.letterbox_affine(records[i]['height'], records[i]['width'], SIZE)
    expected = conventions.get('kpjax').input_pixels_to_coords(preprocess.apply_affine(records[i]['keypoints'], affine),
                                                         SIZE)
    keep = visibility[row] >= 0
    np.testing.assert_allclose(batch['target'][row][keep], expected[keep], atol=1e-6)
  # Strong zoom and shifts push annotated keypoints out: those are masked and their targets 0.
  config = _config(augment=True, batch_size=NUM_RECORDS)
  config.augment.scale = (2.0, 2.5)
  config.augment.translate = 0.3
  config.augment.color_jitter = 0.0  # keeps _record_ids' grey levels
  batch = next(fx.train_batches(config, source, seed=0))
  # Augmentation may flip the image and swap twins; a pair's visibilities agree in at most its order.
  annotated = np.stack([np.sort(records[i]['visibility'] >= 0) for i in _record_ids(batch)])
  assert batch['mask'].sum() < annotated.sum()  # some annotated points left the input
  assert np.all(np.isfinite(batch['target'])) and np.all(batch['target'][batch['mask'] == 0] == 0)
  assert np.all(np.abs(batch['target'][batch['mask'] == 1]) <= 1.0)


def test_train_targets_land_on_the_drawn_dot():
  # A dot drawn at a keypoint: the augmented target, back in input pixels, is the dot's centroid.
  height, width, point = 70, 90, np.array([30.0, 41.0])
  ys, xs = np.mgrid[0:height, 0:width]
  blob = np.exp(-((xs - point[0]) ** 2 + (ys - point[1]) ** 2) / (2 * 2.5 ** 2))
  image = np.repeat((blob * 250).round().astype(np.uint8)[..., None], 3, -1)
  vis = np.where(kp.category_mask('dress'), 1, -1).astype(np.int32)
  record = {'image': _png(image), 'image_id': 'dot', 'category': kp.category_index('dress'),
            'keypoints': np.where(vis[:, None] >= 0, point, -1).astype(np.float32), 'visibility': vis,
            'height': height, 'width': width}
  config = _config('dress')
  config.augment.color_jitter = 0.0
  transform = pipeline.TrainTransform(ModelSpec.from_config(config),
                                      pipeline.augment_lib.AugmentConfig.from_config(config.augment))
  blank = dict(record, image=_png(np.zeros_like(image)))
  checked = 0
  for seed in range(12):
    out = transform.random_map(record, np.random.default_rng(seed))
    ref = transform.random_map(blank, np.random.default_rng(seed))
    if out['mask'].min() == 0:
      continue
    pixels = conventions.get('kpjax').coords_to_input_pixels(out['target'], SIZE)
    assert np.allclose(pixels, pixels[0], atol=1e-4)  # all keypoints share the dot
    diff = ((out['image'] - ref['image']) * preprocess.STDDEV_RGB).mean(-1)
    if pixels[0].min() < 8 or pixels[0].max() > SIZE - 9:
      continue
    w = np.clip(diff, 0, None)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    centroid = np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    assert np.linalg.norm(centroid - pixels[0]) < 0.2
    checked += 1
  assert checked >= 6


def test_kpdem_preprocessing(source):
  with pytest.raises(ValueError, match='kpdem'):
    fx.train_batches(_config(preprocessing='kpdem'), source, seed=0)
  with pytest.raises(errors.ConfigError, match="augment.enabled = True with config.preprocessing = 'kpdem'"):
    config_check.check_config(_config(preprocessing='kpdem'))
  config = _config(augment=False, preprocessing='kpdem')
  batch = next(fx.train_batches(config, source, seed=0))
  assert batch['image'].max() <= 1 / 255 + 1e-6 and batch['image'].min() >= 0
  kept = batch['target'][batch['mask'] == 1]
  assert np.all((kept >= 0) & (kept <= 1))
  # The original's targets: floor(x * S / W) / S ('truncated', the default), or x / W ('exact').
  np.testing.assert_allclose(kept * SIZE, np.round(kept * SIZE), atol=1e-4)
  config.kpdem_targets = 'exact'
  exact = next(fx.train_batches(config, source, seed=0))['target'][batch['mask'] == 1]
  np.testing.assert_allclose(np.floor(exact * SIZE + 1e-4) / SIZE, kept, atol=1e-6)
  assert np.abs(exact * SIZE - np.round(exact * SIZE)).max() > 0.1


def _kpdem_targets(points, height, width, size=SIZE, targets='truncated'):
  """TrainTransform's (target, mask) for one trousers record with `points` (7, 2) at the trousers keypoints."""
  vis = np.where(kp.category_mask('trousers'), 1, -1).astype(np.int32)
  xy = np.full((kp.NUM_KEYPOINTS, 2), -1, np.float32)
  xy[kp.keypoint_indices('trousers')] = points
  record = {'image': np.zeros((height, width, 3), np.uint8), 'image_id': 'edge', 'keypoints': xy,
            'visibility': vis, 'category': kp.category_index('trousers'), 'height': height, 'width': width}
  spec = ModelSpec('trousers', 0.125, 1, size, conventions.get('kpdem', kpdem_targets=targets))
  out = pipeline.TrainTransform(spec, None).random_map(record, np.random.default_rng(0))
  return out['target'], out['mask']


def test_kpdem_targets_keep_keypoints_up_to_the_right_and_bottom_edges():
  """kpdem input pixels are x * S / W (corner-aligned) in [0, S] for the annotations' [0, W]: a keypoint at
  x = 510 of 512 is inside (63.75 of 64) and its target is the original's floor(510 * 64 / 512) / 64."""
  points = np.array([[510, 100], [511, 383], [512, 384], [0, 0], [509, 7], [256, 192], [3, 380]], np.float64)
  target, mask = _kpdem_targets(points, 384, 512)
  np.testing.assert_array_equal(mask, 1.0)
  want = (points.astype(np.int64) * SIZE // [512, 384]) / SIZE  # integer arithmetic: the original's cells
  np.testing.assert_array_equal(target, want.astype(np.float32))
  assert target[0, 0] == 63 / 64 and target[2].tolist() == [1.0, 1.0]
  exact, mask = _kpdem_targets(points, 384, 512, targets='exact')
  np.testing.assert_array_equal(mask, 1.0)
  np.testing.assert_allclose(exact, points / [512, 384], rtol=1e-7)
  # W = 49 (and 98 at x = 49): x * (32 / 49) is 31.999999999999996 in float64, the original's x * 32 / W is 32.
  points = np.array([[49, 49], [48, 48], [49, 0], [0, 49], [1, 2], [24, 25], [47, 46]], np.float64)
  for side in (49, 98):
    target, mask = _kpdem_targets(points, side, side, size=32)
    np.testing.assert_array_equal(mask, 1.0)
    np.testing.assert_array_equal(target, ((points.astype(np.int64) * 32 // side) / 32).astype(np.float32))


@pytest.mark.parametrize('name, inside, outside', [
    ('kpjax', [[-0.5, -0.5], [SIZE - 0.5, SIZE - 0.5], [0, SIZE - 0.5]], [[-0.51, 0], [0, SIZE - 0.49]]),
    ('kpdem', [[0, 0], [SIZE, SIZE], [SIZE - 0.01, 3]], [[-0.01, 0], [0, SIZE + 0.01], [SIZE + 1, 0]]),
])
def test_what_lies_inside_the_input_is_the_conventions(name, inside, outside):
  """kpjax pixels are centres: the square spans [-0.5, S - 0.5]; kpdem's are corner-aligned: [0, S]."""
  mode = conventions.get(name)
  assert mode.inside(np.array(inside), SIZE).all()
  assert not mode.inside(np.array(outside), SIZE).any()
  assert not mode.inside(np.array([[np.nan, 1.0], [1.0, np.inf]]), SIZE).any()
  assert mode.inside(np.zeros((3, 5, 2)), SIZE).shape == (3, 5)


@pytest.mark.parametrize('mode', ['kpjax', 'kpdem'])
def test_eval_batches_padding_order_and_affine_round_trip(source, mode):
  config = _config('all', preprocessing=mode)
  batches = list(fx.eval_batches(config, source, batch_size=8))
  assert len(batches) == 4  # 30 images -> 8 + 8 + 8 + 6 and 2 padding rows
  assert [int(b['valid'].sum()) for b in batches] == [8, 8, 8, 6]
  records = make_records()
  ids = np.concatenate([b['image_id'][b['valid']] for b in batches])
  assert list(ids) == [r['image_id'].decode() for r in records]  # source order, ids as str
  for b in batches:
    assert b['image'].shape == (8, SIZE, SIZE, 3) and b['image'].dtype == np.float32
    assert b['affine'].shape == (8, 2, 3) and b['keypoints'].shape == (8, 24, 2)
    assert b['visibility'].shape == (8, 24) and b['category'].shape == (8,) and b['valid'].dtype == bool
    assert b['image_id'].dtype == object
    valid = b['valid']
    exact = conventions.get(mode, kpdem_targets='exact')  # no truncation: the mapping itself must invert
    coords = exact.input_pixels_to_coords(preprocess.apply_affine(b['keypoints'], b['affine']), SIZE)
    back = exact.coords_to_original(coords, b['affine'], SIZE)
    np.testing.assert_allclose(back[valid], b['keypoints'][valid], atol=1e-6)
  last = batches[-1]
  assert np.all(last['visibility'][~last['valid']] == -1) and np.all(last['image'][~last['valid']] == 0)
  expected = np.stack([conventions.get(mode).prepare(images.decode_image(r['image']), SIZE)[0]
                       for r in records[:8]])
  np.testing.assert_allclose(batches[0]['image'], expected)


def test_eval_batches_category_shards_and_max_images(source):
  config = _config('outwear')
  (only,) = list(fx.eval_batches(config, source, batch_size=8))
  outwear = [r['image_id'].decode() for r in make_records() if r['category'] == kp.category_index('outwear')]
  assert list(only['image_id'][only['valid']]) == outwear and np.all(only['category'][only['valid']] == 2)
  config = _config('all')
  shards = [list(fx.eval_batches(config, source, batch_size=4, process_index=i, process_count=3, max_images=25))
            for i in range(3)]
  assert {len(s) for s in shards} == {3}  # ceil(ceil(25 / 3) / 4): the same count on every process
  per_shard = [np.concatenate([b['image_id'][b['valid']] for b in s]) for s in shards]
  assert sorted(np.concatenate(per_shard)) == sorted(r['image_id'].decode() for r in make_records()[:25])
  assert [len(p) for p in per_shard] == [9, 8, 8]


def test_record_normalisation():
  record = make_records(1)[0]
  norm = sources.RecordSource([record])[0]
  assert norm['image_id'] == 'Images/blouse/000.jpg' and isinstance(norm['category'], int)
  assert norm['keypoints'].dtype == np.float32 and norm['visibility'].dtype == np.int32
  assert set(norm) == set(sources.RECORD_KEYS)


def test_missing_tfds_dataset_names_the_build_command(tmp_path):
  config = _config()
  config.data.source = 'tfds'
  config.data.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(sources.DatasetNotFoundError) as e:
    sources.get_source(config.data, 'train')
  message = str(e.value)
  assert str(tmp_path / 'nowhere') in message
  assert (f'python -m kpjax.data.build --manual-dir <where the FashionAI archives were extracted> '
          f'--data-dir {tmp_path / "nowhere"}') in message
  assert isinstance(e.value, ValueError)
  config.data.source = 'bogus'
  with pytest.raises(errors.ConfigError, match="config.data.source = 'bogus': expected one of tfds, synthetic"):
    config_check.check_config(config)


def test_synthetic_without_dir_or_workdir_is_an_error():
  config = _config()
  config.data.source = 'synthetic'
  with pytest.raises(ValueError, match='workdir'):
    sources.get_source(config.data, 'train')


class _FakeBuilders:
  """Stand-ins for kpjax.data.synthetic.generate / build.build_dataset that count calls and write a
  minimal built layout (the real path is tested in test_synthetic_source_end_to_end)."""

  def __init__(self, fail=False, racer_dir=None):
    self.calls = []
    self.fail = fail
    self.racer_dir = racer_dir

  def generate(self, raw_dir, num_images, seed):
    self.calls.append(('generate', num_images, seed))
    os.makedirs(os.path.join(raw_dir, 'train', 'Annotations'))

  def build_dataset(self, raw_dir, tfds_dir):
    self.calls.append(('build', os.path.basename(raw_dir)))
    if self.fail:
      raise RuntimeError('build failed')
    version = os.path.join(tfds_dir, 'fashionai_keypoints', '1.0.0')
    os.makedirs(version)
    with open(os.path.join(version, 'dataset_info.json'), 'w') as f:
      f.write('{}')
    if self.racer_dir:  # another process finishes first
      os.makedirs(os.path.join(self.racer_dir, 'tfds', 'fashionai_keypoints', '1.0.0'))
      with open(os.path.join(self.racer_dir, 'tfds', 'fashionai_keypoints', '1.0.0', 'dataset_info.json'), 'w') as f:
        f.write('{"winner": true}')


def _install(monkeypatch, fake):
  import types  # pylint: disable=g-import-not-at-top
  import kpjax.data  # pylint: disable=g-import-not-at-top
  synthetic = types.SimpleNamespace(generate=fake.generate)
  build = types.SimpleNamespace(build_dataset=fake.build_dataset)
  monkeypatch.setattr(kpjax.data, 'synthetic', synthetic, raising=False)
  monkeypatch.setattr(kpjax.data, 'build', build, raising=False)


def test_ensure_synthetic_builds_once_atomically(tmp_path, monkeypatch):
  fake = _FakeBuilders()
  _install(monkeypatch, fake)
  base_dir = tmp_path / 'work' / 'synthetic'
  tfds_dir = sources.ensure_synthetic(str(base_dir), 12, 5)
  assert tfds_dir == str(base_dir / 'tfds')
  assert fake.calls == [('generate', 12, 5), ('build', 'raw')]
  version_dir = base_dir / 'tfds' / 'fashionai_keypoints' / '1.0.0'
  assert sources.find_tfds_dir(tfds_dir, 'fashionai_keypoints') == str(version_dir)
  assert (base_dir / 'raw' / 'train' / 'Annotations').is_dir()
  assert sources.ensure_synthetic(str(base_dir), 12, 5) == tfds_dir
  assert len(fake.calls) == 2  # the second call reuses it
  assert os.listdir(tmp_path / 'work') == ['synthetic']  # no temporary directory left


def test_ensure_synthetic_failure_and_lost_race(tmp_path, monkeypatch):
  _install(monkeypatch, _FakeBuilders(fail=True))
  with pytest.raises(RuntimeError, match='build failed'):
    sources.ensure_synthetic(str(tmp_path / 'a'), 4, 0)
  assert os.listdir(tmp_path) == []  # nothing half-written
  racer = tmp_path / 'b'
  _install(monkeypatch, _FakeBuilders(racer_dir=str(racer)))
  tfds_dir = sources.ensure_synthetic(str(racer), 4, 0)
  info = os.path.join(tfds_dir, 'fashionai_keypoints', '1.0.0', 'dataset_info.json')
  assert json.load(open(info)) == {'winner': True}  # the first copy in place is kept
  assert os.listdir(tmp_path) == ['b']
  (tmp_path / 'c').mkdir()
  (tmp_path / 'c' / 'stray.txt').write_text('x')
  with pytest.raises(sources.DatasetNotFoundError, match='holds no built synthetic dataset'):
    sources.ensure_synthetic(str(tmp_path / 'c'), 4, 0)


def test_pixel_records_and_corrupt_images():
  records = make_records(5)
  pixels = [dict(r, image=images.decode_image(r['image'])) for r in records]
  config = _config(augment=False, batch_size=5)
  a = next(fx.train_batches(config, sources.RecordSource(records), seed=0))
  b = next(fx.train_batches(config, sources.RecordSource(pixels), seed=0))
  _assert_batches_equal([a], [b])
  records[2] = dict(records[2], image=b'\xff\xd8 truncated jpeg')
  with pytest.raises(errors.ImageError, match='Images/outwear/002.jpg'):
    next(fx.train_batches(config, sources.RecordSource(records), seed=0))
  with pytest.raises(errors.ImageError, match='Images/outwear/002.jpg'):
    list(fx.eval_batches(config, sources.RecordSource(records), batch_size=2))


def _build_tiny_tfds(data_dir, records):
  """A real TFDS array_record dataset (no TensorFlow) named tiny_fashionai with the record layout."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyFashionai(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(), dtype=np.object_),
          'image_id': tfds.features.Text(),
          'category': tfds.features.Scalar(dtype=np.int64),
          'keypoints': tfds.features.Tensor(shape=(24, 2), dtype=np.float32),
          'visibility': tfds.features.Tensor(shape=(24,), dtype=np.int32),
          'height': tfds.features.Scalar(dtype=np.int32),
          'width': tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(records[:-6]), 'validation': self._generate_examples(records[-6:])}

    def _generate_examples(self, rows):
      for row in rows:
        yield row['image_id'].decode(), dict(row, image_id=row['image_id'].decode())

  TinyFashionai(data_dir=str(data_dir), file_format='array_record').download_and_prepare()


def test_tfds_source_end_to_end(tmp_path):
  records = make_records()
  _build_tiny_tfds(tmp_path / 'building', records)
  os.rename(tmp_path / 'building', tmp_path / 'data')  # what ensure_synthetic does: the dataset is movable
  config = _config('trousers', batch_size=2, augment=False)
  config.data.source = 'tfds'
  config.data.tfds_name = 'tiny_fashionai'
  config.data.data_dir = str(tmp_path / 'data')
  train = sources.get_source(config.data, 'train')
  assert len(train) == NUM_RECORDS - 6 and len(sources.get_source(config.data, 'validation')) == 6
  by_id = {r['image_id'].decode(): r for r in records}
  first = train[0]
  assert isinstance(first['image_id'], str) and isinstance(first['category'], int)
  np.testing.assert_array_equal(first['keypoints'], by_id[first['image_id']]['keypoints'])
  assert first['image'] == by_id[first['image_id']]['image']
  trousers = kp.category_index('trousers')
  assert sorted(train[int(i)]['image_id'] for i in sources.example_indices(train, 'trousers')) == sorted(
      r['image_id'].decode() for r in records[:-6] if r['category'] == trousers)
  config.data.worker_count = 1  # the source travels to a worker process
  it = fx.train_batches(config, train, seed=0)
  try:
    ids = np.concatenate([_record_ids(b) for b in _take(it, 2)])
  finally:
    it.close()
  assert sorted(ids) == [i for i in range(NUM_RECORDS - 6) if i % 5 == trousers]
  with pytest.raises(sources.DatasetNotFoundError, match="no split 'test'.*train, validation"):
    sources.get_source(config.data, 'test')


def test_synthetic_source_end_to_end(tmp_path):
  """The real path: kpjax.data.synthetic generates FashionAI-style files, kpjax.data.build makes TFDS."""
  config = _config('all', batch_size=4)
  config.data.source = 'synthetic'
  config.data.synthetic_num_images = 12
  config.data.synthetic_seed = 0
  train = sources.get_source(config.data, config.data.train_split, workdir=str(tmp_path))
  base_dir = tmp_path / 'synthetic'
  assert (base_dir / 'raw' / 'train' / 'Annotations' / 'train.csv').is_file()
  stamp = os.stat(base_dir / 'tfds').st_mtime_ns
  record = train[0]
  assert set(record) == set(sources.RECORD_KEYS) and isinstance(record['image_id'], str)
  image = images.decode_image(record['image'])
  assert image.shape == (record['height'], record['width'], 3)
  assert np.all(record['visibility'][~kp.category_mask(kp.CATEGORIES[record['category']])] == -1)
  batch = next(fx.train_batches(config, train, seed=0))
  assert batch['image'].shape == (4, SIZE, SIZE, 3) and batch['mask'].sum() > 0
  again = sources.get_source(config.data, config.data.eval_split, workdir=str(tmp_path))  # reuses the build
  assert os.stat(base_dir / 'tfds').st_mtime_ns == stamp
  total = len(train) + len(again)
  assert 0 < len(again) < total <= 12
  (first, *_) = fx.eval_batches(config, again, batch_size=4)
  valid = first['valid']
  mode = conventions.get('kpjax')
  back = mode.coords_to_original(
      mode.input_pixels_to_coords(preprocess.apply_affine(first['keypoints'], first['affine']), SIZE),
      first['affine'], SIZE)
  np.testing.assert_allclose(back[valid], first['keypoints'][valid], atol=1e-4)


def test_two_processes_generating_at_once_agree(tmp_path):
  """Two processes asking for the same synthetic cache at once: one copy lands, both read the same data."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  script = ('import sys, json; from kpjax.configs import base; from kpjax.data import sources\n'
            'c = base.get_config(); c.data.source = "synthetic"; c.data.synthetic_dir = sys.argv[1]\n'
            'c.data.synthetic_num_images = 8\n'
            's = sources.get_source(c.data, "train")\n'
            'print(json.dumps([s[i]["image_id"] for i in range(len(s))]))\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, '-c', script, str(tmp_path / 'synthetic')], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err
  ids = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert ids[0] == ids[1] and len(ids[0]) > 0
  assert os.listdir(tmp_path) == ['synthetic']  # the losing copy is gone
