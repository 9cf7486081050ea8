"""The FashionAI keypoint table: the one place that names keypoints and categories.

Everything else (data, metrics, flips, configs, converter) derives its lists from here.
Indices are positions in the 24-column block of the official CSV.
"""

from __future__ import annotations

import numpy as np

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
ALL = 'all'  # the pseudo-category of one model over all 24 keypoints

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


def check_category(category: str, allow_all: bool = True) -> str:
  """Returns `category` or raises a ValueError that lists the known ones."""
  known = CATEGORIES + ((ALL,) if allow_all else ())
  if category not in known:
    raise ValueError(f'unknown garment category {category!r}; expected one of {", ".join(known)}')
  return category


def keypoint_names(category: str) -> tuple[str, ...]:
  """The keypoints a model for `category` predicts, in CSV order ('all': the 24)."""
  check_category(category)
  return KEYPOINT_NAMES if category == ALL else CATEGORY_KEYPOINTS[category]


def num_keypoints(category: str) -> int:
  """n_locations of the per-category model (blouse 13, dress 15, outwear 14, skirt 4, trousers 7, all 24)."""
  return len(keypoint_names(category))


def keypoint_indices(category: str) -> np.ndarray:
  """Int array (L,): the CSV columns (0..23) of `category`'s keypoints."""
  return np.array([KEYPOINT_NAMES.index(n) for n in keypoint_names(category)], dtype=np.int32)


def flip_permutation(category: str) -> np.ndarray:
  """Int array (L,): after a horizontal flip, keypoint i of `category` takes the place of perm[i].

  Left/right twins swap (`cuff_left_in` <-> `cuff_right_in`); centre points stay.
  Applying it twice is the identity.
  """
  names = keypoint_names(category)
  return np.array([names.index(_mirror_name(n)) for n in names], dtype=np.int32)


def category_mask(category: str) -> np.ndarray:
  """Bool array (24,): which of the 24 CSV keypoints belong to `category`."""
  mask = np.zeros(NUM_KEYPOINTS, dtype=bool)
  mask[keypoint_indices(category)] = True
  return mask


def normalization_indices(category: str) -> tuple[int, int]:
  """CSV columns (0..23) of the two keypoints whose distance normalises `category`'s error."""
  a, b = NORMALIZATION_PAIR[check_category(category, allow_all=False)]
  return KEYPOINT_NAMES.index(a), KEYPOINT_NAMES.index(b)


def category_index(category: str) -> int:
  """Position of `category` in CATEGORIES (the integer stored in datasets)."""
  return CATEGORIES.index(check_category(category, allow_all=False))
