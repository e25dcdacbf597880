"""Per-channel Fisher information at a network's marked activations (Theis et al. 2018).

For an activation :math:`a` (NHWC) with a multiplicative channel mask :math:`m = 1`,
example :math:`n`'s gradient with respect to channel :math:`c`'s mask is

.. math::

  g_{nc} = \\frac{\\partial L_n}{\\partial m_c} = \\sum_{h,w} a_{nhwc}\\,
           \\frac{\\partial L_n}{\\partial a_{nhwc}},
  \\qquad
  \\Delta_c = \\frac{1}{2N} \\sum_{n=1}^{N} g_{nc}^2,

where :math:`L_n` is example :math:`n`'s own cross-entropy. :math:`\\Delta_c`
estimates how much the loss grows when channel :math:`c` is removed.

The marked activations are the points where a network calls ``Module.perturb``
(every block output of WRN and DenseNet-BC, every cell output of DARTS). Gradients with
respect to them come from the ``'perturbations'`` collection, per example through
``jax.vmap`` inside one jitted call per batch, with batch norm in inference mode and no
weight gradients.

Two protocols measure Δ (``config.fisher.protocol`` of the darts_fisher pipeline):

- ``'trained'`` (the default; :func:`channel_fisher`, :func:`accumulate_fisher`): the
  trained student, batch norm in inference mode, no drop path, each example's own loss
  (per-example gradients by ``vmap``) over several batches. This estimates the quantity
  the derivation of Theis et al. assumes — the expected squared per-example gradient of a
  network at the weights that will be grown — and the examples do not interact.
- ``'release'`` (:func:`release_fisher_step`): the author's release, exactly
  (``funcs.one_shot_fisher`` and the cells' backward hook in ``models/darts.py`` of
  github.com/DWhettam/FisherDistillation): batch norm in training mode (gradients through
  the batch statistics, so examples interact), drop path 0.2, the gradient of the
  *batch-mean* loss (so Δ is ``1/N²`` of the per-example form when the examples do not
  interact), one batch of 32 per growth step on a freshly initialised student, and an SGD
  step on the network after each batch. With randomised running statistics the two
  protocols' per-cell rankings were anti-correlated in an outside check (Spearman
  -0.7), so the choice decides which cell grows.

References: L. Theis, I. Korshunova, A. Tejani, F. Huszár. "Faster gaze prediction with
dense networks and Fisher pruning", 2018 (arXiv:1801.05787). Whettam, "Finding the
Right Teacher for a Difficult Student" (2020; the author's release is
github.com/DWhettam/FisherDistillation) uses these Δ at the DARTS cell outputs to choose
which cells of a student to grow into a teacher (:mod:`distill_jax.grow`).
"""

from __future__ import annotations

import functools
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from distill_jax import losses
from distill_jax.models import names

Fisher = dict[str, jax.Array]  # point name -> (C,) per-channel Δ


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def point_shapes(model: nn.Module, variables: dict, image_shape: tuple[int, ...]) -> dict:
  """The ``'perturbations'`` tree of one example of ``image_shape`` (H, W, C), as shapes."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  if names.PERTURBATIONS not in variables:
    raise ValueError(f'{type(model).__name__} marks no activations (no Module.perturb calls)')
  return variables[names.PERTURBATIONS]


@functools.partial(jax.jit, static_argnames=('model',))
def fisher_sums(model: nn.Module, variables: dict, images: jax.Array,
                labels: jax.Array) -> tuple[dict, jax.Array]:
  """``(Σ_n g_nc² per point, N)`` for one batch; images (N, H, W, C) float, labels (N,).

  ``variables`` holds ``params`` and ``batch_stats``; only the perturbations are
  differentiated. Sums over batches add up; :func:`fisher_from_sums` divides by 2N.
  """
  shapes = point_shapes(model, variables, images.shape[1:])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def example_g(x, y):
    def loss(perturbations):
      (logits, _), state = model.apply({**variables, names.PERTURBATIONS: perturbations},
                                       x[None], train=False, mutable=[names.INTERMEDIATES])
      return losses.cross_entropy(logits, y[None]), state[names.INTERMEDIATES]

    grads, intermediates = jax.grad(loss, has_aux=True)(zeros)
    flat_grads, treedef = jax.tree_util.tree_flatten_with_path(grads)
    g = []
    for path, grad in flat_grads:
      activation = _lookup(intermediates, path)
      g.append(jnp.sum(activation.astype(jnp.float32) * grad.astype(jnp.float32), axis=(0, 1, 2)))
    return jax.tree_util.tree_unflatten(treedef, g)

  g = jax.vmap(example_g)(images, labels)
  return jax.tree.map(lambda x: jnp.sum(jnp.square(x), axis=0), g), jnp.asarray(images.shape[0])


def _lookup(intermediates: dict, path) -> jax.Array:
  node = intermediates
  for key in path:
    node = node[getattr(key, 'key', key)]
  return node[0] if isinstance(node, tuple) else node


def fisher_from_sums(sums: dict, count: jax.Array | int) -> Fisher:
  """Δ_c = Σ g² / (2N), keyed by the point's path name (e.g. ``'cell3/output'``,
  :func:`names.cell_output`; ``'group0_block0_out'`` for WRN)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(sums)
  return {_path_name(path): s / (2.0 * count) for path, s in flat}


