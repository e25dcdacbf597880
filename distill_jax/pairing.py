r"""Pairing scores: how alike a candidate teacher and a student are, before any distillation.

Pure, jittable functions on arrays (logits, embeddings, attention points) of a trained
teacher and the student trained alone, computed on the same training images; no labels
unless a score needs them. They turn the seed paper's observation (Whettam 2020: similar
networks pair well, visible in their attention maps) into numbers that can be checked
against the distilled outcome.

- :func:`representation_cka`: linear centred kernel alignment (Kornblith, Norouzi, Lee &
  Hinton, "Similarity of Neural Network Representations Revisited", ICML 2019),

  .. math::

    \mathrm{CKA}(X, Y) = \frac{\lVert \tilde Y^\top \tilde X \rVert_F^2}
                              {\lVert \tilde X^\top \tilde X \rVert_F\,
                               \lVert \tilde Y^\top \tilde Y \rVert_F},

  with :math:`\tilde X, \tilde Y` the column-centred (N, D₁), (N, D₂) arrays: 1 for
  identical inputs, invariant to orthogonal maps and isotropic scaling of either side.
  :func:`minibatch_cka` accumulates the unbiased HSIC estimator (Song et al. 2012) over
  batches (Nguyen, Raghu & Kornblith 2021) for sets too large for one Gram matrix.
- :func:`attention_similarity`: the mean over attention points and examples of the
  attention-transfer distance (Zagoruyko & Komodakis 2017; :mod:`distill_jax.losses`),
  and the mean over points of the linear CKA of the flattened attention maps.
- :func:`logit_agreement`: top-1 agreement and :math:`\mathrm{KL}(p_t^T \| p_s^T)` at
  temperature :math:`T`; :func:`teacher_confidence`: the teacher's mean top-1 probability
  and its expected calibration error (Guo, Pleiss, Sun & Weinberger 2017; equal-width
  bins of the top-1 probability).
- :func:`gradient_alignment`: the cosine between the student's parameter gradients of
  its cross-entropy and of the distillation loss with this teacher, on a batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from distill_jax import losses


def _centred(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  return x - jnp.mean(x, axis=0, keepdims=True)


@jax.jit
def representation_cka(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike) -> jax.Array:
  """Linear CKA of ``x`` (N, D₁...) and ``y`` (N, D₂...); trailing axes are flattened.

  Computed from the feature-space products (D × D), so N may be large. Returns a scalar
  in [0, 1] (0 when either side is constant).
  """
  x, y = _centred(jnp.asarray(x)), _centred(jnp.asarray(y))
  cross = jnp.sum(jnp.square(y.T @ x))
  norm = jnp.sqrt(jnp.sum(jnp.square(x.T @ x))) * jnp.sqrt(jnp.sum(jnp.square(y.T @ y)))
  return jnp.where(norm > 0, cross / jnp.where(norm > 0, norm, 1.0), 0.0)


def _hsic_unbiased(k: jax.Array, l: jax.Array) -> jax.Array:
  """Song et al.'s unbiased HSIC of two (n, n) Gram matrices (n >= 4)."""
  n = k.shape[0]
  k = k * (1 - jnp.eye(n))
  l = l * (1 - jnp.eye(n))
  ones = jnp.ones((n,))
  term = (jnp.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
          - 2.0 / (n - 2) * (ones @ k @ l @ ones))
  return term / (n * (n - 3))


