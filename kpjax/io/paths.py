"""Every path a user gives, local or in Cloud Storage (`gs://bucket/...`), as one type: etils.epath.Path.

    path = paths.resolve('gs://bucket/run')   # or '~/runs/x', 'runs/x' (made absolute), a pathlib.Path
    path.joinpath('metrics.jsonl').write_text(...); path.exists(); path.iterdir()

epath (which orbax uses too) reads gs:// through fsspec's gcsfs; `pip install 'kpjax[gcs]'` brings it and
google-cloud-storage (orbax deletes old checkpoints and tensorboardX writes event files with it). Without the
extra, a gs:// path is one UserError naming it. The first gs:// path of a bucket also checks, once per
process, that there are credentials (Application Default Credentials: `gcloud auth application-default
login`, GOOGLE_APPLICATION_CREDENTIALS, or a VM's service account) and that the bucket can be listed, so that
a typo or a missing role stops a command before it has done or written anything (StorageAccessError).

Emulators: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) points the clients at e.g.
http://127.0.0.1:9023, and no credentials are needed; TENSORSTORE_GCS_HTTP_URL (tensorstore, which writes
orbax's arrays) and CLOUD_STORAGE_EMULATOR_ENDPOINT (google-cloud-cpp in array_record, which reads TFDS
datasets) default to it, and gcsfs's bucket-layout probe (a gRPC API no emulator serves) is turned off
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false), when they are not set.

`storage_failure(e)` turns what the client libraries raise (gcsfs, tensorstore, google-cloud-storage,
array_record) into one kpjax error naming the path and the cause: StorageAccessError (a UserError, exit 2:
no such bucket, no credentials, permission denied) or StorageFailed (a RunFailed, exit 1: the service kept
failing after the libraries' own retries).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from typing import Iterator

from etils import epath

from kpjax.errors import RunFailed, StorageAccessError, StorageFailed, UserError

GCS_EXTRA = "pip install 'kpjax[gcs]'"
GCS_PREFIX = 'gs://'
COMMIT_MARKER = 'commit_success.txt'  # orbax's name for "this directory on an object store is complete"
ROLE = 'roles/storage.objectUser'  # what a run needs on its bucket: list, read, create and delete objects
_EMULATOR_DEFAULTS = ('TENSORSTORE_GCS_HTTP_URL', 'CLOUD_STORAGE_EMULATOR_ENDPOINT')
_SCHEME = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]+)://')

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` is in Cloud Storage (gs://)."""
  return os.fspath(path).startswith(GCS_PREFIX)


def resolve(path: PathLike) -> epath.Path:
  """The epath.Path of a user's path: gs://bucket/... as it is (checked: see the module docstring), a local
  one with '~' expanded and made absolute. Raises UserError for another scheme (s3://, http://...)."""
  text = os.fspath(path)
  if is_remote(text):
    _import_gcs(text)
    _check_bucket(bucket_of(text))
    return epath.Path(text)
  scheme = _SCHEME.match(text)
  if scheme:
    raise UserError(f'{text}: {scheme.group(1)}:// paths are not supported; use a local path or gs://bucket/...')
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def bucket_of(path: PathLike) -> str:
  """'bucket' of gs://bucket/...; UserError for a gs:// path without one."""
  text = os.fspath(path)
  bucket = text[len(GCS_PREFIX):].split('/', 1)[0]
  if not bucket:
    raise UserError(f'{text}: a Cloud Storage path needs a bucket: gs://BUCKET/...')
  return bucket


def join(path: PathLike, *parts: str) -> str:
  """`path`/`parts` as a string (what os.path.join does, for gs:// paths too)."""
  return os.fspath(epath.Path(os.fspath(path)).joinpath(*parts))


def is_complete(directory: PathLike) -> bool:
  """Whether `directory` is a whole directory: locally, that it is one (atomic.staged_dir renames it into
  place whole); on an object store, that its COMMIT_MARKER object is there (written after everything else)."""
  path = epath.Path(os.fspath(directory))
  if is_remote(path):
    return path.joinpath(COMMIT_MARKER).exists()
  return path.is_dir()


# ---- Objects <-> local files -------------------------------------------------------------------------

def filesystem():
  """The gcsfs filesystem (fsspec's cached instance) that epath uses for gs:// paths."""
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem('gs')


def upload_file(local: PathLike, remote: PathLike) -> None:
  """Copies a local file to the object `remote`; the object appears whole when the upload completes."""
  filesystem().put_file(os.fspath(local), os.fspath(remote))


LAST_FILES = ('dataset_info.json',)  # what TFDS readers look for: uploaded after the files it describes


