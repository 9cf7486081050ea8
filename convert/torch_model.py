"""The PyTorch KPDEM network, written from the KPDEM write-up: the repository's one torch definition.

`KeyPointsModel` and `CoordRegression` keep the original's module and layer names (so their state_dict
keys are the released checkpoints' keys, less the `module.` DataParallel prefix). Two knobs, both off by
default, give slim variants for tests and benchmarks: `width` scales every hidden channel count to
round(c * width) (the 24 belief-map channels stay), `num_stages` keeps CPM stages 1..num_stages.
Written independently of kpjax.model, so the tests compare two separate readings of the network.
"""

from __future__ import annotations

from collections import OrderedDict

import dsntnn
import torch
from torch import nn

BELIEF_CHANNELS = 24


def _scale(c: int, width: float) -> int:
  if c in (3, BELIEF_CHANNELS):  # RGB input and belief maps keep their size
    return c
  return max(1, int(round(c * width)))


def make_layers(block: OrderedDict, no_relu_layers) -> nn.Sequential:
  """[in, out, kernel, stride, padding] rows -> Conv2d (+ ReLU unless listed), named as in the table."""
  layers = []
  for layer_name, v in block.items():
    layers.append((layer_name, nn.Conv2d(in_channels=v[0], out_channels=v[1], kernel_size=v[2], stride=v[3],
                                         padding=v[4])))
    if layer_name not in no_relu_layers:
      layers.append(('relu_' + layer_name, nn.ReLU(inplace=True)))
  return nn.Sequential(OrderedDict(layers))


class KeyPointsModel(nn.Module):
  """The CPM backbone: (B, 3, H, W) -> 24 belief maps (B, 24, H, W); pools are undone at once."""

  def __init__(self, width: float = 1.0, num_stages: int = 6):
    super().__init__()
    if not 1 <= num_stages <= 6:
      raise ValueError(f'num_stages must be in 1..6; got {num_stages}')
    self.num_stages = num_stages
    no_relu_layers = ['conv6_2_CPM', 'Mconv7_stage2', 'Mconv7_stage3', 'Mconv7_stage4', 'Mconv7_stage5',
                      'Mconv7_stage6']
    self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=0, return_indices=True)
    self.maxunpool = nn.MaxUnpool2d(2, stride=2)

    blocks = OrderedDict()
    blocks['block1_0_0'] = OrderedDict([
        ('conv1_1', [3, 64, 3, 1, 1]),
        ('conv1_2', [64, 64, 3, 1, 1]),
    ])
    blocks['block1_0_1'] = OrderedDict([
        ('conv2_1', [64, 128, 3, 1, 1]),
        ('conv2_2', [128, 128, 3, 1, 1]),
    ])
    blocks['block1_0_2'] = OrderedDict([
        ('conv3_1', [128, 256, 3, 1, 1]),
        ('conv3_2', [256, 256, 3, 1, 1]),
        ('conv3_3', [256, 256, 3, 1, 1]),
        ('conv3_4', [256, 256, 3, 1, 1]),
    ])
    blocks['block1_0_3'] = OrderedDict([
        ('conv4_1', [256, 512, 3, 1, 1]),
        ('conv4_2', [512, 512, 3, 1, 1]),
        ('conv4_3', [512, 512, 3, 1, 1]),
        ('conv4_4', [512, 512, 3, 1, 1]),
        ('conv5_1', [512, 512, 3, 1, 1]),
        ('conv5_2', [512, 512, 3, 1, 1]),
        ('conv5_3_CPM', [512, 128, 3, 1, 1]),
    ])
    blocks['block1_1'] = OrderedDict([
        ('conv6_1_CPM', [128, 512, 1, 1, 0]),
        ('conv6_2_CPM', [512, 24, 1, 1, 0]),
    ])
    for i in range(2, num_stages + 1):
      blocks['block%d' % i] = OrderedDict([
          ('Mconv1_stage%d' % i, [152, 128, 7, 1, 3]),
          ('Mconv2_stage%d' % i, [128, 128, 7, 1, 3]),
          ('Mconv3_stage%d' % i, [128, 128, 7, 1, 3]),
          ('Mconv4_stage%d' % i, [128, 128, 7, 1, 3]),
          ('Mconv5_stage%d' % i, [128, 128, 7, 1, 3]),
          ('Mconv6_stage%d' % i, [128, 128, 1, 1, 0]),
          ('Mconv7_stage%d' % i, [128, 24, 1, 1, 0]),
      ])

    for k, block in blocks.items():
      for name, (cin, cout, kernel, stride, pad) in block.items():
        if name.startswith('Mconv1_stage'):  # 152 = 24 belief maps + 128 backbone features
          cin_scaled = BELIEF_CHANNELS + _scale(128, width)
        else:
          cin_scaled = _scale(cin, width)
        block[name] = [cin_scaled, _scale(cout, width), kernel, stride, pad]
      blocks[k] = make_layers(block, no_relu_layers)

    self.model1_0_0 = blocks['block1_0_0']
    self.model1_0_1 = blocks['block1_0_1']
    self.model1_0_2 = blocks['block1_0_2']
    self.model1_0_3 = blocks['block1_0_3']
    self.model1_1 = blocks['block1_1']
    for i in range(2, num_stages + 1):
      setattr(self, 'model%d' % i, blocks['block%d' % i])

  def forward(self, x):
    out1_0_0 = self.model1_0_0(x)
    output, indices = self.maxpool(out1_0_0)
    output_un_pool = self.maxunpool(output, indices)

    out1_0_1 = self.model1_0_1(output_un_pool)
    output, indices = self.maxpool(out1_0_1)
    output_un_pool = self.maxunpool(output, indices)

    out1_0_2 = self.model1_0_2(output_un_pool)
    output, indices = self.maxpool(out1_0_2)
    output_un_pool = self.maxunpool(output, indices)

    out1_0 = self.model1_0_3(output_un_pool)

    out = self.model1_1(out1_0)
    for i in range(2, self.num_stages + 1):
      out = getattr(self, 'model%d' % i)(torch.cat([out, out1_0], 1))
    return out


class CoordRegression(nn.Module):
  """KPDEM: images (B, 3, H, W) -> (coords (B, L, 2) normalised (x, y), heatmaps (B, L, H, W))."""

  def __init__(self, n_locations: int, width: float = 1.0, num_stages: int = 6):
    super().__init__()
    self.fcn = KeyPointsModel(width=width, num_stages=num_stages)
    self.hm_conv = nn.Conv2d(24, n_locations, kernel_size=1, bias=False)

  def forward(self, images):
    fcn_out = self.fcn(images)
    unnormalized_heatmaps = self.hm_conv(fcn_out)
    heatmaps = dsntnn.flat_softmax(unnormalized_heatmaps)
    coords = dsntnn.dsnt(heatmaps)
    return coords, heatmaps


CoordRegressionNetwork = CoordRegression  # the write-up's name for the same class


def kpdem_loss(coords, heatmaps, target, sigma_t: float = 1.0, mask=None):
  """The original training loss: average_loss(euclidean_losses + js_reg_losses(sigma_t)) (mask optional)."""
  euc = dsntnn.euclidean_losses(coords, target)
  reg = dsntnn.js_reg_losses(heatmaps, target, sigma_t=sigma_t)
  return dsntnn.average_loss(euc + reg, mask)
