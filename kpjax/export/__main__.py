"""`python -m kpjax.export`: see kpjax.cli.export."""

import sys

from kpjax.cli.export import main

sys.exit(main())
