"""`python -m kpjax.data.build`: see kpjax.cli.build."""

import sys

from kpjax.cli import build

sys.exit(build.main())
