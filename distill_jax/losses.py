"""Knowledge-distillation and attention-transfer losses.

Pure functions on arrays; they import only JAX, NumPy and optax (no Flax, no
configuration, no TensorFlow), so other JAX projects can use them directly. All
of them work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. Inputs of any
floating dtype are accepted; anything narrower than float32 (bfloat16, float16)
is cast to float32 before softmaxes and reductions, so losses come back as
float32 (float64 inputs, with x64 enabled, stay float64).

Every loss has a per-example core, returning one value per example (shape
``(N,)``), and a batch-mean wrapper with the historical name, which is exactly
the mean of its core over the batch:

* :func:`cross_entropy_per_example` -> :func:`cross_entropy`
* :func:`soft_kl_per_example` -> :func:`soft_kl`
* :func:`kd_loss_per_example` -> :func:`kd_loss`
* :func:`at_layer_losses_per_example` -> :func:`at_layer_losses`
* :func:`at_distance_per_example` -> ``sum(at_layer_losses(...))``
* :func:`at_loss_per_example` -> :func:`at_loss`
* :func:`distillation_loss_per_example` -> :func:`distillation_loss`

Classification losses (logits ``(N, K)``, integer labels ``(N,)``; any leading
batch shape ``(..., K)`` works: the cores return that shape, the wrappers
average over all of it):

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
``jax.lax.stop_gradient``. Only shapes (and static string choices) are checked
here; ranges of hyper-parameters (``temperature > 0``, ``alpha`` in
``[0, 1]``, ``beta >= 0``, ``p > 0``) are the caller's responsibility (the
configuration validation checks them), so they may be traced values.

References:
  Hinton, Vinyals & Dean, `Distilling the knowledge in a neural network
  <https://arxiv.org/abs/1503.02531>`_, NIPS Deep Learning Workshop, 2015.

  Zagoruyko & Komodakis, `Paying more attention to attention: improving the
  performance of convolutional neural networks via attention transfer
  <https://arxiv.org/abs/1612.03928>`_, ICLR 2017; released code:
  https://github.com/szagoruyko/attention-transfer.
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
    'at_distance_per_example',
    'at_layer_losses',
    'at_layer_losses_per_example',
    'at_loss',
    'at_loss_per_example',
    'attention_map',
    'cross_entropy',
    'cross_entropy_per_example',
    'distillation_loss',
    'distillation_loss_per_example',
    'kd_loss',
    'kd_loss_per_example',
    'soft_kl',
    'soft_kl_per_example',
)

#: Allowed values of ``form`` in :func:`at_loss` / :func:`at_layer_losses`.
AT_FORMS = ('released', 'l2')
#: Allowed values of ``method`` in :func:`distillation_loss`.
METHODS = ('none', 'kd', 'at', 'kd_at', 'hard')

_NORM_EPS = 1e-12


# ----------------------------------------------------------------------------
# Helpers (shape and static-choice checks only; no value checks, so every
# numeric argument may be a tracer).
# ----------------------------------------------------------------------------


def _as_float(x: jax.typing.ArrayLike) -> jax.Array:
  """Casts to a floating dtype of at least float32 (bf16/f16/ints -> f32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_form(form: str, name: str = 'form') -> None:
  # ``form`` is a static Python string, never traced.
  if form not in AT_FORMS:
    raise ValueError(f'{name} must be one of {AT_FORMS}, got {form!r}.')


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


# ----------------------------------------------------------------------------
# Attention transfer.
# ----------------------------------------------------------------------------


def attention_map(
    activation: jax.typing.ArrayLike, *, p: float = 2
) -> jax.Array:
  r"""Activation-based spatial attention map of Zagoruyko & Komodakis (2017).

  .. math::
    Q_n = \frac{v_n}{\max(\lVert v_n \rVert_2, \epsilon)}, \qquad
    v_{n,(h,w)} = \frac{1}{C} \sum_{c=1}^{C} \lvert a_{nhwc} \rvert^{p},

  with :math:`\epsilon = 10^{-12}` (as ``torch.nn.functional.normalize`` in
  the released code, https://github.com/szagoruyko/attention-transfer), so an
  all-zero activation maps to zeros. Positions are flattened row-major
  (``h * W + w``). Use ``p >= 1`` if you need gradients at zero activations.
  Each row depends on its own example only.

  Args:
    activation: shape ``(N, H, W, C)`` (channels last).
    p: exponent, ``> 0`` (not checked); the papers use 2.

  Returns:
    Shape ``(N, H * W)``; each row has unit L2 norm (or is all zeros).

  Raises:
    ValueError: if ``activation`` is not 4-D.
  """
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


def at_layer_losses_per_example(
    student_points: Sequence[jax.typing.ArrayLike],
    teacher_points: Sequence[jax.typing.ArrayLike],
    *,
    p: float = 2,
    form: str = 'released',
) -> tuple[jax.Array, ...]:
  r"""Per-example, per-layer attention-transfer terms, without :math:`\beta`.

  With :math:`Q^s_{j}, Q^t_{j}` the attention maps (:func:`attention_map`) of
  the ``j``-th student and teacher activations (``P = H W`` positions), the
  term of example ``n`` (Zagoruyko & Komodakis, 2017) is:

  * ``form='released'`` (default), as in the authors' released code
    (https://github.com/szagoruyko/attention-transfer) and RepDistiller:

    .. math::
      L_{j,n} = \frac{1}{P} \sum_{i=1}^{P}
        \big(Q^s_{j,ni} - Q^t_{j,ni}\big)^2 ,

    so that :math:`\frac{1}{N} \sum_n L_{j,n}` is the released batch term, a
    mean over batch and positions. Since the maps are non-negative with unit
    norm, :math:`L_{j,n} \le 2 / P`.
  * ``form='l2'``, the non-squared L2 distance (the paper's Eq. 2):

    .. math::
      L_{j,n} = \big\lVert Q^s_{j,n} - Q^t_{j,n} \big\rVert_2 ,

    with a norm whose gradient is zero (not NaN) where the maps coincide.

  Spatial sizes may differ within a pair: each activation is shrunk to the
  smaller height and width of the pair before its map is taken, by average
  pooling when the size divides evenly and otherwise by
  ``jax.image.resize(..., method='bilinear')`` (antialiased). Both act on each
  example separately, so ``L_{j,n}`` depends on example ``n`` only. Channel
  counts may differ (the maps average over channels). The teacher gets no
  gradient.

  Args:
    student_points: sequence of student activations, each ``(N, H, W, C)``.
    teacher_points: sequence of teacher activations of the same length, each
      ``(N, H', W', C')``.
    p: attention-map exponent (2 in the papers).
    form: ``'released'`` or ``'l2'``.

  Returns:
    A tuple with one array of shape ``(N,)`` per pair of points.

  Raises:
    ValueError: on an unknown ``form``, differing numbers of points, no
      points, activations that are not 4-D, or differing batch sizes.
    TypeError: if the points are not a sequence of arrays.
  """
  _check_form(form)
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
      terms.append(jnp.mean(jnp.square(diff), axis=-1))
    else:
      terms.append(_safe_l2_norm(diff, axis=-1))
  return tuple(terms)


def at_layer_losses(
    student_points: Sequence[jax.typing.ArrayLike],
    teacher_points: Sequence[jax.typing.ArrayLike],
    *,
    p: float = 2,
    form: str = 'released',
) -> tuple[jax.Array, ...]:
  r"""Per-layer attention-transfer terms, without :math:`\beta`.

  The batch means of :func:`at_layer_losses_per_example` (Zagoruyko &
  Komodakis, 2017). With :math:`Q^s_{j}, Q^t_{j}` the attention maps
  (:func:`attention_map`) of the ``j``-th student and teacher activations
  (``N`` examples, ``P = H W`` positions):

  * ``form='released'`` (default), the authors' released code
    (https://github.com/szagoruyko/attention-transfer) and RepDistiller:

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
  return tuple(
      jnp.mean(term) for term in at_layer_losses_per_example(
          student_points, teacher_points, p=p, form=form))


def at_distance_per_example(
    student_points: Sequence[jax.typing.ArrayLike],
    teacher_points: Sequence[jax.typing.ArrayLike],
    *,
    p: float = 2,
    form: str = 'released',
) -> jax.Array:
  r"""Per-example attention distance: the layer terms summed, without beta.

  .. math::
    D_n = \sum_j L_{j,n},

  with :math:`L_{j,n}` from :func:`at_layer_losses_per_example`. Equal to
  ``sum(at_layer_losses([x[None] for x in s], [x[None] for x in t]))`` for
  each example's activations ``s``, ``t``, but computed in one batched pass;
  its batch mean is ``sum(at_layer_losses(...))``.

  Args:
    student_points: sequence of student activations, each ``(N, H, W, C)``.
    teacher_points: sequence of teacher activations of the same length.
    p: attention-map exponent (2 in the papers).
    form: ``'released'`` or ``'l2'``.

  Returns:
    Shape ``(N,)``.

  Raises:
    ValueError: as :func:`at_layer_losses_per_example`, and if the pairs of
      points do not all have the same batch size.
  """
  terms = at_layer_losses_per_example(student_points, teacher_points, p=p,
                                      form=form)
  for j, term in enumerate(terms):
    if term.shape != terms[0].shape:
      raise ValueError(
          f'attention point {j}: batch size {term.shape[0]} differs from the '
          f'batch size {terms[0].shape[0]} of attention point 0.')
  return sum(terms[1:], terms[0])


def at_loss_per_example(
    student_points: Sequence[jax.typing.ArrayLike],
    teacher_points: Sequence[jax.typing.ArrayLike],
    *,
    beta: float = 1e3,
    p: float = 2,
    form: str = 'released',
) -> jax.Array:
  r"""Per-example attention-transfer loss, :math:`\beta D_n`.

  .. math::
    L_{AT,n} = \beta \sum_j L_{j,n},

  :math:`\beta` times :func:`at_distance_per_example`; see :func:`at_loss`
  for the choice of :math:`\beta`.

  Args:
    student_points: sequence of student activations, each ``(N, H, W, C)``.
    teacher_points: sequence of teacher activations of the same length.
    beta: weight, ``>= 0`` (not checked; may be traced).
    p: attention-map exponent.
    form: ``'released'`` or ``'l2'``.

  Returns:
    Shape ``(N,)``. The teacher gets no gradient.
  """
  return beta * at_distance_per_example(student_points, teacher_points, p=p,
                                        form=form)


def at_loss(
    student_points: Sequence[jax.typing.ArrayLike],
    teacher_points: Sequence[jax.typing.ArrayLike],
    *,
    beta: float = 1e3,
    p: float = 2,
    form: str = 'released',
) -> jax.Array:
  r"""Attention-transfer loss of Zagoruyko & Komodakis (2017).

  .. math::
    L_{AT} = \beta \sum_{j} L_j ,

  with :math:`L_j` from :func:`at_layer_losses` (see there for the two forms
  and for mismatched spatial sizes); the batch mean of
  :func:`at_loss_per_example` (pairs of points may differ in batch size here,
  not there). The AT paper writes :math:`\beta / 2` in front
  of the sum; the authors' released code
  (https://github.com/szagoruyko/attention-transfer, and RepDistiller) and the
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
  # beta times the sum of the batch means of the per-example layer terms (the
  # mean of at_loss_per_example when all points share one batch size; pairs
  # with different batch sizes stay allowed here).
  terms = at_layer_losses(student_points, teacher_points, p=p, form=form)
  return beta * sum(terms[1:], terms[0])


# ----------------------------------------------------------------------------
# The combined objective.
# ----------------------------------------------------------------------------


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
