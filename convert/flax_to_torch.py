"""kpjax Flax models -> PyTorch state_dicts the original KPDEM code loads.

    python -m convert.flax_to_torch --config configs/trousers.py --checkpoint DIR --out trousers.pth

DIR is a kpjax model directory (e.g. from convert.torch_to_flax) or a training workdir (its latest
checkpoint). The output is a plain state_dict with the original's keys (`fcn.model1_0_0.conv1_1.weight`
... `hm_conv.weight`, conv weights OIHW) that `CoordRegression(n_locations)` (the original's
keypoints_Net or convert/torch_model.py) loads with `load_state_dict(..., strict=True)`; with
`--dataparallel-prefix` the keys start with `module.`, for a model wrapped in DataParallel first.
float32 values are copied bit for bit, so torch -> flax -> torch gives back identical tensors.
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any, Callable, Mapping

import numpy as np
import torch

from . import layout
from .layout import Architecture
from kpjax.cli import common
from kpjax.data import spec as spec_lib
from kpjax.errors import ConversionError, LayoutError, SpecMismatch
from kpjax.inference import checkpoints
from kpjax.io import atomic
from kpjax.io import paths
from kpjax.train import config_check


def _leaf(variables: Mapping[str, Any], path: layout.Path):
  node = variables
  for part in path:
    node = node[part]
  return node


def variables_to_state_dict(variables: Mapping[str, Any],
                            arch: Architecture | None = None) -> collections.OrderedDict[str, torch.Tensor]:
  """Flax KPDEM variables {'params': ...} -> torch state_dict (keys and layouts of CoordRegression).

  Args:
    variables: the Flax variables (numpy or jax arrays).
    arch: the network they must be; inferred from their shapes when None.

  Raises:
    ConversionError: the variables are not exactly the parameters of a KPDEM network (of `arch`).
  """
  shapes = layout.flax_torch_shapes(variables)
  try:
    found = layout.infer_architecture(shapes)
    if arch is not None and not layout.same_shapes(found, arch):
      raise ConversionError(f'the variables hold a network with {found.describe()}, not {arch.describe()}')
    layout.check_parameters(shapes, arch or found, what='the Flax variables')
  except LayoutError as e:
    raise ConversionError(str(e)) from None
  state_dict = collections.OrderedDict()
  for key, (torch_shape, path, _) in layout.expected_shapes(arch or found).items():
    array = np.asarray(_leaf(variables, path))
    if array.dtype != np.float32:
      array = array.astype(np.float32)
    state_dict[key] = torch.from_numpy(layout.flax_to_torch_array(key, array).copy())
    assert tuple(state_dict[key].shape) == torch_shape, (key, state_dict[key].shape, torch_shape)
  return state_dict


def convert_checkpoint(config, checkpoint_path: str, out: str, *, config_name: str = 'the config',
                      force: bool = False, dataparallel_prefix: bool = False, legacy_format: bool = False,
                      log: Callable[[str], None] = print) -> str:
  """The CLI's work: load the kpjax model, check it against `config` (validated here), write the
  state_dict atomically.

  Returns the absolute path written. Raises ConversionError, ConfigError, SpecMismatch,
  kpjax.errors.CheckpointError or OSError.
  """
  config_check.check_config(config, training=False)
  out_abs = os.fspath(paths.resolve(out))  # a local file or gs://...
  if paths.resolve(out_abs).is_dir():
    raise ConversionError(f'{out_abs} is a directory; --out names the .pth file to write')
  atomic.check_target(out_abs, replace=force, flag='--force', error=ConversionError)
  variables, metadata = checkpoints.load_model(checkpoint_path)
  found = checkpoints.check_metadata(metadata)
  try:
    spec_lib.ModelSpec.from_config(config).check_matches(found, spec_lib.NETWORK_FIELDS, mine=config_name,
                                                         theirs=checkpoint_path)
  except SpecMismatch as e:
    raise ConversionError(str(e)) from None
  arch = Architecture(n_locations=found.n_locations, width=found.width, num_stages=found.num_stages)
  state_dict = variables_to_state_dict(variables, arch)
  if dataparallel_prefix:
    state_dict = collections.OrderedDict((f'module.{k}', v) for k, v in state_dict.items())
  with atomic.staged_file(out_abs) as tmp:
    torch.save(state_dict, tmp, _use_new_zipfile_serialization=not legacy_format)
  log(f'wrote {out_abs}: state_dict of CoordRegression({arch.describe()}), {len(state_dict)} tensors'
      + (', keys prefixed with module.' if dataparallel_prefix else ''))
  log(f'note: feed it as it was trained or converted: preprocessing={found.convention.name!r}, '
      f'input_size={found.input_size} ({found.convention.description})')
  return out_abs


def _convert(args) -> int:
  convert_checkpoint(args.config, args.checkpoint, args.out, config_name=args.config_file, force=args.force,
                    dataparallel_prefix=args.dataparallel_prefix, legacy_format=args.legacy_format)
  return common.OK


def main(argv=None) -> int:
  parser = common.ArgumentParser(prog='python -m convert.flax_to_torch', description=__doc__.split('\n\n')[0])
  parser.add_config_flag(help_text='the category config, e.g. configs/trousers.py')
  parser.add_argument('--checkpoint', required=True, help='a kpjax model directory or training workdir')
  parser.add_argument('--out', required=True, help='the .pth file to write (must not exist unless --force)')
  parser.add_argument('--force', action='store_true', help='replace --out if it exists')
  parser.add_argument('--dataparallel-prefix', action='store_true',
                      help="prefix every key with 'module.' (for a DataParallel-wrapped model)")
  parser.add_argument('--legacy-format', action='store_true',
                      help="write torch's pre-1.6 file format, for PyTorch < 1.6")
  return common.run(_convert, common.parse(parser, argv))


if __name__ == '__main__':
  sys.exit(main())
