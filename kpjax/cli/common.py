"""What every kpjax command-line tool shares: flag parsing, the `--config` flags, and how a run ends.

Each CLI (`kpjax.train`, `kpjax.evaluate`, `kpjax.predict`, `kpjax.export`, `kpjax.data.build`,
`kpjax.data.synthetic`, `convert.torch_to_flax`, `convert.flax_to_torch`; the first six in kpjax/cli/,
one module each) is a thin `main(argv)`: it
parses its flags with `ArgumentParser` (`parse` also loads `--config FILE` with its
`--config.FIELD=VALUE` overrides through ml_collections' config flags, as flax's examples do) and
calls one library function through `run`. Exit statuses, the same for the same kind of failure:

  0    success;
  1    the run went through but failed or is incomplete (kpjax.errors.RunFailed: training diverged,
       images unreadable, the storage service kept failing);
  2    a user's mistake: a bad flag, config, file, checkpoint or dataset (kpjax.errors.UserError, any
       ValueError, OSError; for gs:// paths also no such bucket, no credentials, permission denied:
       kpjax.io.paths): one `error: ...` line on stderr, no traceback, nothing written;
  130  interrupted (Ctrl-C) before anything could be saved.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from kpjax.errors import ConfigFileError, RunFailed

OK = 0
RUN_FAILED = 1
USAGE_ERROR = 2
INTERRUPTED = 130

# Frames of these packages are never a config file's own code.
_LIBRARY_FRAMES = (os.sep + 'ml_collections' + os.sep, os.sep + 'absl' + os.sep, '<frozen ', os.sep + 'importlib' + os.sep)


def error(message: str, status: int = USAGE_ERROR) -> NoReturn:
  """Reports `message` as one `error:` line on stderr and exits with `status`."""
  sys.exit(report(message, status))


class ArgumentParser(argparse.ArgumentParser):
  """argparse with kpjax's error convention: one `error:` line and exit status 2, no usage dump."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('allow_abbrev', False)
    kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str) -> NoReturn:
    error(f'{message} ({self.prog} --help lists the flags)')

  def add_config_flag(self, required: bool = True, help_text: str = '') -> None:
    """`--config FILE` (configs/X.py) plus any number of `--config.FIELD=VALUE` overrides."""
    self.add_argument('--config', required=required, metavar='FILE',
                      help=help_text or 'a config file such as configs/trousers.py; --config.FIELD=VALUE overrides '
                      'its fields (e.g. --config.batch_size=8)')


