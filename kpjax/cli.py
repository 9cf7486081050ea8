"""What kpjax's command-line tools share: a user's mistake is one `error:` line and exit 2, no traceback."""

from __future__ import annotations

import sys
from typing import Callable


def run_reporting_errors(run: Callable[..., int], *args) -> int:
  """Returns run(*args); ValueErrors (the project's user-facing errors: bad files, configs, checkpoints,
  data) and OSErrors become one line on stderr and exit status 2."""
  try:
    return run(*args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # unreadable or unwritable files
    print(f'error: {e.filename}: {e.strerror}' if e.filename else f'error: {e}', file=sys.stderr)
    return 2
