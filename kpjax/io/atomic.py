"""Atomic writes of files and directories: a reader sees the old content or the new, never half of one.

Everything new is written into a private scratch directory beside the target (same file system, named
`.<name>.tmp-<pid>-<random>`), synced to disk, and renamed into place. The old content stays until the
new one is complete and in place; a failure at any step, the final rename included, leaves the old
content whole and no temporary paths behind.

    with staged_file('preds.csv') as tmp: image.save(tmp, format='PNG')  # writers that want a path
    with open_file('scores.json') as f: json.dump(m, f)                   # writers that want a handle
    write_text('out.csv', text); write_bytes('x.bin', data)
    with staged_dir('model', replace=force) as new: build_into(new)       # whole directories

Files are moved with os.replace (atomic, replaces a file on every platform). Directories are moved with
os.rename: on POSIX it replaces only an empty directory and fails on a non-empty one (ENOTEMPTY/EEXIST),
on Windows it never replaces; so replacing a directory is done in steps: the old one is moved aside
(`.<name>.old-<pid>-<random>`), the new one moved in, and only then the old one deleted; if moving the
new one in fails, the old one is moved back.

On an object store (gs://, kpjax.io.paths) there is no rename, but an object appears whole when its upload
completes. A staged file is written to a local temporary file and uploaded as one object. A staged directory
is built in a local temporary directory, uploaded object by object, and then marked complete by one last
object, `commit_success.txt` (paths.COMMIT_MARKER, orbax's name for the same thing): readers
(paths.is_complete) take a directory without it for one that is not there. Replacing one removes the old
marker first, so that a failure part-way leaves a directory that reads as incomplete, never as whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
import warnings
from typing import IO, Iterator

from kpjax.errors import TargetExistsError
from kpjax.io import paths


def _abspath(path: str | os.PathLike) -> str:
  return os.fspath(paths.resolve(path))


def _exists(path: str) -> bool:
  return paths.resolve(path).exists() if paths.is_remote(path) else os.path.lexists(path)


def check_target(path: str | os.PathLike, *, replace: bool, flag: str,
                 error: type[Exception] = TargetExistsError) -> str:
  """Returns the absolute `path`; raises `error` if it exists and not `replace` (`flag` is the CLI's option
  that allows replacing, e.g. '--force'). Callers check early, before slow work; staged_dir checks again."""
  path = _abspath(path)
  if _exists(path) and not replace:
    raise error(f'{path} already exists; choose another path, or pass {flag} to replace it')
  return path


@contextlib.contextmanager
def scratch_dir(beside: str | os.PathLike) -> Iterator[str]:
  """A new private directory beside `beside` (so on its file system; a local temporary one for a gs://
  `beside`), removed with all it holds on exit."""
  beside = _abspath(beside)
  if paths.is_remote(beside):
    path = tempfile.mkdtemp(prefix=f'.{os.path.basename(beside)}.tmp-{os.getpid()}-')
    try:
      yield path
    finally:
      _remove_tree(path)
    return
  parent = os.path.dirname(beside)
  os.makedirs(parent, exist_ok=True)
  while True:
    path = _sibling(beside, 'tmp')
    try:
      os.mkdir(path, 0o700)
      break
    except FileExistsError:
      continue
  try:
    yield path
  finally:
    _remove_tree(path)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path for the body to write `path`'s new content to (e.g. PIL's save, torch.save);
  when the body returns, the file is synced and renamed over `path` (gs://: uploaded as one object).
  Nothing changes if the body raises."""
  path = _abspath(path)
  with scratch_dir(path) as scratch:
    new = os.path.join(scratch, os.path.basename(path))
    yield new
    if paths.is_remote(path):
      paths.upload_file(new, path)
      return
    _fsync(new)
    os.replace(new, path)
  _fsync(os.path.dirname(path))


