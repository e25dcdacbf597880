"""The jitted steps of training and distillation: ``train_step(state, batch, teacher) -> (state, metrics)`` and ``eval_step``.

Both take the raw uint8 batch that :meth:`distill_jax.data.DeviceData.batch` gathers
and do augmentation and normalisation themselves, so the input pipeline is part of
the compiled step. Only the student's ``params`` are differentiated; a teacher, when
there is one, is a frozen ``{'params', 'batch_stats'}`` tree run in inference mode
inside the same step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distill_jax import data as data_lib
from distill_jax import losses
from distill_jax.trainers import methods as methods_lib
from distill_jax.models import names


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: checkpointed whole.

  ``rng`` is a raw uint32 key; step ``s`` draws its randomness from
  ``fold_in(rng, s)``, so a resumed run repeats the uninterrupted one exactly.
  ``connector``: the ``{'params', 'batch_stats'}`` of a method's learned part
  (:class:`distill_jax.trainers.methods.Connector`), None without one; it is trained
  with ``params`` by the same optimiser (``opt_state`` is then that of
  ``{'student': params, 'connector': connector['params']}``). ``memory``: a method's
  memory of the training set (CRD's banks, :func:`distill_jax.trainers.methods.init_memory`),
  None without one; its banks are sharded over the devices by rows
  (:func:`state_shardings`).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  connector: Any = None
  memory: Any = None

  def trainable(self) -> Any:
    """What the optimiser updates: ``params``, or the student's and connector's."""
    if self.connector is None:
      return self.params
    return {'student': self.params, 'connector': self.connector['params']}


def make_augment(data: ml_collections.ConfigDict, mean: Sequence[float], std: Sequence[float]
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``augment(uint8_images, key) -> normalised float32`` from ``config.data`` (crop padding,
  pad mode, flip, cutout) and the dataset's per-channel mean and std."""
  return functools.partial(data_lib.augment, crop_padding=data.crop_padding, flip=data.flip,
                           cutout=data.cutout, pad_mode=data.pad_mode, mean=tuple(mean),
                           std=tuple(std))


def make_normalize(mean: Sequence[float], std: Sequence[float]
                   ) -> Callable[[jax.Array], jax.Array]:
  """``normalize(uint8_images) -> float32``: the evaluation preprocessing."""
  return functools.partial(data_lib.normalize, mean=tuple(mean), std=tuple(std))


def make_loss(distill: ml_collections.ConfigDict | None, steps_per_epoch: int = 1,
              stage: str = 'main') -> Callable[..., tuple[jax.Array, dict]]:
  """``loss(logits, labels, points, teacher_logits, teacher_points, *, embeddings=None,
  step=0) -> (loss, terms)``: :func:`distill_jax.losses.distillation_loss` with
  ``config.distill``'s method and weights bound, or a method of
  :data:`distill_jax.trainers.methods.ZOO` (cross-entropy alone without a ``distill``
  section). ``embeddings``: the student's and teacher's ``intermediates/embedding``, for
  the methods that read them; ``step``: the training step (DKD's warm-up). ``stage='init'``:
  the initialisation stage's loss (:func:`distill_jax.trainers.methods.make_init_loss`)."""
  if stage == 'init':
    return methods_lib.make_init_loss(distill)
  if distill is None:
    return _only_used_terms(functools.partial(losses.distillation_loss, method='none'), 'none')
  if methods_lib.zoo_method(distill.method):
    return methods_lib.make_zoo_loss(distill, steps_per_epoch)
  if distill.warmup_epochs:  # validation says so in one line first
    raise ValueError(f'distill.warmup_epochs: only DKD warms up, not {distill.method!r}')
  return _only_used_terms(functools.partial(
      losses.distillation_loss, method=distill.method, alpha=distill.alpha,
      temperature=distill.temperature, beta=methods_lib.beta(distill), at_form=distill.at_form),
                          distill.method)


# The loss terms of each method beyond cross-entropy; the others are zeros, not logged.
_METHOD_TERMS = {'kd': ('kd',), 'at': ('at',), 'kd_at': ('kd', 'at')}


