"""FashionAI's keypoint set: the 24 keypoints, 5 garment categories, flips, skeletons and NE pairs.

`FASHIONAI` is a kpjax.data.keypoint_sets.KeypointSet like any other (what a model whose metadata names
no set predicts); the names and functions below are its table and the set's methods for it, kept for
the code that speaks FashionAI (its CSV, builder, synthetic garments, converter). Indices are positions
in the 24-column block of the official CSV.
"""

from __future__ import annotations

import numpy as np

from kpjax.data import keypoint_sets

# The 24 keypoint columns of the official CSV, in CSV order.
KEYPOINT_NAMES: tuple[str, ...] = (
    'neckline_left', 'neckline_right', 'center_front', 'shoulder_left', 'shoulder_right',
    'armpit_left', 'armpit_right', 'waistline_left', 'waistline_right', 'cuff_left_in',
    'cuff_left_out', 'cuff_right_in', 'cuff_right_out', 'top_hem_left', 'top_hem_right',
    'waistband_left', 'waistband_right', 'hemline_left', 'hemline_right', 'crotch',
    'bottom_left_in', 'bottom_left_out', 'bottom_right_in', 'bottom_right_out',
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)  # 24

# The keypoints each garment category is annotated with (in CSV order). Counts follow the
# data (outwear has 14, although the KPDEM write-up says 15).
CATEGORY_KEYPOINTS: dict[str, tuple[str, ...]] = {
    'blouse': ('neckline_left', 'neckline_right', 'center_front', 'shoulder_left',
               'shoulder_right', 'armpit_left', 'armpit_right', 'cuff_left_in', 'cuff_left_out',
               'cuff_right_in', 'cuff_right_out', 'top_hem_left', 'top_hem_right'),
    'dress': ('neckline_left', 'neckline_right', 'center_front', 'shoulder_left',
              'shoulder_right', 'armpit_left', 'armpit_right', 'waistline_left', 'waistline_right',
              'cuff_left_in', 'cuff_left_out', 'cuff_right_in', 'cuff_right_out', 'hemline_left',
              'hemline_right'),
    'outwear': ('neckline_left', 'neckline_right', 'shoulder_left', 'shoulder_right',
                'armpit_left', 'armpit_right', 'waistline_left', 'waistline_right', 'cuff_left_in',
                'cuff_left_out', 'cuff_right_in', 'cuff_right_out', 'top_hem_left',
                'top_hem_right'),
    'skirt': ('waistband_left', 'waistband_right', 'hemline_left', 'hemline_right'),
    'trousers': ('waistband_left', 'waistband_right', 'crotch', 'bottom_left_in',
                 'bottom_left_out', 'bottom_right_in', 'bottom_right_out'),
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_KEYPOINTS)  # sorted: blouse, dress, outwear, skirt, trousers
ALL = keypoint_sets.ALL  # the pseudo-category of one model over all 24 keypoints

# The two keypoints whose distance normalises the error of each category (FashionAI's NE).
NORMALIZATION_PAIR: dict[str, tuple[str, str]] = {
    'blouse': ('armpit_left', 'armpit_right'),
    'dress': ('armpit_left', 'armpit_right'),
    'outwear': ('armpit_left', 'armpit_right'),
    'skirt': ('waistband_left', 'waistband_right'),
    'trousers': ('waistband_left', 'waistband_right'),
}


def _mirror_name(name: str) -> str:
  if '_left' in name:
    return name.replace('_left', '_right')
  if '_right' in name:
    return name.replace('_right', '_left')
  return name  # center_front, crotch


def _symmetric(centre, left) -> tuple[tuple[str, str], ...]:
  """Edges: `centre` as given, `left` as given plus their mirror images."""
  return tuple(centre) + tuple(left) + tuple((_mirror_name(a), _mirror_name(b)) for a, b in left)


