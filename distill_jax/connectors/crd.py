"""CRD's memory bank as plain arrays: its initialisation, negative sampling, loss and update."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from distill_jax.connectors.heads import FEAT_DIM
from distill_jax.losses._checks import _as_float
from distill_jax.losses.features import _HIGHEST
from distill_jax.losses.features import _normalize

# CRD's defaults in the release's train_student.py.
NCE_K = 16384  # negatives per example
NCE_T = 0.07  # temperature of the scores
NCE_M = 0.5  # momentum of the memory update
# ContrastLoss's eps (crd/criterion.py).
CRD_EPS = 1e-7
# The value of an unset normalisation constant Z (ContrastMemory's params start at -1).
Z_UNSET = -1.0


def init_crd_memory(key: jax.Array, num_examples: int,
                    dim: int = FEAT_DIM, *, rows: int | None = None) -> dict[str, jax.Array]:
  r"""CRD's memory bank of one embedding per training example and network.

  As ``ContrastMemory`` in RepDistiller ``crd/memory.py``: both banks drawn
  independently from :math:`U(-b, b)`, :math:`b = 1 / \sqrt{D / 3}` (so each row
  has squared norm 1 in expectation; rows are not normalised until they are first
  updated), and both normalisation constants unset (:data:`Z_UNSET`, the release's
  -1), to be fixed by the first :func:`crd_loss`.

  Args:
    key: a PRNG key.
    num_examples: ``N``, the size of the training set (indices are ``0 .. N-1``).
    dim: ``D``, the heads' width.
    rows: the banks' rows, at least ``N`` (default ``N``): rows past ``N`` are padding
      (e.g. to a multiple of the devices the banks are sharded over), drawn like the
      others, never sampled or updated; give :func:`crd_loss` ``num_examples=N`` then.
      Row ``i < N`` is the same for any ``rows``.

  Returns:
    ``{'student': (R, D), 'teacher': (R, D), 'z_student': (), 'z_teacher': ()}``,
    float32. ``'student'`` holds student embeddings (the release's ``memory_v1``) and
    ``'teacher'`` teacher ones (``memory_v2``); ``'z_student'`` normalises the scores
    anchored on the student's embedding (``Z_v1``), ``'z_teacher'`` those anchored on
    the teacher's (``Z_v2``).
  """
  bound = 1.0 / math.sqrt(dim / 3.0)
  rows = int(num_examples) if rows is None else int(rows)
  if rows < num_examples:
    raise ValueError(f'init_crd_memory: rows={rows} must be at least num_examples='
                     f'{num_examples}.')
  k_s, k_t = jax.random.split(key)

  def bank(k):  # row i from its own key: padding does not change the first N rows
    keys = jax.random.split(k, rows)
    return jax.vmap(lambda r: jax.random.uniform(r, (int(dim),), jnp.float32, -bound, bound))(keys)

  return {
      'student': bank(k_s),
      'teacher': bank(k_t),
      'z_student': jnp.asarray(Z_UNSET, jnp.float32),
      'z_teacher': jnp.asarray(Z_UNSET, jnp.float32),
  }

def _check_int_vector(x: jax.Array, name: str, where: str) -> None:
  if x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'{where}: {name} must be a 1-D integer array, got shape {x.shape} '
                     f'and dtype {x.dtype}.')

def sample_negatives(
    key: jax.Array,
    labels: jax.typing.ArrayLike,
    indices: jax.typing.ArrayLike,
    class_of_example: jax.typing.ArrayLike,
    nce_k: int = NCE_K,
    *,
    with_replacement: bool = False,
) -> jax.Array:
  r"""CRD's contrast indices in the release's ``'exact'`` mode: positive first.

  Row ``b`` is ``indices[b]`` (the positive: the example itself) followed by ``nce_k``
  indices of training examples whose class differs from ``labels[b]``, drawn
  uniformly, as ``CIFAR100InstanceSample.__getitem__`` (RepDistiller
  ``dataset/cifar100.py``) draws them from ``cls_negative[target]`` with
  ``np.random.choice``. Note that the release draws *without* replacement unless
  ``nce_k`` exceeds the number of examples of other classes (``replace = k >
  len(cls_negative[target])``); the default here does the same, per row. With
  ``with_replacement=True`` every row is drawn with replacement, which is cheaper
  (``O(B nce_k)`` instead of a partial sort of ``B`` rows of ``N``) and, for ``nce_k`` much
  smaller than ``N``, almost the same distribution.

  Fixed shapes, so it can be jitted (``nce_k`` and ``with_replacement`` static):

  * with replacement, the examples are sorted by class; for class ``c`` occupying
    the sorted slots ``[lo, hi)``, an offset ``u`` uniform in ``[0, N - (hi - lo))``
    maps to slot ``u`` below ``lo`` and ``u + hi - lo`` otherwise;
  * without replacement, each row gives every example of another class a uniform
    random key in ``[0, 1)`` (its own class -1) and keeps the ``nce_k`` largest
    (``lax.top_k``, one partial sort per row: on a CPU about 5x faster than a
    permutation and a sort), a uniform random subset in random order; keys that tie
    (float32 has 2^24 levels in ``[0, 1)``: a few dozen ties in a row of 50,000) go to
    the lower index.

  The release's ``'relax'`` mode (a random positive of the same class) and its
  ``percent`` sub-sampling of the negatives are not reproduced. A class with no
  examples of other classes (a one-class dataset) has no negatives; the release fails
  there, and the row here is meaningless. ``labels`` are taken as given (they should
  be ``class_of_example[indices]``).

  Args:
    key: a PRNG key.
    labels: ``(B,)`` classes of the batch's examples.
    indices: ``(B,)`` dataset indices of the batch's examples.
    class_of_example: ``(N,)`` class of every training example.
    nce_k: ``K``, negatives per example (static).
    with_replacement: always draw with replacement (static).

  Returns:
    ``(B, K + 1)`` int32 dataset indices, column 0 the positive.

  Raises:
    ValueError: on arrays that are not 1-D integer ones, differing batch sizes, or
      ``nce_k < 1``.
  """
  labels = jnp.asarray(labels)
  indices = jnp.asarray(indices)
  classes = jnp.asarray(class_of_example)
  for x, name in ((labels, 'labels'), (indices, 'indices'),
                  (classes, 'class_of_example')):
    _check_int_vector(x, name, 'sample_negatives')
  if labels.shape != indices.shape:
    raise ValueError(f'sample_negatives: labels {labels.shape} and indices '
                     f'{indices.shape} must have the same shape.')
  nce_k = int(nce_k)
  if nce_k < 1:
    raise ValueError(f'sample_negatives: nce_k must be at least 1, got {nce_k}.')
  labels = labels.astype(jnp.int32)
  classes = classes.astype(jnp.int32)
  n, b = classes.shape[0], labels.shape[0]
  key_draw, key_perm = jax.random.split(key)

  def with_replacement_draw():
    order = jnp.argsort(classes, stable=True)
    sorted_classes = classes[order]
    lo = jnp.searchsorted(sorted_classes, labels, side='left')
    hi = jnp.searchsorted(sorted_classes, labels, side='right')
    offset = jax.random.randint(key_draw, (b, nce_k), 0,
                                jnp.maximum(n - (hi - lo), 1)[:, None])
    slot = jnp.where(offset < lo[:, None], offset, offset + (hi - lo)[:, None])
    return order[jnp.minimum(slot, n - 1)]

  if with_replacement or nce_k > n:
    negatives = with_replacement_draw()
  else:
    same = classes[None, :] == labels[:, None]
    enough = n - jnp.sum(same, axis=1) >= nce_k
    keys = jax.random.uniform(key_perm, (b, n))
    _, subset = jax.lax.top_k(jnp.where(same, -1.0, keys), nce_k)
    # The sort of the with-replacement fallback runs only when some row needs it.
    negatives = jax.lax.cond(
        jnp.all(enough), lambda: subset,
        lambda: jnp.where(enough[:, None], subset, with_replacement_draw()))
  return jnp.concatenate([indices.astype(jnp.int32)[:, None],
                          negatives.astype(jnp.int32)], axis=1)

def _check_memory(memory, where: str) -> tuple[jax.Array, jax.Array]:
  try:
    bank_s, bank_t = memory['student'], memory['teacher']
  except (KeyError, TypeError) as e:
    raise ValueError(f"{where}: memory must be a dict with 'student' and 'teacher' banks "
                     '(init_crd_memory).') from e
  bank_s, bank_t = _as_float(bank_s), _as_float(bank_t)
  if bank_s.ndim != 2 or bank_s.shape != bank_t.shape:
    raise ValueError(f'{where}: the memory banks must be (N, D) of the same shape, got '
                     f'{bank_s.shape} and {bank_t.shape}.')
  return bank_s, bank_t

def _check_embeddings(s: jax.Array, t: jax.Array, dim: int, where: str) -> None:
  if s.ndim != 2 or s.shape != t.shape or s.shape[1] != dim:
    raise ValueError(f'{where}: student_emb {s.shape} and teacher_emb {t.shape} must '
                     f'both be (B, {dim}), the width of the memory banks.')

def _nce_terms(scores: jax.Array, z: jax.Array, num_examples: int,
               count: int) -> tuple[jax.Array, jax.Array]:
  """``ContrastLoss`` of ``exp(scores) / Z`` and the Z in use, ``scores: (B, K + 1)``.

  An unset Z (negative) becomes ``mean(exp(scores)) * N``. Computed in log space:
  ``log(P / (P + c)) = log P - logaddexp(log P, log c)``.
  """
  b, k1 = scores.shape
  log_mean = jax.nn.logsumexp(scores) - math.log(b * k1)
  z_first = jnp.exp(log_mean) * count
  z = jax.lax.stop_gradient(jnp.where(z < 0, z_first, z))
  log_p = scores - jnp.log(z)
  k = k1 - 1
  kp_n = k / num_examples
  log_c = math.log(kp_n + CRD_EPS)
  log_denominator = jnp.logaddexp(log_p, log_c)
  log_d1 = log_p[:, 0] - log_denominator[:, 0]
  log_d0 = math.log(kp_n) - log_denominator[:, 1:]
  loss = -(jnp.sum(log_d1) + jnp.sum(log_d0)) / b
  return loss, z

def crd_loss(
    student_emb: jax.typing.ArrayLike,
    teacher_emb: jax.typing.ArrayLike,
    memory: dict[str, jax.typing.ArrayLike],
    indices: jax.typing.ArrayLike,
    contrast_indices: jax.typing.ArrayLike,
    *,
    nce_t: float = NCE_T,
    num_examples: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""CRD's loss against the memory bank, and the normalisation constants it used.

  With the heads' embeddings :math:`s_b, t_b` (:class:`NormalizedEmbed`), the banks
  :math:`M^s, M^t` and the contrast indices :math:`j_{b,0..K}` (positive first,
  :func:`sample_negatives`), the scores are, as ``ContrastMemory.forward``:

  .. math::
    P^{s}_{bi} = \frac{\exp(\langle M^t_{j_{bi}}, s_b \rangle / T)}{Z^s}, \qquad
    P^{t}_{bi} = \frac{\exp(\langle M^s_{j_{bi}}, t_b \rangle / T)}{Z^t},

  each embedding scored against the *other* network's bank. With
  :math:`P_n = 1 / N`, :math:`\epsilon = 10^{-7}` and ``ContrastLoss``'s terms

  .. math::
    \ell(P) = -\frac{1}{B} \sum_b \Big[
      \log \frac{P_{b0}}{P_{b0} + K P_n + \epsilon}
      + \sum_{i=1}^{K} \log \frac{K P_n}{P_{bi} + K P_n + \epsilon} \Big],

  the loss is :math:`\ell(P^s) + \ell(P^t)` (``CRDLoss``: student- plus
  teacher-anchored). Note that the negatives' numerator is :math:`K P_n`, as the
  release has it.

  Notes on the release:

  * Z is fixed from the first batch and never updated: an unset Z (negative, the
    sentinel :data:`Z_UNSET`) becomes :math:`Z = N \cdot \operatorname{mean}_{b,i}
    \exp(\text{score}_{bi} / T)` over the batch's ``B (K + 1)`` scores, positives
    included, and is then a constant (the release stores it with ``.item()``; here it
    is under ``stop_gradient``). Each Z is returned; store it in the memory (it is
    only set while negative).
  * The memory rows are constants (``stop_gradient``). ``teacher_emb`` is *not*
    stopped: in the release the teacher-side head is trained through this loss; stop
    the teacher network's features before the head instead.
  * The release updates the memory inside the same forward pass, after scoring;
    here that is :func:`update_crd_memory`, to call with the same embeddings.
  * The scores are computed in log space (the value is the release's; its
    ``exp(<m, v> / T)`` could overflow only for unnormalised inputs).
  * The scores are the batch against every row of each bank (a ``(B, N)`` product)
    with the contrast columns then taken: the release gathers the ``(B, K + 1, D)``
    memory rows instead (with its defaults and ``B = 64``, 0.5 GB of float32 per bank);
    the values are the same dot products. On a 2-core CPU at ``N = 50,000``,
    ``K = 16,384``, ``B = 128`` its forward and backward take 0.2 s instead of 1.1 s.

  References: Tian, Krishnan & Isola, `Contrastive representation distillation
  <https://arxiv.org/abs/1910.10699>`_, ICLR 2020; release: RepDistiller
  ``crd/memory.py`` (``ContrastMemory``) and ``crd/criterion.py`` (``CRDLoss``,
  ``ContrastLoss``).

  Args:
    student_emb: ``(B, D)`` student head outputs.
    teacher_emb: ``(B, D)`` teacher head outputs.
    memory: the bank from :func:`init_crd_memory` (or :func:`update_crd_memory`).
    indices: ``(B,)`` dataset indices of the batch (shape-checked only: the release
      uses them for its memory update, :func:`update_crd_memory` here).
    contrast_indices: ``(B, K + 1)`` indices, positive first, ``K >= 1``.
    nce_t: the temperature :math:`T` (may be traced).
    num_examples: ``N`` of :math:`P_n` and Z; ``None``: the banks' rows, which is what
      the release uses (both are its ``n_data``). Fewer than the banks' rows when they
      carry padding rows (:func:`init_crd_memory` ``rows``); those are never read.

  Returns:
    ``(loss, {'z_student': Z^s, 'z_teacher': Z^t})``: a scalar, float32 for inputs of
    at most 32 bits, and the constants used.

  Raises:
    ValueError: on inconsistent shapes or a ``num_examples`` beyond the banks' rows.
  """
  bank_s, bank_t = _check_memory(memory, 'crd_loss')
  n, d = bank_s.shape
  if num_examples is not None:
    if not 1 <= int(num_examples) <= n:
      raise ValueError(f'crd_loss: num_examples={num_examples} but the memory banks have '
                       f'{n} rows.')
    n = int(num_examples)
  s = _as_float(student_emb)
  t = _as_float(teacher_emb)
  _check_embeddings(s, t, d, 'crd_loss')
  indices = jnp.asarray(indices)
  contrast = jnp.asarray(contrast_indices)
  _check_int_vector(indices, 'indices', 'crd_loss')
  if (contrast.ndim != 2 or contrast.shape[0] != s.shape[0] or contrast.shape[1] < 2
      or not jnp.issubdtype(contrast.dtype, jnp.integer) or indices.shape[0] != s.shape[0]):
    raise ValueError(
        f'crd_loss: contrast_indices must be integer (B, K + 1) with K >= 1 and indices '
        f'(B,), B = {s.shape[0]}; got {contrast.shape} {contrast.dtype} and '
        f'{indices.shape}.')
  bank_s = jax.lax.stop_gradient(bank_s)
  bank_t = jax.lax.stop_gradient(bank_t)
  dtype = jnp.result_type(s, bank_s)
  z_s = jnp.asarray(memory.get('z_student', Z_UNSET), dtype)
  z_t = jnp.asarray(memory.get('z_teacher', Z_UNSET), dtype)
  # The batch against every row of the bank, then the contrast columns: no (B, K + 1, D)
  # gather of memory rows (which is what the release materialises).
  scores_s = jnp.take_along_axis(jnp.matmul(s, bank_t.T, precision=_HIGHEST), contrast,
                                 axis=1) / nce_t
  scores_t = jnp.take_along_axis(jnp.matmul(t, bank_s.T, precision=_HIGHEST), contrast,
                                 axis=1) / nce_t
  loss_s, z_s = _nce_terms(scores_s, z_s, n, n)
  loss_t, z_t = _nce_terms(scores_t, z_t, n, n)
  return loss_s + loss_t, {'z_student': z_s, 'z_teacher': z_t}

def update_crd_memory(
    memory: dict[str, jax.typing.ArrayLike],
    indices: jax.typing.ArrayLike,
    student_emb: jax.typing.ArrayLike,
    teacher_emb: jax.typing.ArrayLike,
    *,
    nce_m: float = NCE_M,
) -> dict[str, jax.Array]:
  r"""CRD's momentum update of the batch's rows of the memory bank.

  As the end of ``ContrastMemory.forward`` (RepDistiller ``crd/memory.py``), for each
  bank and the batch's rows :math:`i_b`:

  .. math::
    M_{i_b} \leftarrow \frac{m M_{i_b} + (1 - m) v_b}
      {\lVert m M_{i_b} + (1 - m) v_b \rVert_2},

  :math:`v` the student's embeddings for the student bank, the teacher's for the
  teacher bank, :math:`m` = ``nce_m``. Other rows and entries (the Z constants) are
  carried over. No gradient flows (the release runs it under ``no_grad``). The
  release divides by the norm itself; here by ``max(norm, 1e-12)``. With repeated
  indices in a batch one of the updates wins, as in the release's ``index_copy_``
  (which one is unspecified in both).

  Args:
    memory: the bank (:func:`init_crd_memory`).
    indices: ``(B,)`` dataset indices of the batch.
    student_emb: ``(B, D)`` student head outputs.
    teacher_emb: ``(B, D)`` teacher head outputs.
    nce_m: the momentum :math:`m` (may be traced).

  Returns:
    A new memory dict.

  Raises:
    ValueError: on inconsistent shapes.
  """
  bank_s, bank_t = _check_memory(memory, 'update_crd_memory')
  s = jax.lax.stop_gradient(_as_float(student_emb))
  t = jax.lax.stop_gradient(_as_float(teacher_emb))
  _check_embeddings(s, t, bank_s.shape[1], 'update_crd_memory')
  indices = jnp.asarray(indices)
  _check_int_vector(indices, 'indices', 'update_crd_memory')
  if indices.shape[0] != s.shape[0]:
    raise ValueError(f'update_crd_memory: indices {indices.shape} and embeddings '
                     f'{s.shape} differ in batch size.')

  def update(bank, v):
    bank = jax.lax.stop_gradient(bank)
    rows = nce_m * bank[indices] + (1.0 - nce_m) * v.astype(bank.dtype)
    return bank.at[indices].set(_normalize(rows, axis=1).astype(bank.dtype))

  new = dict(memory)
  new['student'] = update(bank_s, s)
  new['teacher'] = update(bank_t, t)
  return new
