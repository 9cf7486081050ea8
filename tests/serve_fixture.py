"""A slim random model for the serving tests: quick to compile in every batch shape kpjax.serve compiles."""

from __future__ import annotations

from kpjax.data import conventions
from kpjax.data import keypoints as kp
from kpjax.data.spec import ModelSpec
from kpjax.inference import checkpoints
from kpjax.model import network as model_lib

import test_predict as tp

SIZE, WIDTH = 32, 0.0625  # 4 to 32 channels, one stage: ~5 ms an image on a 2-core CPU


def small_model(directory: str, category: str = 'all', seed: int = 2, keypoint_set=kp.FASHIONAI) -> str:
  """A model directory of `keypoint_set` (FashionAI's by default) whose random network answers differently for
  different images (test_predict._peaky)."""
  spec = ModelSpec(category=category, width=WIDTH, num_stages=1, input_size=SIZE,
                   convention=conventions.get('kpjax'), keypoint_set=keypoint_set)
  net = model_lib.CoordRegressionNetwork(spec.n_locations, width=WIDTH, num_stages=1)
  variables = tp._peaky(net, tp._init(net, seed))
  return checkpoints.save_model(directory, variables, spec.metadata())
