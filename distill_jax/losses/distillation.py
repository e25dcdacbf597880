"""The combined objective: distillation_loss(_per_example) for each method.

Combines the classification terms (:mod:`distill_jax.losses.classification`)
and the attention-transfer term (:mod:`distill_jax.losses.attention`) into the
loss the trainer optimises for each method in :data:`METHODS`, plus its terms
for logging.

* :func:`distillation_loss_per_example` -> :func:`distillation_loss`
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from distill_jax.losses._checks import _check_same_shape
from distill_jax.losses.attention import _check_form
from distill_jax.losses.attention import at_loss_per_example
from distill_jax.losses.classification import cross_entropy_per_example
from distill_jax.losses.classification import soft_kl_per_example

#: Allowed values of ``method`` in :func:`distillation_loss`.
METHODS = ('none', 'kd', 'at', 'kd_at', 'hard')


def _distillation_terms(
    student_logits, labels, student_points, teacher_logits, teacher_points, *,
    method, alpha, temperature, beta, at_form):
  """Validates and returns per-example ``(base_loss, ce, kd, at)``.

  ``base_loss``, ``ce`` and ``kd`` have the logits' batch shape; ``at`` the
  attention points' ``(N,)`` (or ``None`` when the method has no AT term).
  ``base_loss`` excludes the AT term.
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}.')
  _check_form(at_form, 'at_form')
  needs_logits = method in ('kd', 'kd_at', 'hard')
  needs_points = method in ('at', 'kd_at')
  if needs_logits and teacher_logits is None:
    raise ValueError(f'method {method!r} needs teacher_logits, got None.')
  if needs_points:
    missing = [name for name, value in (('student_points', student_points),
                                        ('teacher_points', teacher_points))
               if value is None]
    if missing:
      raise ValueError(
          f'method {method!r} needs {" and ".join(missing)}, got None.')

  ce = cross_entropy_per_example(student_logits, labels)
  kd = jnp.zeros_like(ce)
  if method in ('kd', 'kd_at'):
    kl = soft_kl_per_example(student_logits, teacher_logits,
                             temperature=temperature)
    kd = alpha * temperature**2 * kl
    base = (1.0 - alpha) * ce + kd
  elif method == 'hard':
    teacher_logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits))
    _check_same_shape(jnp.asarray(student_logits), teacher_logits)
    teacher_labels = jnp.argmax(teacher_logits, axis=-1)
    base = cross_entropy_per_example(student_logits, teacher_labels)
  else:
    base = ce
  at = None
  if needs_points:
    at = at_loss_per_example(student_points, teacher_points, beta=beta,
                             form=at_form)
  return base, ce, kd, at