def upload_tree(local_dir: PathLike, remote_dir: PathLike, exclude: tuple[str, ...] = ()) -> int:
  """Copies every file under `local_dir` to the same relative names under `remote_dir` (several at a time,
  files named in LAST_FILES after all others); returns how many. Empty directories have no objects and are
  not copied; `exclude` names relative paths to leave out."""
  local_dir, remote_dir = os.fspath(local_dir), os.fspath(remote_dir).rstrip('/')
  batches: tuple[list, list] = ([], [])
  for directory, _, files in os.walk(local_dir):
    for name in sorted(files):
      path = os.path.join(directory, name)
      relative = os.path.relpath(path, local_dir).replace(os.sep, '/')
      if relative not in exclude:
        batches[name in LAST_FILES].append((path, f'{remote_dir}/{relative}'))
  for batch in batches:
    if batch:
      filesystem().put([s for s, _ in batch], [t for _, t in batch])
  return sum(len(b) for b in batches)


def list_files(directory: PathLike) -> list[str]:
  """Every file under `directory`, recursively, in a stable order (folder by folder, names sorted;
  gs://: every object under the prefix, sorted)."""
  if is_remote(directory):
    root = os.fspath(resolve(directory)).rstrip('/')
    return sorted(f'{GCS_PREFIX}{p}' for p in filesystem().find(root) if not p.endswith('/'))
  out = []
  for dirpath, dirnames, filenames in os.walk(os.fspath(directory)):
    dirnames.sort()
    out += [os.path.join(dirpath, f) for f in sorted(filenames)]
  return out


