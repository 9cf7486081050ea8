"""`python -m kpjax.data.synthetic`: see kpjax.cli.synthetic."""

import sys

from kpjax.cli import synthetic

sys.exit(synthetic.main())
