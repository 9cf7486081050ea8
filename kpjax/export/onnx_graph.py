"""KPDEM as an ONNX graph, written straight from kpjax's layer tables and Flax variables.

Why this route (measured with onnx 1.23, onnxruntime 1.32 on a slim 2-stage network, 32x32, against
`CoordRegressionNetwork.apply` with direct convolutions):

* this builder: needs only `onnx` to write (onnxruntime to run it): one Conv (+ Relu) per layer,
  pool_unpool as ONNX MaxPool(indices) + MaxUnpool, one Transpose, flat softmax and DSNT as Reshape,
  Softmax, ReduceSum, MatMul: 63 nodes (119 for the full 6-stage network); coordinates agree to 5e-8
  (7.5e-6 for the full network at 64x64 with random He-normal weights).
* torch (`convert.flax_to_torch` + `torch.onnx.export`, torch 2.13): the TorchScript exporter
  (dynamo=False) fails on MaxUnpool2d; the dynamo exporter works (116 nodes: MaxUnpool becomes MaxPool
  pairs + ScatterND, same agreement) but needs torch, onnxscript and dsntnn, and kpjax would import torch.
* jax2onnx 0.17: works (331 nodes, 78 of them Transposes around NHWC convolutions), but pins
  orbax-checkpoint < 0.11.37 (kpjax uses 0.12) and pulls equinox, dm-pix, netron, huggingface-hub.

onnxruntime's MaxPool keeps the first maximum of a window in row-major order, as torch and
`kpjax.model.pool_unpool` do, so ties (flat regions such as letterbox padding) give the same result.
The graph is float32 whatever the checkpoint's compute dtype; parameters are stored as initialisers
named like the torch state_dict (`fcn.model1_0_0.conv1_1.weight`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper
from onnx import TensorProto

from kpjax.model import layers as model_lib

OPSET = 17  # MaxUnpool (11), ReduceSum with axes as an input (13); onnxruntime >= 1.13, TensorRT >= 8.6
IR_VERSION = 8  # the IR version of opset 17, so that onnxruntimes older than the onnx package load the file
INPUT = 'images'
OUTPUTS = ('coords', 'heatmaps')


class _Graph:
  """Accumulates nodes and initialisers; every helper returns the name of the tensor it produced."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []

  def const(self, name: str, array) -> str:
    self.initializers.append(numpy_helper.from_array(np.asarray(array), name=name))
    return name

  def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> str | list[str]:
    names = [name] if outputs == 1 else [f'{name}:{i}' for i in range(outputs)]
    self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **attrs))
    return names[0] if outputs == 1 else names

  def conv(self, x: str, kernel_hwio, bias, name: str) -> str:
    """A stride-1 'SAME' convolution (odd kernel) with a Flax HWIO kernel, as kpjax.model.network.Conv."""
    kernel = np.ascontiguousarray(np.asarray(kernel_hwio, np.float32).transpose(3, 2, 0, 1))  # OIHW
    k = kernel.shape[-1]
    inputs = [x, self.const(f'{name}.weight', kernel)]
    if bias is not None:
      inputs.append(self.const(f'{name}.bias', np.asarray(bias, np.float32)))
    return self.op('Conv', inputs, name, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1])

  def pool_unpool(self, x: str, name: str) -> str:
    """kpjax.model.pool_unpool on NCHW: MaxPool 2x2 with indices, then MaxUnpool to the same size."""
    pooled, indices = self.op('MaxPool', [x], f'{name}.maxpool', outputs=2, kernel_shape=[2, 2], strides=[2, 2])
    return self.op('MaxUnpool', [pooled, indices], f'{name}.maxunpool', kernel_shape=[2, 2], strides=[2, 2])


def _block(g: _Graph, x: str, params: Mapping[str, Any], spec) -> str:
  block_name, layers = spec
  for layer, _, _ in layers:
    p = params[block_name][layer]
    name = f'fcn.{block_name}.{layer}'
    x = g.conv(x, p['kernel'], p['bias'], name)
    if layer not in model_lib.NO_RELU:
      x = g.op('Relu', [x], f'{name}.relu')
  return x


