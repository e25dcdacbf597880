r"""Relational losses on embeddings: RKD, PKT and correlation congruence.

Embeddings are ``(N, D)`` arrays, one row per example (RKD also takes
``(N, ...)`` maps, flattened per example as its release does). They compare
the relations between the examples of a batch, so they are batch-level losses
returning a scalar and need the whole batch.

* :func:`rkd_loss`: relational KD, distance and angle terms (Park et al.,
  2019).
* :func:`pkt_loss`: probabilistic knowledge transfer (Passalis & Tefas, 2018).
* :func:`cc_loss`: correlation congruence as RepDistiller computes it (Peng et
  al., 2019).

Each reproduces its release in RepDistiller
(https://github.com/HobbitLong/RepDistiller, ``distiller_zoo/``); where the
release departs from the paper the docstring says how. Matrix products run at
``jax.lax.Precision.HIGHEST``.
"""

import jax
import jax.numpy as jnp

from distill_jax.losses._checks import _as_float
from distill_jax.losses.features import _HIGHEST
from distill_jax.losses.features import _NORMALIZE_EPS
from distill_jax.losses.features import _normalize

# ``RKDLoss.pdist``'s clamp of squared distances.
_PDIST_EPS = 1e-12


def _embedding_pair(student, teacher, loss: str, *, flatten: bool,
                    same_shape: bool):
  s = _as_float(student)
  t = jax.lax.stop_gradient(_as_float(teacher))
  if flatten:
    if s.ndim < 2 or t.ndim < 2:
      raise ValueError(
          f'{loss}: embeddings need a batch axis and features, got '
          f'student_emb {s.shape} and teacher_emb {t.shape}.')
    s = s.reshape(s.shape[0], -1)
    t = t.reshape(t.shape[0], -1)
  elif s.ndim != 2 or t.ndim != 2:
    raise ValueError(
        f'{loss}: embeddings must be 2-D (N, D), got student_emb {s.shape} and '
        f'teacher_emb {t.shape}.')
  if same_shape and s.shape != t.shape:
    raise ValueError(
        f'{loss}: student_emb shape {s.shape} does not match teacher_emb shape '
        f'{t.shape}.')
  if s.shape[0] != t.shape[0]:
    raise ValueError(
        f'{loss}: student_emb batch size {s.shape[0]} does not match '
        f'teacher_emb batch size {t.shape[0]} (shapes {s.shape} and '
        f'{t.shape}).')
  return s, t


# ----------------------------------------------------------------------------
# Relational KD.
# ----------------------------------------------------------------------------


def _smooth_l1(x: jax.Array) -> jax.Array:
  """Elementwise Huber loss with threshold 1 (``F.smooth_l1_loss``, beta=1)."""
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * jnp.square(x), ax - 0.5)


def _pdist(e: jax.Array) -> jax.Array:
  """Euclidean distance matrix as ``RKDLoss.pdist``: clamped, zero diagonal.

  The squared distances are summed from the differences; the release's
  ``|a|² + |b|² - 2 a·b`` is the same in exact arithmetic but cancels in float32 for
  near or coinciding examples (errors of ~1e-4 relative in the loss, varying with the
  CPU's code generation)."""
  sq = jnp.sum(jnp.square(e[:, None, :] - e[None, :, :]), axis=2)
  dist = jnp.sqrt(jnp.maximum(sq, _PDIST_EPS))
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, dist)


def _mean_normalised_pdist(e: jax.Array) -> jax.Array:
  dist = _pdist(e)
  positive = dist > 0
  mean = jnp.sum(jnp.where(positive, dist, 0.0)) / jnp.sum(positive)
  return dist / mean


def _angles(e: jax.Array) -> jax.Array:
  """``a[i, j, k]``: cosine at vertex ``i`` between ``e_j - e_i``, ``e_k - e_i``."""
  diff = _normalize(e[None, :, :] - e[:, None, :], axis=2, eps=_NORMALIZE_EPS)
  return jnp.einsum('ijd,ikd->ijk', diff, diff, precision=_HIGHEST)


