"""The jitted steps: ``train_step(state, batch, teacher) -> (state, metrics)`` and ``eval_step``.

Both take the raw uint8 batch that :meth:`distill_jax.data.DeviceData.batch` gathers
and do augmentation and normalisation themselves, so the input pipeline is part of
the compiled step. Only the student's ``params`` are differentiated; a teacher, when
there is one, is a frozen ``{'params', 'batch_stats'}`` tree run in inference mode
inside the same step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distill_jax import data as data_lib
from distill_jax import losses


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: checkpointed whole.

  ``rng`` is a raw uint32 key; step ``s`` draws its randomness from
  ``fold_in(rng, s)``, so a resumed run repeats the uninterrupted one exactly.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static (hashable) settings of the compiled steps."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int = 4
  flip: bool = True
  cutout: int = 0
  pad_mode: str = 'constant'
  method: str = 'none'
  alpha: float = 0.9
  temperature: float = 4.0
  beta: float = 1e3
  at_form: str = 'released'
  aux_weight: float = 0.0
  drop_path_prob: float = 0.0
  steps_per_epoch: int = 1
  num_epochs: int = 1


def create_train_state(variables: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state at step 0 from ``{'params', 'batch_stats'}`` (host or device arrays)."""
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed))


def _topk_errors(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example top-1 and top-5 errors (top-k with k = min(5, classes)) as float32."""
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit = top == labels[:, None]
  return 1.0 - hit[:, 0].astype(jnp.float32), 1.0 - hit.any(-1).astype(jnp.float32)


def _model_kwargs(cfg: StepConfig, step: jax.Array) -> dict:
  if not cfg.drop_path_prob:
    return {}
  # DARTS drop path ramps linearly with the epoch, as in the release.
  epoch = (step // cfg.steps_per_epoch).astype(jnp.float32)
  return {'drop_path_prob': cfg.drop_path_prob * epoch / cfg.num_epochs}


def train_step(state: TrainState, batch: dict, teacher: dict | None, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule, cfg: StepConfig,
               teacher_model: nn.Module | None = None) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; returns the new state and scalar metrics."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  aug_rng, dropout_rng = jax.random.split(step_rng)
  images = data_lib.augment(batch['image'], aug_rng, crop_padding=cfg.crop_padding, flip=cfg.flip,
                            cutout=cfg.cutout, pad_mode=cfg.pad_mode, mean=cfg.mean, std=cfg.std)
  labels = batch['label']

  teacher_logits = teacher_points = None
  if teacher_model is not None:
    teacher_logits, teacher_points = teacher_model.apply(teacher, images, train=False)
    teacher_logits, teacher_points = jax.lax.stop_gradient((teacher_logits, teacher_points))

  mutable = ['batch_stats', 'intermediates'] if cfg.aux_weight else ['batch_stats']

  def loss_fn(params):
    (logits, points), new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': dropout_rng}, mutable=mutable, **_model_kwargs(cfg, state.step))
    loss, terms = losses.distillation_loss(
        logits, labels, points, teacher_logits, teacher_points, method=cfg.method,
        alpha=cfg.alpha, temperature=cfg.temperature, beta=cfg.beta, at_form=cfg.at_form)
    if cfg.aux_weight:
      (aux_logits,) = new_vars['intermediates']['aux_logits']
      terms['aux'] = losses.cross_entropy(aux_logits, labels)
      loss = loss + cfg.aux_weight * terms['aux']
    return loss, (logits, new_vars['batch_stats'], terms)

  (loss, (logits, batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  top1, top5 = _topk_errors(logits, labels)
  metrics = {
      **terms, 'loss': loss, 'top1_error': top1.mean(), 'top5_error': top5.mean(),
      'learning_rate': schedule(state.step), 'grad_norm': optax.global_norm(grads),
      'param_norm': optax.global_norm(params)}
  if teacher_logits is not None:
    metrics['teacher_agreement'] = jnp.mean(
        (logits.argmax(-1) == teacher_logits.argmax(-1)).astype(jnp.float32))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, teacher: dict | None, *, model: nn.Module,
              cfg: StepConfig, teacher_model: nn.Module | None = None) -> dict:
  """Sums over the (padded, masked) batch: loss, top-1/top-5 errors and the count.

  With a teacher, also the top-1 agreement with it and the attention distance (the
  released AT term, Σ over points of the mean squared map difference, without β).
  """
  images = data_lib.normalize(batch['image'], cfg.mean, cfg.std)
  logits, points = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                               train=False)
  mask = batch['mask']
  top1, top5 = _topk_errors(logits, batch['label'])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['label'])
  sums = {'loss': jnp.sum(ce * mask), 'top1_error': jnp.sum(top1 * mask),
          'top5_error': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}
  if teacher_model is not None:
    teacher_logits, teacher_points = teacher_model.apply(teacher, images, train=False)
    agree = (logits.argmax(-1) == teacher_logits.argmax(-1)).astype(jnp.float32)
    # Per-example attention distance: vmap the layer losses over single examples.
    per_example = jax.vmap(lambda s, t: sum(losses.at_layer_losses(
        [x[None] for x in s], [x[None] for x in t])))(points, teacher_points)
    sums.update(teacher_agreement=jnp.sum(agree * mask), at_distance=jnp.sum(per_example * mask))
  return sums


def compile_steps(*, mesh: Mesh, model: nn.Module, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, cfg: StepConfig,
                  teacher_model: nn.Module | None = None) -> tuple[Callable, Callable]:
  """``train_step`` and ``eval_step`` jitted over ``mesh``: state replicated, batch on
  ``'data'``, the state donated."""
  replicated = NamedSharding(mesh, P())
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, cfg=cfg,
                        teacher_model=teacher_model),
      out_shardings=(replicated, replicated), donate_argnums=(0,))
  evaluate = jax.jit(functools.partial(eval_step, model=model, cfg=cfg, teacher_model=teacher_model),
                     out_shardings=replicated)
  return train, evaluate
