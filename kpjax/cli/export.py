"""`python -m kpjax.export`: a kpjax model as one self-contained ONNX or StableHLO file (kpjax.export).

  python -m kpjax.export --checkpoint DIR --format onnx --out trousers.onnx
  python -m kpjax.export --checkpoint DIR --format stablehlo --out trousers.stablehlo [--batch 8]
      [--input-size S] [--config configs/trousers.py --config.FIELD=VALUE ...] [--step N] [--force]

Exit status 0, or 2 on an error, with one `error:` line and nothing written.
"""

from __future__ import annotations

from typing import Sequence

from kpjax.cli import common
from kpjax.export import exporter


def parse_args(argv: Sequence[str] | None):
  """The parsed flags (`args.config` loaded or None), or exit status 2 with one `error:` line."""
  parser = common.ArgumentParser(prog='python -m kpjax.export', description=exporter.__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='a model directory (e.g. a converted one), a training workdir or one of its steps')
  parser.add_argument('--format', required=True, help='onnx or stablehlo')
  parser.add_argument('--out', required=True, help='the file to write (stablehlo: also FILE.json)')
  parser.add_argument('--input-size', type=int, help="the square input side S (default: the model's input_size)")
  parser.add_argument('--batch', default='dynamic', help="'dynamic' (default) or a fixed batch size")
  parser.add_config_flag(required=False, help_text='configs/X.py to check against the model; --config.FIELD=VALUE '
                         'overrides its fields')
  parser.add_argument('--step', type=int, help='the checkpoint step of a training workdir (default: latest)')
  parser.add_argument('--force', action='store_true', help='replace --out if it exists')
  return common.parse(parser, argv)


def run(args) -> int:
  exporter.export_model(args.checkpoint, args.format, args.out, config=args.config, input_size=args.input_size,
               batch=args.batch, step=args.step, force=args.force)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return common.run(run, parse_args(argv))

