"""The one correspondence between torch KPDEM state_dict keys and kpjax Flax parameters.

A walk over kpjax.model.layers' tables (BACKBONE, STAGE1, refinement_stage): torch
`fcn.<block>.<layer>.weight` (O, I, kH, kW) is `params/fcn/<block>/<layer>/kernel` (kH, kW, I, O),
`.bias` is `bias`, and `hm_conv.weight` (L, 24, 1, 1) is `params/hm_conv/kernel` (no bias). The
expected shapes come from the Flax model itself (jax.eval_shape of kpjax.model.network.init_variables),
so the table cannot drift from the network it fills. Used by both converters.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from kpjax.errors import LayoutError
from kpjax.model import layers as kpmodel
from kpjax.model import network

Path = tuple[str, ...]

HM_CONV_KEY = 'hm_conv.weight'
FIRST_CONV_KEY = 'fcn.model1_0_0.conv1_1.weight'  # 64 * width output channels
WIDEST_CONV_KEY = 'fcn.model1_0_3.conv4_1.weight'  # 512 * width: pins the width down most finely
_STAGE_KEY = re.compile(r'^fcn\.model(\d+)\.')


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a KPDEM parameter set encodes: CoordRegressionNetwork(n_locations, width, num_stages)."""
  n_locations: int
  width: float
  num_stages: int

  def describe(self) -> str:
    return f'n_locations={self.n_locations}, width={self.width:g}, num_stages={self.num_stages}'


def blocks(num_stages: int) -> list[tuple[str, tuple[kpmodel.Layer, ...]]]:
  """The layer table of a network with `num_stages` CPM stages, in torch module order."""
  return list(kpmodel.BACKBONE) + [kpmodel.STAGE1] + [kpmodel.refinement_stage(i) for i in range(2, num_stages + 1)]


def parameter_table(num_stages: int) -> list[tuple[str, Path]]:
  """[(torch state_dict key, Flax variables path)] in torch's state_dict order."""
  table = []
  for block, layers in blocks(num_stages):
    for name, _, _ in layers:
      table.append((f'fcn.{block}.{name}.weight', ('params', 'fcn', block, name, 'kernel')))
      table.append((f'fcn.{block}.{name}.bias', ('params', 'fcn', block, name, 'bias')))
  table.append((HM_CONV_KEY, ('params', 'hm_conv', 'kernel')))
  return table


def torch_to_flax_array(key: str, array: np.ndarray) -> np.ndarray:
  """A torch tensor's values (numpy) in Flax layout: conv weights OIHW -> HWIO, biases unchanged."""
  return np.ascontiguousarray(array.transpose(2, 3, 1, 0)) if key.endswith('.weight') else array


def flax_to_torch_array(key: str, array: np.ndarray) -> np.ndarray:
  """The inverse of `torch_to_flax_array`: kernels HWIO -> OIHW."""
  return np.ascontiguousarray(array.transpose(3, 2, 0, 1)) if key.endswith('.weight') else array


def _flax_to_torch_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return (shape[3], shape[2], shape[0], shape[1]) if key.endswith('.weight') and len(shape) == 4 else tuple(shape)


@functools.lru_cache(maxsize=32)
def _flax_shapes(arch: Architecture) -> dict[Path, tuple[int, ...]]:
  net = network.CoordRegressionNetwork(n_locations=arch.n_locations, width=arch.width, num_stages=arch.num_stages)
  try:
    tree = jax.eval_shape(lambda: network.init_variables(net, jax.random.key(0), 8))
  except ValueError as e:  # the model's own checks: num_stages in 1..6, width > 0, n_locations >= 1
    raise LayoutError(f'there is no KPDEM network with {arch.describe()}: {e}') from None
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


def expected_shapes(arch: Architecture) -> dict[str, tuple[tuple[int, ...], Path, tuple[int, ...]]]:
  """{torch key: (torch shape, Flax path, Flax shape)} of the network `arch` describes."""
  flax_shapes = _flax_shapes(arch)
  table = parameter_table(arch.num_stages)
  if set(flax_shapes) != {path for _, path in table}:  # the table and the model disagree: a kpjax bug
    raise AssertionError(f'convert.layout is out of date with kpjax.model: '
                         f'{sorted(set(flax_shapes) ^ {p for _, p in table})}')
  return {key: (_flax_to_torch_shape(key, flax_shapes[path]), path, flax_shapes[path]) for key, path in table}


