r"""Logit distillation beyond Hinton et al.'s KD: DKD and DIST.

Logits are ``(N, K)``; :func:`dkd_loss` also takes integer labels ``(N,)``.
Both return a batch-level scalar and reproduce the authors' releases:

* :func:`dkd_loss`: decoupled KD, target-class and non-target-class terms
  (Zhao et al., 2022; mdistiller ``mdistiller/distillers/DKD.py``).
* :func:`dist_loss`: DIST, inter- and intra-class Pearson-correlation
  relations (Huang et al., 2022; image_classification_sota
  ``lib/models/losses/dist_kd.py``).
"""

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from distill_jax.losses._checks import _as_float
from distill_jax.losses._checks import _check_logits_labels
from distill_jax.losses._checks import _check_same_shape

# mdistiller's shift of the target logit out of the non-target softmax.
_DKD_MASK_SHIFT = 1000.0
# The eps of image_classification_sota's cosine similarity.
_DIST_EPS = 1e-8


def _kl_sum(p: jax.Array, log_q: jax.Array) -> jax.Array:
  """``sum_k p_k (log p_k - log_q_k)`` with ``0 log 0 = 0`` (``F.kl_div``)."""
  return jnp.sum(xlogy(p, p) - p * log_q, axis=-1)


def dkd_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> jax.Array:
  r"""Decoupled knowledge distillation loss of Zhao et al. (2022).

  With :math:`p = \sigma(z / T)` and :math:`y_n` the label of example ``n``,
  the binary target/non-target distribution :math:`b = (p_{y}, 1 - p_{y})`
  and the distribution :math:`\hat p` over the non-target classes:

  .. math::
    \mathrm{TCKD} = \frac{T^2}{N} \sum_n \mathrm{KL}(b^t_n \,\|\, b^s_n),
    \quad
    \mathrm{NCKD} = \frac{T^2}{N} \sum_n \mathrm{KL}(\hat p^t_n \,\|\,
      \hat p^s_n),
    \qquad
    L_{DKD} = \alpha\, \mathrm{TCKD} + \beta\, \mathrm{NCKD}.

  As in the release (mdistiller): both KL terms are summed over their classes,
  multiplied by :math:`T^2` and divided by the batch size; :math:`\hat p` is a
  softmax of the logits divided by ``T`` with 1000 subtracted from the target
  class (so its share is negligible: 0 in float32 unless the target's
  :math:`z / T` leads the others by nearly 900); the defaults are those of
  mdistiller's configuration (``CFG.DKD``: :math:`\alpha = 1`,
  :math:`\beta = 8`, :math:`T = 4`; its per-model configurations override
  :math:`\beta`, and its ImageNet ones use :math:`T = 1`). The student's
  :math:`\log b^s` is computed in log space (log-softmax and log-sum-exp over
  the non-target classes) rather than as the log of summed probabilities: the
  same value, but finite where a probability underflows. The release's
  trainer multiplies this loss by a warm-up factor
  ``min(epoch / warmup, 1)`` (``DKD.WARMUP = 20`` epochs) and adds a weighted
  cross-entropy; both belong to the training loop, not to this function. The
  teacher gets no gradient.

  References: Zhao, Cui, Song, Qiu & Liang, `Decoupled knowledge distillation
  <https://arxiv.org/abs/2203.08679>`_, CVPR 2022; release:
  https://github.com/megvii-research/mdistiller,
  ``mdistiller/distillers/DKD.py`` (``dkd_loss``).

  Args:
    student_logits: shape ``(N, K)``, ``K >= 2`` (any leading batch shape
      ``(..., K)`` works; the mean is over all of it).
    teacher_logits: same shape as ``student_logits``.
    labels: integer class indices in ``[0, K)``, shape ``(N,)``.
    alpha: weight of TCKD (may be traced).
    beta: weight of NCKD (may be traced).
    temperature: softmax temperature :math:`T > 0` (may be traced).

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: on mismatched shapes of the logits or labels, or fewer than 2
      classes.
    TypeError: if ``labels`` are not integers.
  """
  s = _as_float(student_logits)
  t = jax.lax.stop_gradient(_as_float(teacher_logits))
  labels = jnp.asarray(labels)
  _check_same_shape(s, t)
  _check_logits_labels(s, labels)
  if s.shape[-1] < 2:
    raise ValueError(
        f'dkd_loss needs at least 2 classes, got student_logits {s.shape}.')
  target = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.bool_)
  z_s = s / temperature
  z_t = t / temperature

  # Target-class term: binary distributions (target, all other classes).
  p_t = jax.nn.softmax(z_t, axis=-1)
  b_t = jnp.stack([jnp.sum(jnp.where(target, p_t, 0.0), axis=-1),
                   jnp.sum(jnp.where(target, 0.0, p_t), axis=-1)], axis=-1)
  lse_s = jax.nn.logsumexp(z_s, axis=-1)
  log_b_s = jnp.stack(
      [jnp.sum(jnp.where(target, z_s, 0.0), axis=-1) - lse_s,
       jax.nn.logsumexp(z_s, axis=-1, where=~target) - lse_s], axis=-1)
  tckd = temperature**2 * jnp.mean(_kl_sum(b_t, log_b_s))

  # Non-target term: the target class shifted out of both softmaxes.
  shift = _DKD_MASK_SHIFT * target
  p_t_other = jax.nn.softmax(z_t - shift, axis=-1)
  log_p_s_other = jax.nn.log_softmax(z_s - shift, axis=-1)
  nckd = temperature**2 * jnp.mean(_kl_sum(p_t_other, log_p_s_other))
  return alpha * tckd + beta * nckd


