"""Optimisers and learning-rate schedules from a config, built from optax parts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(opt: ml_collections.ConfigDict, *, steps_per_epoch: int,
                  num_train_steps: int) -> optax.Schedule:
  """The learning rate per step: ``constant``, ``cosine`` (to ``opt.final_learning_rate``)
  or ``multistep`` (×``opt.decay_factor`` at each epoch in ``opt.milestones``)."""
  lr = opt.learning_rate
  if opt.schedule == 'constant':
    return optax.constant_schedule(lr)
  if opt.schedule == 'cosine':
    alpha = opt.final_learning_rate / lr
    return optax.cosine_decay_schedule(lr, decay_steps=max(num_train_steps, 1), alpha=alpha)
  if opt.schedule == 'multistep':
    boundaries = {int(m) * steps_per_epoch: opt.decay_factor for m in opt.milestones}
    return optax.piecewise_constant_schedule(lr, boundaries)
  raise ValueError(f'optimizer.schedule={opt.schedule!r}; allowed: constant, cosine, multistep')


def make_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum (optionally Nesterov) and L2 weight decay added to the gradient
  (the PyTorch ``SGD(weight_decay=...)`` convention), after optional global-norm clipping."""
  parts = []
  if opt.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.weight_decay:
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  return optax.chain(*parts)


def freeze_modules(tx: optax.GradientTransformation, modules: tuple[str, ...]
                   ) -> optax.GradientTransformation:
  """``tx`` on every parameter except those of the top-level ``modules`` (of the
  network's ``params``, or of its ``'student'`` entry beside a connector's), which get
  no update at all (no weight decay either)."""
  frozen = set(modules)

  def labels(tree):
    def label(path, _):
      keys = [getattr(k, 'key', None) for k in path[:2]]
      top = keys[1] if keys[0] == 'student' else keys[0]
      return 'frozen' if top in frozen else 'train'
    return jax.tree_util.tree_map_with_path(label, tree)

  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def make_drop_path_schedule(drop_path_prob: float, *, steps_per_epoch: int,
                            num_epochs: int) -> optax.Schedule | None:
  """DARTS drop path per step, ramped linearly with the epoch as in the release
  (``drop_path_prob * epoch / num_epochs``); ``None`` when it is off."""
  if not drop_path_prob:
    return None

  def schedule(step):
    epoch = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    return drop_path_prob * epoch / num_epochs

  return schedule
