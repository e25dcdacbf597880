r"""Feature-map distillation losses: SP, NST, FSP and FitNet hints.

Feature maps are ``(N, H, W, C)``, channels last; a network's maps go in as a
Python sequence (tuple or list), one entry per distillation point. Each loss
reproduces the authors' public PyTorch release, which works on NCHW maps: fed
the same data transposed to NHWC, the value is the release's (up to rounding).
All are batch-level losses that return a scalar.

* :func:`sp_loss`: similarity-preserving KD (Tung & Mori, 2019).
* :func:`nst_loss`: neuron selectivity transfer (Huang & Wang, 2017).
* :func:`fsp_loss`: flow of solution procedure (Yim et al., 2017).
* :func:`fitnet_loss`: FitNet hint regression (Romero et al., 2015).

The releases are the files of RepDistiller
(https://github.com/HobbitLong/RepDistiller, ``distiller_zoo/``), whose
training script adds up the per-layer terms of a list-valued loss; the losses
here return that sum. Matrix products run at
``jax.lax.Precision.HIGHEST``, so that accelerators do not trade the float32
accuracy of Gram and FSP matrices for speed.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.losses._checks import _as_float
from distill_jax.losses._checks import _as_points

_HIGHEST = jax.lax.Precision.HIGHEST

# The ``eps`` of ``torch.nn.functional.normalize``, used by the SP and NST
# releases (and by RKD's angle term).
_NORMALIZE_EPS = 1e-12


def _normalize(x: jax.Array, axis: int, eps: float = _NORMALIZE_EPS) -> jax.Array:
  """``x / max(|x|_2, eps)`` along ``axis``, as ``F.normalize``.

  Written as ``x / sqrt(max(|x|^2, eps^2))``: the same value, and a finite
  gradient for an all-zero slice (where the plain norm's gradient is NaN).
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Averaging weights of ``adaptive_avg_pool`` along one axis, ``(out, in)``.

  Output cell ``i`` averages the inputs ``floor(i * in / out)`` up to (not
  including) ``ceil((i + 1) * in / out)``: PyTorch's rule, which also covers
  sizes that do not divide evenly (neighbouring cells then overlap).
  """
  weights = np.zeros((size_out, size_in))
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def _adaptive_avg_pool(x: jax.Array, height: int, width: int) -> jax.Array:
  """PyTorch's ``adaptive_avg_pool2d`` on an NHWC array."""
  if x.shape[1:3] == (height, width):
    return x
  rows = jnp.asarray(_adaptive_pool_matrix(x.shape[1], height), x.dtype)
  cols = jnp.asarray(_adaptive_pool_matrix(x.shape[2], width), x.dtype)
  return jnp.einsum('ph,nhwc,qw->npqc', rows, x, cols, precision=_HIGHEST)


def _match_heights(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The NST/FSP releases' spatial matching of two NHWC maps.

  The map with the larger height is adaptively average-pooled to a square
  whose side is the smaller height; equal heights are left alone. (The
  releases look at heights only, since their maps are square.)
  """
  ha, hb = a.shape[1], b.shape[1]
  if ha > hb:
    a = _adaptive_avg_pool(a, hb, hb)
  elif ha < hb:
    b = _adaptive_avg_pool(b, ha, ha)
  return a, b


def _feature_pairs(student_feats, teacher_feats, loss: str, *,
                   min_pairs: int = 1, nhwc: bool = True):
  """Validated float pairs ``(student, stop_gradient(teacher))``."""
  student_feats = _as_points(student_feats, 'student_feats')
  teacher_feats = _as_points(teacher_feats, 'teacher_feats')
  if len(student_feats) != len(teacher_feats):
    raise ValueError(
        f'{loss}: student_feats has {len(student_feats)} feature maps but '
        f'teacher_feats has {len(teacher_feats)}; they must match.')
  if len(student_feats) < min_pairs:
    raise ValueError(
        f'{loss} needs at least {min_pairs} pair(s) of feature maps, got '
        f'{len(student_feats)}.')
  pairs = []
  for j, (s, t) in enumerate(zip(student_feats, teacher_feats)):
    s = _as_float(s)
    t = jax.lax.stop_gradient(_as_float(t))
    if nhwc and (s.ndim != 4 or t.ndim != 4):
      raise ValueError(
          f'{loss} feature map {j}: maps must be NHWC with 4 dimensions, got '
          f'student {s.shape} and teacher {t.shape}.')
    if s.ndim < 2 or t.ndim < 2:
      raise ValueError(
          f'{loss} feature map {j}: maps need a batch axis and features, got '
          f'student {s.shape} and teacher {t.shape}.')
    if s.shape[0] != t.shape[0]:
      raise ValueError(
          f'{loss} feature map {j}: student batch size {s.shape[0]} does not '
          f'match teacher batch size {t.shape[0]} (shapes {s.shape} and '
          f'{t.shape}).')
    pairs.append((s, t))
  return pairs


def _sum(terms: list[jax.Array]) -> jax.Array:
  return sum(terms[1:], terms[0])


# ----------------------------------------------------------------------------
# Similarity-preserving KD.
# ----------------------------------------------------------------------------


def _sp_gram(f: jax.Array) -> jax.Array:
  f = f.reshape(f.shape[0], -1)
  gram = jnp.matmul(f, f.T, precision=_HIGHEST)
  return _normalize(gram, axis=1)


def sp_loss(
    student_feats: Sequence[jax.typing.ArrayLike],
    teacher_feats: Sequence[jax.typing.ArrayLike],
) -> jax.Array:
  r"""Similarity-preserving KD loss of Tung & Mori (2019).

  For each pair of maps, flattened per example to ``F`` of shape
  ``(N, H W C)``, the batch similarity (Gram) matrix is row-normalised:

  .. math::
    \tilde G = \frac{G_{n\cdot}}{\max(\lVert G_{n\cdot} \rVert_2,
      \epsilon)}, \quad G = F F^\top, \qquad
    L_{SP} = \sum_{l} \frac{1}{N^2}
      \big\lVert \tilde G^t_l - \tilde G^s_l \big\rVert_F^2 ,

  with :math:`\epsilon = 10^{-12}` (``torch.nn.functional.normalize``). The
  Gram matrix does not depend on the order in which features are flattened,
  so NHWC maps give the release's NCHW value. Student and teacher maps of a
  pair may differ in every size but the batch. An all-zero example has a zero
  Gram row (finite value); as in the release, its gradient is scaled by
  :math:`1/\epsilon`. The paper's weight :math:`\gamma` is left to the
  caller. The teacher gets no gradient.

  References: Tung & Mori, `Similarity-preserving knowledge distillation
  <https://arxiv.org/abs/1907.09682>`_, ICCV 2019; release:
  RepDistiller ``distiller_zoo/SP.py`` (``Similarity``), summed over layers
  as its training loop does.

  Args:
    student_feats: sequence of student maps, each ``(N, H, W, C)`` (any
      ``(N, ...)`` works).
    teacher_feats: sequence of teacher maps of the same length, each
      ``(N, H', W', C')``.

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: on differing numbers of maps, no maps, maps without a feature
      axis, or differing batch sizes.
    TypeError: if the maps are not given as a sequence.
  """
  pairs = _feature_pairs(student_feats, teacher_feats, 'sp_loss', nhwc=False)
  terms = []
  for s, t in pairs:
    n = s.shape[0]
    diff = _sp_gram(t) - _sp_gram(s)
    terms.append(jnp.sum(jnp.square(diff)) / (n * n))
  return _sum(terms)


# ----------------------------------------------------------------------------
# Neuron selectivity transfer.
# ----------------------------------------------------------------------------


def _poly_kernel_mean(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over ``n, i, j`` of ``(a_{n,:,i} . b_{n,:,j})^2``; ``a, b: (N, P, C)``."""
  dots = jnp.einsum('npi,npj->nij', a, b, precision=_HIGHEST)
  return jnp.mean(jnp.square(dots))


def nst_loss(
    student_feats: Sequence[jax.typing.ArrayLike],
    teacher_feats: Sequence[jax.typing.ArrayLike],
) -> jax.Array:
  r"""Neuron selectivity transfer loss of Huang & Wang (2017).

  Each channel of a map, a vector over the ``P = H W`` positions, is
  L2-normalised (``f_i / max(|f_i|, 1e-12)``); with the squared polynomial
  kernel :math:`k(x, y) = (x^\top y)^2`, the loss is the squared maximum mean
  discrepancy between the student's channels :math:`s_i` (``C_s`` of them)
  and the teacher's :math:`t_j` (``C_t``), averaged over the batch and summed
  over the pairs of maps:

  .. math::
    L_{NST} = \sum_l \frac{1}{N} \sum_n \Big[
      \frac{1}{C_t^2} \sum_{j,j'} k(t_j, t_{j'})
      + \frac{1}{C_s^2} \sum_{i,i'} k(s_i, s_{i'})
      - \frac{2}{C_s C_t} \sum_{i,j} k(s_i, t_j) \Big].

  The teacher-teacher term is included (the release's ``full_loss``) and
  carries no gradient. An all-zero (dead) channel normalises to zeros, with a
  finite value and gradient. Spatial sizes are matched as in the release: the
  map with the larger height is adaptively average-pooled (PyTorch's
  ``adaptive_avg_pool2d``, uneven sizes included) to a square whose side is
  the smaller height. The release assumes square maps; pairs that still differ
  in size after this step are rejected, as the release fails on them. Channel
  counts may differ. The teacher gets no gradient.

  References: Huang & Wang, `Like what you like: knowledge distill via neuron
  selectivity transfer <https://arxiv.org/abs/1707.01219>`_, 2017; release:
  RepDistiller ``distiller_zoo/NST.py`` (``NSTLoss``), summed over layers as
  its training loop does.

  Args:
    student_feats: sequence of student maps, each ``(N, H, W, C)``.
    teacher_feats: sequence of teacher maps of the same length, each
      ``(N, H', W', C')``.

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: on differing numbers of maps, no maps, maps that are not 4-D,
      differing batch sizes, or spatial sizes that the release's pooling
      cannot match.
    TypeError: if the maps are not given as a sequence.
  """
  pairs = _feature_pairs(student_feats, teacher_feats, 'nst_loss')
  terms = []
  for j, (s, t) in enumerate(pairs):
    s_pooled, t_pooled = _match_heights(s, t)
    if s_pooled.shape[1:3] != t_pooled.shape[1:3]:
      raise ValueError(
          f'nst_loss feature map {j}: student {s.shape} and teacher {t.shape} '
          f'are {s_pooled.shape[1:3]} and {t_pooled.shape[1:3]} after pooling '
          'the taller map to a square of the smaller height; they must match.')
    n, h, w = s_pooled.shape[:3]
    fs = _normalize(s_pooled.reshape(n, h * w, -1), axis=1)
    ft = _normalize(t_pooled.reshape(n, h * w, -1), axis=1)
    terms.append(_poly_kernel_mean(ft, ft) + _poly_kernel_mean(fs, fs)
                 - 2.0 * _poly_kernel_mean(fs, ft))
  return _sum(terms)


# ----------------------------------------------------------------------------
# Flow of solution procedure.
# ----------------------------------------------------------------------------


def _fsp_matrices(feats: list[jax.Array], name: str) -> list[jax.Array]:
  """FSP matrices ``(N, C_{l+1}, C_l)`` of consecutive maps of one network."""
  matrices = []
  for l in range(len(feats) - 1):
    bottom, top = _match_heights(feats[l], feats[l + 1])
    if bottom.shape[1:3] != top.shape[1:3]:
      raise ValueError(
          f'fsp_loss: {name} maps {l} {feats[l].shape} and {l + 1} '
          f'{feats[l + 1].shape} are {bottom.shape[1:3]} and '
          f'{top.shape[1:3]} after pooling the taller map to a square of the '
          'smaller height; they must match.')
    n, h, w = bottom.shape[:3]
    bottom = bottom.reshape(n, h * w, -1)
    top = top.reshape(n, h * w, -1)
    gram = jnp.einsum('npi,npj->nji', bottom, top, precision=_HIGHEST)
    matrices.append(gram / (h * w))
  return matrices


def fsp_loss(
    student_feats: Sequence[jax.typing.ArrayLike],
    teacher_feats: Sequence[jax.typing.ArrayLike],
) -> jax.Array:
  r"""Flow-of-solution-procedure loss of Yim et al. (2017).

  The FSP matrix of consecutive maps :math:`F^{l}` (``C_l`` channels) and
  :math:`F^{l+1}` of one network, brought to ``P = H W`` common positions, is

  .. math::
    G^{l}_{n, j i} = \frac{1}{P} \sum_{p=1}^{P} F^{l+1}_{n p j} F^{l}_{n p i},
    \qquad
    L_{FSP} = \sum_{l} \frac{1}{N C_{l+1} C_l} \sum_{n, j, i}
      \big(G^{l,s}_{n j i} - G^{l,t}_{n j i}\big)^2 .

  As in the release, each squared difference is averaged over the batch and
  both channel axes (the paper sums the matrix entries, with per-pair weights
  :math:`\lambda_l`, and averages over the batch); the pairs' terms are
  summed. Within a network, consecutive maps are matched spatially as in the
  release: the one with the larger height is adaptively average-pooled
  (PyTorch's ``adaptive_avg_pool2d``) to a square whose side is the smaller
  height; pairs still differing in size after that are rejected. The
  student's and teacher's maps may differ in spatial size (the FSP matrices
  do not depend on it) but must have the same channel count at each point, as
  the release requires. RepDistiller trains the student on this loss alone in
  an initialisation stage, before its classification training. The teacher
  gets no gradient.

  References: Yim, Joo, Bae & Kim, A gift from knowledge distillation: fast
  optimization, network minimization and transfer learning, CVPR 2017;
  release: RepDistiller ``distiller_zoo/FSP.py`` (``FSP``), its pair terms
  summed as its initialisation stage does.

  Args:
    student_feats: sequence of at least two student maps, each
      ``(N, H_l, W_l, C_l)``.
    teacher_feats: sequence of teacher maps of the same length, each
      ``(N, H'_l, W'_l, C_l)`` (the same channel counts).

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: on differing numbers of maps, fewer than two maps, maps that
      are not 4-D, differing batch sizes, differing channel counts, or
      consecutive spatial sizes that the release's pooling cannot match.
    TypeError: if the maps are not given as a sequence.
  """
  pairs = _feature_pairs(student_feats, teacher_feats, 'fsp_loss', min_pairs=2)
  for j, (s, t) in enumerate(pairs):
    if s.shape[-1] != t.shape[-1]:
      raise ValueError(
          f'fsp_loss feature map {j}: student has {s.shape[-1]} channels but '
          f'teacher has {t.shape[-1]} (shapes {s.shape} and {t.shape}); FSP '
          'needs equal channel counts at every point.')
  g_s = _fsp_matrices([s for s, _ in pairs], 'student')
  g_t = _fsp_matrices([t for _, t in pairs], 'teacher')
  return _sum([jnp.mean(jnp.square(s - t)) for s, t in zip(g_s, g_t)])


# ----------------------------------------------------------------------------
# FitNet hints.
# ----------------------------------------------------------------------------


def fitnet_loss(
    student_regressed: jax.typing.ArrayLike,
    teacher_feat: jax.typing.ArrayLike,
) -> jax.Array:
  r"""FitNet hint loss of Romero et al. (2015), given the regressed student map.

  .. math::
    L_{HT} = \frac{1}{M} \sum_{k=1}^{M} \big(r_k - u_k\big)^2 ,

  the mean squared difference between the student's hint-layer map after the
  regressor :math:`r` (applied by the caller, e.g. a convolution) and the
  teacher's hint map :math:`u`, over all :math:`M` elements. The release's
  ``nn.MSELoss`` takes this mean; the paper writes
  :math:`\frac{1}{2} \lVert u - r \rVert^2`, a sum. The value does not depend
  on the layout, so NHWC maps give the release's NCHW value. The teacher
  gets no gradient.

  References: Romero et al., `FitNets: hints for thin deep nets
  <https://arxiv.org/abs/1412.6550>`_, ICLR 2015; release: RepDistiller
  ``distiller_zoo/FitNet.py`` (``HintLoss``).

  Args:
    student_regressed: the regressed student map, e.g. ``(N, H, W, C)``.
    teacher_feat: the teacher's hint map, of the same shape.

  Returns:
    A scalar, float32 for inputs of at most 32 bits.

  Raises:
    ValueError: if the shapes differ.
  """
  s = _as_float(student_regressed)
  t = jax.lax.stop_gradient(_as_float(teacher_feat))
  if s.shape != t.shape:
    raise ValueError(
        f'fitnet_loss: student_regressed shape {s.shape} does not match '
        f'teacher_feat shape {t.shape}.')
  return jnp.mean(jnp.square(s - t))
