"""PyTorch KPDEM checkpoints -> kpjax Flax/orbax models.

    python -m convert.torch_to_flax --config configs/trousers.py \
        --torch-checkpoint trousers_landmarks.pt --out converted/trousers [--verify] [--force]

reads the checkpoint safely and without torch (convert.torch_loading over kpjax.io.torch_file: the
released whole-module pickles, state_dicts, wrapping dicts, `module.`/`_orig_mod.` prefixes; nothing in
the file runs), infers n_locations, width and num_stages from its shapes, checks them against the
config, converts every tensor exactly once (conv weights OIHW -> HWIO, convert.layout) and writes a kpjax
model directory
(kpjax.inference.checkpoints.save_model: atomic) whose metadata records the source file, its SHA-256 and the
input conventions: preprocessing 'kpdem' at 64x64 by default, the original's (kpjax.data.kpdem), and for
'kpdem' the targets the model was trained on (`kpdem_targets`: 'truncated' by default, as the
released models were; 'exact' for a model retrained on unrounded targets). torch is imported only
for --verify.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping

import numpy as np

from . import layout
from . import torch_loading
from .layout import Architecture
from kpjax.cli import common
from kpjax.data import conventions
from kpjax.data import keypoints
from kpjax.data import kpdem
from kpjax.data.spec import ModelSpec
from kpjax.errors import ConfigError, ConversionError, LayoutError
from kpjax.inference import checkpoints
from kpjax.io import atomic
from kpjax.io import paths
from kpjax.io import torch_file
from kpjax.train import config_check

DEFAULT_INPUT_SIZE = 64  # the published training script's square input
DEFAULT_PREPROCESSING = 'kpdem'
VERIFY_TOLERANCE = 1e-3  # largest |coordinate difference| (normalised units) --verify accepts


def _to_numpy(key: str, value: Any) -> np.ndarray:
  """A tensor (numpy, or torch where the caller has torch) -> float32 numpy (float16/bfloat16/float64 are
  cast), refusing non-floats."""
  torch = sys.modules.get('torch')  # a torch tensor exists only where torch is imported: never import it here
  if torch is not None and isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    if not value.dtype.is_floating_point:
      raise ConversionError(f'{key} is a {value.dtype} tensor; KPDEM parameters are floating point')
    return value.to(torch.float32).numpy()
  array = np.asarray(value)
  if array.dtype not in torch_file.FLOAT_DTYPES:
    raise ConversionError(f'{key} has dtype {array.dtype}; KPDEM parameters are floating point')
  return array.astype(np.float32, copy=False)


def _shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in state_dict.items()}


def _categories_with(n: int) -> list[str]:
  return [c for c in keypoints.CATEGORIES + (keypoints.ALL,) if keypoints.num_keypoints(c) == n]


def _n_locations_hint(found: int, category: str | None) -> str:
  fits = _categories_with(found)
  if fits:
    hint = (f'A {found}-keypoint checkpoint is a {" or ".join(fits)} model: convert it with '
            f'{" or ".join(f"--config configs/{c}.py" for c in fits)}.')
  else:
    hint = f'No FashionAI category has {found} keypoints: check that this is a KPDEM checkpoint for this data.'
  if category == 'outwear' and found == 15:
    hint += (' (The KPDEM write-up says 15 keypoints for outwear, but the FashionAI data has 14 outwear keypoints; '
             'a 15-output outwear model cannot be mapped onto them without knowing which output is which.)')
  return hint


def check_against(found: Architecture, expected: Architecture, shapes: Mapping[str, tuple[int, ...]],
                  source: str = 'the config', category: str | None = None) -> None:
  """Raises ConversionError if the checkpoint's network (`found`) is not the `expected` one.

  Names the deciding tensor, both shapes, and the setting to change. Differences it does not
  single out are left to layout.check_parameters, which lists every key.
  """
  want = layout.expected_shapes(expected)
  if found.n_locations != expected.n_locations:
    what = f'category {category!r} has' if category else 'it expects'
    raise ConversionError(
        f'{layout.HM_CONV_KEY} has shape {shapes[layout.HM_CONV_KEY]} in the checkpoint but {source} needs '
        f'{want[layout.HM_CONV_KEY][0]}: the checkpoint predicts {found.n_locations} keypoints and {what} '
        f'{expected.n_locations}. {_n_locations_hint(found.n_locations, category)}')
  if found.num_stages != expected.num_stages:
    last = f'fcn.model{found.num_stages}' if found.num_stages > 1 else 'fcn.model1_1 (no refinement stage)'
    raise ConversionError(
        f'the checkpoint has CPM stages 1..{found.num_stages} (its last block is {last}) but {source} has '
        f'model.num_stages={expected.num_stages}; pass --config.model.num_stages={found.num_stages}')
  for key in (layout.WIDEST_CONV_KEY, layout.FIRST_CONV_KEY):
    if key in shapes and shapes[key] != want[key][0]:
      raise ConversionError(
          f'{key} has shape {shapes[key]} in the checkpoint but {want[key][0]} for model.width={expected.width:g} '
          f'in {source}: the checkpoint was made with width {found.width:g}; pass --config.model.width={found.width:g}')


def convert_state_dict(state_dict: Mapping[str, Any], *, n_locations: int | None = None, width: float | None = None,
                       num_stages: int | None = None, source: str = 'the requested model',
                       category: str | None = None) -> dict:
  """A torch KPDEM state_dict -> Flax variables {'params': ...} (numpy float32, kernels HWIO).

  Args:
    state_dict: torch keys (`module.`/`_orig_mod.` prefixes allowed) -> tensors (torch or numpy).
    n_locations, width, num_stages: what the caller expects; each one left None is inferred from
      the shapes (hm_conv.weight, the convs' channel counts, the fcn.model<i> blocks present).
    source: names the expectation in error messages (e.g. "configs/trousers.py (category 'trousers')").
    category: the expected garment category, for the hint when n_locations differs.

  Raises:
    ConversionError: the checkpoint's network differs from the expected one, or is not exactly a
      KPDEM network (every tensor must be used once and every parameter filled).
  """
  state_dict, _ = torch_loading.strip_prefixes(state_dict)
  shapes = _shapes(state_dict)
  try:
    found = layout.infer_architecture(shapes)
    arch = found
    if (n_locations, width, num_stages) != (None, None, None):
      expected = Architecture(n_locations=found.n_locations if n_locations is None else int(n_locations),
                              width=found.width if width is None else float(width),
                              num_stages=found.num_stages if num_stages is None else int(num_stages))
      if not layout.same_shapes(found, expected):
        check_against(found, expected, shapes, source, category)
      arch = expected
    layout.check_parameters(shapes, arch)
  except LayoutError as e:
    raise ConversionError(str(e)) from None
  variables: dict = {}
  for key, (_, path, flax_shape) in layout.expected_shapes(arch).items():
    array = layout.torch_to_flax_array(key, _to_numpy(key, state_dict[key]))
    assert array.shape == flax_shape, (key, array.shape, flax_shape)
    layout.nested_set(variables, path, array)
  return variables


def compare_with_torch(state_dict: Mapping[str, Any], variables: Mapping[str, Any], arch: Architecture,
                       input_size: int, preprocessing: str, seed: int = 0) -> dict[str, float]:
  """Runs the torch network (convert.torch_model) and the Flax one on one random image.

  The image has the value range the model's preprocessing gives (`IOConvention.example_input`).
  Returns {'coords': max |difference| of the coordinates (normalised units), 'heatmaps': max
  |difference| of the heatmaps}.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top

    from . import torch_model  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f'--verify runs the original torch network, which needs torch and dsntnn ({e}): '
                          'pip install "kpjax[torch]", or convert without --verify') from None
  from kpjax.model import network  # pylint: disable=g-import-not-at-top

  image = conventions.get(preprocessing).example_input(np.random.default_rng(seed), (1, input_size, input_size, 3))
  net = torch_model.CoordRegression(arch.n_locations, width=arch.width, num_stages=arch.num_stages)
  clean, _ = torch_loading.strip_prefixes(state_dict)
  net.load_state_dict({k: torch.from_numpy(_to_numpy(k, v).copy()) for k, v in clean.items()}, strict=True)
  net.eval()
  with torch.no_grad():
    t_coords, t_heatmaps = net(torch.from_numpy(image).permute(0, 3, 1, 2).contiguous())
  flax_net = network.CoordRegressionNetwork(arch.n_locations, width=arch.width, num_stages=arch.num_stages)
  f_coords, f_heatmaps = flax_net.apply(variables, jnp.asarray(image))
  return {'coords': float(np.max(np.abs(np.asarray(f_coords) - t_coords.numpy()))),
          'heatmaps': float(np.max(np.abs(np.asarray(f_heatmaps) - t_heatmaps.numpy())))}


