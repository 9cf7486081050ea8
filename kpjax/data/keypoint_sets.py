"""Keypoint sets: what a model's outputs are, as data (names, flips, OKS sigmas, skeletons, categories).

A `KeypointSet` names K keypoints (a record's keypoints and visibility are (K, 2) and (K,) in this
order), the left/right pairs a horizontal flip swaps, and its categories: each a subset of the K names
(in its own order: the order of a COCO file's `keypoints` and of COCO results) with its OKS sigmas,
its skeleton (pairs of names to draw) and how its errors are normalised (a keypoint pair, as
FashionAI's armpits, for NE; the object's area for OKS when the set's `object_scale` is 'area'). A name
shared by several categories is one keypoint (FashionAI's `armpit_left` of blouse, dress and
outwear), so one model over the whole set ('all') has K outputs and masks what a record's category
lacks.

FashionAI's table is one such set (kpjax.data.keypoints.FASHIONAI); a COCO build makes another from
its file's `categories` (kpjax.data.coco). A set is serialisable (`to_json` / `from_json`): it travels
in dataset metadata, checkpoint metadata (`keypoint_set`, absent in FashionAI models: `from_metadata`),
export metadata and the server's description of a model. numpy only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kpjax.errors import KeypointSetError

ALL = 'all'  # the pseudo-category of one model over every keypoint of a set
OBJECT_SCALES = ('', 'area')  # '': no object scale; 'area': OKS with each object's area (COCO data)

# COCO's person keypoints and their OKS sigmas (pycocotools' COCOeval defaults).
COCO_PERSON_KEYPOINTS: tuple[str, ...] = (
    'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder', 'right_shoulder', 'left_elbow',
    'right_elbow', 'left_wrist', 'right_wrist', 'left_hip', 'right_hip', 'left_knee', 'right_knee', 'left_ankle',
    'right_ankle')
COCO_PERSON_SIGMAS: tuple[float, ...] = tuple(
    s / 10.0 for s in (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89))
# The sigma of any other keypoint unless one is given: between COCO's face points (0.025-0.035) and its
# body joints (0.062-0.107). An OKS of 0.5 is then a miss of about 0.12 sqrt(area).
DEFAULT_SIGMA = 0.05


def _pairs(pairs) -> tuple[tuple[str, str], ...]:
  return tuple((str(a), str(b)) for a, b in pairs)


@dataclasses.dataclass(frozen=True)
class Category:
  """One category of a set: its keypoints (names of the set, in the category's own order) and how it is scored.

  sigmas: one OKS sigma per keypoint, or () for defaults (`default_sigmas`); skeleton: pairs of its
  keypoints to draw; normalization: the pair whose distance normalises NE, or None (no NE);
  coco_id: the category's id in COCO files (None for sets not read from one).
  """
  name: str
  keypoints: tuple[str, ...]
  sigmas: tuple[float, ...] = ()
  skeleton: tuple[tuple[str, str], ...] = ()
  normalization: tuple[str, str] | None = None
  coco_id: int | None = None

  def oks_sigmas(self) -> np.ndarray:
    """float64 (K_c,): the sigmas OKS uses for this category (given, else `default_sigmas`)."""
    return np.asarray(self.sigmas or default_sigmas(self.keypoints), np.float64)


@dataclasses.dataclass(frozen=True)
class KeypointSet:
  """A keypoint set (see the module docstring). Hashable and picklable; checked when made.

  Attributes:
    name: the set's name ('fashionai', or the COCO dataset's name).
    keypoints: the K names, in record order.
    categories: the categories (a record's `category` is an index into them).
    flip_pairs: (left, right) name pairs a horizontal flip swaps; every other keypoint stays.
    object_scale: 'area' when objects carry an area and are scored with OKS (COCO data), else ''.
    noun: what a category is called in messages ('garment category' for FashionAI).
  """
  name: str
  keypoints: tuple[str, ...]
  categories: tuple[Category, ...]
  flip_pairs: tuple[tuple[str, str], ...] = ()
  object_scale: str = ''
  noun: str = 'category'

  def __post_init__(self):
    _check_set(self)

  # ---- The set and its categories ------------------------------------------------------------

  @property
  def num_keypoints(self) -> int:
    return len(self.keypoints)

  @property
  def category_names(self) -> tuple[str, ...]:
    return tuple(c.name for c in self.categories)

  @property
  def scored_by_oks(self) -> bool:
    """Whether objects carry areas and are scored with OKS AP (COCO data)."""
    return self.object_scale == 'area'

  @property
  def has_normalization(self) -> bool:
    """Whether some category defines a normalising pair (NE can be computed)."""
    return any(c.normalization for c in self.categories)

  def check_category(self, category: str, allow_all: bool = True) -> str:
    """`category` if it names one of the set's categories (or 'all'), else a ValueError listing them."""
    known = self.category_names + ((ALL,) if allow_all else ())
    if category not in known:
      raise KeypointSetError(f'unknown {self.noun} {category!r}; expected one of {", ".join(known)}')
    return category

  def category(self, name: str) -> Category:
    return self.categories[self.category_index(name)]

  def category_index(self, name: str) -> int:
    """Position of category `name` (the integer stored in records)."""
    return self.category_names.index(self.check_category(name, allow_all=False))

  def coco_category(self, coco_id: int) -> Category:
    """The category whose COCO id is `coco_id`; KeypointSetError when none."""
    for c in self.categories:
      if c.coco_id is not None and c.coco_id == coco_id:
        return c
    raise KeypointSetError(f'keypoint set {self.name!r} has no category with COCO id {coco_id}; it has '
                           + ', '.join(f'{c.name} ({c.coco_id})' for c in self.categories))

  # ---- A model's keypoints -------------------------------------------------------------------

  def keypoint_names(self, category: str) -> tuple[str, ...]:
    """The keypoints a model for `category` predicts, in its order ('all': the set's K)."""
    self.check_category(category)
    return self.keypoints if category == ALL else self.category(category).keypoints

  def keypoint_indices(self, category: str) -> np.ndarray:
    """Int array (L,): the set positions (0..K-1) of `category`'s keypoints."""
    return _indices(self, category)

  def category_mask(self, category: str) -> np.ndarray:
    """Bool array (K,): which of the set's keypoints belong to `category`."""
    mask = np.zeros(self.num_keypoints, dtype=bool)
    mask[self.keypoint_indices(category)] = True
    return mask

  def flip_permutation(self, category: str) -> np.ndarray:
    """Int array (L,): after a horizontal flip, keypoint i of `category` takes the place of perm[i].

    Flip pairs swap, every other keypoint stays; applying it twice is the identity.
    """
    return _flip_permutation(self, category)

  def model_flip_pairs(self, category: str) -> tuple[tuple[str, str], ...]:
    """The flip pairs among `category`'s keypoints (all of them for 'all')."""
    names = set(self.keypoint_names(category))
    return tuple(p for p in self.flip_pairs if p[0] in names)

  def skeleton(self, category: str) -> tuple[tuple[str, str], ...]:
    """Pairs of `category`'s keypoints to draw ('all': every category's, each edge once)."""
    if category != ALL:
      return self.category(category).skeleton
    self.check_category(category)
    edges = []
    for c in self.categories:
      edges += [e for e in c.skeleton if e not in edges and e[::-1] not in edges]
    return tuple(edges)

  def normalization_indices(self, category: str) -> tuple[int, int] | None:
    """Set positions of the pair whose distance normalises `category`'s NE, or None when it has none."""
    pair = self.category(category).normalization
    return None if pair is None else (self.keypoints.index(pair[0]), self.keypoints.index(pair[1]))

  # ---- Serialising ---------------------------------------------------------------------------

  def to_json(self) -> dict[str, Any]:
    """Plain JSON types (what metadata stores); `from_json` makes the same set back."""
    return {
        'name': self.name, 'keypoints': list(self.keypoints), 'flip_pairs': [list(p) for p in self.flip_pairs],
        'object_scale': self.object_scale, 'noun': self.noun,
        'categories': [{'name': c.name, 'keypoints': list(c.keypoints), 'sigmas': list(c.sigmas),
                        'skeleton': [list(e) for e in c.skeleton],
                        'normalization': None if c.normalization is None else list(c.normalization),
                        'coco_id': c.coco_id} for c in self.categories],
    }

  @classmethod
  def from_json(cls, obj: Mapping[str, Any], where: str = 'keypoint set') -> KeypointSet:
    """The set `to_json` wrote; KeypointSetError naming `where` for anything else."""
    try:
      categories = tuple(
          Category(name=str(c['name']), keypoints=tuple(str(n) for n in c['keypoints']),
                   sigmas=tuple(float(s) for s in c.get('sigmas') or ()), skeleton=_pairs(c.get('skeleton') or ()),
                   normalization=tuple(str(n) for n in c['normalization']) if c.get('normalization') else None,
                   coco_id=None if c.get('coco_id') is None else int(c['coco_id']))
          for c in obj['categories'])
      return cls(name=str(obj['name']), keypoints=tuple(str(n) for n in obj['keypoints']), categories=categories,
                 flip_pairs=_pairs(obj.get('flip_pairs') or ()), object_scale=str(obj.get('object_scale', '')),
                 noun=str(obj.get('noun', 'category')))
    except KeypointSetError as e:
      raise KeypointSetError(f'{where}: {e}') from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise KeypointSetError(f'{where} is not a keypoint set ({type(e).__name__}: {e}); expected '
                             '{"name", "keypoints", "categories": [{"name", "keypoints", ...}], ...}') from None

  def describe(self) -> str:
    """One line: the name, K and the categories with their keypoint counts."""
    cats = ', '.join(f'{c.name} {len(c.keypoints)}' for c in self.categories)
    return f'{self.name!r} ({self.num_keypoints} keypoints; {cats})'


@functools.lru_cache(maxsize=64)
def _indices(kset: KeypointSet, category: str) -> np.ndarray:
  out = np.array([kset.keypoints.index(n) for n in kset.keypoint_names(category)], dtype=np.int32)
  out.flags.writeable = False
  return out


@functools.lru_cache(maxsize=64)
def _flip_permutation(kset: KeypointSet, category: str) -> np.ndarray:
  names = kset.keypoint_names(category)
  twin = {a: b for a, b in kset.flip_pairs} | {b: a for a, b in kset.flip_pairs}
  out = np.array([names.index(twin.get(n, n)) for n in names], dtype=np.int32)
  out.flags.writeable = False
  return out


def _check_names(names: Sequence[str], what: str) -> None:
  for n in names:
    if not isinstance(n, str) or not n:
      raise KeypointSetError(f'{what}: keypoint names must be non-empty strings; got {n!r}')
  seen = set()
  for n in names:
    if n in seen:
      raise KeypointSetError(f'{what}: keypoint {n!r} is listed twice')
    seen.add(n)


def _check_set(s: KeypointSet) -> None:
  what = f'keypoint set {s.name!r}'
  if not s.name:
    raise KeypointSetError('a keypoint set needs a name')
  _check_names(s.keypoints, what)
  if not s.keypoints or not s.categories:
    raise KeypointSetError(f'{what} needs at least one keypoint and one category')
  if s.object_scale not in OBJECT_SCALES:
    raise KeypointSetError(f'{what}: object_scale {s.object_scale!r}; expected one of {OBJECT_SCALES}')
  known = set(s.keypoints)
  paired: dict[str, str] = {}
  for a, b in s.flip_pairs:
    if a not in known or b not in known or a == b:
      raise KeypointSetError(f'{what}: flip pair ({a}, {b}) must name two different keypoints of the set')
    for n in (a, b):
      if n in paired:
        raise KeypointSetError(f'{what}: keypoint {n!r} is in two flip pairs')
      paired[n] = a if n == b else b
  names = [c.name for c in s.categories]
  ids = [c.coco_id for c in s.categories if c.coco_id is not None]
  if len(set(names)) != len(names) or ALL in names or '' in names or len(set(ids)) != len(ids):
    raise KeypointSetError(f'{what}: category names (and COCO ids) must be unique and not {ALL!r}; got {names}')
  for c in s.categories:
    where = f'{what}, category {c.name!r}'
    _check_names(c.keypoints, where)
    if not c.keypoints or not set(c.keypoints) <= known:
      raise KeypointSetError(f'{where}: its keypoints must be a non-empty subset of the set\'s; '
                             f'got {list(c.keypoints)}')
    mine = set(c.keypoints)
    for n in mine:
      if n in paired and paired[n] not in mine:
        raise KeypointSetError(f'{where} has {n!r} but not its flip twin {paired[n]!r}')
    for a, b in c.skeleton + ((c.normalization,) if c.normalization else ()):
      if a not in mine or b not in mine:
        raise KeypointSetError(f'{where}: the pair ({a}, {b}) names a keypoint the category lacks')
    if c.sigmas and (len(c.sigmas) != len(c.keypoints) or not all(math.isfinite(v) and v > 0 for v in c.sigmas)):
      raise KeypointSetError(f'{where}: expected {len(c.keypoints)} positive OKS sigmas; got {list(c.sigmas)}')


# ---- Defaults and helpers for making sets --------------------------------------------------------

def mirror_name(name: str) -> str:
  """The name a horizontal flip gives `name`: its `left`/`right` words swapped ('left_eye' <-> 'right_eye',
  'cuff_left_in' <-> 'cuff_right_in'); a name without one is its own mirror."""
  swap = {'left': 'right', 'right': 'left', 'Left': 'Right', 'Right': 'Left', 'LEFT': 'RIGHT', 'RIGHT': 'LEFT'}
  return '_'.join(swap.get(w, w) for w in name.split('_'))


def flip_pairs_from_names(names: Iterable[str]) -> tuple[tuple[str, str], ...]:
  """(left, right) pairs of `names` whose mirror (`mirror_name`) is also among them, in name order."""
  names = list(names)
  present = set(names)
  pairs = []
  for n in names:
    m = mirror_name(n)
    if m != n and m in present and (m, n) not in pairs and 'left' in n.lower().split('_'):
      pairs.append((n, m))
  return tuple(pairs)


def default_sigmas(names: Sequence[str]) -> tuple[float, ...]:
  """COCO's 17 sigmas for COCO's person keypoints (in COCO's order), else DEFAULT_SIGMA for each."""
  if tuple(names) == COCO_PERSON_KEYPOINTS:
    return COCO_PERSON_SIGMAS
  return (DEFAULT_SIGMA,) * len(names)


def parse_sigmas(text: str | float | None, flag: str = '--sigmas') -> float | dict[str, list[float]] | None:
  """A command line's sigmas: None (defaults), a number (every keypoint's), or a JSON file's
  {category name: [one sigma per keypoint]}; KeypointSetError naming `flag` otherwise."""
  if text is None or isinstance(text, (int, float)):
    value = text
  elif os.path.isfile(text):
    try:
      with open(text, encoding='utf-8') as f:
        value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise KeypointSetError(f'{flag} {text}: not a readable JSON file ({e})') from None
    ok = isinstance(value, dict) and all(isinstance(v, list) and all(isinstance(x, (int, float)) and not
                                                                     isinstance(x, bool) for x in v)
                                         for v in value.values())
    if not ok:
      raise KeypointSetError(f'{flag} {text}: expected a JSON object mapping category names to lists of sigmas')
    return {str(k): [float(x) for x in v] for k, v in value.items()}
  else:
    try:
      value = float(text)
    except ValueError:
      raise KeypointSetError(f'{flag} {text!r}: expected a number (every keypoint\'s sigma) or a JSON file mapping '
                             'category names to lists of sigmas') from None
  if value is not None and not (math.isfinite(value) and value > 0):
    raise KeypointSetError(f'{flag} {text!r}: a sigma must be a positive number')
  return None if value is None else float(value)


def category_sigmas(sigmas: float | Mapping[str, Sequence[float]] | None, category: str,
                    names: Sequence[str], flag: str = '--sigmas') -> tuple[float, ...]:
  """The sigmas `sigmas` (parse_sigmas') gives category `category` with keypoints `names` (() = defaults)."""
  if sigmas is None:
    return ()
  if isinstance(sigmas, (int, float)):
    return (float(sigmas),) * len(names)
  if category not in sigmas:
    raise KeypointSetError(f'{flag} has no sigmas for category {category!r}; it has {", ".join(sigmas) or "none"}')
  values = tuple(float(v) for v in sigmas[category])
  if len(values) != len(names) or not all(math.isfinite(v) and v > 0 for v in values):
    raise KeypointSetError(f'{flag}: category {category!r} has {len(names)} keypoints; expected as many positive '
                           f'sigmas, got {list(values)}')
  return values


# ---- Sets in metadata ----------------------------------------------------------------------------

METADATA_KEY = 'keypoint_set'


def from_metadata(metadata: Mapping[str, Any], where: str = 'metadata') -> KeypointSet:
  """The set a model's or dataset's metadata records; FashionAI's when it records none (every model
  kpjax 0.1.0 wrote, and every FashionAI model since)."""
  if metadata.get(METADATA_KEY) is None:
    from kpjax.data import keypoints  # pylint: disable=g-import-not-at-top  (FashionAI's set is built on this module)
    return keypoints.FASHIONAI
  return KeypointSet.from_json(metadata[METADATA_KEY], where=f'{where}: {METADATA_KEY}')


def to_metadata(kset: KeypointSet) -> dict[str, Any]:
  """The metadata entries that record `kset` (none for FashionAI's, which absence implies)."""
  from kpjax.data import keypoints  # pylint: disable=g-import-not-at-top
  return {} if kset == keypoints.FASHIONAI else {METADATA_KEY: kset.to_json()}