def _only_used_terms(loss_fn: Callable, method: str) -> Callable:
  keep = ('ce', *_METHOD_TERMS.get(method, ()))

  def loss(*args, embeddings=None, step=0):
    del embeddings, step  # these methods read logits and attention points only
    total, terms = loss_fn(*args)
    return total, {k: v for k, v in terms.items() if k in keep}
  return loss


def create_train_state(variables: dict, tx: optax.GradientTransformation, seed: int,
                       connector: dict | None = None, memory: dict | None = None
                       ) -> TrainState:
  """A fresh state at step 0 from ``{'params', 'batch_stats'}`` (host or device arrays)
  and, for a method with a learned part, its ``{'params', 'batch_stats'}`` and memory."""
  params = variables['params']
  if connector is not None:
    connector = {'params': connector['params'], 'batch_stats': connector.get('batch_stats', {})}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables.get('batch_stats', {}), opt_state=None,
                     rng=jax.random.PRNGKey(seed), connector=connector, memory=memory)
  return state.replace(opt_state=tx.init(state.trainable()))


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """The sharding of each array of ``state``: replicated, except the memory's banks
  (:data:`distill_jax.trainers.methods.MEMORY_ROWS`), whose rows are split over
  ``'data'`` like a batch."""
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P(data_lib.DATA_AXIS))

  def pick(path, _):
    keys = [getattr(k, 'name', getattr(k, 'key', None)) for k in path]
    return rows if keys[:1] == ['memory'] and keys[-1] in methods_lib.MEMORY_ROWS else replicated
  return jax.tree_util.tree_map_with_path(pick, state)


def place_state(state: TrainState, shardings: TrainState) -> TrainState:
  """A host (or device) state placed by ``shardings`` (:func:`state_shardings`; every
  process holds the whole state and gives each of its devices its part)."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, state, shardings)


def _topk_errors(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example top-1 and top-5 errors (top-k with k = min(5, classes)) as float32."""
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit = top == labels[:, None]
  return 1.0 - hit[:, 0].astype(jnp.float32), 1.0 - hit.any(-1).astype(jnp.float32)