def channel_fisher(model: nn.Module, variables: dict, images: jax.Array,
                   labels: jax.Array) -> Fisher:
  """Per-channel Fisher Δ at every marked point of ``model`` for one batch.

  Args:
    model: a registered network (``distill_jax.models.create_model``).
    variables: ``{'params', 'batch_stats'}``.
    images: (N, H, W, C) normalised float images.
    labels: (N,) integer labels.

  Returns:
    ``{point name: (C,) float32 Δ}``; see :func:`cell_totals` for per-point sums.
  """
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  sums, count = fisher_sums(model, variables, images, labels)
  return fisher_from_sums(sums, count)


def accumulate_fisher(model: nn.Module, variables: dict,
                      batches: Iterable[tuple[jax.Array, jax.Array]]) -> Fisher:
  """Δ over several ``(images, labels)`` batches: Σ over all examples, divided by 2N."""
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  total, count = None, 0
  for images, labels in batches:
    sums, n = fisher_sums(model, variables, images, labels)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    count += int(n)
  if total is None:
    raise ValueError('accumulate_fisher needs at least one batch')
  return fisher_from_sums(total, count)


def cell_totals(fisher: Fisher) -> dict[str, float]:
  """Each point's total Δ (sum over its channels)."""
  return {name: float(jnp.sum(delta)) for name, delta in fisher.items()}


# The release's fixed settings of its Fisher step (funcs.one_shot_fisher, fisher_expand.py).
RELEASE_DROP_PATH = 0.2
RELEASE_LEARNING_RATE = 0.1
RELEASE_MOMENTUM = 0.9
RELEASE_WEIGHT_DECAY = 5e-4


@functools.partial(jax.jit, static_argnames=('model',))
def release_fisher_step(model: nn.Module, variables: dict, images: jax.Array,
                        labels: jax.Array, key: jax.Array) -> tuple[Fisher, dict]:
  """One batch of the release's Fisher measurement and the SGD step that follows it.

  In the release's order: a training-mode forward pass on uniform noise in [0, 1) of
  the batch's shape (it only moves the batch-norm running statistics, as the release's
  ``net(torch.rand(...))``); then the batch in training mode (batch statistics, drop path
  :data:`RELEASE_DROP_PATH` where the network has it) with the batch-mean cross-entropy
  :math:`\bar L`, giving, for every marked activation,

  .. math::

    g_{nc} = \sum_{h,w} a_{nhwc} \frac{\partial \bar L}{\partial a_{nhwc}},
    \qquad \Delta_c = \frac{1}{2N} \sum_n g_{nc}^2;

  then one step of SGD (learning rate 0.1, momentum 0.9 from a fresh buffer, so the step
  is the plain gradient, weight decay 5e-4 on every parameter, batch norm's included)
  with the gradients of that same pass.

  Args:
    model: a registered network whose ``__call__`` marks activations (``Module.perturb``).
    variables: ``{'params', 'batch_stats'}``.
    images: (N, H, W, C) normalised (and, as the release, augmented) float images.
    labels: (N,) integer labels.
    key: drop path's and the noise's randomness.

  Returns:
    ``(Δ keyed like channel_fisher, variables after the step)``. The batch norms'
    running variance follows Flax (the biased batch variance; PyTorch's is unbiased).
  """
  key_noise, key_noise_drop, key_drop = jax.random.split(key, 3)
  kwargs = {'drop_path_prob': RELEASE_DROP_PATH} if hasattr(model, 'drop_path_prob') else {}
  noise = jax.random.uniform(key_noise, images.shape, jnp.float32)
  _, state = model.apply(variables, noise, train=True, rngs={'dropout': key_noise_drop},
                         mutable=['batch_stats', names.INTERMEDIATES], **kwargs)
  batch_stats = state['batch_stats']
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[names.PERTURBATIONS])

  def loss(params, perturbations):
    (logits, _), state = model.apply(
        {'params': params, 'batch_stats': batch_stats, names.PERTURBATIONS: perturbations},
        images, train=True, rngs={'dropout': key_drop},
        mutable=['batch_stats', names.INTERMEDIATES], **kwargs)
    return losses.cross_entropy(logits, labels), state

  (param_grads, point_grads), state = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      variables['params'], zeros)
  flat, _ = jax.tree_util.tree_flatten_with_path(point_grads)
  fisher = {}
  for path, grad in flat:
    activation = _lookup(state[names.INTERMEDIATES], path)
    g = jnp.sum(activation.astype(jnp.float32) * grad.astype(jnp.float32), axis=(1, 2))
    fisher[_path_name(path)] = 0.5 * jnp.mean(jnp.square(g), axis=0)
  sgd = optax.chain(optax.add_decayed_weights(RELEASE_WEIGHT_DECAY),
                    optax.sgd(RELEASE_LEARNING_RATE, momentum=RELEASE_MOMENTUM))
  params = variables['params']
  updates, _ = sgd.update(param_grads, sgd.init(params), params)
  return fisher, {'params': optax.apply_updates(params, updates),
                  'batch_stats': state['batch_stats']}
