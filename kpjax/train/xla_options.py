"""XLA compile options for kpjax's jitted training and inference steps (the one place that sets any).

Pass them to `jax.jit(..., compiler_options=kpjax.train.xla_options.compiler_options(model))`. They are
per-compilation options, so they need no XLA_FLAGS and cannot clash with a user's own XLA_FLAGS.

Today there is one: on CPU, with remat, keep jax.checkpoint's optimization barriers. XLA:CPU's pipeline
expands (removes) optimization barriers before common-subexpression elimination, so the forward pass that
jax.checkpoint recomputes in the backward pass is merged back into the original one and remat silently
saves nothing (measured: the full network's training step at 96x96 keeps 0.71 GB with or without remat;
with the barriers kept, 0.27 GB). XLA:GPU and XLA:TPU keep the barriers anyway.

Performance on CPU needs no flags. Measured on jaxlib 0.10.2 (2-core AMD EPYC): --xla_cpu_use_onednn,
--xla_cpu_experimental_onednn_custom_call and --xla_cpu_use_xnnpack change a 3x3/7x7 convolution by
under 5%; --xla_cpu_experimental_ynn_fusion_type= (YNNPACK off, Eigen convolutions) makes the training
step ~9% slower, --xla_cpu_multi_thread_eigen=false ~35% slower, and
--xla_cpu_enable_concurrency_optimized_scheduler=false is within noise. The speed comes from kpjax.model.conv.
"""

from __future__ import annotations

import jax

KEEP_REMAT_BARRIERS = {'xla_disable_hlo_passes': 'cse_barrier_expander'}


def compiler_options(model=None, backend: str | None = None) -> dict[str, str] | None:
  """Options for jitting a step of `model` (anything with a `remat` attribute; None: assume remat)."""
  backend = backend or jax.default_backend()
  remat = True if model is None else bool(getattr(model, 'remat', False))
  if backend == 'cpu' and remat:
    return dict(KEEP_REMAT_BARRIERS)
  return None
