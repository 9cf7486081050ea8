"""The training state, optimiser and the jit-compiled, data-parallel training step.

`make_train_step` is what `kpjax.train` runs and what `benchmarks/train_step.py` times: keep its
signature stable.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from kpjax.data import keypoints
from kpjax.data.spec import ModelSpec
from kpjax.model import losses
from kpjax.model import vgg19
from kpjax.model.network import CoordRegressionNetwork, init_variables
from kpjax.train import xla_options


class TrainState(flax.struct.PyTreeNode):
  """Everything a resumed run needs besides the data iterator: step, params, opt_state."""
  step: jax.Array
  params: Any
  opt_state: Any

  def as_dict(self) -> dict[str, Any]:
    return {'step': self.step, 'params': self.params, 'opt_state': self.opt_state}


def build_model(config, keypoint_set=keypoints.FASHIONAI) -> CoordRegressionNetwork:
  """The network a (validated, kpjax.train.config_check) config trains on data of `keypoint_set`: its ModelSpec
  with the config's compute dtype, remat, convolution algorithm ('' = the convention's default) and unpool form."""
  return ModelSpec.from_config(config, keypoint_set).build(
      config.model.conv_algorithm, dtype=jnp.dtype(config.compute_dtype), remat=bool(config.remat),
      remat_policy=config.remat_policy, unpool=config.model.unpool)


def make_schedule(config) -> optax.Schedule:
  """Learning rate per step: linear warmup to config.learning_rate, then cosine / step decay / constant."""
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


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Gradient clipping by global norm (of all parameters), then Adam(W) or RMSprop on `schedule`
  (make_schedule(config)).

  config.backbone_lr_multiplier != 1 scales the updates of the VGG19 layers (kpjax.model.vgg19.pretrained_layers)
  by it, after the global clipping: that is training them at learning rate * multiplier, since the updates
  of Adam(W) and RMSprop, weight decay included, are proportional to the learning rate. The optimizer
  state is the same whatever the multiplier (a run may change it when resuming), and at 1 the optimizer
  is exactly the one without the option.
  """
  multiplier = float(config.backbone_lr_multiplier)
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
    labels = vgg19.param_labels(updates)
    return jax.tree_util.tree_map(lambda u, label: u * multiplier if label == 'backbone' else u, updates, labels), state

  return optax.GradientTransformation(inner.init, update)


def create_train_state(model: CoordRegressionNetwork, optimizer: optax.GradientTransformation, rng: jax.Array,
                       input_size: int) -> TrainState:
  """Fresh parameters (initialised from `rng`) and optimiser state at step 0."""
  # One compiled initialisation: run eagerly, every initialiser and layer would compile on its own
  # (about a minute on a 2-core CPU instead of a few seconds).
  init_rng, _ = jax.random.split(rng)  # (the second key once seeded a state rng; kept so that seeds keep their init)
  params = jax.jit(lambda r: init_variables(model, r, input_size)['params'])(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def loss_fn(params, model: CoordRegressionNetwork, batch: dict[str, jax.Array], sigma_t: float, js_weight: float):
  """Masked KPDEM loss of one batch; returns (loss, {'euclidean', 'js'})."""
  coords, heatmaps = model.apply({'params': params}, batch['image'])
  return losses.keypoint_loss(coords, heatmaps, batch['target'], batch['mask'], sigma_t=sigma_t, js_weight=js_weight)


def make_train_step(model: CoordRegressionNetwork, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, sigma_t: float, js_weight: float,
                    mesh: jax.sharding.Mesh | None = None
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted `step(state, batch) -> (state, metrics)`.

  optimizer, schedule: from make_optimizer / make_schedule (the schedule only reports the step's
  learning rate); sigma_t, js_weight: the loss's (kpjax.model.losses.keypoint_loss).

  batch: {'image' (B, S, S, 3) f32, 'target' (B, L, 2), 'mask' (B, L)}, B the global batch. With a
  mesh, batch arrays are sharded along its 'data' axis and the state replicated: XLA then splits
  the forward/backward pass across devices and all-reduces the gradients (a mean over the global
  batch, so any device count gives the same step). A non-finite loss or gradient leaves the state
  unchanged and reports metrics['finite'] = False, so that no NaN reaches a checkpoint.

  metrics: 'loss', 'euclidean', 'js', 'grad_norm', 'lr', 'finite' (scalars, replicated).
  """
  sigma_t, js_weight = float(sigma_t), float(js_weight)

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

  options = xla_options.compiler_options(model)  # keeps remat effective on CPU (see kpjax.train.xla_options)
  if mesh is None:
    return jax.jit(step, donate_argnums=0, compiler_options=options)
  from kpjax.inference import devices  # pylint: disable=g-import-not-at-top
  replicated = devices.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, devices.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0, compiler_options=options)


def make_training(config, mesh: jax.sharding.Mesh | None = None, keypoint_set=keypoints.FASHIONAI):
  """(model, optimizer, jitted step) for a validated config (kpjax.train.config_check) on data of `keypoint_set`:
  what kpjax.train runs, and what the tests and benchmarks build to run or time it. See make_train_step for
  the step."""
  model = build_model(config, keypoint_set)
  schedule = make_schedule(config)
  optimizer = make_optimizer(config, schedule)
  step = make_train_step(model, optimizer, schedule, sigma_t=float(config.sigma_t), js_weight=float(config.js_weight),
                         mesh=mesh)
  return model, optimizer, step
