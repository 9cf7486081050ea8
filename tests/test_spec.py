"""kpjax.data.spec.ModelSpec: config -> metadata -> spec round trips, and one comparison that names every
field on which a config and a checkpoint disagree."""

import pytest

from kpjax.data import keypoints
from kpjax.configs import base
from kpjax.data import conventions
from kpjax.data.spec import ModelSpec
from kpjax.errors import SpecMismatch


def _spec(category='trousers', width=0.25, num_stages=2, input_size=64, preprocessing='kpjax', **kw):
  return ModelSpec(category, width, num_stages, input_size, conventions.get(preprocessing, **kw))


@pytest.mark.parametrize('category', keypoints.CATEGORIES + (keypoints.ALL,))
@pytest.mark.parametrize('preprocessing, targets', [('kpjax', 'truncated'), ('kpdem', 'truncated'),
                                                    ('kpdem', 'exact')])
def test_metadata_round_trips(category, preprocessing, targets):
  spec = _spec(category, preprocessing=preprocessing, kpdem_targets=targets)
  meta = spec.metadata(step=12)
  assert meta['n_locations'] == keypoints.num_keypoints(category)
  assert meta['step'] == 12
  assert ModelSpec.from_metadata(meta) == spec


def test_from_config_reads_the_model_fields():
  config = base.get_config()
  config.category, config.model.width, config.model.num_stages, config.input_size = 'skirt', 0.5, 3, 128
  config.preprocessing, config.kpdem_targets = 'kpdem', 'exact'
  assert ModelSpec.from_config(config) == _spec('skirt', 0.5, 3, 128, 'kpdem', kpdem_targets='exact')


def test_metadata_that_describes_no_model_is_refused():
  meta = _spec().metadata()
  del meta['width'], meta['input_size']
  with pytest.raises(SpecMismatch, match=r'^M lacks width, input_size; expected the keys'):
    ModelSpec.from_metadata(meta, where='M')
  meta = _spec().metadata()
  meta['n_locations'] = 24
  with pytest.raises(SpecMismatch, match=r"n_locations 24 does not fit category 'trousers' \(7 keypoints\)"):
    ModelSpec.from_metadata(meta)
  meta = _spec().metadata()
  meta['category'] = 'hats'
  with pytest.raises(SpecMismatch, match='hats'):
    ModelSpec.from_metadata(meta)


def test_check_matches_names_each_differing_field_and_the_flag_that_fixes_it():
  config_side = _spec(width=0.25, input_size=64)
  checkpoint = _spec(width=1.0, input_size=512, preprocessing='kpdem')
  with pytest.raises(SpecMismatch) as e:
    config_side.check_matches(checkpoint)
  message = str(e.value)
  assert "width = 0.25 in the config but 1.0 in the checkpoint" in message
  assert "input_size = 64 in the config but 512 in the checkpoint" in message
  assert "preprocessing = 'kpjax' in the config but 'kpdem' in the checkpoint" in message
  for fix in ('--config.model.width=1.0', '--config.input_size=512', '--config.preprocessing=kpdem'):
    assert fix in message
  assert 'num_stages' not in message and 'category' not in message


def test_check_matches_compares_only_the_fields_asked():
  config_side = _spec(input_size=64)
  config_side.check_matches(_spec(input_size=512), fields=('category', 'width', 'num_stages'))
  with pytest.raises(SpecMismatch, match=r"a config of category 'skirt' \(configs/skirt.py\)"):
    config_side.check_matches(_spec('skirt'), fields=('category',))


def test_build_makes_the_described_network_with_the_modes_convolutions():
  net = _spec('blouse', 0.25, 3, preprocessing='kpdem').build()
  assert (net.n_locations, net.width, net.num_stages) == (13, 0.25, 3)
  assert net.conv_algorithm == conventions.get('kpdem').conv_algorithm == 'direct'
  assert _spec().build(conv_algorithm='direct-pooled').conv_algorithm == 'direct-pooled'
  assert _spec().build('').conv_algorithm == 'auto'  # '' = the convention's default
  assert _spec(preprocessing='kpdem').build('').conv_algorithm == 'direct'

