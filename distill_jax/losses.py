"""Knowledge-distillation and attention-transfer losses.

Pure functions on arrays; they import only JAX, NumPy and optax (no Flax, no
configuration, no TensorFlow), so other JAX projects can use them directly. All
of them work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. Inputs of any
floating dtype are accepted; anything narrower than float32 (bfloat16, float16)
is cast to float32 before softmaxes and reductions, so losses come back as
float32 scalars (float64 inputs, with x64 enabled, stay float64).

Classification losses (logits ``(N, K)``, integer labels ``(N,)``; any leading
batch shape ``(..., K)`` works, the mean is over all of it):

* :func:`cross_entropy`: mean softmax cross-entropy.
* :func:`soft_kl`: ``KL(softmax(t / T) || softmax(s / T))``, batch mean.
* :func:`kd_loss`: Hinton et al.'s objective,
  ``(1 - alpha) * CE + alpha * T**2 * soft_kl``.

Attention transfer (activations ``(N, H, W, C)``, channels last):

* :func:`attention_map`: L2-normalised channel mean of ``|a|**p``, ``(N, H*W)``.
* :func:`at_layer_losses`: the per-layer attention-transfer terms, without beta.
* :func:`at_loss`: ``beta * sum(at_layer_losses(...))``.

Combined objective:

* :func:`distillation_loss`: the loss the trainer optimises for each method
  (``'none'``, ``'kd'``, ``'at'``, ``'kd_at'``, ``'hard'``) plus its terms for
  logging.

Teachers never receive gradients: every teacher input goes through
``jax.lax.stop_gradient``.

References:
  Hinton, Vinyals & Dean, `Distilling the knowledge in a neural network
  <https://arxiv.org/abs/1503.02531>`_, 2015.

  Zagoruyko & Komodakis, `Paying more attention to attention: improving the
  performance of convolutional neural networks via attention transfer
  <https://arxiv.org/abs/1612.03928>`_, 2016.
"""

from collections.abc import Sequence
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = (
    'AT_FORMS',
    'METHODS',
    'at_layer_losses',
    'at_loss',
    'attention_map',
    'cross_entropy',
    'distillation_loss',
    'kd_loss',
    'soft_kl',
)

#: Allowed values of ``form`` in :func:`at_loss` / :func:`at_layer_losses`.
AT_FORMS = ('released', 'l2')
#: Allowed values of ``method`` in :func:`distillation_loss`.
METHODS = ('none', 'kd', 'at', 'kd_at', 'hard')

_NORM_EPS = 1e-12


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _as_float(x: jax.typing.ArrayLike) -> jax.Array:
  """Casts to a floating dtype of at least float32 (bf16/f16/ints -> f32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _concrete(value):
  """Returns ``value`` as a Python float, or None if it is traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _check_temperature(temperature) -> None:
  v = _concrete(temperature)
  if v is not None and not v > 0:
    raise ValueError(f'temperature must be > 0, got {temperature!r}.')


def _check_alpha(alpha) -> None:
  v = _concrete(alpha)
  if v is not None and not 0.0 <= v <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha!r}.')


def _check_beta(beta) -> None:
  v = _concrete(beta)
  if v is not None and not v >= 0:
    raise ValueError(f'beta must be >= 0, got {beta!r}.')


def _check_p(p) -> None:
  v = _concrete(p)
  if v is not None and not v > 0:
    raise ValueError(f'p must be > 0, got {p!r}.')


def _check_form(form) -> None:
  if form not in AT_FORMS:
    raise ValueError(f'form must be one of {AT_FORMS}, got {form!r}.')


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
  if logits.ndim < 1:
    raise ValueError(
        f'logits must have a class axis, got shape {logits.shape}.')
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f'labels shape {labels.shape} does not match logits shape '
        f'{logits.shape}: expected labels of shape {logits.shape[:-1]}.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
        f'labels must be integer class indices, got dtype {labels.dtype}.')


def _check_same_shape(student_logits, teacher_logits) -> None:
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f'student_logits shape {student_logits.shape} does not match '
        f'teacher_logits shape {teacher_logits.shape}.')


