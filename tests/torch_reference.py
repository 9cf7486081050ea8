"""Test helpers around the PyTorch reference network (convert/torch_model.py): not a test file.

Written independently of convert/torch_to_flax.py, so the model tests compare two separate readings of
the parameter layout: here a plain key walk, `a.b.c.weight` (OIHW) -> params/a/b/c/kernel (HWIO) and
`a.b.c.bias` -> params/a/b/c/bias.
"""

from __future__ import annotations

import copy
import math

import jax.numpy as jnp
import numpy as np
import torch

from convert import torch_model


def torch_state_dict_to_flax(state_dict, dtype=np.float32, shapes_only: bool = False) -> dict:
  """A torch state_dict (of CoordRegression) -> Flax variables {'params': nested dict} of jnp arrays.

  With shapes_only, the leaves are the Flax shapes (tuples) instead, and nothing is copied.
  """
  params: dict = {}
  for key, value in state_dict.items():
    *path, leaf = key.split('.')
    if leaf == 'weight':
      if value.ndim != 4:
        raise ValueError(f'{key}: expected a 4D conv weight (O, I, H, W); got shape {tuple(value.shape)}')
      name, perm = 'kernel', (2, 3, 1, 0)  # OIHW -> HWIO
    elif leaf == 'bias':
      name, perm = 'bias', (0,)
    else:
      raise ValueError(f'{key}: unexpected parameter kind {leaf!r}')
    node = params
    for part in path:
      node = node.setdefault(part, {})
    if shapes_only:
      node[name] = tuple(value.shape[i] for i in perm)
    else:
      array = value.detach().cpu().numpy().transpose(perm)
      node[name] = jnp.asarray(np.ascontiguousarray(array, dtype=dtype))
  return {'params': params}


def flax_grads_to_torch_layout(grads: dict) -> dict[str, np.ndarray]:
  """Flax parameter tree (params/... kernel HWIO) -> {torch key: array in torch layout (OIHW)}."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, prefix + [k])
      elif k == 'kernel':
        out['.'.join(prefix + ['weight'])] = np.asarray(v).transpose(3, 2, 0, 1)
      else:
        out['.'.join(prefix + [k])] = np.asarray(v)

  walk(grads.get('params', grads), [])
  return out


def make_torch_model(n_locations: int, width: float = 1.0, num_stages: int = 6, seed: int = 0,
                     init: str = 'he', hm_gain: float = 1.0) -> torch_model.CoordRegression:
  """A seeded CoordRegression in eval mode.

  init='he' draws every conv weight from N(0, 2 / fan_in) and biases from N(0, 0.05^2) so that the
  signal survives ~40 random layers (torch's default init leaves a deep random net's heatmaps almost
  uniform and its coords near 0, which would make a comparison weak); init='torch' keeps torch's default
  initialisation. hm_gain multiplies hm_conv's weights ('he' only): ~10 gives peaked heatmaps.
  """
  torch.manual_seed(seed)
  model = torch_model.CoordRegression(n_locations, width=width, num_stages=num_stages)
  if init == 'he':
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith('weight'):
          fan_in = math.prod(p.shape[1:])
          gain = hm_gain if name.startswith('hm_conv') else 1.0
          p.copy_(torch.randn(p.shape, generator=gen) * (gain * math.sqrt(2.0 / fan_in)))
        else:
          p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
  elif init != 'torch':
    raise ValueError(f"init must be 'he' or 'torch'; got {init!r}")
  return model.eval()


def nhwc_to_torch(images: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
  """NHWC numpy -> contiguous NCHW float32 tensor (dsntnn.flat_softmax uses .view, so contiguity matters)."""
  t = torch.from_numpy(np.array(images, np.float32)).permute(0, 3, 1, 2).contiguous()
  return t.requires_grad_(requires_grad)


def torch_forward(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Run the torch network on NHWC numpy images -> (coords (B, L, 2), heatmaps (B, L, H, W)) numpy.

  Computes in the model's dtype (float32, or float64 after `.double()`).
  """
  dtype = next(model.parameters()).dtype
  with torch.no_grad():
    coords, heatmaps = model(nhwc_to_torch(images).to(dtype))
  return coords.numpy(), heatmaps.numpy()