def convert_checkpoint(config, torch_checkpoint: str, out: str, *, config_name: str = 'the config',
                       input_size: int = DEFAULT_INPUT_SIZE, preprocessing: str = DEFAULT_PREPROCESSING,
                       kpdem_targets: str = kpdem.CONVERTED_TARGETS, force: bool = False, verify: bool = False,
                       log: Callable[[str], None] = print) -> tuple[str, dict[str, Any]]:
  """The CLI's work: read, check, convert, optionally verify, then write `out` atomically.

  The model written is the config's (validated here, kpjax.train.config_check) at `input_size` with
  `preprocessing`. Nothing is written unless every step succeeds. Returns (absolute output path,
  metadata). Raises TorchFileError, ConversionError, ConfigError or CheckpointError.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.input_size, config.preprocessing, config.kpdem_targets = input_size, preprocessing, kpdem_targets
  try:
    config_check.check_config(config, training=False)
  except ConfigError as e:  # the two flags of this command, or a field of the config file
    flags = {'config.input_size': '--input-size', 'config.preprocessing': '--preprocessing',
             'config.kpdem_targets': '--kpdem-targets'}
    message = str(e)
    for field, flag in flags.items():
      message = message.replace(field, flag)
    raise ConversionError(message) from None
  spec = ModelSpec.from_config(config)
  out_abs = os.fspath(paths.resolve(out))  # a local directory or gs://...
  # fail before the (slow) reading and converting; save_model checks again
  atomic.check_target(out_abs, replace=force, flag='--force', error=checkpoints.CheckpointError)
  expected = Architecture(n_locations=spec.n_locations, width=spec.width, num_stages=spec.num_stages)
  source = f"{config_name} (category '{spec.category}')"

  ckpt = torch_loading.load_torch_checkpoint(torch_checkpoint)
  log(f'read {ckpt.path}: {ckpt.container}, {ckpt.file_format} format, {len(ckpt.state_dict)} tensors'
      + (f', removed key prefixes {" ".join(ckpt.prefixes)}' if ckpt.prefixes else ''))
  variables = convert_state_dict(ckpt.state_dict, n_locations=expected.n_locations, width=expected.width,
                                 num_stages=expected.num_stages, source=source, category=spec.category)
  log(f'converted {len(ckpt.state_dict)} tensors -> CoordRegressionNetwork({expected.describe()})')
  metadata = spec.metadata(source=os.path.basename(ckpt.path), sha256=ckpt.sha256,
                           source_format=f'{ckpt.container} ({ckpt.file_format})', converter='convert.torch_to_flax')
  if verify:
    diffs = compare_with_torch(ckpt.state_dict, variables, expected, spec.input_size, spec.convention.name)
    log(f'verify: largest coordinate difference {diffs["coords"]:.3g}, largest heatmap difference '
        f'{diffs["heatmaps"]:.3g} (torch vs Flax, one random {spec.input_size}x{spec.input_size} image)')
    if not diffs['coords'] <= VERIFY_TOLERANCE:
      raise ConversionError(f'--verify: the converted model disagrees with the torch one (coordinates differ by '
                            f'{diffs["coords"]:.3g} > {VERIFY_TOLERANCE}); nothing was written')
  path = checkpoints.save_model(out_abs, variables, metadata, force=force)
  log(f'wrote {path} ({", ".join(f"{k}={v}" for k, v in spec.convention.metadata().items())}, '
      f'input_size={spec.input_size})')
  return path, metadata


def _convert(args) -> int:
  convert_checkpoint(args.config, args.torch_checkpoint, args.out, config_name=args.config_file,
                     input_size=args.input_size, preprocessing=args.preprocessing, kpdem_targets=args.kpdem_targets,
                     force=args.force, verify=args.verify)
  return common.OK


def main(argv=None) -> int:
  parser = common.ArgumentParser(prog='python -m convert.torch_to_flax', description=__doc__.split('\n\n')[0])
  parser.add_config_flag(help_text='the category config, e.g. configs/trousers.py (fields may be overridden: '
                         '--config.model.width=0.5)')
  parser.add_argument('--torch-checkpoint', required=True,
                      help='the PyTorch file: a released whole-module pickle, a state_dict or a dict wrapping one')
  parser.add_argument('--out', required=True, help='the model directory to write (must not exist unless --force)')
  parser.add_argument('--input-size', type=int, default=DEFAULT_INPUT_SIZE,
                      help='side of the square network input recorded in the metadata (the original trained at 64)')
  parser.add_argument('--preprocessing', default=DEFAULT_PREPROCESSING, choices=conventions.NAMES,
                      help="input conventions recorded in the metadata: 'kpdem' (the original's, for released "
                      "models) or 'kpjax'")
  parser.add_argument('--kpdem-targets', default=kpdem.CONVERTED_TARGETS, choices=kpdem.TARGETS,
                      help="with --preprocessing kpdem, the targets the model was trained on, recorded in the "
                      "metadata: 'truncated' (the original's dataset code: floor(x * 64 / W) / 64; outputs are "
                      "mapped to the cell centre) or 'exact' (x / W, for a model retrained on unrounded targets)")
  parser.add_argument('--force', action='store_true',
                      help='replace --out if it exists (only once the new model is complete)')
  parser.add_argument('--verify', action='store_true',
                      help='run the torch and the converted network on a random image and print the largest '
                      'coordinate and heatmap differences (fails above 1e-3)')
  return common.run(_convert, common.parse(parser, argv))


if __name__ == '__main__':
  sys.exit(main())