def rkd_loss(
    student_emb: jax.typing.ArrayLike,
    teacher_emb: jax.typing.ArrayLike,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> jax.Array:
  r"""Relational knowledge distillation loss of Park et al. (2019).

  With :math:`d_{ij} = \lVert e_i - e_j \rVert_2` for ``i != j`` and
  :math:`d_{ii} = 0`, normalised by the mean :math:`\mu` of its off-diagonal
  entries, and the cosines at vertex ``i``
  :math:`a_{ijk} = \langle \hat e_{ij}, \hat e_{ik} \rangle`,
  :math:`\hat e_{ij} = (e_j - e_i) / \max(\lVert e_j - e_i \rVert, 10^{-12})`:

  .. math::
    L_{RKD} = w_D \frac{1}{N^2} \sum_{i,j}
        \ell_1^{\mathrm{smooth}}\Big(\frac{d^s_{ij}}{\mu^s}
          - \frac{d^t_{ij}}{\mu^t}\Big)
      + w_A \frac{1}{N^3} \sum_{i,j,k}
        \ell_1^{\mathrm{smooth}}\big(a^s_{ijk} - a^t_{ijk}\big),

  :math:`\ell_1^{\mathrm{smooth}}(x) = x^2 / 2` for :math:`|x| < 1`, else
  :math:`|x| - 1/2` (the paper's Huber loss).

  As in the release, and where it is more specific than the paper:

  * squared distances are clamped at :math:`10^{-12}` before the square root
    (so coinciding examples are :math:`10^{-6}` apart), then the diagonal is
    set to 0;
  * :math:`\mu` is the mean of the positive entries of the distance matrix,
    which after the clamp are exactly the ``N (N - 1)`` off-diagonal ones;
    the student's :math:`\mu^s` is differentiated through, not detached
    (only the teacher side is computed without gradient);
  * both terms are means over all ``N^2`` pairs and ``N^3`` triplets,
    degenerate ones (repeated indices, whose terms are 0) included, where the
    paper sums over pairs and triplets of distinct examples;
  * the default weights are the release's ``w_d=25``, ``w_a=50``.

  One deviation, in rounding only: the squared distances are summed from the
  differences, where the release expands them as :math:`|a|^2 + |b|^2 - 2 a \cdot b`;
  equal in exact arithmetic, the expansion cancels in float32 for near or coinciding
  examples (about 1e-4 relative in the loss, varying with the CPU's code generation).

  Distances and angles do not depend on the order in which features are
  flattened, so NHWC maps give the release's NCHW value. The teacher gets no
  gradient.

  References: Park, Kim, Lu & Cho, `Relational knowledge distillation
  <https://arxiv.org/abs/1904.05068>`_, CVPR 2019; release: RepDistiller
  ``distiller_zoo/RKD.py`` (``RKDLoss``).

  Args:
    student_emb: student embeddings ``(N, D)`` (or ``(N, ...)``, flattened
      per example).
    teacher_emb: teacher embeddings ``(N, D')`` (or ``(N, ...)``).
    distance_weight: :math:`w_D` (may be traced).
    angle_weight: :math:`w_A` (may be traced).

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: on inputs without a feature axis, differing batch sizes, or
      fewer than 2 examples (the mean distance is then undefined; the release
      returns NaN).
  """
  s, t = _embedding_pair(student_emb, teacher_emb, 'rkd_loss', flatten=True,
                         same_shape=False)
  if s.shape[0] < 2:
    raise ValueError(
        f'rkd_loss needs at least 2 examples, got student_emb {s.shape} and '
        f'teacher_emb {t.shape}.')
  loss_d = jnp.mean(_smooth_l1(_mean_normalised_pdist(s)
                               - _mean_normalised_pdist(t)))
  loss_a = jnp.mean(_smooth_l1(_angles(s) - _angles(t)))
  return distance_weight * loss_d + angle_weight * loss_a


# ----------------------------------------------------------------------------
# Probabilistic knowledge transfer.
# ----------------------------------------------------------------------------


def _pkt_conditional(x: jax.Array, eps) -> jax.Array:
  """Row-stochastic matrix of shifted cosine similarities (PKT's kernel)."""
  sq = jnp.sum(jnp.square(x), axis=1, keepdims=True)
  positive = sq > 0
  # sqrt with a zero (not NaN) gradient at an all-zero row.
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  x = x / (norm + eps)
  x = jnp.where(jnp.isnan(x), 0.0, x)
  sim = (jnp.matmul(x, x.T, precision=_HIGHEST) + 1.0) / 2.0
  return sim / jnp.sum(sim, axis=1, keepdims=True)


def pkt_loss(
    student_emb: jax.typing.ArrayLike,
    teacher_emb: jax.typing.ArrayLike,
    *,
    eps: float = 1e-7,
) -> jax.Array:
  r"""Probabilistic knowledge transfer loss of Passalis & Tefas (2018).

  Each embedding is scaled to (about) unit norm, :math:`\hat x_i = x_i /
  (\lVert x_i \rVert_2 + \epsilon)`; the cosine similarities are shifted to
  ``[0, 1]`` and normalised per row into conditional densities, and the loss
  is the mean of the KL terms between the teacher's and the student's:

  .. math::
    K_{ij} = \frac{\hat x_i^\top \hat x_j + 1}{2}, \quad
    p_{j|i} = \frac{K_{ij}}{\sum_{k} K_{ik}}, \qquad
    L_{PKT} = \frac{1}{N^2} \sum_{i,j} p^t_{j|i}
      \log \frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}.

  As in the release (the authors' code, through RepDistiller): each row keeps
  the example's similarity to itself (:math:`j = i`), the KL terms are averaged
  over all ``N^2`` entries rather than summed per row, :math:`\epsilon =
  10^{-7}` is added to the norms and inside the logarithm, and NaNs after the
  scaling (from non-finite inputs) are set to 0. An all-zero embedding gets
  similarity 1/2 to every example; its gradient is finite here (the release's
  is NaN, from the square root at 0). The teacher gets no gradient.

  References: Passalis & Tefas, `Learning deep representations with
  probabilistic knowledge transfer <https://arxiv.org/abs/1803.10837>`_, ECCV
  2018; release: RepDistiller ``distiller_zoo/PKT.py`` (``PKT``, from
  https://github.com/passalis/probabilistic_kt).

  Args:
    student_emb: student embeddings, ``(N, D)``.
    teacher_emb: teacher embeddings, ``(N, D')``.
    eps: the release's :math:`\epsilon` (may be traced).

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: on inputs that are not 2-D or differing batch sizes.
  """
  s, t = _embedding_pair(student_emb, teacher_emb, 'pkt_loss', flatten=False,
                         same_shape=False)
  p_s = _pkt_conditional(s, eps)
  p_t = _pkt_conditional(t, eps)
  return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


# ----------------------------------------------------------------------------
# Correlation congruence.
# ----------------------------------------------------------------------------


def cc_loss(
    student_emb: jax.typing.ArrayLike,
    teacher_emb: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Correlation-congruence loss as RepDistiller's ``Correlation`` computes it.

  With :math:`\delta_n = \lvert s_n - t_n \rvert` (elementwise) for the ``N``
  examples in batch order:

  .. math::
    L_{CC} = \frac{1}{N - 1} \sum_{n=1}^{N-1} \sum_{d=1}^{D}
      \delta_{n,d}\, \delta_{n+1,d}.

  This is the release (code the paper's authors shared with RepDistiller's
  author), followed here rather than the paper: Peng et al. (2019) match
  the batch's correlation matrices, built with a Taylor-expanded Gaussian
  kernel, whereas the release multiplies the absolute student-teacher
  differences of neighbouring examples. The value depends on the order of
  the batch. The absolute value has a zero gradient where the student equals
  the teacher, as ``torch.abs`` does.

  In RepDistiller both embeddings come from trainable linear layers of the
  same width (``LinearEmbed``, 128 by default), and the teacher-side layer
  is trained through this loss. Here, as for every loss of this package,
  the teacher input gets no gradient; a trainable teacher-side projection
  has to be trained some other way.

  References: Peng et al., `Correlation congruence for knowledge
  distillation <https://arxiv.org/abs/1904.01802>`_, ICCV 2019; release:
  RepDistiller ``distiller_zoo/CC.py`` (``Correlation``).

  Args:
    student_emb: student embeddings, ``(N, D)``.
    teacher_emb: teacher embeddings of the same shape.

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: on inputs that are not 2-D, differing shapes, or fewer than 2
      examples (the release returns NaN).
  """
  s, t = _embedding_pair(student_emb, teacher_emb, 'cc_loss', flatten=False,
                         same_shape=True)
  if s.shape[0] < 2:
    raise ValueError(
        f'cc_loss needs at least 2 examples, got student_emb {s.shape} and '
        f'teacher_emb {t.shape}.')
  diff = s - t
  # |diff| with torch.abs's zero subgradient at 0 (jnp.abs has 1 there).
  delta = diff * jnp.sign(diff)
  return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))
