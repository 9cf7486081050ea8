"""`python -m kpjax.evaluate`: see kpjax.cli.evaluate (the library: kpjax.inference.evaluation)."""

import sys

from kpjax.cli.evaluate import main

if __name__ == '__main__':
  sys.exit(main())
