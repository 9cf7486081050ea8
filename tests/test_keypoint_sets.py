"""kpjax.data.keypoint_sets: a keypoint set is data. FashionAI's table is one instance that behaves as the table
did (flips, masks, pairs by the old name rules); a set round-trips through JSON and metadata (FashionAI's
implied when metadata names none, as in every 0.1.0 file); inconsistent sets are refused by name."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kpjax.data import keypoint_sets as ks
from kpjax.data import keypoints as kp
from kpjax.data.spec import ModelSpec
from kpjax.data import conventions
from kpjax.errors import KeypointSetError, SpecMismatch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'release-0.1.0')

# A second, non-garment set: two categories of different sizes, a shared name, flips, sigmas, a pair.
FIGURES = ks.KeypointSet(
    name='figures', keypoints=('head', 'left_hand', 'right_hand', 'hip', 'tip', 'left_barb', 'right_barb'),
    categories=(
        ks.Category('figure', ('head', 'hip', 'right_hand', 'left_hand'), sigmas=(.03, .06, .05, .05),
                    skeleton=(('head', 'hip'), ('hip', 'left_hand'), ('hip', 'right_hand')),
                    normalization=('head', 'hip'), coco_id=1),
        ks.Category('arrow', ('tip', 'left_barb', 'right_barb', 'hip'), skeleton=(('tip', 'left_barb'),), coco_id=7)),
    flip_pairs=(('left_hand', 'right_hand'), ('left_barb', 'right_barb')), object_scale='area')


def test_fashionai_is_a_set_with_the_tables_behaviour():
  s = kp.FASHIONAI
  assert s.keypoints == kp.KEYPOINT_NAMES and s.category_names == kp.CATEGORIES
  for c in kp.CATEGORIES + (kp.ALL,):
    names = kp.keypoint_names(c)
    # The old rule: `_left` <-> `_right` in each name, centre points stay.
    want = [names.index(kp._mirror_name(n)) for n in names]  # pylint: disable=protected-access
    np.testing.assert_array_equal(s.flip_permutation(c), want)
    np.testing.assert_array_equal(s.keypoint_indices(c), [kp.KEYPOINT_NAMES.index(n) for n in names])
  for c in kp.CATEGORIES:
    a, b = kp.NORMALIZATION_PAIR[c]
    assert s.normalization_indices(c) == (kp.KEYPOINT_NAMES.index(a), kp.KEYPOINT_NAMES.index(b))
    assert s.skeleton(c) == kp.SKELETON[c]
  assert (kp.num_keypoints('blouse'), kp.num_keypoints('outwear'), kp.num_keypoints('all')) == (13, 14, 24)
  # The generic rule (whole `left`/`right` words) finds the same 11 pairs (center_front and crotch stay).
  assert ks.flip_pairs_from_names(kp.KEYPOINT_NAMES) == s.flip_pairs and len(s.flip_pairs) == 11
  with pytest.raises(ValueError, match="unknown garment category 'hat'"):
    kp.check_category('hat')


def test_a_set_of_other_keypoints():
  s = FIGURES
  assert s.num_keypoints == 7 and s.keypoint_names('arrow') == ('tip', 'left_barb', 'right_barb', 'hip')
  np.testing.assert_array_equal(s.keypoint_indices('figure'), [0, 3, 2, 1])  # the category's own order
  np.testing.assert_array_equal(s.flip_permutation('figure'), [0, 1, 3, 2])
  np.testing.assert_array_equal(s.flip_permutation('arrow'), [0, 2, 1, 3])
  np.testing.assert_array_equal(s.flip_permutation('all'), [0, 2, 1, 3, 4, 6, 5])
  np.testing.assert_array_equal(s.category_mask('arrow'), [0, 0, 0, 1, 1, 1, 1])
  assert s.normalization_indices('figure') == (0, 3) and s.normalization_indices('arrow') is None
  np.testing.assert_array_equal(s.category('figure').oks_sigmas(), [.03, .06, .05, .05])
  np.testing.assert_array_equal(s.category('arrow').oks_sigmas(), [ks.DEFAULT_SIGMA] * 4)
  assert s.model_flip_pairs('arrow') == (('left_barb', 'right_barb'),)
  assert s.skeleton('all') == (('head', 'hip'), ('hip', 'left_hand'), ('hip', 'right_hand'), ('tip', 'left_barb'))
  assert s.coco_category(7).name == 'arrow'
  with pytest.raises(KeypointSetError, match="no category with COCO id 2"):
    s.coco_category(2)
  with pytest.raises(KeypointSetError, match="unknown category 'hat'; expected one of figure, arrow, all"):
    s.keypoint_names('hat')


def test_json_and_metadata_round_trips():
  for s in (kp.FASHIONAI, FIGURES):
    back = ks.KeypointSet.from_json(json.loads(json.dumps(s.to_json())))
    assert back == s and hash(back) == hash(s)
  assert ks.to_metadata(kp.FASHIONAI) == {}  # implied: FashionAI files stay as they were
  assert ks.from_metadata({}) is kp.FASHIONAI
  assert ks.from_metadata(json.loads(json.dumps(ks.to_metadata(FIGURES)))) == FIGURES
  spec = ModelSpec('all', 0.25, 1, 32, conventions.get('kpjax'), FIGURES)
  meta = json.loads(json.dumps(spec.metadata(step=3)))
  assert meta['n_locations'] == 7 and meta['keypoint_set']['name'] == 'figures'
  assert ModelSpec.from_metadata(meta) == spec
  fashion = ModelSpec('skirt', 0.25, 1, 32, conventions.get('kpjax'))
  assert 'keypoint_set' not in fashion.metadata()
  with pytest.raises(SpecMismatch, match=r"the config describes the keypoint set 'fashionai' .* but the checkpoint "
                                         r"'figures' \(7 keypoints; figure 4, arrow 4\)"):
    ModelSpec('all', 0.25, 1, 32, conventions.get('kpjax')).check_matches(spec)
  meta['category'] = 'skirt'
  with pytest.raises(SpecMismatch, match="unknown category 'skirt'"):
    ModelSpec.from_metadata(meta)


def test_models_written_by_0_1_0_are_fashionai_models():
  from kpjax.inference import checkpoints
  for name in ('converted_trousers', 'workdir_trousers'):
    meta = checkpoints.read_metadata(os.path.join(FIXTURES, name))
    assert 'keypoint_set' not in meta
    spec = checkpoints.check_metadata(meta)
    assert spec.keypoint_set is kp.FASHIONAI and spec.n_locations == 7


@pytest.mark.parametrize('change, message', [
    (dict(keypoints=('a', 'a')), "keypoint 'a' is listed twice"),
    (dict(flip_pairs=(('left_hand', 'nose'),)), 'must name two different keypoints of the set'),
    (dict(flip_pairs=(('left_hand', 'right_hand'), ('right_hand', 'hip'))), "'right_hand' is in two flip pairs"),
    (dict(categories=(ks.Category('figure', ('head', 'left_hand')),)), "has 'left_hand' but not its flip twin"),
    (dict(categories=(ks.Category('f', ('head',), skeleton=(('head', 'hip'),)),)), 'names a keypoint the category'),
    (dict(categories=(ks.Category('f', ('head', 'hip'), sigmas=(0.1,)),)), 'expected 2 positive OKS sigmas'),
    (dict(categories=(ks.Category('all', ('head',)),)), "not 'all'"),
    (dict(categories=(ks.Category('f', ('nose',)),)), 'non-empty subset'),
    (dict(object_scale='mass'), "object_scale 'mass'"),
])
def test_inconsistent_sets_are_refused(change, message):
  fields = dict(name='figures', keypoints=FIGURES.keypoints, categories=FIGURES.categories,
                flip_pairs=FIGURES.flip_pairs)
  fields.update(change)
  with pytest.raises(KeypointSetError, match=message):
    ks.KeypointSet(**fields)
  with pytest.raises(KeypointSetError, match='is not a keypoint set'):
    ks.KeypointSet.from_json({'name': 'x'})


def test_names_sigmas_and_their_flags(tmp_path):
  assert ks.mirror_name('left_eye') == 'right_eye' and ks.mirror_name('cuff_right_in') == 'cuff_left_in'
  assert ks.mirror_name('leftover') == 'leftover'
  assert ks.flip_pairs_from_names(['nose', 'right_eye', 'left_eye', 'left_only']) == (('left_eye', 'right_eye'),)
  from pycocotools import cocoeval  # pylint: disable=g-import-not-at-top  (the reference, a test dependency)
  np.testing.assert_array_equal(ks.default_sigmas(ks.COCO_PERSON_KEYPOINTS),
                                cocoeval.Params(iouType='keypoints').kpt_oks_sigmas)
  assert ks.default_sigmas(('a', 'b')) == (ks.DEFAULT_SIGMA,) * 2
  assert ks.parse_sigmas('0.05') == 0.05 and ks.parse_sigmas(None) is None
  path = tmp_path / 's.json'
  path.write_text(json.dumps({'figure': [0.1, 0.2]}))
  parsed = ks.parse_sigmas(str(path))
  assert parsed == {'figure': [0.1, 0.2]}
  assert ks.category_sigmas(parsed, 'figure', ('a', 'b')) == (0.1, 0.2)
  assert ks.category_sigmas(0.3, 'figure', ('a', 'b', 'c')) == (0.3,) * 3
  for bad, message in (('-1', 'positive'), ('many', 'expected a number'), (str(tmp_path), 'expected a number')):
    with pytest.raises(KeypointSetError, match=message):
      ks.parse_sigmas(bad)
  with pytest.raises(KeypointSetError, match="has 3 keypoints; expected as many"):
    ks.category_sigmas(parsed, 'figure', ('a', 'b', 'c'))
  with pytest.raises(KeypointSetError, match="no sigmas for category 'arrow'"):
    ks.category_sigmas(parsed, 'arrow', ('a',))