_SLEEVE = (('neckline_left', 'shoulder_left'), ('shoulder_left', 'cuff_left_out'),
           ('cuff_left_out', 'cuff_left_in'), ('cuff_left_in', 'armpit_left'))
# The garment outlines drawn over predictions (kpjax.inference.drawing).
SKELETON: dict[str, tuple[tuple[str, str], ...]] = {
    'blouse': _symmetric(
        (('neckline_left', 'center_front'), ('center_front', 'neckline_right'), ('top_hem_left', 'top_hem_right')),
        _SLEEVE + (('armpit_left', 'top_hem_left'),)),
    'outwear': _symmetric(
        (('neckline_left', 'neckline_right'), ('top_hem_left', 'top_hem_right')),
        _SLEEVE + (('armpit_left', 'waistline_left'), ('waistline_left', 'top_hem_left'))),
    'dress': _symmetric(
        (('neckline_left', 'center_front'), ('center_front', 'neckline_right'), ('hemline_left', 'hemline_right')),
        _SLEEVE + (('armpit_left', 'waistline_left'), ('waistline_left', 'hemline_left'))),
    'skirt': _symmetric(
        (('waistband_left', 'waistband_right'), ('hemline_left', 'hemline_right')),
        (('waistband_left', 'hemline_left'),)),
    'trousers': _symmetric(
        (('waistband_left', 'waistband_right'),),
        (('waistband_left', 'bottom_left_out'), ('bottom_left_out', 'bottom_left_in'),
         ('bottom_left_in', 'crotch'))),
}

# The set itself. Sigmas are the default (keypoint_sets.DEFAULT_SIGMA): FashionAI is scored with NE.
FASHIONAI = keypoint_sets.KeypointSet(
    name='fashionai',
    keypoints=KEYPOINT_NAMES,
    categories=tuple(keypoint_sets.Category(name=c, keypoints=CATEGORY_KEYPOINTS[c], skeleton=SKELETON[c],
                                            normalization=NORMALIZATION_PAIR[c]) for c in CATEGORIES),
    flip_pairs=tuple((n, _mirror_name(n)) for n in KEYPOINT_NAMES if '_left' in n),
    noun='garment category',
)
TFDS_NAME = 'fashionai_keypoints'  # the TFDS dataset kpjax.data.build makes from the FashionAI files


def check_category(category: str, allow_all: bool = True) -> str:
  """Returns `category` or raises a ValueError that lists the known ones."""
  return FASHIONAI.check_category(category, allow_all)


def keypoint_names(category: str) -> tuple[str, ...]:
  """The keypoints a model for `category` predicts, in CSV order ('all': the 24)."""
  return FASHIONAI.keypoint_names(category)


def num_keypoints(category: str) -> int:
  """n_locations of the per-category model (blouse 13, dress 15, outwear 14, skirt 4, trousers 7, all 24)."""
  return len(keypoint_names(category))


def keypoint_indices(category: str) -> np.ndarray:
  """Int array (L,): the CSV columns (0..23) of `category`'s keypoints."""
  return FASHIONAI.keypoint_indices(category).copy()


def flip_permutation(category: str) -> np.ndarray:
  """Int array (L,): after a horizontal flip, keypoint i of `category` takes the place of perm[i].

  Left/right twins swap (`cuff_left_in` <-> `cuff_right_in`); centre points stay.
  Applying it twice is the identity.
  """
  return FASHIONAI.flip_permutation(category).copy()


def category_mask(category: str) -> np.ndarray:
  """Bool array (24,): which of the 24 CSV keypoints belong to `category`."""
  return FASHIONAI.category_mask(category)


def normalization_indices(category: str) -> tuple[int, int]:
  """CSV columns (0..23) of the two keypoints whose distance normalises `category`'s error."""
  check_category(category, allow_all=False)
  return FASHIONAI.normalization_indices(category)


def category_index(category: str) -> int:
  """Position of `category` in CATEGORIES (the integer stored in datasets)."""
  return FASHIONAI.category_index(category)
