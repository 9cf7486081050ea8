"""kpjax.io.atomic: whole new content or the old one intact, whatever step fails, and no temporary paths left."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from kpjax.io import atomic
from kpjax.inference import checkpoints as checkpoint
from rename_faults import fail_renames


def tree(path):
  """{relative path: content} of every file under `path`."""
  out = {}
  for directory, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(directory, name)) as f:
        out[os.path.relpath(os.path.join(directory, name), path)] = f.read()
  return out


def make_old(tmp_path):
  target = tmp_path / 'out'
  (target / 'sub').mkdir(parents=True)
  (target / 'a.txt').write_text('old a')
  (target / 'sub' / 'b.txt').write_text('old b')
  return str(target), tree(target)


def build_new(new):
  os.makedirs(os.path.join(new, 'sub'))
  with open(os.path.join(new, 'sub', 'c.txt'), 'w') as f:
    f.write('new c')


# ---- Files ---------------------------------------------------------------------------------------

def test_file_writers_write_whole_files(tmp_path):
  path = tmp_path / 'deep' / 'f.txt'
  assert atomic.write_text(path, 'one\ntwo\r\n') == str(path)
  assert path.read_bytes() == b'one\ntwo\r\n'  # newlines untranslated
  atomic.write_bytes(path, b'\x00\x01')
  assert path.read_bytes() == b'\x00\x01'
  with atomic.open_file(path) as f:
    json.dump({'ne': 0.5}, f)
  assert json.loads(path.read_text()) == {'ne': 0.5}
  with atomic.staged_file(path) as tmp:
    assert not os.path.exists(tmp) and os.path.dirname(os.path.dirname(tmp)) == str(path.parent)
    np.savetxt(tmp, np.arange(3))  # a writer that wants a path of its own
  assert np.loadtxt(str(path)).tolist() == [0, 1, 2]
  assert os.listdir(path.parent) == ['f.txt']
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not a private temp file's 0600
  with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
    with atomic.open_file(path, 'a'):
      pass


def test_failing_writer_leaves_the_old_file(tmp_path):
  path = tmp_path / 'f.txt'
  path.write_text('old')
  with pytest.raises(RuntimeError, match='writer broke'):
    with atomic.open_file(path) as f:
      f.write('half of the new')
      f.flush()
      raise RuntimeError('writer broke')
  assert path.read_text() == 'old' and os.listdir(tmp_path) == ['f.txt']


@pytest.mark.parametrize('fn', ['replace', 'rename'])
def test_failing_final_rename_leaves_the_old_file(tmp_path, monkeypatch, fn):
  path = tmp_path / 'f.txt'
  path.write_text('old')
  fail_renames(monkeypatch, path, {1}, fn=fn)
  if fn == 'replace':
    with pytest.raises(OSError, match='injected'):
      atomic.write_text(path, 'new')
    assert path.read_text() == 'old'
  else:  # files are moved with os.replace: os.rename failing does not matter
    atomic.write_text(path, 'new')
    assert path.read_text() == 'new'
  assert os.listdir(tmp_path) == ['f.txt']


# ---- Directories ---------------------------------------------------------------------------------

def test_new_and_replaced_directories(tmp_path):
  fresh = str(tmp_path / 'fresh')
  with atomic.staged_dir(fresh) as new:
    assert not os.path.exists(new) and not os.path.exists(fresh)
    build_new(new)
  assert tree(fresh) == {'sub/c.txt': 'new c'}
  target, _ = make_old(tmp_path)
  with atomic.staged_dir(target, replace=True) as new:
    build_new(new)
    assert tree(target)['a.txt'] == 'old a'  # the old one stays while the new one is built
  assert tree(target) == {'sub/c.txt': 'new c'}
  assert sorted(os.listdir(tmp_path)) == ['fresh', 'out']


def test_existing_directory_is_refused_without_the_flag(tmp_path):
  target, old = make_old(tmp_path)
  ran = []
  with pytest.raises(atomic.TargetExistsError, match=r'out already exists.*pass --overwrite to replace it'):
    with atomic.staged_dir(target, flag='--overwrite') as new:
      ran.append(new)
  assert not ran and tree(target) == old and os.listdir(tmp_path) == ['out']

  class MyError(ValueError):
    pass

  with pytest.raises(MyError, match='--force'):
    atomic.check_target(target, replace=False, flag='--force', error=MyError)
  assert atomic.check_target(target, replace=True, flag='--force') == target


@pytest.mark.parametrize('failing', [{1}, {2}], ids=['first-rename', 'second-rename'])
def test_failing_rename_keeps_the_old_directory(tmp_path, monkeypatch, failing):
  target, old = make_old(tmp_path)
  seen = fail_renames(monkeypatch, target, failing)
  with pytest.raises(OSError, match='injected'):
    with atomic.staged_dir(target, replace=True) as new:
      build_new(new)
  assert tree(target) == old and os.listdir(tmp_path) == ['out']
  assert len(seen) == (1 if failing == {1} else 3)  # aside; or aside, in (fails), back


def test_failing_body_keeps_the_old_directory(tmp_path):
  target, old = make_old(tmp_path)
  with pytest.raises(RuntimeError, match='half built'):
    with atomic.staged_dir(target, replace=True) as new:
      build_new(new)
      raise RuntimeError('half built')
  assert tree(target) == old and os.listdir(tmp_path) == ['out']
  with pytest.raises(FileNotFoundError, match='nothing was built'):
    with atomic.staged_dir(target, replace=True):
      pass
  assert tree(target) == old and os.listdir(tmp_path) == ['out']


def test_when_putting_the_old_one_back_fails_too_the_error_says_where_it_is(tmp_path, monkeypatch):
  target, old = make_old(tmp_path)
  fail_renames(monkeypatch, target, {2, 3})
  with pytest.raises(OSError, match=r'the old content is in (\S+): move it back') as e:
    with atomic.staged_dir(target, replace=True) as new:
      build_new(new)
  aside = str(e.value).split('the old content is in ')[1].split(':')[0]
  assert tree(aside) == old and os.listdir(tmp_path) == [os.path.basename(aside)]


def test_first_wins(tmp_path):
  target = str(tmp_path / 'shared')
  with atomic.staged_dir(target, first_wins=True) as new:
    build_new(new)
    os.makedirs(os.path.join(target, 'theirs'))  # another process finished first
  assert os.listdir(target) == ['theirs'] and os.listdir(tmp_path) == ['shared']
  with pytest.raises(atomic.TargetExistsError, match='already exists'):  # without first_wins it is an error
    with atomic.staged_dir(str(tmp_path / 'other')) as new:
      build_new(new)
      os.makedirs(tmp_path / 'other' / 'theirs')
  assert os.listdir(tmp_path / 'other') == ['theirs'] and sorted(os.listdir(tmp_path)) == ['other', 'shared']
  with pytest.raises(ValueError, match='exclude each other'):
    with atomic.staged_dir(target, replace=True, first_wins=True):
      pass


# ---- Callers -------------------------------------------------------------------------------------

def _model(tmp_path, value, force=False):
  meta = {'category': 'skirt', 'n_locations': 4, 'width': 0.125, 'num_stages': 1, 'input_size': 64,
          'preprocessing': 'kpjax'}
  variables = {'params': {'hm_conv': {'kernel': np.full((1, 1, 8, 4), value, np.float32)}}}
  return checkpoint.save_model(str(tmp_path / 'model'), variables, meta, force=force)


def test_save_model_keeps_the_old_model_when_replacing_fails(tmp_path, monkeypatch):
  path = _model(tmp_path, 1.0)
  with pytest.raises(checkpoint.CheckpointError, match='already exists.*--force'):
    _model(tmp_path, 2.0)
  with monkeypatch.context() as m:
    fail_renames(m, path, {2})
    with pytest.raises(OSError, match='injected'):
      _model(tmp_path, 2.0, force=True)
  assert os.listdir(tmp_path) == ['model']
  assert checkpoint.load_model(path)[0]['params']['hm_conv']['kernel'].max() == 1.0
  _model(tmp_path, 3.0, force=True)
  assert checkpoint.load_model(path)[0]['params']['hm_conv']['kernel'].max() == 3.0
  assert os.listdir(tmp_path) == ['model']