def glob(pattern: str) -> list[str]:
  """The files a glob pattern matches, sorted ('**' matches across folders; gs://: gcsfs's glob)."""
  if is_remote(pattern):
    _check_bucket(bucket_of(pattern))
    fs = filesystem()
    return sorted(f'{GCS_PREFIX}{p}' for p in fs.glob(pattern) if fs.isfile(p))
  import glob as glob_lib  # pylint: disable=g-import-not-at-top
  return sorted(f for f in glob_lib.glob(pattern, recursive=True) if os.path.isfile(f))


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
  """A local file with `path`'s content: `path` itself when local, else a private temporary copy of the
  object (for readers that need a real file: zip archives, seeks), removed on exit. A kpjax error raised
  in the block that names the copy names `path` instead. A missing object is left for the reader to report
  (nothing is copied)."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  remote = resolve(path)
  scratch = tempfile.mkdtemp(prefix='kpjax-')
  local = os.path.join(scratch, remote.name)
  try:
    if remote.is_file():
      filesystem().get_file(os.fspath(remote), local)
    yield local
  except (UserError, RunFailed) as e:
    if e.args and isinstance(e.args[0], str) and local in e.args[0]:
      e.args = (e.args[0].replace(local, os.fspath(remote)),) + e.args[1:]
    raise
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


# ---- Checks and failures ---------------------------------------------------------------------------------

def _import_gcs(path: str) -> None:
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    for name in _EMULATOR_DEFAULTS:
      os.environ.setdefault(name, os.environ['STORAGE_EMULATOR_HOST'])
    os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')  # read when gcsfs is imported
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top,unused-import
    from google.cloud import storage  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise StorageAccessError(f'{path} is a Cloud Storage path, which needs the gcs extra ({e.name} is not '
                             f'installed): {GCS_EXTRA}') from None
  import fsspec  # pylint: disable=g-import-not-at-top
  # No cached listings: orbax writes its arrays through tensorstore, behind gcsfs's back.
  fsspec.config.conf.setdefault('gs', {}).setdefault('use_listings_cache', False)


@functools.lru_cache(maxsize=None)
def _check_credentials(path: str) -> None:
  """Application Default Credentials, unless an emulator is in use (once per process)."""
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    return
  import google.auth  # pylint: disable=g-import-not-at-top
  import google.auth.exceptions  # pylint: disable=g-import-not-at-top
  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise StorageAccessError(
        f'no Google Cloud credentials for {path}: {_one_line(e)}. Run `gcloud auth application-default login`, '
        'set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or run on a VM whose service account '
        f'has {ROLE} on the bucket (for an emulator, set STORAGE_EMULATOR_HOST)') from None


@functools.lru_cache(maxsize=None)
def _check_bucket(bucket: str) -> None:
  """That the extra is installed, there are credentials and `bucket` can be listed (once per bucket)."""
  path = f'{GCS_PREFIX}{bucket}'
  _import_gcs(path)
  _check_credentials(path)
  try:
    filesystem().call('GET', 'b/{}/o', bucket, maxResults=1, json_out=True)
  except Exception as e:  # pylint: disable=broad-except
    mapped = storage_failure(e, path, bucket_known=False)
    if mapped is None:
      raise
    raise mapped from None


def check_writable(directory: PathLike) -> None:
  """That objects can be created and deleted under the gs:// `directory` (a run saves and deletes
  checkpoints): writes and deletes one small object, before a run has done anything. Local: nothing."""
  if not is_remote(directory):
    return
  probe = resolve(directory).joinpath(f'.kpjax-write-check-{os.getpid()}')
  for action in ('create', 'delete'):
    try:
      probe.write_text('kpjax checks that it may write here\n') if action == 'create' else probe.unlink()
    except Exception as e:  # pylint: disable=broad-except
      mapped = storage_failure(e, os.fspath(directory), doing=f'{action} objects there')
      if mapped is None:
        raise
      raise mapped from None


def storage_failure(e: BaseException, path: PathLike | None = None, default: PathLike | None = None,
                    bucket_known: bool = True, doing: str = '') -> StorageAccessError | StorageFailed | None:
  """The kpjax error for a Cloud Storage failure `e` (from gcsfs, tensorstore, google-cloud-storage or
  array_record, anywhere in its chain of causes) at `path` (default: the gs:// path the error names, else
  `default`), or None when `e` is no storage failure. `doing`: what failed, e.g. 'create objects there'."""
  if isinstance(e, (UserError, RunFailed)):
    return None  # kpjax's own errors say what happened already
  where = os.fspath(path) if path is not None else _path_in(e) or (os.fspath(default) if default else 'Cloud Storage')
  for cause in _chain(e):
    kind, detail = _classify(cause)
    if kind is None:
      continue
    if kind == 'not_found':
      if bucket_known or not where.startswith(GCS_PREFIX):
        continue  # a missing object: for the caller to say what it expected
      return StorageAccessError(f'{where}: bucket {bucket_of(where)} does not exist (or is not visible to these '
                                'credentials); create it (gcloud storage buckets create gs://BUCKET) or fix the path')
    if kind == 'credentials':
      return StorageAccessError(f'{where}: the request was not authenticated ({detail}); set up Application Default '
                                'Credentials: gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS')
    if kind == 'permission':
      bucket = f'bucket {bucket_of(where)}' if where.startswith(GCS_PREFIX) else 'the bucket'
      return StorageAccessError(f'{where}: {f"cannot {doing}: " if doing else ""}permission denied ({detail}); '
                                f'the credentials need {ROLE} on {bucket}')
    return StorageFailed(f'{where}: the storage service failed ({detail}), after the client libraries\' retries')
  return None


def _chain(e: BaseException) -> Iterator[BaseException]:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


_HTTP_CODE = re.compile(r"http_response_code='?(\d{3})|HTTP (?:status|code|error)?\s*:?\s*(\d{3})")
_RETRYABLE_STATUS = re.compile(r'\b(UNAVAILABLE|DEADLINE_EXCEEDED)\b')  # tensorstore's, array_record's


def _classify(e: BaseException) -> tuple[str | None, str]:
  """('not_found' | 'credentials' | 'permission' | 'failed' | None, a short cause) of one exception."""
  module, text = type(e).__module__, _one_line(e)
  code = getattr(e, 'code', None)  # gcsfs's HttpError, google.api_core's errors: the HTTP status
  if isinstance(code, str) and code.isdigit():
    code = int(code)
  if not isinstance(code, int):
    match = _HTTP_CODE.search(text)
    code = int(next(g for g in match.groups() if g)) if match else None
  if module.startswith('google.auth'):
    return 'credentials', _short(text)
  if code == 401 or 'UNAUTHENTICATED' in text or 'Anonymous caller' in text:
    return 'credentials', _short(text)
  if text.startswith('Forbidden') and module == 'builtins':  # gcsfs: 'Forbidden: URL' and the service's message
    return 'permission', _short(' '.join(str(e).split('\n', 1)[-1].split()))
  if code == 403 or 'PERMISSION_DENIED' in text:
    return 'permission', _short(text)
  if code == 404 or isinstance(e, FileNotFoundError) or 'NOT_FOUND' in text:
    return 'not_found', _short(text)
  if isinstance(code, int) and code >= 500:
    return 'failed', f'HTTP {code}: {_short(text)}'
  if module.startswith(('aiohttp', 'requests', 'urllib3', 'google.api_core', 'gcsfs')) or \
      (module == 'builtins' and _RETRYABLE_STATUS.search(text)):
    return 'failed', _short(text)
  return None, ''


def _path_in(e: BaseException) -> str | None:
  """A gs:// path named by `e` or its causes (gcsfs names 'b/BUCKET/o/NAME' URLs), else None."""
  for cause in _chain(e):
    text = str(cause)
    match = re.search(r'gs://[^\s\'"]+', text)
    if match:
      return match.group(0)
    match = re.search(r'/b/([a-z0-9][a-z0-9._-]+)/o(?:/([^\s?\'"]+))?', text)
    if match:
      return f'{GCS_PREFIX}{match.group(1)}' + (f'/{_unquote(match.group(2))}' if match.group(2) else '')
  return None


def _unquote(text: str) -> str:
  import urllib.parse  # pylint: disable=g-import-not-at-top
  return urllib.parse.unquote(text)


def _short(text: str, limit: int = 160) -> str:
  text = text.split(' [http_response_body', 1)[0].split('\\n', 1)[0]
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split()) or type(e).__name__