def _safe_norm(x: jax.Array, axis: int) -> jax.Array:
  """L2 norm with a zero (not NaN) gradient at an all-zero slice."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _pearson(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
  """Pearson correlation along ``axis`` as the release: centred cosine + eps."""
  a = a - jnp.mean(a, axis=axis, keepdims=True)
  b = b - jnp.mean(b, axis=axis, keepdims=True)
  return jnp.sum(a * b, axis=axis) / (
      _safe_norm(a, axis) * _safe_norm(b, axis) + _DIST_EPS)


def dist_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> jax.Array:
  r"""DIST loss of Huang et al. (2022): inter- and intra-class relations.

  With :math:`Y = \sigma(Z / T)` row-wise (``(N, K)``) and :math:`\rho` the
  Pearson correlation, computed as the release does, a cosine of centred
  vectors with :math:`\epsilon = 10^{-8}` added to the product of norms:

  .. math::
    \rho(u, v) = \frac{(u - \bar u)^\top (v - \bar v)}
      {\lVert u - \bar u \rVert \lVert v - \bar v \rVert + \epsilon},
    \qquad
    L_{DIST} = \beta\, T^2 \Big(1 - \frac{1}{N} \sum_n
        \rho(Y^s_{n\cdot}, Y^t_{n\cdot})\Big)
      + \gamma\, T^2 \Big(1 - \frac{1}{K} \sum_k
        \rho(Y^s_{\cdot k}, Y^t_{\cdot k})\Big).

  The first (inter-class) term correlates each example's class
  probabilities; the second (intra-class) correlates each class's
  probabilities across the batch, so the loss needs the whole batch. Both are
  multiplied by :math:`T^2`, as in the classification release
  (image_classification_sota's ``DIST``), whose defaults
  :math:`\beta = \gamma = T = 1` (also those of its ``kd_method='dist'``)
  are the defaults here. A vector that is constant after centring (e.g. the single example of
  a batch of one, in the intra-class term) has correlation 0, with a finite
  gradient. The teacher gets no gradient.

  References: Huang, You, Wang, Qian & Xu, `Knowledge distillation from a
  stronger teacher <https://arxiv.org/abs/2205.10536>`_, NeurIPS 2022;
  release: https://github.com/hunto/image_classification_sota,
  ``lib/models/losses/dist_kd.py`` (``DIST``).

  Args:
    student_logits: shape ``(N, K)``.
    teacher_logits: same shape as ``student_logits``.
    beta: weight of the inter-class term (may be traced).
    gamma: weight of the intra-class term (may be traced).
    temperature: softmax temperature :math:`T > 0` (may be traced).

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: if the logits are not 2-D or their shapes differ.
  """
  s = _as_float(student_logits)
  t = jax.lax.stop_gradient(_as_float(teacher_logits))
  _check_same_shape(s, t)
  if s.ndim != 2:
    raise ValueError(
        f'dist_loss: logits must be 2-D (N, K), got student_logits {s.shape} '
        f'and teacher_logits {t.shape}.')
  y_s = jax.nn.softmax(s / temperature, axis=1)
  y_t = jax.nn.softmax(t / temperature, axis=1)
  inter = temperature**2 * (1.0 - jnp.mean(_pearson(y_s, y_t, axis=1)))
  intra = temperature**2 * (1.0 - jnp.mean(_pearson(y_s, y_t, axis=0)))
  return beta * inter + gamma * intra
