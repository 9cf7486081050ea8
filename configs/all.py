"""One model for every garment: 24 outputs, keypoints outside an image's category masked."""

from kpjax.configs import base


def get_config():
  config = base.get_config()
  config.category = 'all'
  return config