@jax.jit
def _batch_hsics(x: jax.Array, y: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  y = jnp.asarray(y, jnp.float32).reshape(y.shape[0], -1)
  k, l = x @ x.T, y @ y.T
  return jnp.stack([_hsic_unbiased(k, l), _hsic_unbiased(k, k), _hsic_unbiased(l, l)])


def minibatch_cka(batches: Iterable[tuple[jax.typing.ArrayLike, jax.typing.ArrayLike]]
                  ) -> jax.Array:
  """Linear CKA over ``(x, y)`` batches (each of at least 4 rows): the unbiased HSIC
  estimates summed over batches, :math:`\\sum H(K, L) / \\sqrt{\\sum H(K, K) \\sum H(L, L)}`."""
  total = None
  for x, y in batches:
    if jnp.shape(x)[0] < 4 or jnp.shape(x)[0] != jnp.shape(y)[0]:
      raise ValueError(f'minibatch_cka needs batches of equal size >= 4; got {jnp.shape(x)[0]} '
                       f'and {jnp.shape(y)[0]} rows')
    h = _batch_hsics(jnp.asarray(x), jnp.asarray(y))
    total = h if total is None else total + h
  if total is None:
    raise ValueError('minibatch_cka needs at least one batch')
  return total[0] / jnp.sqrt(total[1] * total[2])


@jax.jit
def attention_similarity(teacher_points: Sequence[jax.typing.ArrayLike],
                         student_points: Sequence[jax.typing.ArrayLike]) -> dict:
  """``{'at_distance', 'attention_cka'}`` of two networks' attention points on the same
  N images (each point (N, H, W, C); pairs of equal H, W, channels may differ).

  ``at_distance``: the mean over points and examples of the attention-transfer term
  (the released form of :func:`distill_jax.losses.at_distance_per_example`), lower is
  more alike; ``attention_cka``: the mean over points of :func:`representation_cka` of
  the (N, H·W) attention maps, higher is more alike.
  """
  if len(teacher_points) != len(student_points) or not teacher_points:
    raise ValueError(f'attention_similarity needs the same number (>= 1) of teacher and '
                     f'student points; got {len(teacher_points)} and {len(student_points)}')
  distance = losses.at_distance_per_example(list(student_points), list(teacher_points))
  ckas = [representation_cka(losses.attention_map(t), losses.attention_map(s))
          for t, s in zip(teacher_points, student_points)]
  return {'at_distance': jnp.mean(distance) / len(teacher_points),
          'attention_cka': jnp.mean(jnp.stack(ckas))}


@jax.jit
def logit_agreement(teacher_logits: jax.typing.ArrayLike, student_logits: jax.typing.ArrayLike,
                    temperature: float = 4.0) -> dict:
  """``{'agreement', 'kl'}``: the fraction of examples whose top-1 classes agree, and the
  mean :math:`\\mathrm{KL}(\\sigma(t/T) \\| \\sigma(s/T))` (no :math:`T^2`); (N, K) logits."""
  t, s = jnp.asarray(teacher_logits), jnp.asarray(student_logits)
  agree = jnp.mean((jnp.argmax(t, -1) == jnp.argmax(s, -1)).astype(jnp.float32))
  kl = jnp.mean(losses.soft_kl_per_example(s, t, temperature=temperature))
  return {'agreement': agree, 'kl': kl}


def teacher_confidence(teacher_logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                       num_bins: int = 15) -> dict:
  """``{'confidence', 'ece'}``: the teacher's mean top-1 probability and its expected
  calibration error, :math:`\\sum_b \\frac{|B_b|}{N} |\\mathrm{acc}(B_b) -
  \\mathrm{conf}(B_b)|` over ``num_bins`` equal-width bins of the top-1 probability
  (bin ``b`` holds :math:`(b/M, (b+1)/M]`)."""
  return _confidence(jnp.asarray(teacher_logits), jnp.asarray(labels), num_bins)


@functools.partial(jax.jit, static_argnames=('num_bins',))
def _confidence(logits: jax.Array, labels: jax.Array, num_bins: int) -> dict:
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  bins = jnp.clip(jnp.ceil(top * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  count = jnp.zeros(num_bins).at[bins].add(1.0)
  conf = jnp.zeros(num_bins).at[bins].add(top)
  acc = jnp.zeros(num_bins).at[bins].add(correct)
  ece = jnp.sum(jnp.abs(acc - conf)) / logits.shape[0]
  return {'confidence': jnp.mean(top), 'ece': ece}


def gradient_alignment(logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                       images: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                       teacher_logits: jax.typing.ArrayLike, *, temperature: float = 4.0
                       ) -> jax.Array:
  r"""Cosine between the student's parameter gradients of its own loss and of the
  distillation loss with this teacher, on one batch (no training):

  .. math::

    \cos\big(\nabla_\theta \mathrm{CE}(s_\theta(x), y),\;
               \nabla_\theta T^2 \mathrm{KL}(\sigma(t/T) \| \sigma(s_\theta(x)/T))\big),

  both batch means, over every leaf of ``params`` flattened into one vector. Near 1: the
  teacher pulls the student where its labels do; near 0 or below: elsewhere.

  Args:
    logits_fn: ``(params, images) -> (N, K) logits`` of the student (e.g. a closure over
      ``model.apply`` with its batch statistics in inference mode); static under ``jit``.
    params: the student's trainable parameters (any pytree).
    images: (N, ...) the batch the student reads.
    labels: (N,) integer labels.
    teacher_logits: (N, K) the teacher's logits on the same images.
    temperature: the distillation temperature T.
  """
  return _gradient_alignment(logits_fn, params, jnp.asarray(images), jnp.asarray(labels),
                             jnp.asarray(teacher_logits), temperature)


@functools.partial(jax.jit, static_argnums=(0,))
def _gradient_alignment(logits_fn, params, images, labels, teacher_logits, temperature):
  def ce(p):
    return losses.cross_entropy(logits_fn(p, images), labels)

  def kd(p):
    kl = losses.soft_kl_per_example(logits_fn(p, images), teacher_logits,
                                    temperature=temperature)
    return temperature ** 2 * jnp.mean(kl)

  flat = lambda tree: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])
  g_ce, g_kd = flat(jax.grad(ce)(params)), flat(jax.grad(kd)(params))
  norm = jnp.linalg.norm(g_ce) * jnp.linalg.norm(g_kd)
  return jnp.where(norm > 0, jnp.dot(g_ce, g_kd) / jnp.where(norm > 0, norm, 1.0), 0.0)
