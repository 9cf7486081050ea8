"""kpjax.train.config_check: every shipped config passes, each bad value is refused by name, and resuming
compares exactly the fields that change what is trained."""

import importlib

import pytest

from kpjax.train import config_check
from kpjax.configs import base
import train_fixture
from kpjax import errors

SHIPPED = ('base', 'demo', 'all', 'blouse', 'dress', 'outwear', 'skirt', 'trousers')


def _config(**overrides):
  """The base config with model__width=... set as config.model.width."""
  return train_fixture.with_overrides(base.get_config(), {k.replace('__', '.'): v for k, v in overrides.items()})


@pytest.mark.parametrize('name', SHIPPED)
def test_every_shipped_config_is_valid(name):
  config = importlib.import_module(f'kpjax.configs.{name}').get_config()
  assert config_check.check_config(config) is config


def _leaves(config):
  return set(config_check.flatten(config))


def test_every_rule_and_resumable_field_names_a_field_of_the_base_config():
  # A misspelt rule would silently check nothing (absent fields are skipped): each must exist.
  fields = _leaves(base.get_config())
  rules = {field for field, _, _ in config_check._RULES}  # pylint: disable=protected-access
  assert rules <= fields, rules - fields
  assert config_check.RESUMABLE <= fields, config_check.RESUMABLE - fields


@pytest.mark.parametrize('field, value, expected', [
    ('input_size', 251, 'a positive even number of pixels'),
    ('input_size', 0, 'a positive even number of pixels'),
    ('batch_size', True, 'a positive integer'),  # a bool is not a count
    ('eval_batch_size', 0, 'a positive integer'),
    ('model__num_stages', 7, 'an integer in 1..6'),
    ('model__width', -1.0, 'a positive number'),
    ('model__conv_algorithm', 'fft', "'' (the preprocessing convention's default) or one of"),
    ('model__unpool', 'gather', 'one of mask, scatter'),
    ('category', 'hats', 'one of blouse, dress, outwear, skirt, trousers'),
    ('augment__scale', (1.25, 0.75), '(lo, hi) with 0 < lo <= hi'),
    ('augment__color_jitter', 1.0, 'a number in [0, 1)'),
    ('compute_dtype', 'float16', 'use bfloat16'),
    ('remat_policy', 'save_everything_please', 'a jax.checkpoint_policies name'),
    ('backbone_lr_multiplier', float('inf'), 'a finite number >= 0'),
    ('data__num_eval_images', -1, 'an integer >= 0'),
])
def test_a_bad_value_is_refused_naming_the_field_value_and_expectation(field, value, expected):
  with pytest.raises(errors.ConfigError) as e:
    config_check.check_config(_config(**{field: value}))
  message = str(e.value)
  assert message.startswith(f'config.{field.replace("__", ".")} = {value!r}: expected'), message
  assert expected in message


def test_edge_values_that_are_valid_pass():
  config_check.check_config(_config(input_size=8, model__num_stages=1, model__width=0.01, seed=-3,
                                    augment__scale=(1.0, 1.0), js_weight=0, grad_clip_norm=0.0,
                                    compute_dtype='bfloat16', model__conv_algorithm='direct-pooled'))


def test_backbone_and_init_from_together_are_refused():
  with pytest.raises(errors.ConfigError, match='init_backbone and config.init_from are both set'):
    config_check.check_config(_config(init_backbone='vgg19.pth', init_from='/models/trousers'))


def test_augmenting_kpdem_inputs_is_refused_for_training_only():
  config = _config(preprocessing='kpdem')
  with pytest.raises(errors.ConfigError, match="augmentation needs preprocessing='kpjax'"):
    config_check.check_config(config)
  assert config_check.check_config(config, training=False) is config
  config.augment.enabled = False
  assert config_check.check_config(config) is config


def test_flatten_names_leaves_by_dotted_path_as_json_reads_them_back():
  flat = config_check.flatten(_config(input_size=64))
  assert flat['input_size'] == 64
  assert flat['model.width'] == 1.0
  assert flat['augment.scale'] == [0.75, 1.25]  # a tuple is stored as JSON's list
  assert not any(isinstance(v, dict) for v in flat.values())


def test_resume_accepts_the_same_config_and_every_resumable_change():
  stored = config_check.flatten(base.get_config())
  config_check.check_resume(stored, base.get_config())
  changed = _config(stop_at_step=10, log_every_steps=7, eval_every_steps=9, keep_checkpoints=1,
                    data__worker_count=3, data__num_threads=4, data__num_eval_images=5, remat=True,
                    model__conv_algorithm='direct', model__unpool='scatter', init_backbone='vgg19.pth')
  config_check.check_resume(stored, changed)


def test_resume_names_every_changed_field_with_both_values():
  stored = config_check.flatten(base.get_config())
  del stored['seed']  # a field the stored config lacks is a difference too
  new = _config(model__width=0.5, batch_size=64, augment__flip=False)
  with pytest.raises(errors.ConfigError) as e:
    config_check.check_resume(stored, new, where='W')
  message = str(e.value)
  assert message.startswith('W holds a run started with another config')
  for part in ('config.model.width: 1.0 when the run started, 0.5 now',
               'config.batch_size: 32 when the run started, 64 now',
               'config.augment.flip: True when the run started, False now',
               'config.seed: (absent) when the run started, 0 now'):
    assert part in message, message
  assert 'stop_at_step' not in message
