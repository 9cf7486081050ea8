"""kpjax.inference.checkpoints: model directories and training checkpoints written, found and read back.

Models are slim (trousers, width 1/16, 1 stage); training checkpoints hold a tiny hand-made state, which
is all the format needs (nothing here trains).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from kpjax.data import keypoints as kp
from kpjax.errors import CheckpointError
from kpjax.inference import checkpoints
from kpjax.model import network

META = {'category': 'trousers', 'n_locations': 7, 'width': 0.0625, 'num_stages': 1, 'input_size': 16,
        'preprocessing': 'kpjax'}


@pytest.fixture(scope='module')
def net():
  return network.CoordRegressionNetwork(7, width=0.0625, num_stages=1)


@pytest.fixture(scope='module')
def variables(net, random_variables):
  return random_variables(net, seed=0)


def _assert_trees_equal(got, want):
  assert isinstance(got, dict) and sorted(got) == sorted(want)
  for key in want:
    if isinstance(want[key], dict):
      _assert_trees_equal(got[key], want[key])
    else:
      assert np.asarray(got[key]).dtype == np.asarray(want[key]).dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _state(step: int) -> dict:
  """A tiny training state whose values say which step it is."""
  return {'step': np.asarray(step, np.int32), 'params': {'w': np.arange(3, dtype=np.float32) + step},
          'opt_state': {'mu': np.full((3,), 0.5 * step, np.float32), 'count': np.asarray(step, np.int32)}}


def _training_run(workdir, steps, keep=10, metrics=None) -> None:
  """Training checkpoints of `steps` in `workdir`, as the loop saves them (eval/ne from `metrics`)."""
  manager = checkpoints.training_manager(os.path.join(workdir, checkpoints.CHECKPOINTS_SUBDIR), keep)
  try:
    for step in steps:
      checkpoints.save_training(manager, step, _state(step), dict(META, config={'seed': 0}),
                                {'batches': step}, (metrics or {}).get(step))
  finally:
    manager.close()


# ---- Model directories -------------------------------------------------------------------------

def test_save_model_round_trip(tmp_path, variables):
  meta = dict(META, source='hand-made', sha256='0' * 64)
  path = checkpoints.save_model(str(tmp_path / 'm'), variables, meta)
  assert path == str(tmp_path / 'm') and os.path.isabs(path)
  got, got_meta = checkpoints.load_model(path)
  _assert_trees_equal(got, variables)
  assert got_meta == meta
  assert checkpoints.locate(path) == checkpoints.Location(path, 'model')
  assert os.listdir(tmp_path) == ['m']  # no staging directory left beside it


def test_save_model_replaces_only_with_force(tmp_path, variables, random_variables, net):
  path = checkpoints.save_model(str(tmp_path / 'm'), variables, META)
  other = random_variables(net, seed=1)
  with pytest.raises(CheckpointError, match=r'already exists.*--force'):
    checkpoints.save_model(path, other, META)
  _assert_trees_equal(checkpoints.load_model(path)[0], variables)
  checkpoints.save_model(path, other, dict(META, source='second'), force=True)
  got, meta = checkpoints.load_model(path)
  _assert_trees_equal(got, other)
  assert meta['source'] == 'second'
  assert os.listdir(tmp_path) == ['m']


@pytest.mark.parametrize('bad, message', [
    ({k: v for k, v in META.items() if k != 'width'}, 'lacks width'),
    (dict(META, n_locations=4), 'n_locations 4 does not fit category'),
    (dict(META, preprocessing='opencv'), "unknown preprocessing 'opencv'"),
    (dict(META, category='hat'), 'hat'),
])
def test_save_model_refuses_metadata_that_describes_no_model(tmp_path, variables, bad, message):
  with pytest.raises(CheckpointError, match=message):
    checkpoints.save_model(str(tmp_path / 'm'), variables, bad)
  assert os.listdir(tmp_path) == []


def test_save_model_that_fails_midway_writes_nothing(tmp_path, variables):
  """All of it appears or nothing does: an array that cannot be read fails inside the staged write."""

  class Unreadable:
    shape, dtype = (3,), np.dtype(np.float32)

    def __array__(self, *args, **kwargs):
      raise RuntimeError('unreadable array')

  broken = {'params': dict(variables['params'], hm_conv={'kernel': Unreadable()})}
  with pytest.raises(RuntimeError, match='unreadable array'):
    checkpoints.save_model(str(tmp_path / 'm'), broken, META)
  assert os.listdir(tmp_path) == []
  path = checkpoints.save_model(str(tmp_path / 'm'), variables, META)
  with pytest.raises(RuntimeError, match='unreadable array'):
    checkpoints.save_model(path, broken, META, force=True)
  _assert_trees_equal(checkpoints.load_model(path)[0], variables)  # the old model stays
  assert os.listdir(tmp_path) == ['m']


# ---- Training checkpoints ----------------------------------------------------------------------

def test_training_checkpoints_round_trip(tmp_path):
  checkpoints_dir = str(tmp_path / 'checkpoints')
  manager = checkpoints.training_manager(checkpoints_dir, keep=3)
  try:
    assert checkpoints.restore_training(manager, _state(0)) is None  # nothing saved yet
    assert checkpoints.training_steps(checkpoints_dir) == []
    checkpoints.save_training(manager, 2, _state(2), META, {'batches': 2, 'note': 'two'})
    checkpoints.save_training(manager, 5, _state(5), META, {'batches': 5})
    checkpoints.save_training(manager, 5, _state(99), META, {'batches': 99})  # a saved step is left as it is
    state, data_state = checkpoints.restore_training(manager, _state(0))
  finally:
    manager.close()
  _assert_trees_equal(state, _state(5))
  assert data_state == {'batches': 5}
  assert checkpoints.training_steps(checkpoints_dir) == [2, 5]
  assert checkpoints.read_metadata(str(tmp_path))['step'] == 5  # the step is added to the metadata
  assert checkpoints.read_metadata(str(tmp_path), step=2) == dict(META, step=2)


def test_keeps_the_latest_n_and_the_best_by_eval_ne(tmp_path):
  # keep=2: the latest two (5, 6) and the lowest eval/ne (step 2); steps saved without one never count as best.
  _training_run(str(tmp_path), range(1, 7), keep=2, metrics={1: 0.5, 2: 0.1, 4: 0.3, 6: 0.4})
  assert checkpoints.training_steps(str(tmp_path / 'checkpoints')) == [2, 5, 6]
  # The best among the latest: nothing else is kept.
  _training_run(str(tmp_path / 'b'), range(1, 5), keep=2, metrics={1: 0.5, 2: 0.4, 4: 0.1})
  assert checkpoints.training_steps(str(tmp_path / 'b' / 'checkpoints')) == [3, 4]


def test_load_model_of_a_training_workdir(tmp_path, variables):
  _training_run(str(tmp_path), [2, 4])
  params, meta = checkpoints.load_model(str(tmp_path))
  _assert_trees_equal(params, {'params': _state(4)['params']})
  assert meta == dict(META, config={'seed': 0}, step=4)
  params, meta = checkpoints.load_model(str(tmp_path), step=2)
  _assert_trees_equal(params, {'params': _state(2)['params']})
  assert meta['step'] == 2


# ---- Finding a model ---------------------------------------------------------------------------

def test_locate_every_layout(tmp_path, monkeypatch, variables):
  model = checkpoints.save_model(str(tmp_path / 'model'), variables, META)
  workdir = str(tmp_path / 'run')
  _training_run(workdir, [2, 4])
  ckpts = os.path.join(workdir, 'checkpoints')
  latest = checkpoints.Location(os.path.join(ckpts, '4'), 'training', workdir, 4)
  second = checkpoints.Location(os.path.join(ckpts, '2'), 'training', workdir, 2)
  assert checkpoints.locate(model) == checkpoints.Location(model, 'model')
  assert checkpoints.locate(workdir) == latest
  assert checkpoints.locate(workdir, step=2) == second
  assert checkpoints.locate(ckpts) == latest
  assert checkpoints.locate(ckpts, step=2) == second
  assert checkpoints.locate(os.path.join(ckpts, '2')) == second
  monkeypatch.chdir(tmp_path)  # relative paths are made absolute
  assert checkpoints.locate('run') == latest
  # A step directory outside a workdir's checkpoints/ (copied elsewhere) has no workdir.
  shutil.copytree(os.path.join(ckpts, '4'), tmp_path / 'copy')
  assert checkpoints.locate(str(tmp_path / 'copy')) == checkpoints.Location(str(tmp_path / 'copy'), 'training')


def test_locate_says_what_it_found_instead(tmp_path):
  workdir = str(tmp_path / 'run')
  _training_run(workdir, [2, 4])
  ckpts = os.path.join(workdir, 'checkpoints')
  with pytest.raises(CheckpointError, match=r'has no checkpoint of step 3; it has steps \[2, 4\]'):
    checkpoints.locate(workdir, step=3)
  (tmp_path / 'weights.pth').write_bytes(b'not a directory')
  with pytest.raises(CheckpointError, match=r'weights.pth is a file; .*convert.torch_to_flax'):
    checkpoints.locate(str(tmp_path / 'weights.pth'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointError, match=r'empty is not a kpjax checkpoint: expected a model directory'):
    checkpoints.locate(str(tmp_path / 'empty'))
  with pytest.raises(CheckpointError, match=r'nowhere does not exist'):
    checkpoints.locate(str(tmp_path / 'nowhere'))
  # orbax writes a step under a temporary name and renames it when complete: until then it is no step.
  os.rename(os.path.join(ckpts, '4'), os.path.join(ckpts, '4.orbax-checkpoint-tmp-1733280000'))
  assert checkpoints.training_steps(ckpts) == [2]
  assert checkpoints.locate(workdir).step == 2
  os.makedirs(os.path.join(ckpts, '6', 'metadata'))  # a step directory without its state
  assert checkpoints.locate(workdir).step == 2
  shutil.rmtree(os.path.join(ckpts, '2'))
  with pytest.raises(CheckpointError, match=r'checkpoints holds no finished checkpoint yet'):
    checkpoints.locate(workdir)


def test_read_metadata_reads_no_array(tmp_path, variables):
  path = checkpoints.save_model(str(tmp_path / 'm'), variables, dict(META, source='x'))
  for name in os.listdir(os.path.join(path, 'params')):  # the arrays go; the item's directory stays
    target = os.path.join(path, 'params', name)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
  assert checkpoints.read_metadata(path) == dict(META, source='x')
  with pytest.raises(CheckpointError, match=r'cannot read the checkpoint in .*m: '):
    checkpoints.load_model(path)
  (tmp_path / 'e').mkdir()
  with pytest.raises(CheckpointError, match='is not a kpjax checkpoint'):
    checkpoints.read_metadata(str(tmp_path / 'e'))


def test_load_model_refuses_metadata_that_describes_no_model(tmp_path, variables):
  path = checkpoints.save_model(str(tmp_path / 'm'), variables, META)
  # Damaged by hand after saving: the metadata no longer describes a model.
  meta_file = os.path.join(path, 'metadata', 'metadata')
  with open(meta_file) as f:
    text = f.read()
  with open(meta_file, 'w') as f:
    f.write(text.replace('"n_locations": 7', '"n_locations": 9'))
  with pytest.raises(CheckpointError, match=r'm/metadata: n_locations 9 does not fit category'):
    checkpoints.load_model(path)


# ---- Checking parameters against the model -----------------------------------------------------

def _replace(tree, path, value):
  """A copy of `tree` with the leaf at `path` (keys) replaced by `value` (None: removed)."""
  tree = dict(tree)
  if len(path) > 1:
    tree[path[0]] = _replace(tree[path[0]], path[1:], value)
  elif value is None:
    del tree[path[0]]
  else:
    tree[path[0]] = value
  return tree


def test_check_fits_names_the_first_mismatching_parameter(net, variables):
  checkpoints.check_fits(net, variables, 'ok')  # the right parameters pass
  hm = ('params', 'hm_conv', 'kernel')
  channels = variables['params']['hm_conv']['kernel'].shape[2]  # the last stage's output channels
  bias = ('params', 'fcn', 'model1_0_1', 'conv2_1', 'bias')  # (8,) at width 1/16
  cases = [
      (_replace(variables, hm, np.zeros((1, 1, channels, 4), np.float32)),
       rf"\['params'\]\['hm_conv'\]\['kernel'\] is \(1, 1, {channels}, 4\) in the checkpoint, "
       rf"\(1, 1, {channels}, 7\) expected"),
      (_replace(variables, bias, None), r"\['conv2_1'\]\['bias'\] is missing in the checkpoint, \(8,\) expected"),
      (_replace(variables, ('params', 'extra'), np.zeros(2)), r"\['params'\]\['extra'\] is \(2,\) in the "
                                                                 r'checkpoint, not a parameter expected'),
      # Two differ: the one first in key order ('fcn' < 'hm_conv') is named.
      (_replace(_replace(variables, hm, np.zeros((1, 1, channels, 4))), bias, np.zeros(3)),
       r"^model.pth does not hold the network its metadata describes: \['params'\]\['fcn'\]\['model1_0_1'\]"
       r"\['conv2_1'\]\['bias'\] is \(3,\)"),
  ]
  for bad, message in cases:
    with pytest.raises(CheckpointError, match=message):
      checkpoints.check_fits(net, bad, 'model.pth')


def test_check_metadata_is_the_model_spec(variables):
  spec = checkpoints.check_metadata(META)
  assert (spec.category, spec.n_locations, spec.width, spec.num_stages, spec.input_size) == ('trousers', 7, 0.0625,
                                                                                             1, 16)
  assert spec.metadata() == META and kp.num_keypoints(spec.category) == 7
  with pytest.raises(CheckpointError, match='lacks input_size'):
    checkpoints.check_metadata({k: v for k, v in META.items() if k != 'input_size'})
