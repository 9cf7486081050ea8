"""Defaults for every kpjax run; category, `all` and `demo` configs override a few fields.

Use as `python -m kpjax.train --config configs/trousers.py --workdir DIR --config.batch_size=32`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Garment category: blouse, dress, outwear, skirt, trousers (one model each, as KPDEM), or
  # `all` (one model with 24 outputs; keypoints outside an image's category are masked).
  # The model's n_locations follows from it (kpjax.data.keypoints.num_keypoints).
  config.category = 'trousers'

  # ---- Data -----------------------------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  # 'tfds': the FashionAI release built by `python -m kpjax.data.build` into `data_dir`.
  # 'synthetic': procedural garments, generated and built under `synthetic_dir` when absent.
  config.data.source = 'tfds'
  config.data.tfds_name = 'fashionai_keypoints'
  config.data.data_dir = '~/tensorflow_datasets'
  config.data.synthetic_dir = ''  # '' = DIR/synthetic inside the workdir
  config.data.synthetic_num_images = 2000
  config.data.synthetic_seed = 0
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.num_eval_images = 0  # 0 = the whole eval split
  config.data.worker_count = 0  # grain worker processes (0 = in the main process)
  config.data.worker_buffer_size = 2
  # Threads decoding/augmenting per process (PIL releases the GIL); 0 = auto: min(8, CPU cores)
  # without worker processes, 2 per worker with them.
  config.data.num_threads = 0

  # ---- Input ----------------------------------------------------------------------------
  # Side of the square network input in pixels: even (kpjax.model.layers.INPUT_SIDE_RULE; each 2x2 pool is
  # undone at once, so nothing else divides it).
  config.input_size = 256
  # 'kpjax': letterbox + mean/std, dsntnn [-1, 1] targets (models trained here).
  # 'kpdem': the original's resize to a square, /255 twice, targets pixel/size in [0, 1]
  # (converted released checkpoints).
  config.preprocessing = 'kpjax'
  # With 'kpdem': the targets the model learns, the original's 'truncated' floor(x * S / W) / S (the
  # released models; outputs are read as the centre of their cell) or 'exact' x / W (kpjax.data.kpdem).
  config.kpdem_targets = 'truncated'

  # ---- Augmentation (training only; keypoints move with the pixels) ----------------------
  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = True
  config.augment.scale = (0.75, 1.25)  # random zoom factor range
  config.augment.rotation_deg = 20.0  # uniform in [-r, r]
  config.augment.translate = 0.1  # fraction of the input size, each axis
  config.augment.flip = True  # horizontal flip with left/right keypoints swapped
  config.augment.color_jitter = 0.2  # brightness/contrast/saturation strength (0 = off)

  # ---- Model ----------------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.width = 1.0  # hidden channels = round(c * width); 1.0 = KPDEM's 36.9 M params
  config.model.num_stages = 6  # CPM stages 1..6 (KPDEM: 6)
  # Convolutions (kpjax.model.conv): 'auto' (Winograd where it pays on a CPU), 'direct' (XLA's, the closest
  # match to PyTorch), 'winograd', or 'direct-pooled' ('direct' in the three blocks whose output is
  # max-pooled, 'auto' elsewhere); '' = the preprocessing's default: 'auto' for 'kpjax', 'direct' for
  # 'kpdem' (converted models: see docs/converting.md). The parameters are the same whichever.
  config.model.conv_algorithm = ''
  # Each max-pool + max-unpool pair (kpjax.model.pooling): 'mask' (pool_unpool, one fused elementwise pass)
  # or 'scatter' (max_pool_2x2's indices, then max_unpool_2x2's scatter, torch's own pair). The same bits,
  # outputs and gradients, and the same parameters, either way; 'mask' is the faster.
  config.model.unpool = 'mask'
  config.compute_dtype = 'float32'  # 'bfloat16' on GPU/TPU; params, softmax, DSNT, loss stay f32
  config.remat = False  # jax.checkpoint each block (less memory, ~1/3 more compute)
  config.remat_policy = 'nothing_saveable'  # a jax.checkpoint_policies name

  # ---- Loss -----------------------------------------------------------------------------
  config.sigma_t = 1.0  # std (input pixels) of the JS regulariser's target Gaussian
  config.js_weight = 1.0  # loss = euclidean + js_weight * js (KPDEM: 1)

  # ---- Optimisation ---------------------------------------------------------------------
  config.optimizer = 'adam'  # 'adam' or 'rmsprop' (KPDEM: RMSprop lr 2.5e-4, alpha 0.9)
  config.learning_rate = 1e-3  # peak
  config.warmup_steps = 500
  config.schedule = 'cosine'  # 'cosine' (to 0 at total_steps), 'step' or 'constant'
  config.weight_decay = 0.0
  config.rmsprop_decay = 0.9
  config.grad_clip_norm = 1.0  # global norm; 0 = off
  config.batch_size = 32  # global: split across every device of every process
  config.total_steps = 100_000

  # ---- Loop -----------------------------------------------------------------------------
  config.seed = 0
  # Stop (with a checkpoint) after this step and resume later from the workdir, e.g. to fit a run
  # into job slots; the schedule still spans total_steps. 0 = run to total_steps.
  config.stop_at_step = 0
  config.log_every_steps = 50
  config.eval_every_steps = 2000
  config.eval_batch_size = 32
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3  # latest kept; the best by eval/ne is kept besides
  config.init_from = ''  # a converted checkpoint directory to start from (fine-tuning)
  # torchvision's VGG19 ImageNet state dict (vgg19-dcbb9e9d.pth) for conv1_1 .. conv5_2 of a fresh run
  # (needs model.width = 1; ignored when resuming; not with init_from). '' = all layers from scratch.
  config.init_backbone = ''
  # Learning rate of those 14 pretrained layers relative to the others (1.0 = the same).
  config.backbone_lr_multiplier = 1.0
  config.num_vis_images = 8  # validation predictions drawn at each evaluation

  return config
