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

from kpjax.data import conventions
from kpjax.data import keypoints
from kpjax.errors import SpecMismatch

FIELDS = ('category', 'width', 'num_stages', 'input_size', 'preprocessing', 'kpdem_targets')
NETWORK_FIELDS = ('category', 'width', 'num_stages')  # what the parameters encode
REQUIRED_METADATA = ('category', 'n_locations', 'width', 'num_stages', 'input_size', 'preprocessing')
# The config flag that sets each field (for the fixes error messages suggest).
_CONFIG_FLAGS = {'width': 'model.width', 'num_stages': 'model.num_stages', 'input_size': 'input_size',
                 'preprocessing': 'preprocessing', 'kpdem_targets': 'kpdem_targets'}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A KPDEM model and its input conventions.

  Attributes:
    category: the garment category ('all' = one model over the 24 keypoints).
    width: hidden channel multiplier (1.0 = the original network).
    num_stages: CPM stages, 1..6.
    input_size: side of the square network input in pixels (kpjax.model.layers.INPUT_SIDE_RULE).
    convention: the input/output convention (kpjax.data.conventions; `preprocessing` in configs and metadata).
  """
  category: str
  width: float
  num_stages: int
  input_size: int
  convention: conventions.IOConvention

  @property
  def n_locations(self) -> int:
    return keypoints.num_keypoints(self.category)

  @classmethod
  def from_config(cls, config) -> ModelSpec:
    """The model a (validated, kpjax.train.config_check) config trains."""
    return cls(category=config.category, width=float(config.model.width), num_stages=int(config.model.num_stages),
               input_size=int(config.input_size),
               convention=conventions.get(config.preprocessing, kpdem_targets=config.kpdem_targets))

  @classmethod
  def from_metadata(cls, metadata: Mapping[str, Any], where: str = 'metadata') -> ModelSpec:
    """The model a checkpoint's metadata describes; SpecMismatch naming `where` if it describes none."""
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
      raise SpecMismatch(f'{where} lacks {", ".join(missing)}; expected the keys {", ".join(REQUIRED_METADATA)}')
    try:
      spec = cls(category=keypoints.check_category(metadata['category']), width=float(metadata['width']),
                 num_stages=int(metadata['num_stages']), input_size=int(metadata['input_size']),
                 convention=conventions.from_metadata(metadata))
    except (TypeError, ValueError) as e:
      raise SpecMismatch(f'{where}: {e}') from None
    if int(metadata['n_locations']) != spec.n_locations:
      raise SpecMismatch(f'{where}: n_locations {metadata["n_locations"]} does not fit category '
                         f'{spec.category!r} ({spec.n_locations} keypoints)')
    return spec

  def metadata(self, **extra) -> dict[str, Any]:
    """The JSON metadata saved with a model (plus `extra` entries: source, step...)."""
    meta = {'category': self.category, 'n_locations': self.n_locations, 'width': self.width,
            'num_stages': self.num_stages, 'input_size': self.input_size}
    meta.update(self.convention.metadata())
    meta.update(extra)
    return meta

  def build(self, conv_algorithm: str = '', **kwargs):
    """The CoordRegressionNetwork; kwargs (dtype, remat...) pass through. `conv_algorithm` '' (as
    config.model.conv_algorithm defaults) is the convention's (see kpjax.data.conventions)."""
    from kpjax.model import network  # pylint: disable=g-import-not-at-top  (Flax: not in data workers)
    return network.CoordRegressionNetwork(n_locations=self.n_locations, width=self.width, num_stages=self.num_stages,
                                          conv_algorithm=conv_algorithm or self.convention.conv_algorithm, **kwargs)

  def value(self, field: str) -> Any:
    """A field's value as configs write it (the convention's name as 'preprocessing'; kpdem_targets or None)."""
    if field in ('preprocessing', 'kpdem_targets'):
      return self.convention.metadata().get(field)
    return getattr(self, field)

  def check_matches(self, other: ModelSpec, fields: Iterable[str] = FIELDS, *, mine: str = 'the config',
                    theirs: str = 'the checkpoint') -> None:
    """Raises SpecMismatch naming every field in `fields` on which `other` differs, with both values
    and the config flag that would make them agree (self is the config's side)."""
    differ = [f for f in fields if self.value(f) != other.value(f)]
    if not differ:
      return
    parts = [f'{f} = {self.value(f)!r} in {mine} but {other.value(f)!r} in {theirs}' for f in differ]
    fixes = [f'--config.{_CONFIG_FLAGS[f]}={other.value(f)}' for f in differ if f in _CONFIG_FLAGS]
    if 'category' in differ:
      fixes.insert(0, f'a config of category {other.category!r} (configs/{other.category}.py)')
    raise SpecMismatch('; '.join(parts) + '. To describe the same model, use ' + ' and '.join(fixes))
