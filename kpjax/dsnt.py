"""dsntnn's API under its own name: `kpjax.dsnt` is kpjax.model.dsnt (DSNT, its losses and regularisers)."""

from kpjax.model.dsnt import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
from kpjax.model.dsnt import __all__  # noqa: F401
