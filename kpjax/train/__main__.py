"""`python -m kpjax.train`: see kpjax.cli.train."""

import sys

from kpjax.cli.train import main

sys.exit(main())
