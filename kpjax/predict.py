"""`python -m kpjax.predict`: see kpjax.cli.predict (the library: kpjax.inference.prediction)."""

import sys

from kpjax.cli.predict import main

if __name__ == '__main__':
  sys.exit(main())