def _safe_l2_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """Euclidean norm whose gradient at ``x = 0`` is zero instead of NaN."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  safe_sq = jnp.where(positive, sq, 1.0)
  return jnp.where(positive, jnp.sqrt(safe_sq), 0.0)


# ----------------------------------------------------------------------------
# Classification losses.
# ----------------------------------------------------------------------------


def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Mean softmax cross-entropy with integer labels.

  .. math::
    \mathrm{CE} = -\frac{1}{N} \sum_{n=1}^{N} \log \sigma(z_n)_{y_n},
    \qquad \sigma(z)_k = \frac{e^{z_k}}{\sum_j e^{z_j}}.

  Args:
    logits: unnormalised scores, shape ``(N, K)`` (any leading batch shape
      ``(..., K)`` is accepted; the mean is over all of it).
    labels: integer class indices in ``[0, K)``, shape ``(N,)`` (``logits``'s
      shape without the class axis).

  Returns:
    A scalar, float32 for inputs of at most 32 bits.
  """
  logits = _as_float(logits)
  labels = jnp.asarray(labels)
  _check_logits_labels(logits, labels)
  return jnp.mean(
      optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels))


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
  averaged over the batch, without the :math:`T^2` factor of :func:`kd_loss`.
  It is zero when the student's logits equal the teacher's. The teacher gets no
  gradient.

  Args:
    student_logits: shape ``(N, K)`` (or ``(..., K)``).
    teacher_logits: same shape as ``student_logits``.
    temperature: softmax temperature :math:`T > 0`.

  Returns:
    A scalar, float32 for inputs of at most 32 bits.
  """
  _check_temperature(temperature)
  student_logits = _as_float(student_logits)
  teacher_logits = jax.lax.stop_gradient(_as_float(teacher_logits))
  _check_same_shape(student_logits, teacher_logits)
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  return jnp.mean(optax.losses.kl_divergence_with_log_targets(log_q, log_p))


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
      \mathrm{KL}\big(\sigma(t_n / T) \,\|\, \sigma(s_n / T)\big).

  The paper writes the soft term as a cross-entropy against the teacher's
  softened distribution; the KL used here differs from it by the teacher's
  entropy, a constant, so the gradient is the same and the soft term is zero
  when the student matches the teacher. :math:`T^2` keeps the soft term's
  gradient scale independent of :math:`T`. This is also the form of the
  attention-transfer release (KL summed over classes, divided by the batch
  size; :math:`T = 4`, :math:`\alpha = 0.9`). The teacher gets no gradient.

  Args:
    student_logits: shape ``(N, K)`` (or ``(..., K)``).
    teacher_logits: same shape as ``student_logits``.
    labels: integer labels, shape ``(N,)``.
    alpha: weight of the soft term, in ``[0, 1]``.
    temperature: softmax temperature :math:`T > 0`.

  Returns:
    A scalar, float32 for inputs of at most 32 bits.
  """
  _check_alpha(alpha)
  _check_temperature(temperature)
  ce = cross_entropy(student_logits, labels)
  kl = soft_kl(student_logits, teacher_logits, temperature=temperature)
  return (1.0 - alpha) * ce + alpha * temperature**2 * kl


# ----------------------------------------------------------------------------
# Attention transfer.
# ----------------------------------------------------------------------------


