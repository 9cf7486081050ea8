"""Flag parsing for the converter CLIs: user errors become one `error: ...` line and exit status 2."""

from __future__ import annotations

import sys

from absl import flags
from absl import logging


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config file reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f'error: {e}\nPass --helpshort to see the flags.\n')
  except Exception as e:  # ml_collections raises OSError/AttributeError/... for bad config files and overrides
    message = ' '.join(str(e).replace('\\n', ' ').split()) or type(e).__name__
    sys.stderr.write(f'error: bad --config file or override: {message}\n')
  sys.exit(2)


def quiet_logging() -> None:
  """Only warnings from absl/orbax/jax logging unless --verbosity was given (orbax logs every step at INFO)."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
