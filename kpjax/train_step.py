"""The training state, optimiser and the jit-compiled, data-parallel training step.

`make_train_step` is what `kpjax.train` runs and what `benchmarks/train_step.py` times: keep its
signature stable.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from kpjax import backbone
from kpjax import keypoints
from kpjax import losses
from kpjax import xla_options
from kpjax.model import CoordRegressionNetwork, init_variables

OPTIMIZERS = ('adam', 'rmsprop')
SCHEDULES = ('cosine', 'step', 'constant')
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')


class TrainState(flax.struct.PyTreeNode):
  """Everything a resumed run needs besides the data iterator: step, params, opt_state, rng (key data)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  def as_dict(self) -> dict[str, Any]:
    return {'step': self.step, 'params': self.params, 'opt_state': self.opt_state, 'rng': self.rng}


def build_model(config) -> CoordRegressionNetwork:
  """The network a config describes (n_locations from its category)."""
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'unknown compute_dtype {config.compute_dtype!r}; expected one of {", ".join(COMPUTE_DTYPES)}')
  return CoordRegressionNetwork(
      n_locations=keypoints.num_keypoints(config.category), width=float(config.model.width),
      num_stages=int(config.model.num_stages), dtype=jnp.dtype(config.compute_dtype), remat=bool(config.remat),
      remat_policy=config.remat_policy)


def make_schedule(config) -> optax.Schedule:
  """Learning rate per step: linear warmup to config.learning_rate, then cosine / step decay / constant."""
  if config.schedule not in SCHEDULES:
    raise ValueError(f'unknown schedule {config.schedule!r}; expected one of {", ".join(SCHEDULES)}')
  peak, warmup, total = float(config.learning_rate), int(config.warmup_steps), int(config.total_steps)
  warmup = min(warmup, max(total - 1, 0))
  if config.schedule == 'cosine':  # to 0 at total_steps
    decay = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
  elif config.schedule == 'step':  # x0.1 at 60% and at 85% of training (steps counted after the warmup)
    scales = {}
    for fraction in (0.6, 0.85):
      boundary = max(int(fraction * total) - warmup, 1)
      scales[boundary] = scales.get(boundary, 1.0) * 0.1
    decay = optax.piecewise_constant_schedule(peak, scales)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config) -> optax.GradientTransformation:
  """Gradient clipping by global norm (of all parameters), then Adam(W) or RMSprop on `make_schedule(config)`.

  config.backbone_lr_multiplier != 1 scales the updates of the VGG19 layers (kpjax.backbone.pretrained_layers)
  by it, after the global clipping: that is training them at learning rate * multiplier, since the updates
  of Adam(W) and RMSprop, weight decay included, are proportional to the learning rate. The optimizer
  state is the same whatever the multiplier (a run may change it when resuming), and at 1 the optimizer
  is exactly the one without the option.
  """
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {config.optimizer!r}; expected one of {", ".join(OPTIMIZERS)}')
  multiplier = float(config.backbone_lr_multiplier)
  if not (multiplier >= 0 and math.isfinite(multiplier)):
    raise ValueError(f'config.backbone_lr_multiplier must be a finite number >= 0; got {multiplier}')
  schedule = make_schedule(config)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
  if config.optimizer == 'adam':
    parts.append(optax.adamw(schedule, weight_decay=float(config.weight_decay)) if config.weight_decay
                 else optax.adam(schedule))
  else:  # torch.optim.RMSprop(lr, alpha): optax's decay is torch's alpha, eps outside the sqrt
    parts.append(optax.rmsprop(schedule, decay=float(config.rmsprop_decay), eps=1e-8, eps_in_sqrt=False))
    if config.weight_decay:
      parts.insert(-1, optax.add_decayed_weights(float(config.weight_decay)))
  if multiplier != 1.0:
    parts[-1] = _scale_backbone_updates(parts[-1], multiplier)
  return optax.chain(*parts)


def _scale_backbone_updates(inner: optax.GradientTransformation, multiplier: float) -> optax.GradientTransformation:
  """`inner` with the updates of the pretrained VGG19 layers times `multiplier`; its state is inner's own."""

  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    labels = backbone.param_labels(updates)
    return jax.tree_util.tree_map(lambda u, label: u * multiplier if label == 'backbone' else u, updates, labels), state

  return optax.GradientTransformation(inner.init, update)


def create_train_state(config, rng: jax.Array, model: CoordRegressionNetwork,
                       optimizer: optax.GradientTransformation | None = None) -> TrainState:
  """Fresh parameters (initialised from `rng`) and optimiser state at step 0."""
  init_rng, state_rng = jax.random.split(rng)
  # One compiled initialisation: run eagerly, every initialiser and layer would compile on its own
  # (about a minute on a 2-core CPU instead of a few seconds).
  params = jax.jit(lambda r: init_variables(model, r, int(config.input_size))['params'])(init_rng)
  optimizer = optimizer or make_optimizer(config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=jax.random.key_data(state_rng))


def loss_fn(params, model: CoordRegressionNetwork, batch: dict[str, jax.Array], sigma_t: float, js_weight: float):
  """Masked KPDEM loss of one batch; returns (loss, {'euclidean', 'js'})."""
  coords, heatmaps = model.apply({'params': params}, batch['image'])
  return losses.keypoint_loss(coords, heatmaps, batch['target'], batch['mask'], sigma_t=sigma_t, js_weight=js_weight)


def make_train_step(model: CoordRegressionNetwork, config, mesh: jax.sharding.Mesh | None = None,
                    optimizer: optax.GradientTransformation | None = None
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted `step(state, batch) -> (state, metrics)`.

  batch: {'image' (B, S, S, 3) f32, 'target' (B, L, 2), 'mask' (B, L)}, B the global batch. With a
  mesh, batch arrays are sharded along its 'data' axis and the state replicated: XLA then splits
  the forward/backward pass across devices and all-reduces the gradients (a mean over the global
  batch, so any device count gives the same step). A non-finite loss or gradient leaves the state
  unchanged and reports metrics['finite'] = False, so that no NaN reaches a checkpoint.

  metrics: 'loss', 'euclidean', 'js', 'grad_norm', 'lr', 'finite' (scalars, replicated).
  """
  optimizer = optimizer or make_optimizer(config)
  schedule = make_schedule(config)
  sigma_t, js_weight = float(config.sigma_t), float(config.js_weight)

  def step(state: TrainState, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, model, batch, sigma_t, js_weight)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = {'loss': loss, 'euclidean': aux['euclidean'], 'js': aux['js'], 'grad_norm': grad_norm,
               'lr': schedule(state.step), 'finite': finite}
    return new_state, metrics

  options = xla_options.compiler_options(model)  # keeps remat effective on CPU (see kpjax.xla_options)
  if mesh is None:
    return jax.jit(step, donate_argnums=0, compiler_options=options)
  from kpjax import parallel  # pylint: disable=g-import-not-at-top
  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0, compiler_options=options)