def attention_map(
    activation: jax.typing.ArrayLike, *, p: float = 2
) -> jax.Array:
  r"""Activation-based spatial attention map of Zagoruyko & Komodakis (2016).

  .. math::
    Q_n = \frac{v_n}{\max(\lVert v_n \rVert_2, \epsilon)}, \qquad
    v_{n,(h,w)} = \frac{1}{C} \sum_{c=1}^{C} \lvert a_{nhwc} \rvert^{p},

  with :math:`\epsilon = 10^{-12}` (as ``torch.nn.functional.normalize``), so
  an all-zero activation maps to zeros. Positions are flattened row-major
  (``h * W + w``). Use ``p >= 1`` if you need gradients at zero activations.

  Args:
    activation: shape ``(N, H, W, C)`` (channels last).
    p: exponent, ``> 0``; the papers use 2.

  Returns:
    Shape ``(N, H * W)``; each row has unit L2 norm (or is all zeros).
  """
  _check_p(p)
  a = _as_float(activation)
  if a.ndim != 4:
    raise ValueError(
        f'activation must be NHWC with 4 dimensions, got shape {a.shape}.')
  if isinstance(p, numbers.Number) and p == 2:
    v = jnp.mean(jnp.square(a), axis=-1)
  else:
    v = jnp.mean(jnp.abs(a) ** p, axis=-1)
  v = v.reshape(v.shape[0], -1)
  sq = jnp.sum(jnp.square(v), axis=-1, keepdims=True)
  # sqrt(max(|v|^2, eps^2)) == max(|v|, eps), with a finite gradient at v = 0.
  norm = jnp.sqrt(jnp.maximum(sq, _NORM_EPS**2))
  return v / norm


