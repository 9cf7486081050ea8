"""The one validation of a run's config, done where it enters (each CLI, `train_and_evaluate`).

Every field of configs/base.py that has a meaning kpjax checks is a row of `_RULES`: a config that
passes `check_config` can be handed down (as sub-configs and typed values) without any further
checking, and one that fails is refused with a message naming the field, its value and what was
expected. Checks that depend on the machine (the batch against the device count) are made where the
machine is known (kpjax.train.loop). No Flax here: the network's constants come from its layer tables.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

import jax

from kpjax.data import conventions
from kpjax.data import keypoints
from kpjax.data import kpdem
from kpjax.errors import ConfigError
from kpjax.model import layers
from kpjax.model import pooling

OPTIMIZERS = ('adam', 'rmsprop')
SCHEDULES = ('cosine', 'step', 'constant')
COMPUTE_DTYPES = ('float32', 'bfloat16')
DATA_SOURCES = ('tfds', 'synthetic')



def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v) -> bool:
  return _is_int(v) and v > 0


def _non_negative_int(v) -> bool:
  return _is_int(v) and v >= 0


def _one_of(choices) -> Callable[[Any], bool]:
  return lambda v: v in choices


def _category(v) -> bool:
  return isinstance(v, str) and bool(v)


_FASHIONAI_CATEGORIES = f'one of {", ".join(keypoints.CATEGORIES)} or {keypoints.ALL!r}'


def _fashionai_data(config) -> bool:
  """Whether the config trains on FashionAI data (whose categories are known without reading it)."""
  present, data = _lookup(config, 'data')
  if not present:
    return True
  return data.get('source', 'tfds') == 'synthetic' or data.get('tfds_name', keypoints.TFDS_NAME) == keypoints.TFDS_NAME


def _scale_range(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(s) for s in v)
          and 0 < v[0] <= v[1])


def _remat_policy(v) -> bool:
  return isinstance(v, str) and hasattr(jax.checkpoint_policies, v)


# (field, test, what is expected). Fields a config lacks are skipped (a config file may be partial
# only in tests; configs/base.py has them all).
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    # Any data's: FashionAI's categories are checked below, other sets' when their dataset is read.
    ('category', _category, f'{_FASHIONAI_CATEGORIES}, or a category of the dataset\'s keypoint set'),
    ('input_size', layers.valid_side, layers.INPUT_SIDE_RULE),
    ('preprocessing', _one_of(conventions.NAMES), f'one of {", ".join(conventions.NAMES)}'),
    ('kpdem_targets', _one_of(kpdem.TARGETS), f'one of {", ".join(kpdem.TARGETS)}'),
    ('model.width', lambda v: _is_number(v) and v > 0, 'a positive number (1.0 = the original network)'),
    ('model.num_stages', lambda v: _is_int(v) and 1 <= v <= layers.MAX_STAGES, f"an integer in 1..{layers.MAX_STAGES}"),
    ('model.conv_algorithm', _one_of(('',) + layers.CONV_ALGORITHMS),
     f"'' (the preprocessing convention's default) or one of {', '.join(layers.CONV_ALGORITHMS)}"),
    ('model.unpool', _one_of(pooling.UNPOOLS), f"one of {', '.join(pooling.UNPOOLS)} (how each pool + unpool runs)"),
    ('compute_dtype', _one_of(COMPUTE_DTYPES),
     f'one of {", ".join(COMPUTE_DTYPES)} (float16 is not supported: it needs loss scaling; use bfloat16)'),
    ('remat', lambda v: isinstance(v, bool), 'True or False'),
    ('remat_policy', _remat_policy, 'a jax.checkpoint_policies name (e.g. nothing_saveable)'),
    ('data.source', _one_of(DATA_SOURCES), f'one of {", ".join(DATA_SOURCES)}'),
    ('data.tfds_name', lambda v: isinstance(v, str) and bool(v), 'a TFDS dataset name'),
    ('data.synthetic_num_images', _positive_int, 'a positive integer'),
    ('data.num_eval_images', _non_negative_int, 'an integer >= 0 (0 = the whole split)'),
    ('data.worker_count', _non_negative_int, 'an integer >= 0 (grain worker processes; 0 = none)'),
    ('data.worker_buffer_size', _positive_int, 'a positive integer'),
    ('data.num_threads', _non_negative_int, 'an integer >= 0 (0 = auto)'),
    ('augment.scale', _scale_range, '(lo, hi) with 0 < lo <= hi'),
    ('augment.rotation_deg', lambda v: _is_number(v) and v >= 0, 'a number >= 0 (degrees)'),
    ('augment.translate', lambda v: _is_number(v) and v >= 0, 'a number >= 0 (a fraction of the input side)'),
    ('augment.color_jitter', lambda v: _is_number(v) and 0 <= v < 1, 'a number in [0, 1)'),
    ('sigma_t', lambda v: _is_number(v) and v > 0, 'a positive number (input pixels)'),
    ('js_weight', lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
    ('optimizer', _one_of(OPTIMIZERS), f'one of {", ".join(OPTIMIZERS)}'),
    ('learning_rate', lambda v: _is_number(v) and v >= 0, 'a number >= 0 (the peak)'),
    ('warmup_steps', _non_negative_int, 'an integer >= 0'),
    ('schedule', _one_of(SCHEDULES), f'one of {", ".join(SCHEDULES)}'),
    ('weight_decay', lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
    ('rmsprop_decay', lambda v: _is_number(v) and 0 <= v < 1, 'a number in [0, 1)'),
    ('grad_clip_norm', lambda v: _is_number(v) and v >= 0, 'a number >= 0 (0 = no clipping)'),
    ('batch_size', _positive_int, 'a positive integer (the global batch)'),
    ('total_steps', _positive_int, 'a positive integer'),
    ('seed', _is_int, 'an integer'),
    ('stop_at_step', _non_negative_int, 'an integer >= 0 (0 = run to total_steps)'),
    ('log_every_steps', _positive_int, 'a positive integer'),
    ('eval_every_steps', _positive_int, 'a positive integer'),
    ('eval_batch_size', _positive_int, 'a positive integer'),
    ('checkpoint_every_steps', _positive_int, 'a positive integer'),
    ('keep_checkpoints', _positive_int, 'a positive integer'),
    ('num_vis_images', _non_negative_int, 'an integer >= 0'),
    ('init_from', lambda v: isinstance(v, str), 'a path, or empty'),
    ('init_backbone', lambda v: isinstance(v, str), "a path to torchvision's VGG19 state dict, or empty"),
    ('backbone_lr_multiplier', lambda v: _is_number(v) and math.isfinite(v) and v >= 0, 'a finite number >= 0'),
)


def _lookup(config, field: str):
  node = config
  for part in field.split('.'):
    if part not in node:
      return False, None
    node = node[part]
  return True, node


def check_config(config, training: bool = True) -> Any:
  """Returns `config` if every field it has is valid, else raises ConfigError for the first that is not.

  `training`: also refuse what only training cannot do (augmenting a model fed KPDEM's way); the
  evaluation and prediction tools use such configs to describe converted models.
  """
  for field, test, expected in _RULES:
    present, value = _lookup(config, field)
    if present and not test(value):
      raise ConfigError(f'config.{field} = {value!r}: expected {expected}')
  present, category = _lookup(config, 'category')
  if present and _fashionai_data(config) and category not in keypoints.CATEGORIES + (keypoints.ALL,):
    raise ConfigError(f'config.category = {category!r}: expected {_FASHIONAI_CATEGORIES} (FashionAI data: '
                      f'config.data.tfds_name = {keypoints.TFDS_NAME!r} or synthetic garments)')
  if config.get('init_backbone') and config.get('init_from'):
    raise ConfigError('config.init_backbone and config.init_from are both set: start from the VGG19 backbone '
                      '(init_backbone) or from a whole converted model (init_from), not both')
  if not training or not config.augment.enabled or conventions.get(config.preprocessing).supports_augmentation:
    return config
  raise ConfigError(f'config.augment.enabled = True with config.preprocessing = {config.preprocessing!r}: '
                    "augmentation needs preprocessing='kpjax' (the original's non-aspect-preserving resize has "
                    'no augmented twin); set config.augment.enabled=False to fine-tune with KPDEM\'s conventions')


# What a resumed run may change: when and how much it logs, evaluates and saves, how it reads its
# data, and settings that change memory or speed but not what is computed. Any other field (the
# category, model, input and preprocessing, batch size, optimiser and schedule, loss, seed, data
# source and splits, augmentation, precision) would make the resumed run train something else.
RESUMABLE = frozenset({
    'stop_at_step', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'num_vis_images', 'eval_batch_size', 'data.num_eval_images', 'data.worker_count', 'data.worker_buffer_size',
    'data.num_threads', 'data.data_dir', 'data.synthetic_dir', 'remat', 'remat_policy', 'model.conv_algorithm',
    'model.unpool', 'init_from', 'init_backbone',  # the last two ignored when resuming: the checkpoint wins
})


def flatten(config) -> dict[str, Any]:
  """{'data.source': 'tfds', ...}: every leaf of a config by its dotted name, as JSON keeps it."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, f'{prefix}{key}.')
      else:
        flat[prefix + key] = value

  walk(config.to_dict() if hasattr(config, 'to_dict') else config, '')
  return json.loads(json.dumps(flat))  # tuples -> lists, as a stored config reads back


def check_resume(stored: Mapping[str, Any], config, where: str = 'the workdir') -> None:
  """Raises ConfigError naming every field outside RESUMABLE whose value in `config` differs from the
  `stored` one (flatten() of the config the run was started with), with both values."""
  new = flatten(config)
  missing = object()
  changed = [(k, stored.get(k, missing), new.get(k, missing)) for k in sorted(set(stored) | set(new))
             if k not in RESUMABLE and stored.get(k, missing) != new.get(k, missing)]
  if not changed:
    return
  show = lambda v: '(absent)' if v is missing else repr(v)  # pylint: disable=unnecessary-lambda-assignment
  fields = '; '.join(f'config.{k}: {show(old)} when the run started, {show(now)} now' for k, old, now in changed)
  raise ConfigError(f'{where} holds a run started with another config, and resuming it would train something '
                    f'else: {fields}. Resume with the values it started with, or train in a new --workdir')
