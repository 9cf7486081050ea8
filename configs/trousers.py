"""KPDEM's trousers model: 7 keypoints, trained on the FashionAI data (TFDS, built by kpjax.data.build)."""

from kpjax.configs import base


def get_config():
  config = base.get_config()
  config.category = 'trousers'
  return config
