"""What a model is and how it is fed: the one description shared by configs, checkpoints and converters.

A `ModelSpec` is read from a config (`from_config`: what a run trains) or from a checkpoint's metadata
(`from_metadata`: what a saved model is), written into every saved model (`metadata`), builds the
network (`build`), and is compared with another spec by `check_matches`, the one place that decides
whether a config and a checkpoint describe the same model (fine-tuning, evaluation, prediction,
export, both converters).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np

from kpjax.data import conventions
from kpjax.data import keypoint_sets
from kpjax.data import keypoints
from kpjax.errors import SpecMismatch

FIELDS = ('keypoint_set', 'category', 'width', 'num_stages', 'input_size', 'preprocessing', 'kpdem_targets')
NETWORK_FIELDS = ('category', 'width', 'num_stages')  # what the parameters encode
REQUIRED_METADATA = ('category', 'n_locations', 'width', 'num_stages', 'input_size', 'preprocessing')
# The config flag that sets each field (for the fixes error messages suggest).
_CONFIG_FLAGS = {'width': 'model.width', 'num_stages': 'model.num_stages', 'input_size': 'input_size',
                 'preprocessing': 'preprocessing', 'kpdem_targets': 'kpdem_targets'}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A KPDEM model and its input conventions.

  Attributes:
    category: a category of the keypoint set ('all' = one model over all its keypoints), e.g. a garment.
    width: hidden channel multiplier (1.0 = the original network).
    num_stages: CPM stages, 1..6.
    input_size: side of the square network input in pixels (kpjax.model.layers.INPUT_SIDE_RULE).
    convention: the input/output convention (kpjax.data.conventions; `preprocessing` in configs and metadata).
    keypoint_set: what the outputs are (kpjax.data.keypoint_sets; FashionAI's unless the data says otherwise).
  """
  category: str
  width: float
  num_stages: int
  input_size: int
  convention: conventions.IOConvention
  keypoint_set: keypoint_sets.KeypointSet = keypoints.FASHIONAI

  def __post_init__(self):
    self.keypoint_set.check_category(self.category)

  @property
  def n_locations(self) -> int:
    return len(self.keypoint_names)

  @property
  def keypoint_names(self) -> tuple[str, ...]:
    """The names of the model's outputs, in output order."""
    return self.keypoint_set.keypoint_names(self.category)

  def keypoint_indices(self) -> np.ndarray:
    """Int (L,): the set positions of the model's outputs (records hold the whole set)."""
    return self.keypoint_set.keypoint_indices(self.category)

  def flip_permutation(self) -> np.ndarray:
    """Int (L,): which output takes each output's place after a horizontal flip (keypoint_sets)."""
    return self.keypoint_set.flip_permutation(self.category)

  @classmethod
  def from_config(cls, config, keypoint_set: keypoint_sets.KeypointSet = keypoints.FASHIONAI) -> ModelSpec:
    """The model a (validated, kpjax.train.config_check) config trains on data of `keypoint_set`
    (kpjax.data.sources.dataset_keypoint_set(config.data): the config names the data, the data the set)."""
    return cls(category=config.category, width=float(config.model.width), num_stages=int(config.model.num_stages),
               input_size=int(config.input_size),
               convention=conventions.get(config.preprocessing, kpdem_targets=config.kpdem_targets),
               keypoint_set=keypoint_set)

  @classmethod
  def from_metadata(cls, metadata: Mapping[str, Any], where: str = 'metadata') -> ModelSpec:
    """The model a checkpoint's metadata describes; SpecMismatch naming `where` if it describes none."""
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
      raise SpecMismatch(f'{where} lacks {", ".join(missing)}; expected the keys {", ".join(REQUIRED_METADATA)}')
    try:
      kset = keypoint_sets.from_metadata(metadata, where)
      spec = cls(category=kset.check_category(metadata['category']), width=float(metadata['width']),
                 num_stages=int(metadata['num_stages']), input_size=int(metadata['input_size']),
                 convention=conventions.from_metadata(metadata), keypoint_set=kset)
    except (TypeError, ValueError) as e:
      raise SpecMismatch(f'{where}: {e}') from None
    if int(metadata['n_locations']) != spec.n_locations:
      raise SpecMismatch(f'{where}: n_locations {metadata["n_locations"]} does not fit category '
                         f'{spec.category!r} ({spec.n_locations} keypoints)')
    return spec

  def metadata(self, **extra) -> dict[str, Any]:
    """The JSON metadata saved with a model (plus `extra` entries: source, step...); the keypoint set's
    (`keypoint_set`) unless it is FashionAI's, which its absence means."""
    meta = {'category': self.category, 'n_locations': self.n_locations, 'width': self.width,
            'num_stages': self.num_stages, 'input_size': self.input_size}
    meta.update(self.convention.metadata())
    meta.update(keypoint_sets.to_metadata(self.keypoint_set))
    meta.update(extra)
    return meta

  def build(self, conv_algorithm: str = '', **kwargs):
    """The CoordRegressionNetwork; kwargs (dtype, remat...) pass through. `conv_algorithm` '' (as
    config.model.conv_algorithm defaults) is the convention's (see kpjax.data.conventions)."""
    from kpjax.model import network  # pylint: disable=g-import-not-at-top  (Flax: not in data workers)
    return network.CoordRegressionNetwork(n_locations=self.n_locations, width=self.width, num_stages=self.num_stages,
                                          conv_algorithm=conv_algorithm or self.convention.conv_algorithm, **kwargs)

  def value(self, field: str) -> Any:
    """A field's value as configs write it (the convention's name as 'preprocessing'; kpdem_targets or None;
    the keypoint set's name and size)."""
    if field == 'keypoint_set':
      return self.keypoint_set.describe()
    if field in ('preprocessing', 'kpdem_targets'):
      return self.convention.metadata().get(field)
    return getattr(self, field)

  def check_matches(self, other: ModelSpec, fields: Iterable[str] = FIELDS, *, mine: str = 'the config',
                    theirs: str = 'the checkpoint') -> None:
    """Raises SpecMismatch naming every field in `fields` on which `other` differs, with both values
    and the config flag that would make them agree (self is the config's side)."""
    differ = [f for f in fields if (self.keypoint_set != other.keypoint_set if f == 'keypoint_set'
                                    else self.value(f) != other.value(f))]
    if not differ:
      return
    parts = [f'{f} = {self.value(f)!r} in {mine} but {other.value(f)!r} in {theirs}' if f != 'keypoint_set' else
             f'{mine} describes the keypoint set {self.value(f)} but {theirs} {other.value(f)}' for f in differ]
    fixes = [f'--config.{_CONFIG_FLAGS[f]}={other.value(f)}' for f in differ if f in _CONFIG_FLAGS]
    if 'category' in differ:
      fixes.insert(0, f'a config of category {other.category!r} (configs/{other.category}.py)'
                   if other.keypoint_set == keypoints.FASHIONAI else f'--config.category={other.category}')
    if 'keypoint_set' in differ:
      fixes.insert(0, f'data of the keypoint set {other.keypoint_set.name!r} (config.data.tfds_name)')
    raise SpecMismatch('; '.join(parts) + '. To describe the same model, use ' + ' and '.join(fixes))