def build_model(variables: Mapping[str, Any], num_stages: int, input_size: int, batch: int | None = None,
                metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
  """The ONNX model of `CoordRegressionNetwork(n_locations, width, num_stages).apply(variables, images)`.

  Args:
    variables: Flax variables {'params': {'fcn': ..., 'hm_conv': ...}} (width and n_locations follow
      from their shapes; they must match the network, see kpjax.export).
    num_stages: CPM stages (1..6).
    input_size: S, the square input side (even: kpjax.model.layers.INPUT_SIDE_RULE).
    batch: a fixed batch size, or None for a dynamic one ('batch').
    metadata: string key/values stored in the model's metadata_props.

  Returns:
    A checked ModelProto: input `images` float32 (B, S, S, 3) NHWC; outputs `coords` (B, L, 2)
    (x, y) in dsntnn's normalised units and `heatmaps` (B, L, S, S), each map summing to 1.
  """
  params = variables['params']
  n_locations = int(np.shape(params['hm_conv']['kernel'])[-1])
  b = 'batch' if batch is None else int(batch)
  g = _Graph()
  x = g.op('Transpose', [INPUT], 'nhwc_to_nchw', perm=[0, 3, 1, 2])
  for i, spec in enumerate(model_lib.BACKBONE):
    x = _block(g, x, params['fcn'], spec)
    if i < len(model_lib.BACKBONE) - 1:
      x = g.pool_unpool(x, f'fcn.{spec[0]}')
  features = x
  beliefs = _block(g, features, params['fcn'], model_lib.STAGE1)
  for i in range(2, num_stages + 1):
    joined = g.op('Concat', [beliefs, features], f'fcn.model{i}.concat', axis=1)  # as jnp.concatenate([b, f], -1)
    beliefs = _block(g, joined, params['fcn'], model_lib.refinement_stage(i))
  logits = g.conv(beliefs, params['hm_conv']['kernel'], None, 'hm_conv')  # (B, L, S, S)
  # dsnt.flat_softmax: one softmax over all S * S cells of each map.
  flat = g.op('Reshape', [logits, g.const('flat_shape', np.array([0, 0, -1], np.int64))], 'flatten')
  probs = g.op('Softmax', [flat], 'flat_softmax', axis=2)
  heatmaps = g.op('Reshape', [probs, g.const('map_shape', np.array([0, 0, input_size, input_size], np.int64))],
                  OUTPUTS[1])
  # dsnt.dsnt: the expectation of each axis' pixel-centre coordinates -1 + (2 i + 1) / S under its marginal.
  centres = ((2 * np.arange(input_size, dtype=np.float32) + 1) / input_size - 1).reshape(-1, 1)
  centres = g.const('pixel_centres', centres.astype(np.float32))
  x_marginal = g.op('ReduceSum', [heatmaps, g.const('rows_axis', np.array([2], np.int64))], 'x_marginal',
                    keepdims=0)  # (B, L, S) over columns
  y_marginal = g.op('ReduceSum', [heatmaps, g.const('columns_axis', np.array([3], np.int64))], 'y_marginal',
                    keepdims=0)
  x_mean = g.op('MatMul', [x_marginal, centres], 'x_expectation')  # (B, L, 1)
  y_mean = g.op('MatMul', [y_marginal, centres], 'y_expectation')
  g.op('Concat', [x_mean, y_mean], OUTPUTS[0], axis=2)

  graph = helper.make_graph(
      g.nodes, 'kpdem', [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [b, input_size, input_size, 3])],
      [helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT, [b, n_locations, 2]),
       helper.make_tensor_value_info(OUTPUTS[1], TensorProto.FLOAT, [b, n_locations, input_size, input_size])],
      initializer=g.initializers)
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)], producer_name='kpjax',
                            ir_version=IR_VERSION)
  if metadata:
    helper.set_model_props(proto, dict(metadata))
  onnx.checker.check_model(proto, full_check=True)  # also runs shape inference over the whole graph
  return proto
