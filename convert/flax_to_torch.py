"""kpjax Flax models -> PyTorch state_dicts the original KPDEM code loads.

    python -m convert.flax_to_torch --config configs/trousers.py --checkpoint DIR --out trousers.pth

DIR is an exported model (e.g. from convert.torch_to_flax) or a training workdir (its latest
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

from convert import layout
from convert.layout import Architecture, LayoutError
from kpjax import atomic
from kpjax import checkpoint
from kpjax import keypoints


class ExportError(ValueError):
  """Variables or a checkpoint that cannot become the requested torch state_dict."""


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
    ExportError: the variables are not exactly the parameters of a KPDEM network (of `arch`).
  """
  shapes = layout.flax_torch_shapes(variables)
  try:
    found = layout.infer_architecture(shapes)
    if arch is not None and not layout.same_shapes(found, arch):
      raise ExportError(f'the variables hold a network with {found.describe()}, not {arch.describe()}')
    layout.check_parameters(shapes, arch or found, what='the Flax variables')
  except LayoutError as e:
    raise ExportError(str(e)) from None
  state_dict = collections.OrderedDict()
  for key, (torch_shape, path, _) in layout.expected_shapes(arch or found).items():
    array = np.asarray(_leaf(variables, path))
    if array.dtype != np.float32:
      array = array.astype(np.float32)
    state_dict[key] = torch.from_numpy(layout.flax_to_torch_array(key, array).copy())
    assert tuple(state_dict[key].shape) == torch_shape, (key, state_dict[key].shape, torch_shape)
  return state_dict


def _check_config(config, metadata: Mapping[str, Any], config_name: str, checkpoint_path: str) -> Architecture:
  try:
    category = keypoints.check_category(config.category)
  except ValueError as e:
    raise ExportError(f'{config_name}: {e}') from None
  wanted = {'category': category, 'width': float(config.model.width), 'num_stages': int(config.model.num_stages)}
  for key, value in wanted.items():
    if metadata[key] != value:
      flag = '--config' if key == 'category' else f'--config.model.{key}'
      fix = (f'pass the config of category {metadata[key]!r}' if key == 'category'
             else f'pass {flag}={metadata[key]:g}')
      raise ExportError(f'{config_name} says {key} = {value!r} but {checkpoint_path} holds a model with '
                        f'{key} = {metadata[key]!r}; {fix}')
  return Architecture(n_locations=int(metadata['n_locations']), width=float(metadata['width']),
                      num_stages=int(metadata['num_stages']))


def export_checkpoint(config, checkpoint_path: str, out: str, *, config_name: str = 'the config',
                      force: bool = False, dataparallel_prefix: bool = False, legacy_format: bool = False,
                      log: Callable[[str], None] = print) -> str:
  """The CLI's work: load the kpjax model, check it against `config`, write the state_dict atomically.

  Returns the absolute path written. Raises ExportError, kpjax.checkpoint.CheckpointError or OSError.
  """
  out_abs = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out_abs):
    raise ExportError(f'{out_abs} is a directory; --out names the .pth file to write')
  atomic.check_target(out_abs, replace=force, flag='--force', error=ExportError)
  variables, metadata = checkpoint.load_model(checkpoint_path)
  arch = _check_config(config, metadata, config_name, checkpoint_path)
  state_dict = variables_to_state_dict(variables, arch)
  if dataparallel_prefix:
    state_dict = collections.OrderedDict((f'module.{k}', v) for k, v in state_dict.items())
  with atomic.staged_file(out_abs) as tmp:
    torch.save(state_dict, tmp, _use_new_zipfile_serialization=not legacy_format)
  log(f'wrote {out_abs}: state_dict of CoordRegression({arch.describe()}), {len(state_dict)} tensors'
      + (', keys prefixed with module.' if dataparallel_prefix else ''))
  if metadata['preprocessing'] != 'kpdem':
    log(f"note: this model expects kpjax's input conventions (preprocessing={metadata['preprocessing']!r}, "
        f"input_size={metadata['input_size']}: letterboxed, mean/std-normalised images; coordinates in dsntnn's "
        '[-1, 1]), not the original training script\'s; feed it the same way in PyTorch')
  return out_abs


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from convert import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    sys.stderr.write(f'error: unexpected arguments {" ".join(argv[1:])}\n')
    sys.exit(2)
  f = flags.FLAGS
  cli.quiet_logging()
  try:
    export_checkpoint(f.config, f.checkpoint, f.out, config_name=config_flags.get_config_filename(f['config']),
                      force=f.force, dataparallel_prefix=f['dataparallel-prefix'].value,
                      legacy_format=f['legacy-format'].value)
  except (ExportError, checkpoint.CheckpointError, OSError) as e:
    sys.stderr.write(f'error: {e}\n')
    sys.exit(1)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Category config, e.g. configs/trousers.py.', lock_config=True)
  flags.DEFINE_string('checkpoint', None, 'A kpjax model directory or training workdir.')
  flags.DEFINE_string('out', None, 'The .pth file to write (must not exist unless --force).')
  flags.DEFINE_bool('force', False, 'Replace --out if it exists.')
  flags.DEFINE_bool('dataparallel-prefix', False, "Prefix every key with 'module.' (for a DataParallel-wrapped model).")
  flags.DEFINE_bool('legacy-format', False, "Write torch's pre-1.6 file format, for PyTorch < 1.6.")
  flags.mark_flags_as_required(['config', 'checkpoint', 'out'])


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top

  from convert import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