def torch_loss_and_grads(model: torch.nn.Module, images: np.ndarray, target: np.ndarray, sigma_t: float = 1.0,
                         mask: np.ndarray | None = None):
  """The dsntnn recipe (torch_model.kpdem_loss) and d loss / d every parameter, keyed like state_dict.

  Returns (loss, grads {key: array}, coords, heatmaps), in the model's dtype.
  """
  dtype = next(model.parameters()).dtype
  model.zero_grad(set_to_none=True)
  coords, heatmaps = model(nhwc_to_torch(images).to(dtype))
  mask_t = None if mask is None else torch.from_numpy(np.array(mask)).to(dtype)
  loss = torch_model.kpdem_loss(coords, heatmaps, torch.from_numpy(np.array(target)).to(dtype), sigma_t=sigma_t,
                                mask=mask_t)
  loss.backward()
  grads = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}
  return float(loss.detach()), grads, coords.detach().numpy(), heatmaps.detach().numpy()


def torch_pool_unpool(x_nhwc: np.ndarray, cotangent_nhwc: np.ndarray | None = None):
  """torch MaxUnpool2d(2, 2)(*MaxPool2d(2, 2, return_indices=True)(x)) on NHWC numpy.

  Returns (values NHWC, d <values, cotangent> / dx NHWC or None).
  """
  pool = torch.nn.MaxPool2d(2, stride=2, padding=0, return_indices=True)
  unpool = torch.nn.MaxUnpool2d(2, stride=2)
  x = nhwc_to_torch(x_nhwc, requires_grad=cotangent_nhwc is not None)
  y = unpool(*pool(x))
  grad = None
  if cotangent_nhwc is not None:
    y.backward(nhwc_to_torch(cotangent_nhwc))
    grad = x.grad.permute(0, 2, 3, 1).numpy().copy()
  return y.detach().permute(0, 2, 3, 1).numpy().copy(), grad


POOLED_BLOCKS = ('model1_0_0', 'model1_0_1', 'model1_0_2')  # each is followed by max-pool + max-unpool
NO_RELU = frozenset(['conv6_2_CPM'] + [f'Mconv7_stage{i}' for i in range(2, 7)])


class DecisionMargins:
  """How far, in float64, the network's piecewise decisions are from flipping, recorded during forwards.

  Use as a context manager around forwards of a float64 model: `relu` is the smallest |pre-activation| of
  any ReLU'd unit and `pool` the smallest gap between the largest and second-largest value of any 2x2
  pooling window whose maximum is positive, each relative to the RMS of its layer. Float32 rounding (~1e-6
  relative at this depth) can put a decision with a smaller margin on different sides in torch and in JAX:
  a flipped ReLU changes that unit's gradient entirely, a flipped pool moves a value to another pixel. Both
  are genuine discontinuities of the function, not bugs, so the float32 comparisons run on data whose
  margins are wide (and say so when they are not).
  """

  def __init__(self, model: torch_model.CoordRegression):
    if next(model.parameters()).dtype != torch.float64:
      raise ValueError('DecisionMargins needs a float64 model (model.double())')
    self.model = model
    self.relu = float('inf')
    self.pool = float('inf')
    self._handles = []

  def _relu_hook(self, module, inputs, output):
    z = output.detach()
    self.relu = min(self.relu, float(z.abs().min() / z.pow(2).mean().sqrt()))

  def _pool_hook(self, module, inputs, output):
    y = output.detach()
    b, c, h, w = y.shape
    win = y.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4)
    top2 = win.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1])[top2[..., 0] > 0]
    if gap.numel():
      self.pool = min(self.pool, float(gap.min() / y.pow(2).mean().sqrt()))

  def __enter__(self):
    for name, module in self.model.fcn.named_modules():
      if isinstance(module, torch.nn.Conv2d) and name.rsplit('.', 1)[-1] not in NO_RELU:
        self._handles.append(module.register_forward_hook(self._relu_hook))
      if name in POOLED_BLOCKS:
        self._handles.append(module.register_forward_hook(self._pool_hook))
    return self

  def __exit__(self, *exc):
    for h in self._handles:
      h.remove()
    self._handles = []

  def __repr__(self):
    return f'DecisionMargins(relu={self.relu:.1e}, pool={self.pool:.1e})'


def decision_margins(model: torch_model.CoordRegression, images: np.ndarray) -> DecisionMargins:
  """DecisionMargins of a float64 copy of `model` on `images`."""
  model64 = copy.deepcopy(model).double()
  with DecisionMargins(model64) as margins, torch.no_grad():
    model64(nhwc_to_torch(images).double())
  return margins
