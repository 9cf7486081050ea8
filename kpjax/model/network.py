"""KPDEM's network in Flax: a CPM on VGG blocks at full resolution, a 1x1 heatmap conv and DSNT.

The modules walk the layer tables of kpjax.model.layers, whose names are the PyTorch original's, so the
torch state_dict key `fcn.model1_0_0.conv1_1.weight` is `params/fcn/model1_0_0/conv1_1/kernel` here
(OIHW -> HWIO) and conversion is a table walk.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpjax.model import conv as conv_lib
from kpjax.model import dsnt
from kpjax.model.layers import (BACKBONE, CONV_ALGORITHMS, HEATMAP_CHANNELS, Layer, MAX_STAGES, NO_RELU, STAGE1,
                                INPUT_SIDE_RULE, refinement_stage, scaled_channels, valid_side)
from kpjax.model import pooling


def block_conv_algorithm(conv_algorithm: str, pooled: bool) -> str:
  """The kpjax.model.conv algorithm of one block's convs under the network's `conv_algorithm`.

  'direct-pooled' is 'direct' for the blocks whose output is max-pooled (`pooled`: the first three)
  and 'auto' after the last pool. A 2x2 max-pool is discontinuous where a window's largest values tie
  (flat image regions give exact ties), so an algorithm whose rounding depends on the output position
  (Winograd's tiles) changes which element is kept there, and the network's output can move by many
  pixels. After the last pool every layer is continuous, but the stages amplify Winograd's ~1e-6
  relative rounding: a model whose output follows the image closely can still move by tens of pixels
  (so converted models run 'direct' everywhere, kpjax.data.conventions.KpdemConvention).
  'direct-pooled' is bit-identical to 'direct' up to and including the last pool_unpool, and runs
  ~94% of the network's multiply-adds (conv4_1 onwards) by 'auto'.
  """
  if conv_algorithm == 'direct-pooled':
    return 'direct' if pooled else 'auto'
  return conv_algorithm


class Conv(nn.Module):
  """A stride-1 'SAME' conv with bias: nn.Conv's parameters (names, shapes, initialisers), but computed by
  `kpjax.model.conv.conv2d`, which picks Winograd or XLA's direct convolution (`algorithm`, default 'auto')."""
  features: int
  kernel_size: int
  dtype: Any = jnp.float32
  algorithm: str = 'auto'

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    return conv_lib.conv2d(x, kernel, self.algorithm) + bias


class ConvBlock(nn.Module):
  """A named run of convs from a layer table (torch: `make_layers` -> nn.Sequential)."""
  layers: Sequence[Layer]
  width: float = 1.0
  dtype: Any = jnp.float32
  conv_algorithm: str = 'auto'

  @nn.compact
  def __call__(self, x):
    for name, channels, kernel in self.layers:
      x = Conv(scaled_channels(channels, self.width), kernel, dtype=self.dtype, algorithm=self.conv_algorithm,
               name=name)(x)
      if name not in NO_RELU:
        x = nn.relu(x)
    return x


class KeyPointsModel(nn.Module):
  """The CPM backbone: (B, H, W, 3) -> 24 belief maps (B, H, W, 24) at full resolution.

  Stage 1 is VGG blocks (a max-pool + max-unpool pair after the first three, in the form `unpool` names:
  see CoordRegressionNetwork) and conv6_*_CPM; each refinement stage sees the previous belief maps
  concatenated with the backbone features (24 + 128 * width channels).
  """
  width: float = 1.0
  num_stages: int = MAX_STAGES
  dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  conv_algorithm: str = 'auto'
  unpool: str = 'mask'

  @nn.compact
  def __call__(self, x):
    block_cls = ConvBlock
    if self.remat:
      block_cls = nn.remat(ConvBlock, policy=getattr(jax.checkpoint_policies, self.remat_policy))

    def block(spec, pooled=False):
      name, layers = spec
      return block_cls(layers=layers, width=self.width, dtype=self.dtype,
                       conv_algorithm=block_conv_algorithm(self.conv_algorithm, pooled), name=name)

    pool_unpool = pooling.pool_unpool_fn(self.unpool)
    for i, spec in enumerate(BACKBONE):
      pooled = i < len(BACKBONE) - 1
      x = block(spec, pooled)(x)
      if pooled:
        x = pool_unpool(x)
    features = x
    beliefs = block(STAGE1)(features)
    for i in range(2, self.num_stages + 1):
      beliefs = block(refinement_stage(i))(jnp.concatenate([beliefs, features], axis=-1))
    return beliefs


def check_images(images: jax.Array) -> None:
  """Raises a ValueError unless images are (B, H, W, 3) with H and W as INPUT_SIDE_RULE says."""
  if images.ndim != 4:
    raise ValueError(f'images must be NHWC (B, H, W, 3); got shape {tuple(images.shape)} (rank {images.ndim})')
  if images.shape[-1] != 3:
    raise ValueError(f'images must have 3 (RGB) channels last, (B, H, W, 3); got shape {tuple(images.shape)}')
  h, w = images.shape[1:3]
  if not (valid_side(int(h)) and valid_side(int(w))):
    raise ValueError(f'image height and width must each be {INPUT_SIDE_RULE}; got {h}x{w}')


class CoordRegressionNetwork(nn.Module):
  """KPDEM: images (B, H, W, 3) float32 -> (coords (B, L, 2), heatmaps (B, L, H, W)).

  coords are DSNT expectations in normalised (x, y), [-1, 1] spanning the image; heatmaps are flat
  softmaxes (each (H, W) map sums to 1). Softmax, DSNT and outputs are float32 whatever `dtype`.

  Attributes:
    n_locations: keypoints L (blouse 13, dress 15, outwear 14, skirt 4, trousers 7, all 24).
    width: hidden channel multiplier (1.0 = the original, 36.9 M parameters).
    num_stages: CPM stages kept, 1..6 (6 = the original).
    dtype: compute dtype of the convolutions (parameters stay float32).
    remat: rematerialise each block in the backward pass (jax.checkpoint with `remat_policy`).
    conv_algorithm: 'auto' (Winograd for the 3x3 and 7x7 convs where it pays: float32 on a CPU, >= 64
      channels, images >= 32x32; XLA's convolution elsewhere), 'direct' (always XLA's, the closest match
      to PyTorch), 'winograd', or 'direct-pooled' ('direct' before the max-pools, 'auto' after them:
      pools decide ties as 'direct' does, see block_conv_algorithm); the parameters are the same
      whichever. See kpjax.model.conv.
    unpool: how each max-pool + max-unpool pair runs: 'mask' (kpjax.model.pool_unpool, fused: one
      elementwise pass) or 'scatter' (max_pool_2x2's values and indices scattered back by max_unpool_2x2,
      torch's own pair). Both give the same bits, outputs and gradients; the parameters are the same.
  """
  n_locations: int
  width: float = 1.0
  num_stages: int = MAX_STAGES
  dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  conv_algorithm: str = 'auto'
  unpool: str = 'mask'

  def setup(self):
    if not 1 <= self.num_stages <= MAX_STAGES:
      raise ValueError(f'num_stages must be in 1..{MAX_STAGES}; got {self.num_stages}')
    if self.width <= 0:
      raise ValueError(f'width must be positive; got {self.width}')
    if self.n_locations < 1:
      raise ValueError(f'n_locations must be at least 1; got {self.n_locations}')
    if self.remat and not hasattr(jax.checkpoint_policies, self.remat_policy):
      raise ValueError(f'unknown remat_policy {self.remat_policy!r}; expected a jax.checkpoint_policies name')
    if self.conv_algorithm not in CONV_ALGORITHMS:
      raise ValueError(f'conv_algorithm must be one of {CONV_ALGORITHMS}; got {self.conv_algorithm!r}')
    if self.unpool not in pooling.UNPOOLS:
      raise ValueError(f'unpool must be one of {pooling.UNPOOLS}; got {self.unpool!r}')
    self.fcn = KeyPointsModel(self.width, self.num_stages, self.dtype, self.remat, self.remat_policy,
                              self.conv_algorithm, self.unpool)
    self.hm_conv = nn.Conv(self.n_locations, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)

  def __call__(self, images):
    check_images(images)
    unnormalized = self.hm_conv(self.fcn(images.astype(self.dtype)))  # (B, H, W, L)
    unnormalized = jnp.transpose(unnormalized, (0, 3, 1, 2)).astype(jnp.float32)  # (B, L, H, W)
    heatmaps = dsnt.flat_softmax(unnormalized)
    return dsnt.dsnt(heatmaps), heatmaps


def init_variables(model: CoordRegressionNetwork, rng: jax.Array, input_size: int | tuple[int, int] = 64):
  """Freshly initialised variables for `model` (shapes do not depend on the input size)."""
  h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
  return model.init(rng, jnp.zeros((1, h, w, 3), jnp.float32))
