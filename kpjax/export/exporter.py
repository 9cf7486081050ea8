"""A kpjax model as one self-contained file: ONNX, or a serialized jax.export (StableHLO) module
(`python -m kpjax.export`, kpjax.cli.export).

The exported function is the network as `CoordRegressionNetwork.apply` runs it, in float32 with
direct convolutions: input `images` float32 (B, S, S, 3) NHWC, already preprocessed as the model's
metadata says; outputs `coords` (B, L, 2) and `heatmaps` (B, L, S, S). The batch is dynamic unless
`--batch N`; S is the model's input_size unless `--input-size` (not for a 'kpdem' model with 'truncated'
targets, whose outputs are cells of its own input's grid). The metadata (category, keypoint names in
output order, the flip pairs and skeleton among them, the whole keypoint set, input size, preprocessing
and what it means, kpjax version) goes into the ONNX
file's metadata_props, or for StableHLO into a JSON file beside it (FILE.json). A request that cannot
be carried out raises ExportError (or CheckpointError...) before anything is written.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import kpjax
from kpjax.errors import ExportError
from kpjax.io import atomic
from kpjax.io import paths

FORMATS = ('onnx', 'stablehlo')
EXTRA_HINT = "pip install 'kpjax[export]'"


def parse_batch(text: str | int | None) -> int | None:
  """'dynamic' (or None) -> None; a positive integer (or its text) -> that fixed batch size."""
  if text is None or text == 'dynamic':
    return None
  if isinstance(text, int) and not isinstance(text, bool):
    value = text
  else:
    value = int(text) if isinstance(text, str) and text.strip().isdigit() else 0
  if value < 1:
    raise ExportError(f"--batch must be 'dynamic' or a positive integer; got {text!r}")
  return value


def artifact_metadata(metadata: Mapping[str, Any], fmt: str, input_size: int, batch: int | None) -> dict[str, Any]:
  """What an exported file says about itself (JSON values): the model, its input and its outputs."""
  from kpjax.inference import checkpoints  # pylint: disable=g-import-not-at-top
  spec = checkpoints.check_metadata(dict(metadata))
  names = list(spec.keypoint_names)
  kset = spec.keypoint_set
  b = 'B' if batch is None else str(batch)
  info = {
      'format': fmt,
      'kpjax_version': kpjax.__version__,
      'category': metadata['category'],
      'keypoints': names,
      'n_locations': len(names),
      # Names of the outputs a horizontal flip swaps, and the edges drawn between outputs.
      'flip_pairs': [list(p) for p in kset.model_flip_pairs(spec.category)],
      'skeleton': [list(e) for e in kset.skeleton(spec.category)],
      'keypoint_set': kset.to_json(),  # everything else: categories, sigmas, normalisation (kpjax.data.keypoint_sets)
      'input_size': int(input_size),
      'batch': 'dynamic' if batch is None else int(batch),
      'input': f'images: float32 ({b}, {input_size}, {input_size}, 3) NHWC, RGB, preprocessed as `preprocessing` says',
      'outputs': (f'coords: float32 ({b}, {len(names)}, 2) (x, y) per keypoint in `keypoints` order; heatmaps: '
                  f'float32 ({b}, {len(names)}, {input_size}, {input_size}), each map summing to 1'),
      **spec.convention.metadata(),  # 'preprocessing' (and a kpdem model's 'kpdem_targets')
      'preprocessing_description': f'S = {input_size} ({input_size}x{input_size} input): '
                                   f'{spec.convention.description}',
      'width': float(metadata['width']),
      'num_stages': int(metadata['num_stages']),
      'checkpoint_input_size': int(metadata['input_size']),
  }
  info.update({k: metadata[k] for k in ('source', 'sha256', 'step') if k in metadata})
  return info


def onnx_properties(info: Mapping[str, Any]) -> dict[str, str]:
  """ONNX metadata_props are strings: strings stay, everything else (lists, numbers) becomes JSON."""
  return {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}


def _import_onnx_builder():
  try:
    from kpjax.export import onnx_graph  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(f'--format onnx needs the onnx package ({e}); install it with {EXTRA_HINT}') from None
  return onnx_graph


def export_model(checkpoint_path: str, fmt: str, out: str, *, config=None, input_size: int | None = None,
                 batch: int | None = None, step: int | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> list[str]:
  """Exports a kpjax model (any checkpoint kpjax.inference.checkpoints.load_model reads) to `out`.

  Args:
    checkpoint_path: a model directory (e.g. a converted one), a training workdir or a step directory.
    fmt: 'onnx' or 'stablehlo'.
    out: the file to write ('stablehlo' also writes out + '.json', the metadata).
    config: an ml_collections config to check against the checkpoint's metadata (optional).
    input_size: S (default: the metadata's input_size); even (kpjax.model.layers.INPUT_SIDE_RULE). A
      'kpdem' model with 'truncated' targets only exports at its own size (its outputs are cells of that
      grid): another is an ExportError.
    batch: a fixed batch size, or None for a dynamic batch.
    step: the step of a training workdir (default: its latest).
    force: replace existing output files.

  Returns:
    The absolute paths written. Raises ValueError (ExportError, CheckpointError...) on a user's mistake,
    before anything is written.
  """
  if fmt not in FORMATS:
    raise ExportError(f'unknown format {fmt!r}; expected one of {", ".join(FORMATS)}')
  batch = parse_batch(batch)
  out = os.fspath(paths.resolve(out))  # a local file or gs://...
  targets = [out] + ([out + '.json'] if fmt == 'stablehlo' else [])
  for path in targets:
    if paths.resolve(path).is_dir():
      raise ExportError(f'{path} is a directory; --out names the file to write')
    atomic.check_target(path, replace=force, flag='--force', error=ExportError)
  builder = _import_onnx_builder() if fmt == 'onnx' else None
  from kpjax.data import geometry  # pylint: disable=g-import-not-at-top
  if input_size is not None:
    geometry.check_input_size(input_size)
  if config is not None:
    from kpjax.train import config_check  # pylint: disable=g-import-not-at-top
    config_check.check_config(config, training=False)

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from kpjax.inference import checkpoints  # pylint: disable=g-import-not-at-top
  from kpjax.inference import predictor  # pylint: disable=g-import-not-at-top
  model, variables, spec, metadata = predictor.load_predictor(checkpoint_path, config, step=step)
  size = spec.input_size if input_size is None else input_size
  problem = spec.convention.other_input_size_problem(spec.input_size, size)
  if problem:
    raise ExportError(f'--input-size {size}: the model was trained at {spec.input_size}x{spec.input_size} and '
                      f'{problem}; export it at its own size (leave out --input-size)')
  model = model.clone(dtype=jnp.float32, conv_algorithm='direct')  # the portable, PyTorch-exact convolutions
  checkpoints.check_fits(model, variables, checkpoint_path)
  info = artifact_metadata(metadata, fmt, size, batch)
  if fmt == 'onnx':
    files = {out: builder.build_model(variables, model.num_stages, size, batch, onnx_properties(info))
             .SerializeToString()}
  else:
    from kpjax.export import stablehlo  # pylint: disable=g-import-not-at-top
    files = {out: stablehlo.export_bytes(model, variables, size, batch),
             out + '.json': (json.dumps(info, indent=2) + '\n').encode()}
  written = []
  try:
    for path, data in files.items():
      atomic.write_bytes(path, data)
      written.append(path)
  except BaseException:
    for path in written:  # a half-finished pair is worse than none
      paths.resolve(path).unlink()
    raise
  b = 'batch' if batch is None else batch
  log(f'wrote {out} ({fmt}, {len(files[out]) / 1e6:.1f} MB): images float32 ({b}, {size}, {size}, 3) -> '
      f'coords ({b}, {info["n_locations"]}, 2), heatmaps ({b}, {info["n_locations"]}, {size}, {size}); '
      f'{spec.category}, preprocessing {spec.convention.name}'
      + (f'; metadata in {out}.json' if fmt == 'stablehlo' else ''))
  return written
