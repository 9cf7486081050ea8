"""A kpjax model as one self-contained file: ONNX, or a serialized jax.export (StableHLO) module.

  python -m kpjax.export --checkpoint DIR --format onnx --out trousers.onnx
  python -m kpjax.export --checkpoint DIR --format stablehlo --out trousers.stablehlo [--batch 8]
      [--input-size S] [--config configs/trousers.py --config.FIELD=VALUE ...] [--step N] [--force]

The exported function is the network as `CoordRegressionNetwork.apply` runs it, in float32 with
direct convolutions: input `images` float32 (B, S, S, 3) NHWC, already preprocessed as the model's
metadata says; outputs `coords` (B, L, 2) and `heatmaps` (B, L, S, S). The batch is dynamic unless
`--batch N`; S is the model's input_size unless `--input-size`. The metadata (category, keypoint
names in output order, input size, preprocessing and what it means, kpjax version) goes into the ONNX
file's metadata_props, or for StableHLO into a JSON file beside it (FILE.json). Exit status 0, or 2
on an error, with one `error:` line and nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from typing import Any, Callable, Mapping, Sequence

import kpjax
from kpjax import cli
from kpjax import keypoints as kp

FORMATS = ('onnx', 'stablehlo')
EXTRA_HINT = "pip install 'kpjax[export]'"
PREPROCESSING = {  # what the input must be and what coords mean, per metadata 'preprocessing'; {s}: the input side
    'kpjax': ('RGB image letterboxed into {s}x{s} (scaled to fit with its aspect kept, centred, bilinear, padded '
              'with the ImageNet mean colour), then (pixel - 255 * [0.485, 0.456, 0.406]) / (255 * [0.229, 0.224, '
              "0.225]); coords are dsntnn's normalised (x, y) in [-1, 1]: input pixel = ((c + 1) * {s} - 1) / 2, "
              'then the inverse of the letterbox affine gives original pixels (kpjax.data.preprocess).'),
    'kpdem': ('RGB image resized to {s}x{s} as skimage.transform.resize does (bilinear, anti-aliased, values in '
              '[0, 1]), then divided by 255 once more (the original KPDEM script); coords are (x, y) in [0, 1] of '
              'the image: original pixel = (c_x * W, c_y * H) (kpjax.kpdem).'),
}


class ExportError(ValueError):
  """A request that cannot be exported: bad flags, an existing output, a missing optional package."""


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
  names = list(kp.keypoint_names(metadata['category']))
  mode = metadata['preprocessing']
  b = 'B' if batch is None else str(batch)
  info = {
      'format': fmt,
      'kpjax_version': kpjax.__version__,
      'category': metadata['category'],
      'keypoints': names,
      'n_locations': len(names),
      'input_size': int(input_size),
      'batch': 'dynamic' if batch is None else int(batch),
      'input': f'images: float32 ({b}, {input_size}, {input_size}, 3) NHWC, RGB, preprocessed as `preprocessing` says',
      'outputs': (f'coords: float32 ({b}, {len(names)}, 2) (x, y) per keypoint in `keypoints` order; heatmaps: '
                  f'float32 ({b}, {len(names)}, {input_size}, {input_size}), each map summing to 1'),
      'preprocessing': mode,
      'preprocessing_description': PREPROCESSING[mode].format(s=int(input_size)),
      'width': float(metadata['width']),
      'num_stages': int(metadata['num_stages']),
      'checkpoint_input_size': int(metadata['input_size']),
  }
  info.update({k: metadata[k] for k in ('source', 'sha256', 'step') if k in metadata})
  return info


def onnx_properties(info: Mapping[str, Any]) -> dict[str, str]:
  """ONNX metadata_props are strings: strings stay, everything else (lists, numbers) becomes JSON."""
  return {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}


def check_variables(model, variables, where: str) -> None:
  """Raises ExportError unless `variables` has exactly the parameter shapes `model` needs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def shapes(tree):
    return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}

  want = shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3), jnp.float32))))
  got = shapes(variables)
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      raise ExportError(f'{where} does not hold the network its metadata describes: {key} is '
                        f'{got.get(key, "missing")} in the checkpoint, {want.get(key, "not a parameter")} expected')


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder (created with the umask's
  permissions, unlike mkstemp's 0600) and a rename."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{secrets.token_hex(4)}')
  try:
    with open(tmp, 'xb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _import_onnx_builder():
  try:
    from kpjax import export_onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(f'--format onnx needs the onnx package ({e}); install it with {EXTRA_HINT}') from None
  return export_onnx


def export_model(checkpoint_path: str, fmt: str, out: str, *, config=None, input_size: int | None = None,
                 batch: int | None = None, step: int | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> list[str]:
  """Exports a kpjax model (any checkpoint `checkpoint.load_model` reads) to `out`.

  Args:
    checkpoint_path: an exported/converted model directory, a training workdir or a step directory.
    fmt: 'onnx' or 'stablehlo'.
    out: the file to write ('stablehlo' also writes out + '.json', the metadata).
    config: an ml_collections config to check against the checkpoint's metadata (optional).
    input_size: S (default: the metadata's input_size); a multiple of 8.
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
  out = os.path.abspath(os.path.expanduser(out))
  paths = [out] + ([out + '.json'] if fmt == 'stablehlo' else [])
  for path in paths:
    if os.path.isdir(path):
      raise ExportError(f'{path} is a directory; --out names the file to write')
    if os.path.exists(path) and not force:
      raise ExportError(f'{path} already exists; choose another --out or pass --force to replace it')
  builder = _import_onnx_builder() if fmt == 'onnx' else None
  from kpjax.data import preprocess  # pylint: disable=g-import-not-at-top
  if input_size is not None:
    preprocess.check_input_size(input_size)

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from kpjax import inference  # pylint: disable=g-import-not-at-top
  model, variables, metadata = inference.load_predictor(checkpoint_path, config, step=step)
  size = preprocess.check_input_size(int(metadata['input_size']) if input_size is None else input_size)
  model = model.clone(dtype=jnp.float32, conv_algorithm='direct')  # the portable, PyTorch-exact convolutions
  check_variables(model, variables, checkpoint_path)
  info = artifact_metadata(metadata, fmt, size, batch)
  if fmt == 'onnx':
    files = {out: builder.build_model(variables, model.num_stages, size, batch, onnx_properties(info))
             .SerializeToString()}
  else:
    from kpjax import export_stablehlo  # pylint: disable=g-import-not-at-top
    files = {out: export_stablehlo.export_bytes(model, variables, size, batch),
             out + '.json': (json.dumps(info, indent=2) + '\n').encode()}
  written = []
  try:
    for path, data in files.items():
      write_bytes_atomic(path, data)
      written.append(path)
  except BaseException:
    for path in written:  # a half-finished pair is worse than none
      os.unlink(path)
    raise
  b = 'batch' if batch is None else batch
  log(f'wrote {out} ({fmt}, {len(files[out]) / 1e6:.1f} MB): images float32 ({b}, {size}, {size}, 3) -> '
      f'coords ({b}, {info["n_locations"]}, 2), heatmaps ({b}, {info["n_locations"]}, {size}, {size}); '
      f'{metadata["category"]}, preprocessing {metadata["preprocessing"]}'
      + (f'; metadata in {out}.json' if fmt == 'stablehlo' else ''))
  return written


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one `error:` line (exit 2), like every other failure here."""

  def error(self, message):
    self.exit(2, f'error: {message} (see --help)\n')


def parse_args(argv: Sequence[str] | None):
  parser = _Parser(prog='python -m kpjax.export', description=__doc__.split('\n\n')[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='an exported or converted model directory, a training workdir or one of its steps')
  parser.add_argument('--format', required=True, help='onnx or stablehlo')
  parser.add_argument('--out', required=True, help='the file to write (stablehlo: also FILE.json)')
  parser.add_argument('--input-size', type=int, help="the square input side S (default: the model's input_size)")
  parser.add_argument('--batch', default='dynamic', help="'dynamic' (default) or a fixed batch size")
  parser.add_argument('--config', help='configs/X.py to check against the model; --config.FIELD=VALUE overrides')
  parser.add_argument('--step', type=int, help='the checkpoint step of a training workdir (default: latest)')
  parser.add_argument('--force', action='store_true', help='replace --out if it exists')
  args, rest = parser.parse_known_args(argv)
  overrides = [a[len('--config.'):] for a in rest if a.startswith('--config.')]
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  if overrides and not args.config:
    parser.error('--config.FIELD overrides need --config')
  return args, overrides


def run(args, overrides) -> int:
  config = None
  if args.config:
    from kpjax import inference  # pylint: disable=g-import-not-at-top
    config = inference.load_config(args.config, overrides)
  export_model(args.checkpoint, args.format, args.out, config=config, input_size=args.input_size,
               batch=args.batch, step=args.step, force=args.force)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args, overrides = parse_args(argv)
  return cli.run_reporting_errors(run, args, overrides)


if __name__ == '__main__':
  sys.exit(main())