@contextlib.contextmanager
def open_file(path: str | os.PathLike, mode: str = 'w', encoding: str | None = 'utf-8') -> Iterator[IO]:
  """Like open(path, mode) for writing ('w' or 'wb'), but `path` changes only when the block completes."""
  if mode not in ('w', 'wb'):
    raise ValueError(f"open_file writes whole files: mode must be 'w' or 'wb', not {mode!r}")
  with staged_file(path) as new:
    with open(new, mode, encoding=None if 'b' in mode else encoding) as f:
      yield f


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
  """Writes `data` to `path` atomically; returns the absolute path."""
  with open_file(path, 'wb') as f:
    f.write(data)
  return _abspath(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = 'utf-8') -> str:
  """Writes `text` to `path` atomically, newlines untranslated; returns the absolute path."""
  return write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, *, replace: bool = False, flag: str = '--force',
               error: type[Exception] = TargetExistsError, first_wins: bool = False) -> Iterator[str]:
  """Yields a path (not yet existing) where the body builds `path`'s new directory; when the body returns,
  it is synced and moved to `path`.

  An existing `path` raises `error` (see check_target) before the body runs, unless `replace`: then the
  old directory is swapped out only once the new one is complete, and kept if any step fails. With
  `first_wins`, several processes may build the same `path` at once: the first to finish moves its copy
  in, the others discard theirs without error (the caller checks what is there afterwards).
  """
  if replace and first_wins:
    raise ValueError('staged_dir: replace and first_wins exclude each other')
  path = _abspath(path)
  if not first_wins:
    check_target(path, replace=replace, flag=flag, error=error)
  with scratch_dir(path) as scratch:
    new = os.path.join(scratch, os.path.basename(path))
    yield new
    if not os.path.isdir(new):
      raise FileNotFoundError(f'staged_dir: nothing was built at {new} for {path}')
    if paths.is_remote(path):
      _publish(new, path, replace=replace, first_wins=first_wins, flag=flag, error=error)
      return
    _fsync_tree(new)
    if replace and os.path.lexists(path):
      _swap(new, path)
    else:
      try:
        os.rename(new, path)
      except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR) or not os.path.lexists(path):
          raise
        if not first_wins:  # it appeared while we were building
          check_target(path, replace=False, flag=flag, error=error)
          raise
  _fsync(os.path.dirname(path))


def _publish(new: str, path: str, *, replace: bool, first_wins: bool, flag: str, error: type[Exception]) -> None:
  """Uploads the local directory `new` to the gs:// directory `path`, marked complete last (module docstring)."""
  target = paths.resolve(path)
  if target.exists():
    if first_wins and paths.is_complete(target):
      return  # another process's copy is in place
    if not (replace or first_wins):  # it appeared while we were building
      check_target(path, replace=False, flag=flag, error=error)
    if replace:
      marker = target.joinpath(paths.COMMIT_MARKER)
      if marker.exists():
        marker.unlink()  # from here on the old directory reads as incomplete
      target.rmtree()
  paths.upload_tree(new, target, exclude=(paths.COMMIT_MARKER,))
  target.joinpath(paths.COMMIT_MARKER).write_text(f'kpjax: {path} is complete\n')


def _swap(new: str, path: str) -> None:
  """Moves `path` aside and `new` to `path`, then deletes the old one; if moving `new` in fails, moves
  the old one back, so that `path` is never missing."""
  aside = _sibling(path, 'old')
  os.rename(path, aside)
  try:
    os.rename(new, path)
  except BaseException as e:
    try:
      os.rename(aside, path)
    except OSError as back:
      raise OSError(f'replacing {path} failed ({e}), and so did putting the old one back ({back}); the old '
                    f'content is in {aside}: move it back to {path}') from e
    raise
  _remove_tree(aside)


def _sibling(path: str, kind: str) -> str:
  """A name beside `path` that no other process or call picks: hidden, with our pid and a random part."""
  parent, name = os.path.split(path)
  return os.path.join(parent, f'.{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}')


def _remove_tree(path: str) -> None:
  """Removes a temporary or replaced file or directory; warns (rather than raise over the error in
  flight, or fail a write that is already in place) if that fails."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
      os.unlink(path)
  if os.path.lexists(path):
    warnings.warn(f'could not remove {path}; delete it by hand', RuntimeWarning)


def _fsync(path: str) -> None:
  """Flushes a file's or a directory's entries to disk, so a rename never outlives the data it points to."""
  is_dir = os.path.isdir(path)
  fd = os.open(path, os.O_RDONLY | (getattr(os, 'O_DIRECTORY', 0) if is_dir else 0))
  try:
    os.fsync(fd)
  except OSError as e:
    if not (is_dir and e.errno in (errno.EINVAL, errno.ENOTSUP)):  # some file systems cannot sync directories
      raise
  finally:
    os.close(fd)


def _fsync_tree(root: str) -> None:
  for directory, _, files in os.walk(root):
    for name in files:
      if not os.path.islink(os.path.join(directory, name)):
        _fsync(os.path.join(directory, name))
    _fsync(directory)
