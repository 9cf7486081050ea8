"""Starting KPDEM's backbone from torchvision's VGG19 ImageNet weights (`config.init_backbone`).

KPDEM's first convolutions carry VGG19's names and shapes (conv1_1 .. conv4_4, conv5_1, conv5_2), and
CPM / OpenPose start them from ImageNet. torchvision's `vgg19-dcbb9e9d.pth` is a state dict with
`features.N.weight` (O, I, 3, 3) and `features.N.bias` (O,) for VGG19's 16 convolutions, N being the
conv's index in `torchvision.models.vgg19().features` (ReLUs and max-pools take indices too), plus
`classifier.*`. Which Flax layer each one fills is found by name in kpjax.model.layers.BACKBONE; the file is
read by kpjax.io.torch_file (no torch, nothing from the file runs).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from kpjax.errors import BackboneError, TorchFileError, UnsafeTorchFileError
from kpjax.io import torch_file
from kpjax.model import layers
from kpjax.model import network

# torchvision's VGG19 ('E'): output channels of each 3x3 conv, 'M' for a 2x2 max-pool.
VGG19_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M')
OTHER_VGGS = {8: 'VGG11', 10: 'VGG13', 13: 'VGG16'}  # conv counts of the VGGs that are not VGG19
_CONV_WEIGHT = re.compile(r'^features\.(\d+)\.weight$')
_BN_SUFFIXES = ('running_mean', 'running_var', 'num_batches_tracked')
Path = tuple[str, ...]


def vgg19_convs() -> list[tuple[str, int, int, int]]:
  """[(VGG name 'conv<block>_<i>', index N in `features`, in channels, out channels)] for VGG19's 16 convs."""
  convs, index, block, i, channels = [], 0, 1, 1, 3
  for v in VGG19_CFG:
    if v == 'M':  # MaxPool2d: one index; the next conv starts a new block
      index, block, i = index + 1, block + 1, 1
    else:  # Conv2d + ReLU: two indices
      convs.append((f'conv{block}_{i}', index, channels, v))
      index, i, channels = index + 2, i + 1, v
  return convs


def pretrained_layers() -> list[tuple[str, int, Path]]:
  """[(VGG name, features index, Flax path under params)] of the VGG19 convs KPDEM has, in network order."""
  index = {name: n for name, n, _, _ in vgg19_convs()}
  return [(name, index[name], ('fcn', block, name))
          for block, layers in layers.BACKBONE for name, _, _ in layers if name in index]


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  shapes = {}
  for _, n, cin, cout in vgg19_convs():
    shapes[f'features.{n}.weight'] = (cout, cin, 3, 3)
    shapes[f'features.{n}.bias'] = (cout,)
  return shapes


def _short(items: list[str], limit: int = 8) -> str:
  return ', '.join(items[:limit]) + (f' ... ({len(items)} in all)' if len(items) > limit else '')


def check_vgg19(state: Mapping[str, np.ndarray], path: str) -> None:
  """Raises BackboneError unless `state` is torchvision's VGG19 layout: all 16 convs with VGG19's shapes,
  no BatchNorm, nothing else under `features.` (`classifier.*` may be anything)."""
  where = f'config.init_backbone {path}'
  kpdem = [k for k in state if re.match(r'^(module\.)*(fcn|hm_conv)\.', k)]
  if kpdem:
    raise BackboneError(f'{where} is a KPDEM checkpoint ({_short(kpdem, 3)}), not torchvision\'s VGG19: to start '
                        'from a KPDEM model, convert it with python -m convert.torch_to_flax and pass the result as '
                        'config.init_from')
  features = [k for k in state if k.startswith('features.')]
  if not features:
    raise BackboneError(f'{where} is not a torchvision VGG state dict: it has no features.N.weight keys (found '
                        f'{_short(sorted(state), 5)}); expected torchvision\'s vgg19 ImageNet weights, '
                        'vgg19-dcbb9e9d.pth')
  bn = [k for k in features if k.endswith(_BN_SUFFIXES)]
  if bn:
    raise BackboneError(f'{where} has BatchNorm statistics ({_short(bn, 3)}): it is a VGG with BatchNorm such as '
                        'torchvision\'s vgg19_bn, whose convs sit at other indices; KPDEM\'s backbone has no '
                        'BatchNorm: use the plain vgg19 weights (vgg19-dcbb9e9d.pth)')
  expected = _expected_shapes()
  missing = [k for k in expected if k not in state]
  wrong = [f'{k} {tuple(state[k].shape)} (VGG19: {expected[k]})'
           for k in expected if k in state and tuple(state[k].shape) != expected[k]]
  unexpected = [k for k in features if k not in expected]
  if not (missing or wrong or unexpected):
    return
  found = sorted(int(m.group(1)) for k in features if (m := _CONV_WEIGHT.match(k)) and np.ndim(state[k]) == 4)
  guess = OTHER_VGGS.get(len(found))
  parts = [f'it has {len(found)} convolutions, at features.{found}' + (f' (that is {guess})' if guess else '')
           + f'; VGG19 has 16, at features.{[n for _, n, _, _ in vgg19_convs()]}']
  for title, items in (('missing', missing), ('shape mismatches', wrong), ('unexpected', unexpected)):
    if items:
      parts.append(f'{title}: {_short(items)}')
  raise BackboneError(f'{where} is not torchvision\'s VGG19 ImageNet state dict: ' + '; '.join(parts))


