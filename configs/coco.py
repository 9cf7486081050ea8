"""A model of any keypoint set, trained on a COCO-format dataset built by `python -m kpjax.data.build --format coco`.

    python -m kpjax.train --config configs/coco.py --workdir W --config.data.tfds_name=NAME --config.data.data_dir=D

The dataset's keypoint set (its metadata) decides the model's outputs, masks and flips: one model over
every category (keypoints outside an object's category masked, as configs/all.py does for FashionAI), or
one per category with --config.category=NAME. Each example is one object cropped top-down from its box
(kpjax.data.build.coco). Evaluation reports COCO's keypoint AP (eval/ap, eval/ap/<category>; NE too when the
set defines a normalising pair), and the best checkpoint kept is the one of the highest eval/ap.
"""

from kpjax.configs import base


def get_config():
  config = base.get_config()
  config.category = 'all'  # or one category of the dataset's keypoint set
  config.data.source = 'tfds'
  config.data.tfds_name = 'coco_keypoints'  # the --name the dataset was built with
  config.data.eval_split = 'validation'
  # A crop holds one object: a 256x256 input is COCO top-down's usual resolution (e.g. 256x192).
  config.input_size = 256
  return config
