"""A kpjax model as one self-contained file: ONNX (`onnx_graph`) or StableHLO (`stablehlo`); `exporter`
does the whole job, `python -m kpjax.export` is its command line (kpjax.cli.export)."""
