"""The demo: synthetic garments of all five categories, a slim KPDEM, minutes on a 2-core CPU.

`make demo` runs `python -m kpjax.train --config configs/demo.py --workdir workdir/demo`: it draws
the garments into the workdir (kpjax.data.synthetic), builds them as the TFDS dataset the real data
uses, trains one 24-keypoint model (keypoints outside each garment's category masked) and reports
FashionAI's NE per category. Its measured time and NE are in the README's Quick start.
"""

from kpjax.configs import base


def get_config():
  config = base.get_config()
  config.category = 'all'
  config.data.source = 'synthetic'
  config.data.synthetic_num_images = 2000
  config.data.num_eval_images = 200

  # Small enough for minutes on a 2-core CPU, and still learning (measured: docs/performance.md, the demo's
  # time): a 32x32 input, 3/32 of the channels (6 to 48), 2 CPM stages.
  config.input_size = 32
  config.model.width = 0.09375
  config.model.num_stages = 2

  config.batch_size = 16
  config.eval_batch_size = 50
  config.total_steps = 700
  config.learning_rate = 3e-3
  config.warmup_steps = 50
  config.log_every_steps = 25
  config.eval_every_steps = 350
  config.checkpoint_every_steps = 350
  config.num_vis_images = 8
  return config
