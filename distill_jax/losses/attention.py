"""Attention transfer: attention maps and the AT losses of Zagoruyko & Komodakis.

Activations are ``(N, H, W, C)``, channels last.

* :func:`attention_map`: L2-normalised channel mean of ``|a|**p``, ``(N, H*W)``.
* :func:`at_layer_losses_per_example` -> :func:`at_layer_losses`: the
  per-layer terms, without beta.
* :func:`at_distance_per_example`: the layer terms summed, per example.
* :func:`at_loss_per_example` -> :func:`at_loss`: ``beta`` times the sum.

Also owns :data:`AT_FORMS` and its check, and the spatial resize that lets
student and teacher activations of different sizes be compared.
"""

from collections.abc import Sequence
import numbers

import jax
import jax.numpy as jnp

from distill_jax.losses._checks import _as_float
from distill_jax.losses._checks import _as_points

#: Allowed values of ``form`` in :func:`at_loss` / :func:`at_layer_losses`.
AT_FORMS = ('released', 'l2')

_NORM_EPS = 1e-12


def _check_form(form: str, name: str = 'form') -> None:
  # ``form`` is a static Python string, never traced.
  if form not in AT_FORMS:
    raise ValueError(f'{name} must be one of {AT_FORMS}, got {form!r}.')


def _safe_l2_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """Euclidean norm whose gradient at ``x = 0`` is zero instead of NaN."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  positive = sq > 0
  safe_sq = jnp.where(positive, sq, 1.0)
  return jnp.where(positive, jnp.sqrt(safe_sq), 0.0)


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