def parse(parser: ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses argv (default sys.argv[1:]); `args.config` becomes the loaded ConfigDict (or None) and
  `args.config_file` the file's path as given (for messages).

  A bad flag, a config file that does not load or an override that does not fit it exits with one
  `error:` line (status 2).
  """
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
  has_config = 'config' in vars(args)
  overrides, unknown = _split_overrides(rest) if has_config else ([], list(rest))
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  if has_config:
    if overrides and not args.config:
      parser.error('--config.FIELD=VALUE overrides need --config FILE')
    args.config_file = args.config
    try:
      args.config = load_config(args.config, overrides) if args.config else None
    except ConfigFileError as e:
      error(str(e))
  return args


def _split_overrides(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
  """(`--config.FIELD[=VALUE]` tokens, with a separate VALUE token where one follows; the rest)."""
  overrides, unknown = [], []
  i = 0
  while i < len(tokens):
    token = tokens[i]
    if token.startswith(('--config.', '--noconfig.')):
      overrides.append(token)
      if '=' not in token and i + 1 < len(tokens) and not tokens[i + 1].startswith('--'):
        overrides.append(tokens[i + 1])
        i += 1
    else:
      unknown.append(token)
    i += 1
  return overrides, unknown


def load_config(path: str, overrides: Sequence[str] = ()) -> Any:
  """`get_config()` of the config file at `path` with ml_collections overrides (`--config.FIELD=VALUE`).

  Raises ConfigFileError naming the file (and, for a bug in it, the file and line) or the override.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ConfigFileError(f'config file {path} does not exist; expected a file such as configs/trousers.py')
  argv = ['kpjax', f'--config={path}', *overrides]
  values = flags.FlagValues()
  # ml_collections reads the overrides from `sys_argv` (sys.argv by default).
  config_flags.DEFINE_config_file('config', None, 'the config file', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)
    config = values.config
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigFileError(_describe_failure(path, overrides, e)) from None
  if config is None:
    raise ConfigFileError(f'config {path}: get_config() returned None; it must return an ml_collections.ConfigDict')
  return config


def _describe_failure(path: str, overrides: Sequence[str], e: BaseException) -> str:
  """What went wrong loading a config: an override (naming it) or the file's own code (`FILE, line N:
  Type: message` of its innermost frame; ml_collections re-raises some errors with the original as
  __context__)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  root = e
  while root.__context__ is not None and 'Error whilst parsing config file' in str(root):
    root = root.__context__
  if isinstance(root, SyntaxError) and root.filename:
    return f'cannot load config {path}: {root.filename}, line {root.lineno}: SyntaxError: {root.msg}'
  frames = [f for f in traceback.extract_tb(root.__traceback__)
            if f.filename != __file__ and not any(p in f.filename for p in _LIBRARY_FRAMES)]
  if root is e and (isinstance(e, flags.Error) or not frames):
    if isinstance(e, (AttributeError, KeyError)) and e.args:
      field = str(e.args[0]).strip('\'"')
      problem = f'the config has no field {field}'
    else:
      problem = _one_line(e)
    return f'bad config override ({" ".join(overrides)}): {problem}'
  where = f'{frames[-1].filename}, line {frames[-1].lineno}: ' if frames else ''
  return f'cannot load config {path}: {where}{type(root).__name__}: {_one_line(root)}'


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split()) or type(e).__name__


def quiet_logging() -> None:
  """Only warnings from absl/orbax/jax logging (orbax logs every save at INFO); no tracebacks of the errors the
  command reports itself: gcsfs's logger logs one for each failed request, orbax one for a failed background
  save."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger('gcsfs').setLevel(std_logging.CRITICAL)
  absl_logger = std_logging.getLogger('absl')
  if _no_orbax_tracebacks not in absl_logger.filters:
    absl_logger.addFilter(_no_orbax_tracebacks)


def _no_orbax_tracebacks(record) -> bool:
  return not (record.exc_info and f'{os.sep}orbax{os.sep}' in record.pathname)


def run(fn: Callable[..., int | None], *args, **kwargs) -> int:
  """Runs a CLI's library call and turns its failure into kpjax's exit statuses (module docstring).

  `fn` returns an exit status (None = 0). A user's mistake (ValueError, OSError) and RunFailed print
  one `error:` line; Ctrl-C prints one too. So does a Cloud Storage failure (kpjax.io.paths.storage_failure).
  """
  from kpjax.io import paths  # pylint: disable=g-import-not-at-top
  quiet_logging()
  try:
    status = fn(*args, **kwargs)
  except RunFailed as e:
    return report(str(e), RUN_FAILED)
  except KeyboardInterrupt:
    return report('interrupted', INTERRUPTED)
  except Exception as e:  # pylint: disable=broad-except
    failure = paths.storage_failure(e)
    if failure is not None:
      return report(str(failure), RUN_FAILED if isinstance(failure, RunFailed) else USAGE_ERROR)
    if isinstance(e, ValueError):
      return report(str(e), USAGE_ERROR)
    if isinstance(e, OSError):  # unreadable or unwritable files
      return report(f'{e.filename}: {e.strerror}' if e.filename and e.strerror else str(e), USAGE_ERROR)
    raise
  return OK if status is None else int(status)


def report(message: str, status: int) -> int:
  """Prints `message` as one `error:` line on stderr (white space folded) and returns `status`."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  return status
