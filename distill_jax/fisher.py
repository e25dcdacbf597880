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