def _resize_spatial(a: jax.Array, height: int, width: int) -> jax.Array:
  """Shrinks NHWC ``a`` to ``(height, width)``: average pool or bilinear."""
  n, h, w, c = a.shape
  if (h, w) == (height, width):
    return a
  if h % height == 0 and w % width == 0:
    a = a.reshape(n, height, h // height, width, w // width, c)
    return jnp.mean(a, axis=(2, 4))
  return jax.image.resize(a, (n, height, width, c), method='bilinear')


def _as_points(points, name: str) -> tuple:
  if isinstance(points, (jax.Array, np.ndarray)) or not isinstance(
      points, Sequence):
    raise TypeError(
        f'{name} must be a sequence (tuple or list) of NHWC arrays, got '
        f'{type(points).__name__}.')
  return tuple(points)


def at_layer_losses(
    student_points: Sequence[jax.typing.ArrayLike],
    teacher_points: Sequence[jax.typing.ArrayLike],
    *,
    p: float = 2,
    form: str = 'released',
) -> tuple[jax.Array, ...]:
  r"""Per-layer attention-transfer terms, without :math:`\beta`.

  With :math:`Q^s_{j}, Q^t_{j}` the attention maps (:func:`attention_map`) of
  the ``j``-th student and teacher activations (``N`` examples, ``P = H W``
  positions):

  * ``form='released'`` (default), the authors' released code and
    RepDistiller:

    .. math::
      L_j = \frac{1}{N P} \sum_{n=1}^{N} \sum_{i=1}^{P}
        \big(Q^s_{j,ni} - Q^t_{j,ni}\big)^2 .

    Since the maps are non-negative with unit norm, :math:`L_j \le 2 / P`.
  * ``form='l2'``, the non-squared L2 distance (the paper's Eq. 2):

    .. math::
      L_j = \frac{1}{N} \sum_{n=1}^{N} \big\lVert Q^s_{j,n} - Q^t_{j,n}
        \big\rVert_2 ,

    with a norm whose gradient is zero (not NaN) where the maps coincide.

  Spatial sizes may differ within a pair: each activation is shrunk to the
  smaller height and width of the pair before its map is taken, by average
  pooling when the size divides evenly and otherwise by
  ``jax.image.resize(..., method='bilinear')`` (antialiased). Channel counts
  may differ (the maps average over channels). The teacher gets no gradient.

  Args:
    student_points: sequence of student activations, each ``(N, H, W, C)``.
    teacher_points: sequence of teacher activations of the same length, each
      ``(N, H', W', C')``.
    p: attention-map exponent (2 in the papers).
    form: ``'released'`` or ``'l2'``.

  Returns:
    A tuple with one scalar per pair of points.

  Raises:
    ValueError: on an unknown ``form``, differing numbers of points, no
      points, activations that are not 4-D, or differing batch sizes.
  """
  _check_form(form)
  _check_p(p)
  student_points = _as_points(student_points, 'student_points')
  teacher_points = _as_points(teacher_points, 'teacher_points')
  if len(student_points) != len(teacher_points):
    raise ValueError(
        f'student_points has {len(student_points)} attention points but '
        f'teacher_points has {len(teacher_points)}; they must match.')
  if not student_points:
    raise ValueError('at least one pair of attention points is needed, got 0.')
  terms = []
  for j, (s, t) in enumerate(zip(student_points, teacher_points)):
    s = _as_float(s)
    t = jax.lax.stop_gradient(_as_float(t))
    if s.ndim != 4 or t.ndim != 4:
      raise ValueError(
          f'attention point {j}: activations must be NHWC with 4 dimensions, '
          f'got student {s.shape} and teacher {t.shape}.')
    if s.shape[0] != t.shape[0]:
      raise ValueError(
          f'attention point {j}: student batch size {s.shape[0]} does not '
          f'match teacher batch size {t.shape[0]}.')
    height = min(s.shape[1], t.shape[1])
    width = min(s.shape[2], t.shape[2])
    q_s = attention_map(_resize_spatial(s, height, width), p=p)
    q_t = attention_map(_resize_spatial(t, height, width), p=p)
    diff = q_s - q_t
    if form == 'released':
      terms.append(jnp.mean(jnp.square(diff)))
    else:
      terms.append(jnp.mean(_safe_l2_norm(diff, axis=-1)))
  return tuple(terms)


def at_loss(
    student_points: Sequence[jax.typing.ArrayLike],
    teacher_points: Sequence[jax.typing.ArrayLike],
    *,
    beta: float = 1e3,
    p: float = 2,
    form: str = 'released',
) -> jax.Array:
  r"""Attention-transfer loss of Zagoruyko & Komodakis (2016).

  .. math::
    L_{AT} = \beta \sum_{j} L_j ,

  with :math:`L_j` from :func:`at_layer_losses` (see there for the two forms
  and for mismatched spatial sizes). The AT paper writes :math:`\beta / 2`
  in front of the sum; the authors' released code (and RepDistiller) and the
  seed paper's Eq. 2 use :math:`\beta`, as here, with :math:`\beta = 1000`
  for the released form.

  Args:
    student_points: sequence of student activations, each ``(N, H, W, C)``.
    teacher_points: sequence of teacher activations of the same length.
    beta: weight, ``>= 0``.
    p: attention-map exponent.
    form: ``'released'`` (mean squared difference of the maps) or ``'l2'``
      (mean non-squared L2 distance).

  Returns:
    A scalar, float32 for inputs of at most 32 bits. The teacher gets no
    gradient.
  """
  _check_beta(beta)
  terms = at_layer_losses(student_points, teacher_points, p=p, form=form)
  return beta * sum(terms[1:], terms[0])


# ----------------------------------------------------------------------------
# The combined objective.
# ----------------------------------------------------------------------------


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
    Arguments a method does not use (teacher inputs, ``alpha`` ...) are ignored
    apart from validation.

  Raises:
    ValueError: on an unknown ``method`` or ``at_form``, ``temperature <= 0``,
      ``alpha`` outside ``[0, 1]``, ``beta < 0``, or a missing input the
      method needs.
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}.')
  if at_form not in AT_FORMS:
    raise ValueError(f'at_form must be one of {AT_FORMS}, got {at_form!r}.')
  _check_alpha(alpha)
  _check_temperature(temperature)
  _check_beta(beta)
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

  ce = cross_entropy(student_logits, labels)
  zero = jnp.zeros((), ce.dtype)
  kd = zero
  at = zero
  if method in ('kd', 'kd_at'):
    kl = soft_kl(student_logits, teacher_logits, temperature=temperature)
    kd = alpha * temperature**2 * kl
    loss = (1.0 - alpha) * ce + kd
  elif method == 'hard':
    teacher_logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits))
    _check_same_shape(jnp.asarray(student_logits), teacher_logits)
    teacher_labels = jnp.argmax(teacher_logits, axis=-1)
    loss = cross_entropy(student_logits, teacher_labels)
  else:
    loss = ce
  if needs_points:
    at = at_loss(student_points, teacher_points, beta=beta, form=at_form)
    loss = loss + at
  terms = {'ce': ce, 'kd': kd, 'at': at, 'loss': loss}
  return loss, terms