def _refused_model(e: UnsafeTorchFileError, path: str) -> BackboneError:
  kpdem = [n for n in e.names if n.endswith(('CoordRegression', 'KeyPointsModel'))]
  if kpdem:
    return BackboneError(f'config.init_backbone {path} is a whole pickled KPDEM model ({", ".join(kpdem)}), not '
                         'torchvision\'s VGG19: to start from a KPDEM model, convert it with python -m '
                         'convert.torch_to_flax and pass the result as config.init_from')
  return BackboneError(f'config.init_backbone: {e}')


def read_vgg19(path: str) -> dict[Path, dict[str, np.ndarray]]:
  """{Flax path: {'kernel' (3, 3, I, O) HWIO, 'bias' (O,)}} float32 of the 14 VGG19 convs KPDEM has.

  Reads and checks the whole file (VGG19's 16 convs, no BatchNorm); raises BackboneError.
  """
  try:
    state = torch_file.read_state_dict(path)
  except UnsafeTorchFileError as e:
    raise _refused_model(e, path) from None
  except TorchFileError as e:
    raise BackboneError(f'config.init_backbone: {e}') from None
  check_vgg19(state, path)
  return {flax_path: {'kernel': np.ascontiguousarray(state[f'features.{n}.weight'].transpose(2, 3, 1, 0),
                                                     np.float32),
                      'bias': np.asarray(state[f'features.{n}.bias'], np.float32)}
          for _, n, flax_path in pretrained_layers()}


def _keys(path) -> Path:
  return tuple(getattr(p, 'key', getattr(p, 'name', p)) for p in path)


def check_fits(weights: Mapping[Path, Mapping[str, np.ndarray]], params: Any) -> None:
  """Raises BackboneError naming the first layer whose shape in `params` (arrays or ShapeDtypeStructs,
  the tree under 'params') differs from VGG19's, e.g. a network of model.width != 1."""
  leaves = {_keys(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  for vgg_name, n, flax_path in pretrained_layers():
    for leaf_name, value in weights[flax_path].items():
      key = flax_path + (leaf_name,)
      if key not in leaves:
        raise BackboneError(f'config.init_backbone: this network has no {"/".join(("params",) + key)} for VGG19\'s '
                            f'{vgg_name}')
      if tuple(leaves[key].shape) != value.shape:
        raise BackboneError(
            f'config.init_backbone: {vgg_name} ({"/".join(("params",) + key)}) is {tuple(leaves[key].shape)} in this '
            f'network but {value.shape} in VGG19 (features.{n}, {"HWIO" if value.ndim == 4 else "bias"}); the '
            'pretrained backbone needs the full-width network, config.model.width = 1')


def read_for_model(path: str, model: network.CoordRegressionNetwork) -> dict[Path, dict[str, np.ndarray]]:
  """`read_vgg19(path)` checked against `model`'s parameter shapes (traced only: no parameters are made)."""
  weights = read_vgg19(path)
  shapes = jax.eval_shape(lambda: network.init_variables(model, jax.random.key(0), 8))
  check_fits(weights, shapes['params'])
  return weights


def copy_into(params: Any, weights: Mapping[Path, Mapping[str, np.ndarray]]) -> Any:
  """`params` (the tree under 'params') with the 14 pretrained layers replaced; every other leaf is kept."""
  check_fits(weights, params)
  flat = {path + (name,): value for path, leaves in weights.items() for name, value in leaves.items()}
  return jax.tree_util.tree_map_with_path(
      lambda p, x: np.asarray(flat[_keys(p)], x.dtype) if _keys(p) in flat else x, params)


def param_labels(params: Any) -> Any:
  """A tree like `params` of 'backbone' (the pretrained layers' kernels and biases) and 'other'."""
  layers = {flax_path for _, _, flax_path in pretrained_layers()}
  return jax.tree_util.tree_map_with_path(lambda p, _: 'backbone' if _keys(p)[:3] in layers else 'other', params)