def infer_architecture(shapes: Mapping[str, tuple[int, ...]]) -> Architecture:
  """The Architecture a torch-layout {key: shape} encodes (before any strict check).

  n_locations from hm_conv.weight (L, 24, 1, 1); width from the widest conv (conv4_1, 512 * width
  outputs; conv1_1 if absent); num_stages from the highest fcn.model<i> block present.
  """
  hm = shapes.get(HM_CONV_KEY)
  if hm is None:
    sample = ', '.join(sorted(shapes)[:4]) or 'none'
    raise LayoutError(f'no {HM_CONV_KEY}: these are not the parameters of a KPDEM CoordRegression network '
                      f'(its keys look like fcn.model1_0_0.conv1_1.weight ... hm_conv.weight; found {len(shapes)} '
                      f'keys such as {sample})')
  if len(hm) != 4 or tuple(hm[1:]) != (kpmodel.HEATMAP_CHANNELS, 1, 1):
    raise LayoutError(f'{HM_CONV_KEY} has shape {tuple(hm)}; expected (n_locations, {kpmodel.HEATMAP_CHANNELS}, 1, 1), '
                      'the 1x1 conv from the 24 belief maps to one heatmap per keypoint')
  width = 1.0
  for key, base in ((WIDEST_CONV_KEY, 512), (FIRST_CONV_KEY, 64)):
    if key in shapes and len(shapes[key]) == 4:
      width = shapes[key][0] / base
      break
  stages = [int(m.group(1)) for k in shapes if (m := _STAGE_KEY.match(k))]
  refinement = [s for s in stages if 2 <= s <= kpmodel.MAX_STAGES]
  return Architecture(n_locations=int(hm[0]), width=width, num_stages=max(refinement, default=1))


def flax_architecture(variables: Mapping[str, Any]) -> Architecture:
  """The Architecture of Flax KPDEM variables, read from their shapes (as `infer_architecture`)."""
  return infer_architecture(flax_torch_shapes(variables))


def flax_torch_shapes(variables: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """{torch key: torch-layout shape} of the Flax variables at the table's paths, plus every other
  leaf under its own dotted path (so that strict checks see it as unexpected)."""
  by_path = {path: key for key, path in parameter_table(kpmodel.MAX_STAGES)}
  shapes = {}
  for path, leaf in flatten_variables(variables):
    shape = tuple(np.shape(leaf))
    key = by_path.get(path)
    if key is None:
      shapes['/'.join(path)] = shape
    else:
      shapes[key] = _flax_to_torch_shape(key, shape) if len(shape) == 4 else shape
  return shapes


def same_shapes(a: Architecture, b: Architecture) -> bool:
  """Whether two architectures create parameters of identical shapes (widths may differ below rounding)."""
  if (a.n_locations, a.num_stages) != (b.n_locations, b.num_stages):
    return False
  return all(v[0] == expected_shapes(b)[k][0] for k, v in expected_shapes(a).items())


def check_parameters(shapes: Mapping[str, tuple[int, ...]], arch: Architecture, what: str = 'the checkpoint') -> None:
  """Raises LayoutError unless `shapes` (torch keys and layouts) are exactly the parameters of `arch`.

  Lists every missing key, unexpected key and shape mismatch (torch layout, both shapes).
  """
  expected = expected_shapes(arch)
  missing = [k for k in expected if k not in shapes]
  unexpected = [k for k in shapes if k not in expected]
  wrong = [f'{k}: {tuple(shapes[k])} in {what}, {expected[k][0]} expected'
           for k in expected if k in shapes and tuple(shapes[k]) != expected[k][0]]
  if not (missing or unexpected or wrong):
    return
  parts = []
  for title, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', wrong)):
    if items:
      shown = items if len(items) <= 12 else items[:12] + [f'... and {len(items) - 12} more']
      parts.append(f'{title} ({len(items)}): ' + '; '.join(shown))
  raise LayoutError(f'{what} does not match the KPDEM network ({arch.describe()}): ' + '. '.join(parts) +
                    '. Every parameter of the network must be present exactly once with its shape; '
                    'is this a KPDEM CoordRegression checkpoint?')


def nested_set(tree: dict, path: Path, value) -> None:
  node = tree
  for part in path[:-1]:
    node = node.setdefault(part, {})
  node[path[-1]] = value


def flatten_variables(variables: Mapping[str, Any]) -> Iterator[tuple[Path, Any]]:
  """(path, leaf) of every leaf of a nested Flax variables dict."""
  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        yield from walk(v, prefix + (str(k),))
    else:
      yield prefix, node
  yield from walk(variables, ())
