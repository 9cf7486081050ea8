"""kpjax: the KPDEM clothing keypoint detector (CPM + DSNT) in JAX/Flax."""

__version__ = '0.1.0'
