"""KPDEM's layer tables: the network as data, read by the Flax modules, both converters and the ONNX export.

Block and layer names are the PyTorch original's module names (`convert/torch_model.py`), so the torch
state_dict key `fcn.model1_0_0.conv1_1.weight` is `params/fcn/model1_0_0/conv1_1/kernel` here. Nothing here
imports JAX or Flax: config validation reads these constants.
"""

from __future__ import annotations

import numbers

# One row per conv: (name, output channels, kernel size). Stride 1, padding kernel // 2, ReLU after
# every conv except those in NO_RELU. HEATMAP_CHANNELS outputs are not scaled by `width`.
Layer = tuple[str, int, int]
HEATMAP_CHANNELS = 24

BACKBONE: tuple[tuple[str, tuple[Layer, ...]], ...] = (  # each block is followed by pool_unpool but the last
    ('model1_0_0', (('conv1_1', 64, 3), ('conv1_2', 64, 3))),
    ('model1_0_1', (('conv2_1', 128, 3), ('conv2_2', 128, 3))),
    ('model1_0_2', (('conv3_1', 256, 3), ('conv3_2', 256, 3), ('conv3_3', 256, 3), ('conv3_4', 256, 3))),
    ('model1_0_3', (('conv4_1', 512, 3), ('conv4_2', 512, 3), ('conv4_3', 512, 3), ('conv4_4', 512, 3),
                    ('conv5_1', 512, 3), ('conv5_2', 512, 3), ('conv5_3_CPM', 128, 3))),
)
STAGE1: tuple[str, tuple[Layer, ...]] = (
    'model1_1', (('conv6_1_CPM', 512, 1), ('conv6_2_CPM', HEATMAP_CHANNELS, 1)))


def refinement_stage(i: int) -> tuple[str, tuple[Layer, ...]]:
  """Stage i (2..6): 5 7x7 convs, a 1x1, and a 1x1 to the 24 belief maps."""
  return (f'model{i}', tuple((f'Mconv{j}_stage{i}', 128, 7) for j in range(1, 6))
          + ((f'Mconv6_stage{i}', 128, 1), (f'Mconv7_stage{i}', HEATMAP_CHANNELS, 1)))


NO_RELU = frozenset(['conv6_2_CPM'] + [f'Mconv7_stage{i}' for i in range(2, 7)])
MAX_STAGES = 6
# The network's conv_algorithm values: kpjax.model.conv's, plus 'direct-pooled' (see block_conv_algorithm).
CONV_ALGORITHMS = ('auto', 'direct', 'winograd', 'direct-pooled')


def scaled_channels(channels: int, width: float) -> int:
  """Hidden channel count at `width` (belief-map outputs stay HEATMAP_CHANNELS)."""
  if channels == HEATMAP_CHANNELS:
    return channels
  return max(1, int(round(channels * width)))


# The one constraint on the input's size. Each 2x2 max-pool (stride 2) needs even sides, and each is undone at
# once by its max-unpool, so every block runs at the input's own size: nothing else divides it.
INPUT_SIDE_RULE = ('a positive even number of pixels (the 2x2 max-pools need even sides; each is undone at once, '
                   'so every block runs at the input size)')


def valid_side(side) -> bool:
  """Whether `side` (pixels) is a height or width the network takes: positive and even (INPUT_SIDE_RULE)."""
  return isinstance(side, numbers.Integral) and not isinstance(side, bool) and side > 0 and side % 2 == 0