def train_step(state: TrainState, batch: dict, teacher: dict | None, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               augment: Callable[[jax.Array, jax.Array], jax.Array], loss_fn: Callable,
               drop_path: optax.Schedule | None = None, aux_weight: float = 0.0,
               teacher_model: nn.Module | None = None, embeddings: bool = False,
               connector_model: nn.Module | None = None) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; returns the new state and scalar metrics.

  ``augment`` (:func:`make_augment`) turns the raw batch into training inputs; ``loss_fn``
  (:func:`make_loss`) scores the student against the labels and the teacher;
  ``drop_path`` (:func:`distill_jax.trainers.optim.make_drop_path_schedule`) gives a DARTS
  network's drop-path probability per step; ``aux_weight`` weighs the auxiliary head;
  ``embeddings``: pass both networks' sown embeddings to ``loss_fn`` (RKD, PKT, CC);
  ``connector_model``: the method's learned part, applied to ``state.connector`` (and
  ``state.memory``, with the batch's ``'index'``) with its loss passed to ``loss_fn`` as
  ``learned`` and its parameters trained with the student's.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  aug_rng, dropout_rng = jax.random.split(step_rng)
  memory_rng = jax.random.fold_in(step_rng, 2)  # CRD's negatives
  images = augment(batch['image'], aug_rng)
  labels = batch['label']

  teacher_logits = teacher_points = teacher_embedding = None
  if teacher_model is not None and embeddings:
    (teacher_logits, teacher_points), sown = teacher_model.apply(
        teacher, images, train=False, mutable=[names.INTERMEDIATES])
    (teacher_embedding,) = sown[names.INTERMEDIATES][names.EMBEDDING]
  elif teacher_model is not None:
    teacher_logits, teacher_points = teacher_model.apply(teacher, images, train=False)
  teacher_logits, teacher_points, teacher_embedding = jax.lax.stop_gradient(
      (teacher_logits, teacher_points, teacher_embedding))

  mutable = ['batch_stats', names.INTERMEDIATES] if aux_weight or embeddings else ['batch_stats']
  kwargs = {} if drop_path is None else {'drop_path_prob': drop_path(state.step)}

  def objective(trainable):
    params = trainable if connector_model is None else trainable['student']
    (logits, points), new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        rngs={'dropout': dropout_rng}, mutable=mutable, **kwargs)
    pair = ((new_vars[names.INTERMEDIATES][names.EMBEDDING][0], teacher_embedding)
            if embeddings else None)
    learned, connector, memory = None, state.connector, state.memory
    if connector_model is not None:
      (learned, memory), connector_vars = connector_model.apply(
          {'params': trainable['connector'], 'batch_stats': connector['batch_stats']},
          points, teacher_points, *(pair or (None, None)), train=True,
          mutable=['batch_stats'], memory=memory, labels=labels, index=batch.get('index'),
          key=memory_rng)
      connector = {'params': trainable['connector'],
                   'batch_stats': connector_vars.get('batch_stats', {})}
    loss, terms = loss_fn(logits, labels, points, teacher_logits, teacher_points,
                          embeddings=pair, step=state.step,
                          **({} if learned is None else {'learned': learned}))
    if aux_weight:
      (aux_logits,) = new_vars[names.INTERMEDIATES][names.AUX_LOGITS]
      terms['aux'] = losses.cross_entropy(aux_logits, labels)
      loss = loss + aux_weight * terms['aux']
    return loss, (logits, new_vars['batch_stats'], connector, memory, terms)

  trainable = state.trainable()
  (loss, (logits, batch_stats, connector, memory, terms)), grads = jax.value_and_grad(
      objective, has_aux=True)(trainable)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trained = optax.apply_updates(trainable, updates)
  params = trained if connector_model is None else trained['student']
  if connector_model is not None:
    connector = {'params': trained['connector'], 'batch_stats': connector['batch_stats']}

  top1, top5 = _topk_errors(logits, labels)
  metrics = {
      **terms, 'loss': loss, 'top1_error': top1.mean(), 'top5_error': top5.mean(),
      'learning_rate': schedule(state.step), 'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(params)}
  if teacher_logits is not None:
    metrics['teacher_agreement'] = jnp.mean(
        (logits.argmax(-1) == teacher_logits.argmax(-1)).astype(jnp.float32))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, connector=connector, memory=memory)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, teacher: dict | None, *, model: nn.Module,
              normalize: Callable[[jax.Array], jax.Array],
              teacher_model: nn.Module | None = None) -> dict:
  """Sums over the (padded, masked) batch: loss, top-1/top-5 errors and the count.

  With a teacher, also the top-1 agreement with it and, when the two networks have as
  many attention points (KD alone needs no such pairing), the attention distance (the released AT term, Σ over points of the mean squared map
  difference, without β).
  """
  images = normalize(batch['image'])
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
    sums['teacher_agreement'] = jnp.sum(agree * mask)
    if points and len(points) == len(teacher_points):
      per_example = losses.at_distance_per_example(points, teacher_points)
      sums['at_distance'] = jnp.sum(per_example * mask)
  return sums


def compile_steps(*, mesh: Mesh, model: nn.Module, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, augment: Callable, normalize: Callable,
                  loss_fn: Callable, drop_path: optax.Schedule | None = None,
                  aux_weight: float = 0.0, teacher_model: nn.Module | None = None,
                  embeddings: bool = False, connector_model: nn.Module | None = None,
                  state_sharding: Any = None) -> tuple[Callable, Callable]:
  """``train_step`` and ``eval_step`` jitted over ``mesh``: the state as
  ``state_sharding`` (:func:`state_shardings`; default replicated), batch on ``'data'``,
  the state donated."""
  replicated = NamedSharding(mesh, P())
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, augment=augment,
                        loss_fn=loss_fn, drop_path=drop_path, aux_weight=aux_weight,
                        teacher_model=teacher_model, embeddings=embeddings,
                        connector_model=connector_model),
      out_shardings=(replicated if state_sharding is None else state_sharding, replicated),
      donate_argnums=(0,))
  evaluate = jax.jit(functools.partial(eval_step, model=model, normalize=normalize,
                                       teacher_model=teacher_model),
                     out_shardings=replicated)
  return train, evaluate
