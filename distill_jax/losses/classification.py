"""Classification losses: cross-entropy, softened KL and Hinton et al.'s KD loss.

Logits ``(N, K)`` and integer labels ``(N,)``; any leading batch shape
``(..., K)`` works: the per-example cores return that shape, the batch-mean
wrappers average over all of it.

* :func:`cross_entropy_per_example` -> :func:`cross_entropy`
* :func:`soft_kl_per_example` -> :func:`soft_kl`
* :func:`kd_loss_per_example` -> :func:`kd_loss`
"""

import jax
import jax.numpy as jnp
import optax

from distill_jax.losses._checks import _as_float
from distill_jax.losses._checks import _check_logits_labels
from distill_jax.losses._checks import _check_same_shape


def cross_entropy_per_example(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Per-example softmax cross-entropy with integer labels.

  .. math::
    \mathrm{CE}_n = -\log \sigma(z_n)_{y_n},
    \qquad \sigma(z)_k = \frac{e^{z_k}}{\sum_j e^{z_j}}.

  Args:
    logits: unnormalised scores, shape ``(N, K)`` (any leading batch shape
      ``(..., K)`` is accepted).
    labels: integer class indices in ``[0, K)``, shape ``(N,)`` (``logits``'s
      shape without the class axis).

  Returns:
    Shape ``(N,)`` (``logits.shape[:-1]``), float32 for inputs of at most 32
    bits.

  Raises:
    ValueError: if ``labels.shape != logits.shape[:-1]``.
    TypeError: if ``labels`` are not integers.
  """
  logits = _as_float(logits)
  labels = jnp.asarray(labels)
  _check_logits_labels(logits, labels)
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Mean softmax cross-entropy with integer labels.

  .. math::
    \mathrm{CE} = -\frac{1}{N} \sum_{n=1}^{N} \log \sigma(z_n)_{y_n},
    \qquad \sigma(z)_k = \frac{e^{z_k}}{\sum_j e^{z_j}}.

  The mean of :func:`cross_entropy_per_example`.

  Args:
    logits: unnormalised scores, shape ``(N, K)`` (any leading batch shape
      ``(..., K)`` is accepted; the mean is over all of it).
    labels: integer class indices in ``[0, K)``, shape ``(N,)`` (``logits``'s
      shape without the class axis).

  Returns:
    A scalar, float32 for inputs of at most 32 bits.
  """
  return jnp.mean(cross_entropy_per_example(logits, labels))


def soft_kl_per_example(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: float,
) -> jax.Array:
  r"""Per-example KL divergence from the softened teacher to the student.

  .. math::
    \mathrm{KL}\big(\sigma(t_n / T) \,\|\, \sigma(s_n / T)\big)
    = \sum_{k} p_{nk} (\log p_{nk} - \log q_{nk}),

  with :math:`p = \sigma(t/T)`, :math:`q = \sigma(s/T)`, summed over classes,
  without the :math:`T^2` factor of :func:`kd_loss_per_example` (Hinton et al.,
  2015). It is zero when the student's logits equal the teacher's. The teacher
  gets no gradient.

  Args:
    student_logits: shape ``(N, K)`` (or ``(..., K)``).
    teacher_logits: same shape as ``student_logits``.
    temperature: softmax temperature :math:`T > 0` (not checked; may be
      traced).

  Returns:
    Shape ``(N,)`` (``student_logits.shape[:-1]``), float32 for inputs of at
    most 32 bits.

  Raises:
    ValueError: if the two logits' shapes differ.
  """
  student_logits = _as_float(student_logits)
  teacher_logits = jax.lax.stop_gradient(_as_float(teacher_logits))
  _check_same_shape(student_logits, teacher_logits)
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  return optax.losses.kl_divergence_with_log_targets(log_q, log_p)


def soft_kl(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    *,
    temperature: float,
) -> jax.Array:
  r"""KL divergence from the softened teacher to the softened student.

  .. math::
    \frac{1}{N} \sum_{n=1}^{N} \mathrm{KL}\big(\sigma(t_n / T) \,\|\,
    \sigma(s_n / T)\big) = \frac{1}{N} \sum_{n} \sum_{k} p_{nk}
    (\log p_{nk} - \log q_{nk}),

  with :math:`p = \sigma(t/T)`, :math:`q = \sigma(s/T)`: summed over classes,
  averaged over the batch (the mean of :func:`soft_kl_per_example`), without
  the :math:`T^2` factor of :func:`kd_loss`. It is zero when the student's
  logits equal the teacher's. The teacher gets no gradient.

  Args:
    student_logits: shape ``(N, K)`` (or ``(..., K)``).
    teacher_logits: same shape as ``student_logits``.
    temperature: softmax temperature :math:`T > 0`.

  Returns:
    A scalar, float32 for inputs of at most 32 bits.
  """
  return jnp.mean(
      soft_kl_per_example(student_logits, teacher_logits,
                          temperature=temperature))


def kd_loss_per_example(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float = 0.9,
    temperature: float = 4.0,
) -> jax.Array:
  r"""Per-example knowledge-distillation loss (Hinton, Vinyals & Dean, 2015).

  .. math::
    \ell_n = (1 - \alpha)\, \mathrm{CE}_n
      + \alpha\, T^2\, \mathrm{KL}\big(\sigma(t_n / T) \,\|\, \sigma(s_n / T)
      \big),

  with :math:`\mathrm{CE}_n` from :func:`cross_entropy_per_example` and the KL
  from :func:`soft_kl_per_example`. See :func:`kd_loss` for the relation to
  the paper and to the attention-transfer release. The teacher gets no
  gradient.

  Args:
    student_logits: shape ``(N, K)`` (or ``(..., K)``).
    teacher_logits: same shape as ``student_logits``.
    labels: integer labels, shape ``(N,)``.
    alpha: weight of the soft term, in ``[0, 1]`` (not checked; may be traced).
    temperature: softmax temperature :math:`T > 0` (not checked; may be
      traced).

  Returns:
    Shape ``(N,)``, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: on mismatched shapes of the logits or labels.
  """
  ce = cross_entropy_per_example(student_logits, labels)
  kl = soft_kl_per_example(student_logits, teacher_logits,
                           temperature=temperature)
  return (1.0 - alpha) * ce + alpha * temperature**2 * kl


def kd_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float = 0.9,
    temperature: float = 4.0,
) -> jax.Array:
  r"""Knowledge-distillation loss of Hinton, Vinyals & Dean (2015).

  .. math::
    (1 - \alpha)\, \mathrm{CE}\big(y, \sigma(s)\big)
    + \alpha\, T^2\, \frac{1}{N} \sum_n
      \mathrm{KL}\big(\sigma(t_n / T) \,\|\, \sigma(s_n / T)\big),

  the batch mean of :func:`kd_loss_per_example`.

  The paper writes the soft term as a cross-entropy against the teacher's
  softened distribution; the KL used here differs from it by the teacher's
  entropy, a constant, so the gradient is the same and the soft term is zero
  when the student matches the teacher. :math:`T^2` keeps the soft term's
  gradient scale independent of :math:`T`. This is also the form of the
  attention-transfer release, https://github.com/szagoruyko/attention-transfer
  (KL summed over classes, divided by the batch size; :math:`T = 4`,
  :math:`\alpha = 0.9`). The teacher gets no gradient.

  Args:
    student_logits: shape ``(N, K)`` (or ``(..., K)``).
    teacher_logits: same shape as ``student_logits``.
    labels: integer labels, shape ``(N,)``.
    alpha: weight of the soft term, in ``[0, 1]``.
    temperature: softmax temperature :math:`T > 0`.

  Returns:
    A scalar, float32 for inputs of at most 32 bits.
  """
  return jnp.mean(
      kd_loss_per_example(student_logits, teacher_logits, labels, alpha=alpha,
                          temperature=temperature))