def distillation_loss_per_example(
    student_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    student_points: Sequence[jax.typing.ArrayLike] | None = None,
    teacher_logits: jax.typing.ArrayLike | None = None,
    teacher_points: Sequence[jax.typing.ArrayLike] | None = None,
    *,
    method: str,
    alpha: float = 0.9,
    temperature: float = 4.0,
    beta: float = 1e3,
    at_form: str = 'released',
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""Per-example training objective for one distillation method, and terms.

  ========  ==========================================================
  method    loss of example ``n``
  ========  ==========================================================
  'none'    :math:`\mathrm{CE}_n(y, s)`
  'kd'      :func:`kd_loss_per_example`
  'at'      :math:`\mathrm{CE}_n(y, s) + ` :func:`at_loss_per_example`
  'kd_at'   :func:`kd_loss_per_example` + :func:`at_loss_per_example`
  'hard'    :math:`\mathrm{CE}_n(\arg\max_k t_{nk}, s)`: the teacher's
            predicted classes replace the labels
  ========  ==========================================================

  KD follows Hinton, Vinyals & Dean (2015), AT Zagoruyko & Komodakis (2017).

  Args:
    student_logits: shape ``(N, K)``.
    labels: true integer labels, shape ``(N,)``.
    student_points: student activations for attention transfer (methods
      ``'at'`` and ``'kd_at'``), each ``(N, H, W, C)``.
    teacher_logits: shape ``(N, K)`` (methods ``'kd'``, ``'kd_at'``,
      ``'hard'``).
    teacher_points: teacher activations (methods ``'at'`` and ``'kd_at'``).
    method: one of ``'none'``, ``'kd'``, ``'at'``, ``'kd_at'``, ``'hard'``.
    alpha: KD weight in ``[0, 1]`` (not checked; may be traced).
    temperature: KD temperature, ``> 0`` (not checked; may be traced).
    beta: AT weight, ``>= 0`` (not checked; may be traced).
    at_form: ``'released'`` or ``'l2'``, see :func:`at_layer_losses`.

  Returns:
    ``(loss, terms)``, each of shape ``(N,)``; ``terms`` maps ``'ce'``
    (cross-entropy against the true labels, for every method), ``'kd'``
    (:math:`\alpha T^2` times :func:`soft_kl_per_example`, zeros when unused),
    ``'at'`` (:math:`\beta \sum_j L_{j,n}`, zeros when unused) and ``'loss'``
    (the loss itself). Arguments a method does not use are ignored.

  Raises:
    ValueError: on an unknown ``method`` or ``at_form``, a missing input the
      method needs, or mismatched shapes (including logits whose batch shape
      differs from the attention points' batch size).
  """
  base, ce, kd, at = _distillation_terms(
      student_logits, labels, student_points, teacher_logits, teacher_points,
      method=method, alpha=alpha, temperature=temperature, beta=beta,
      at_form=at_form)
  if at is None:
    at = jnp.zeros_like(ce)
    loss = base
  else:
    if at.shape != ce.shape:
      raise ValueError(
          f'student_logits batch shape {ce.shape} does not match the '
          f'attention points batch shape {at.shape}.')
    loss = base + at
  terms = {'ce': ce, 'kd': kd, 'at': at, 'loss': loss}
  return loss, terms


def distillation_loss(
    student_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    student_points: Sequence[jax.typing.ArrayLike] | None = None,
    teacher_logits: jax.typing.ArrayLike | None = None,
    teacher_points: Sequence[jax.typing.ArrayLike] | None = None,
    *,
    method: str,
    alpha: float = 0.9,
    temperature: float = 4.0,
    beta: float = 1e3,
    at_form: str = 'released',
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""The training objective for one distillation method, and its terms.

  ========  ==========================================================
  method    loss
  ========  ==========================================================
  'none'    :math:`\mathrm{CE}(y, s)`
  'kd'      :func:`kd_loss`
  'at'      :math:`\mathrm{CE}(y, s) + ` :func:`at_loss`
  'kd_at'   :func:`kd_loss` + :func:`at_loss`
  'hard'    :math:`\mathrm{CE}(\arg\max_k t_k, s)`: the teacher's predicted
            classes replace the labels
  ========  ==========================================================

  The batch means of :func:`distillation_loss_per_example` (loss and every
  term). Each term is averaged over its own batch, so (unlike the per-example
  core) the attention points may have a different batch size from the logits.

  Args:
    student_logits: shape ``(N, K)``.
    labels: true integer labels, shape ``(N,)``.
    student_points: student activations for attention transfer (methods
      ``'at'`` and ``'kd_at'``).
    teacher_logits: shape ``(N, K)`` (methods ``'kd'``, ``'kd_at'``,
      ``'hard'``).
    teacher_points: teacher activations (methods ``'at'`` and ``'kd_at'``).
    method: one of ``'none'``, ``'kd'``, ``'at'``, ``'kd_at'``, ``'hard'``.
    alpha: KD weight in ``[0, 1]``.
    temperature: KD temperature, ``> 0``.
    beta: AT weight, ``>= 0``.
    at_form: ``'released'`` or ``'l2'``, see :func:`at_layer_losses`.

  Returns:
    ``(loss, terms)``; ``terms`` maps ``'ce'`` (cross-entropy against the true
    labels, for every method), ``'kd'`` (:math:`\alpha T^2` times
    :func:`soft_kl`, zero when unused), ``'at'`` (:math:`\beta \sum_j L_j`,
    zero when unused) and ``'loss'`` (the loss itself) to scalars. For
    ``'hard'``, ``'loss'`` is the cross-entropy against the teacher's argmax.
    Arguments a method does not use (teacher inputs, ``alpha`` ...) are
    ignored.

  Raises:
    ValueError: on an unknown ``method`` or ``at_form``, a missing input the
      method needs, or mismatched shapes. Ranges of ``alpha``,
      ``temperature`` and ``beta`` are not checked here (the configuration
      validation does), so they may be traced.
  """
  base, ce, kd, at = _distillation_terms(
      student_logits, labels, student_points, teacher_logits, teacher_points,
      method=method, alpha=alpha, temperature=temperature, beta=beta,
      at_form=at_form)
  # Each term is averaged over its own batch, so the logits and the attention
  # points may come from batches of different sizes; when they agree this is
  # the mean of distillation_loss_per_example's loss.
  ce, kd, loss = jnp.mean(ce), jnp.mean(kd), jnp.mean(base)
  at = jnp.zeros((), ce.dtype) if at is None else jnp.mean(at)
  loss = loss + at
  terms = {'ce': ce, 'kd': kd, 'at': at, 'loss': loss}
  return loss, terms
