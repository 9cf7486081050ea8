"""`python -m kpjax.serve`: see kpjax.cli.serve (the app: kpjax.serve.app)."""

import sys

from kpjax.cli.serve import main

if __name__ == '__main__':
  sys.exit(main())
