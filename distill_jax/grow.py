"""Growing a trained student into a teacher about twice its size.

The seed paper ("Finding the right teacher", section "Fisher Distillation") builds a
bespoke teacher for a NAS student by scaling the student up: either every cell
uniformly, or cell by cell where the per-channel Fisher information says the network
is most sensitive. This module implements both for the DARTS evaluation network
(:mod:`distill_jax.models.darts`), plus a deeper-network baseline, the author's released
"denser" operator and a uniform widening of WRN.

Entry points::

  grown_config, grown_variables = grow(model_config, variables, strategy='fisher',
                                       fisher=fisher_fn, rng=key)
  config, variables, history = grow_with_history(...)    # same arguments
  save_history(path, history)                              # JSON

A model config is the plain dict that ``create_model(**model_config)`` takes; variables
are ``{'params', 'batch_stats'}``.

Parameter counts
----------------
For DARTS, ``num_params`` is the number of trainable parameters *without* the auxiliary
head (the figure the DARTS release reports; the paper's setting trains without it). The
target is ``target_param_ratio * num_params(student)``; ``uniform`` and ``fisher`` (with
``operator='widen'``) land within ``±TOLERANCE`` (3%) of it or raise a ``ValueError``.
The stem (``stem_multiplier * init_channels`` channels) is never widened: ``init_channels``
stays, the grown widths live in ``cell_channels``.

Strategies (``operator='widen'``)
---------------------------------
- ``uniform``: ``C_i' = m_i * round(s * C_i / m_i)`` for one scale ``s`` found by bisection
  on the parameter count (monotone in ``s``), where ``m_i = lcm(2, groups_i)`` keeps every
  width even (``FactorizedReduce`` splits it in halves) and divisible by the cell's group
  count (depthwise cells: ``m_i = 2``). Cells of equal width jump together; when such a
  jump straddles the ±3% band, subsets of the jump's cells are tried (the other rounding
  direction for some cells of the same ``s``), and the list closest to the target wins.
- ``fisher``: the paper's rule. With :math:`\\Delta_c` the per-channel Fisher information
  of the cell outputs (Theis et al. 2018),

  .. math::

    \\Delta_c = \\frac{1}{2N}\\sum_{n=1}^{N}\\Big(\\sum_{h,w} a_{nhwc}
                \\frac{\\partial L_n}{\\partial a_{nhwc}}\\Big)^2,

  each step widens the cell :math:`i^* = \\mathrm{cell}(\\arg\\max_c \\Delta_c)` holding the
  single most important channel (cell score = :math:`\\max_c \\Delta_c` over the cell's
  ``len(concat) * C_i`` output channels) by ``WIDEN_STEP`` (25%) of its current width,
  rounded to a multiple of ``m_i`` and at least ``m_i`` (e.g. 16 -> 20 -> 26 -> 32 ...).
  Steps repeat while the count is below the target. The step that would overshoot is
  shortened to the width (in steps of ``m_i``) whose count is closest to the target
  inside the ±3% band (or growth stops, if the current count is already in the band and
  closer); if no such width exists the chosen cell takes the widest partial step that
  stays below the target and growth continues; only when neither exists does the next
  cell in score order step in (``fallback: True`` in the history). ``fisher`` is either
  a callable ``fisher(model_config, variables) -> {'cell{i}/output': Δ}``, re-estimated
  on the grown network before every step (the grown variables are built step by step
  for it; no estimate is requested once no step can bring the count closer to the
  target), or a precomputed dict, used unchanged for every step (no re-estimation: the
  same cell keeps winning; the variables are built once at the end).
- ``depth``: the same genotype, default per-cell widths and more cells: the number of
  layers (above the student's) whose count is closest to the target, or the explicit
  ``layers=`` (the paper's 25-layer teacher of a 10-layer student; for DARTS_V1 with
  C = 16 that is 2.7x the 10-layer count, 19 layers is the closest to 2x). Weights are
  freshly initialised (no copying); the ±3% band is not enforced (layers are discrete).
  See :func:`grown_depth_config`.

Operator ``'denser'`` (the author's released dissertation code)
----------------------------------------------------------------
Instead of widening, a step halves the group count of a cell's separable and dilated
convolutions (depthwise = ``C`` groups -> ``C/2`` -> ``C/4`` ... -> 1; a step needs an even
count). ``uniform`` densifies the cells one at a time in index order, cycling; ``fisher``
densifies the highest-scoring cell where the score is the *sum* of Δ over the cell's
channels, as in the release (the widening rule uses the *max*, as the seed's text
describes). Cells without separable/dilated convolutions (e.g. the DARTS_V1 reduction
cell) are skipped. Growth stops when the count reaches the target (a last step is taken
only if it ends closer to the target than stopping) or when nothing can be densified;
the ±3% band is not guaranteed (a warning is issued). The changed ``k x k`` convolutions
are re-initialised; with ``function_preserving=True`` they instead embed the old kernel
(zero weights between channels that were in different groups), which is exact.

Weight transfer (widening)
--------------------------
Channel ``c`` of a cell's ``C``-channel space (the width of its preprocessing, of every
operation and of every node) is placed at ``pos(c)`` of the ``C'``-channel space. The
space is split into ``B`` equal blocks, ``B = lcm(2 if the cell has a FactorizedReduce,
groups if grouped)`` (``B = 1`` otherwise); block ``b`` of size ``C/B`` goes to the start
of new block ``b`` of size ``C'/B``:
``pos(c) = (c // (C/B)) * (C'/B) + c % (C/B)``. With ``B = 1`` this is the prefix layout;
with ``B = 2`` the two ``FactorizedReduce`` halves (conv1 -> first half, conv2 -> second
half) stay aligned; grouped convolutions keep their groups. A cell's output concatenates
its nodes, so node ``k``'s channel ``c`` moves from ``k*C + c`` to ``k*C' + pos(c)``; the
layers that read it (the next cell's ``preprocess1``, the ``preprocess0`` of the cell after
next, the auxiliary head after the second reduction cell, the classifier after the last
cell) get their input weights at those positions. Every widened tensor keeps the
student's values (kernels, batch-norm scale/bias and running mean/var) at the original
positions; the other entries come from ``init_variables`` of the grown network with
``rng`` (fresh, PyTorch-style init; BN scale 1, bias 0, mean 0, var 1).

Function preserving (Net2WiderNet; Chen, Goodfellow & Shlens 2016)
-------------------------------------------------------------------
With ``function_preserving=True`` every new position ``j`` of a cell copies an old channel
``g(j)`` drawn uniformly (from ``rng``) within its block (so halves and groups stay
consistent); ``g(pos(c)) = c``. Every output-side tensor (kernel columns, BN parameters
and statistics) is gathered with ``g``; every input-side kernel row is gathered with
``g`` and divided by the replication count ``n(g(j)) = |{j' : g(j') = g(j)}|``:

.. math::

  W'_{\\cdot, j} = W_{\\cdot, g(j)}, \\qquad
  U'_{j, \\cdot} = U_{g(j), \\cdot} / n(g(j)).

Depthwise kernels are per-channel (gathered, not divided); grouped kernels are handled
as block-diagonal dense kernels. Because every operation of a cell (and ReLU, pooling,
identity, node sums, drop path) acts on the same ``C_i`` channels with the same ``g``, the
grown network computes the student's logits exactly (up to float rounding) in
inference mode. Caveat (as in Net2Net): replicas have identical incoming and outgoing
weights, so plain SGD keeps them identical; add noise or train with the fresh-init
default (``function_preserving=False``) if the extra capacity should be used.

Other networks
--------------
WRN supports ``strategy='uniform'`` with ``operator='widen'`` only: the integer
``widen_factor`` whose count is closest to the target (no ±3% guarantee), the student's
weights copied into the leading slices of every tensor (prefix layout), new shortcut
convolutions fresh. Everything else (DenseNet-BC, WRN ``fisher``/``depth``/``denser``,
function-preserving WRN) raises a one-line ``ValueError``.

History
-------
:func:`grow_with_history` returns one dict per growth step: ``step`` (1, 2, ...),
``cell`` (the grown cell; None for one-shot strategies), ``score`` (the selection score
of that cell: max Δ for widening, sum Δ for 'denser'; None without Fisher),
``num_params`` (after the step), ``cell_channels`` and ``cell_groups`` (DARTS, after the
step), ``scores`` (every cell's score, Fisher strategies), ``fallback`` (Fisher
widening), ``scale`` (uniform widening), ``layers`` (depth) or ``widen_factor`` (WRN).
:func:`save_history` writes it as JSON.

References:
  L. Theis, I. Korshunova, A. Tejani, F. Huszár. "Faster gaze prediction with dense
  networks and Fisher pruning", 2018 (arXiv:1801.05787).
  T. Chen, I. Goodfellow, J. Shlens. "Net2Net: Accelerating learning via knowledge
  transfer", ICLR 2016 (arXiv:1511.05641).
  The seed paper: "Finding the right teacher" (Fisher Distillation), and FACTS.md
  ("The paper's setting").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from distill_jax.genotypes import Genotype
from distill_jax.models import count_params, create_model, init_variables, param_shapes
from distill_jax.models.darts import count_params_without_aux

STRATEGIES: tuple[str, ...] = ('uniform', 'fisher', 'depth')
OPERATORS: tuple[str, ...] = ('widen', 'denser')
# Allowed relative deviation of the grown parameter count from the target.
TOLERANCE = 0.03
# A Fisher widening step adds this fraction of the chosen cell's current width.
WIDEN_STEP = 0.25
DEFAULT_MAX_STEPS = 200

Variables = dict[str, Any]
FisherFn = Callable[[dict, Variables], Mapping[str, Any]]
History = list[dict[str, Any]]

_SUPPORTED = ('supported: darts (strategies uniform, fisher, depth; operators widen, denser), '
              'wrn (strategy uniform, operator widen)')


# ------------------------------------------------------------------------------- helpers


def _plain_config(model_config: Any) -> dict:
  """A plain dict copy of a model config (dict or ml_collections ConfigDict)."""
  if hasattr(model_config, 'to_dict'):
    cfg = dict(model_config.to_dict())
  elif isinstance(model_config, Mapping):
    cfg = dict(model_config)
  else:
    raise ValueError(
        f'model_config must be a dict or ConfigDict; got {type(model_config).__name__}')
  if 'name' not in cfg:
    raise ValueError('model_config lacks "name"; allowed: a config accepted by create_model')
  for key in ('cell_channels', 'cell_groups'):
    if cfg.get(key) is not None:
      cfg[key] = tuple(cfg[key])
  return cfg


def _as_key(rng: Any) -> jax.Array:
  if rng is None:
    return jax.random.key(0)
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    return jax.random.key(int(rng))
  return rng


def _round_to(x: float, m: int) -> int:
  """The multiple of ``m`` nearest to ``x`` (halves round up), at least ``m``."""
  return m * max(1, int(math.floor(x / m + 0.5)))


def _lcm(a: int, b: int) -> int:
  return a * b // math.gcd(a, b)


def _in_band(n: float, target: float) -> bool:
  return abs(n - target) <= TOLERANCE * target


# -------------------------------------------------------------------------- DARTS layout


@dataclasses.dataclass(frozen=True)
class _Darts:
  """The shape-relevant facts of a DARTS network: widths, groups, cell wiring."""
  genotype: Genotype
  chans: tuple[int, ...]
  groups: tuple[int | None, ...]
  reductions: tuple[int, int]
  stem: int
  num_classes: int
  auxiliary: bool
  in_channels: int

  @classmethod
  def from_config(cls, cfg: dict, in_channels: int) -> '_Darts':
    model = create_model(**cfg)
    return cls(model.resolved_genotype(), tuple(model.resolved_cell_channels()),
               tuple(model.resolved_cell_groups()), tuple(model.reduction_indices()),
               model.stem_multiplier * model.init_channels, model.num_classes,
               bool(model.auxiliary), in_channels)

  @property
  def layers(self) -> int:
    return len(self.chans)

  def replace(self, **kw: Any) -> '_Darts':
    return dataclasses.replace(self, **kw)

  def config(self, base: dict) -> dict:
    cfg = dict(base)
    cfg['cell_channels'] = tuple(int(c) for c in self.chans)
    cfg['cell_groups'] = tuple(None if g is None else int(g) for g in self.groups)
    return cfg

  def reduction(self, i: int) -> bool:
    return i in self.reductions

  def reduction_prev(self, i: int) -> bool:
    return i > 0 and (i - 1) in self.reductions

  def pairs(self, i: int) -> tuple[tuple[str, int], ...]:
    return self.genotype.reduce if self.reduction(i) else self.genotype.normal

  def concat(self, i: int) -> tuple[int, ...]:
    return self.genotype.reduce_concat if self.reduction(i) else self.genotype.normal_concat

  def out_channels(self, j: int) -> int:
    """Channels of cell ``j``'s output (``j = -1``: the stem)."""
    return self.stem if j < 0 else len(self.concat(j)) * self.chans[j]

  def strides(self, i: int) -> list[tuple[str, int]]:
    """``(op, stride)`` of every edge of cell ``i``."""
    red = self.reduction(i)
    return [(op, 2 if red and idx < 2 else 1) for op, idx in self.pairs(i)]

  def has_factorized_reduce(self, i: int) -> bool:
    return self.reduction_prev(i) or any(op == 'skip_connect' and s == 2
                                         for op, s in self.strides(i))

  def has_grouped_ops(self, i: int) -> bool:
    return any(op.startswith(('sep_conv', 'dil_conv')) for op, _ in self.pairs(i))

  def multiple(self, i: int) -> int:
    """Widths of cell ``i`` must be multiples of this: even and divisible by its groups."""
    g = self.groups[i]
    return _lcm(2, 1 if g is None else g)

  def blocks(self, i: int) -> int:
    """Blocks of the channel layout of cell ``i`` (see the module docstring)."""
    g = self.groups[i]
    return _lcm(2 if self.has_factorized_reduce(i) else 1, 1 if g is None else g)

  def count(self, include_aux: bool = False) -> int:
    """Trainable parameters, computed from the shapes (checked against ``param_shapes``)."""
    n = 9 * self.in_channels * self.stem + 2 * self.stem
    for i, c in enumerate(self.chans):
      g = c if self.groups[i] is None else self.groups[i]
      c_in0 = self.out_channels(i - 2) if i >= 2 else self.stem
      c_in1 = self.out_channels(i - 1) if i >= 1 else self.stem
      n += (c_in0 + c_in1) * c + 4 * c  # preprocess0/1 (1x1 or factorized) + BN
      for op, stride in self.strides(i):
        if op.startswith(('sep_conv', 'dil_conv')):
          k = int(op[-1])
          one = k * k * (c // g) * c + c * c + 2 * c
          n += 2 * one if op.startswith('sep_conv') else one
        elif op == 'skip_connect' and stride == 2:
          n += c * c + 2 * c
    n += self.out_channels(self.layers - 1) * self.num_classes + self.num_classes
    if include_aux and self.auxiliary:
      a = self.out_channels(self.reductions[1])
      n += a * 128 + 2 * 128 + 4 * 128 * 768 + 2 * 768 + 768 * self.num_classes + self.num_classes
    return n


# ------------------------------------------------------------------------ weight transfer


@dataclasses.dataclass(frozen=True)
class _AxisMap:
  """New index -> old index along one axis (-1: new, fresh init) and, on input axes of a
  function-preserving transfer, the factor ``1 / n(g(j))`` of each new index."""
  src: np.ndarray
  scale: np.ndarray | None = None


def _cell_mapping(c_old: int, c_new: int, blocks: int, preserving: bool,
                  key: jax.Array) -> np.ndarray:
  """``g``: new channel -> old channel of one cell (-1 = fresh unless preserving).

  Block ``b`` (``c_old / blocks`` channels) moves to the start of new block ``b``; with
  ``preserving`` the rest of new block ``b`` replicates channels of old block ``b`` drawn
  uniformly from ``key``.
  """
  if c_old % blocks or c_new % blocks:
    raise ValueError(f'cannot widen a cell from {c_old} to {c_new} channels in {blocks} '
                     f'aligned blocks; widths must be multiples of {blocks}')
  b_old, b_new = c_old // blocks, c_new // blocks
  src = np.full(c_new, -1, np.int64)
  for b in range(blocks):
    src[b * b_new:b * b_new + b_old] = np.arange(b * b_old, (b + 1) * b_old)
    extra = b_new - b_old
    if preserving and extra > 0:
      draw = jax.random.randint(jax.random.fold_in(key, b), (extra,), 0, b_old)
      src[b * b_new + b_old:(b + 1) * b_new] = b * b_old + np.asarray(draw)
  return src


def _take(old: np.ndarray, fresh_shape: tuple[int, ...], axes: Mapping[int, _AxisMap],
          fresh: np.ndarray | None, preserving: bool) -> np.ndarray:
  """Moves ``old`` into the grown shape along the mapped axes.

  Function preserving: gather every mapped axis with ``src`` and multiply input axes by
  ``scale``. Otherwise: start from ``fresh`` and write ``old`` at the positions whose
  ``src`` is not -1 on every axis (unmapped axes must keep their size).
  """
  old = np.asarray(old)
  if preserving:
    out = old
    for ax, m in axes.items():
      out = np.take(out, m.src, axis=ax)
      if m.scale is not None:
        shape = [1] * out.ndim
        shape[ax] = -1
        out = out * m.scale.reshape(shape)
    out = out.astype(old.dtype)
  else:
    out = np.array(fresh, dtype=old.dtype, copy=True)
    new_idx, old_idx = [], []
    for ax in range(old.ndim):
      if ax in axes:
        keep = np.nonzero(axes[ax].src >= 0)[0]
        new_idx.append(keep)
        old_idx.append(axes[ax].src[keep])
      else:
        new_idx.append(np.arange(old.shape[ax]))
        old_idx.append(np.arange(old.shape[ax]))
    out[np.ix_(*new_idx)] = old[np.ix_(*old_idx)]
  if tuple(out.shape) != tuple(fresh_shape):
    raise AssertionError(f'weight transfer produced {out.shape}, expected {fresh_shape}')
  return out


def _grouped_to_dense(kernel: np.ndarray, groups: int) -> np.ndarray:
  """``(k, k, C/groups, C)`` grouped kernel -> block-diagonal ``(k, k, C, C)``."""
  kh, kw, cpg, c = kernel.shape
  dense = np.zeros((kh, kw, c, c), kernel.dtype)
  for j in range(groups):
    s = slice(j * cpg, (j + 1) * cpg)
    dense[:, :, s, s] = kernel[:, :, :, s]
  return dense


def _dense_to_grouped(dense: np.ndarray, groups: int) -> np.ndarray:
  """Block-diagonal ``(k, k, C, C)`` -> ``(k, k, C/groups, C)`` (off-block entries dropped)."""
  c = dense.shape[-1]
  cpg = c // groups
  return np.concatenate([dense[:, :, j * cpg:(j + 1) * cpg, j * cpg:(j + 1) * cpg]
                         for j in range(groups)], axis=-1)


class _Maps:
  """Per-cell channel mappings of one growth step and the axis maps derived from them."""

  def __init__(self, old: _Darts, new: _Darts, key: jax.Array, preserving: bool):
    self.old, self.new, self.preserving = old, new, preserving
    self.src, self.counts = [], []
    for i, (c_old, c_new) in enumerate(zip(old.chans, new.chans)):
      if c_new == c_old:
        src = np.arange(c_old)
      else:
        src = _cell_mapping(c_old, c_new, old.blocks(i), preserving, jax.random.fold_in(key, i))
      self.src.append(src)
      self.counts.append(np.bincount(src[src >= 0], minlength=c_old))

  def _map(self, src: np.ndarray, counts: np.ndarray, reads: bool) -> _AxisMap:
    if reads and self.preserving:
      return _AxisMap(src, 1.0 / counts[src])
    return _AxisMap(src)

  def cell(self, i: int, reads: bool = False) -> _AxisMap:
    """Cell ``i``'s ``C``-channel space (``reads``: as a layer's input axis)."""
    return self._map(self.src[i], self.counts[i], reads)

  def half(self, i: int, which: int) -> _AxisMap:
    """Output axis of a FactorizedReduce half (0: conv1, 1: conv2) in cell ``i``."""
    src = self.src[i]
    h_new, h_old = len(src) // 2, self.old.chans[i] // 2
    part = src[:h_new] if which == 0 else src[h_new:]
    kept = part[part >= 0]
    if np.any(kept >= h_old) if which == 0 else np.any(kept < h_old):
      raise AssertionError(f'cell {i}: FactorizedReduce halves are not aligned')
    return _AxisMap(part if which == 0 else np.where(part >= 0, part - h_old, -1))

  def output(self, j: int) -> _AxisMap:
    """Cell ``j``'s concatenated output as a layer's input axis (``j < 0``: the stem)."""
    if j < 0:
      n = self.old.stem
      return self._map(np.arange(n), np.ones(n, np.int64), True)
    c_old = self.old.chans[j]
    nodes = len(self.old.concat(j))
    src = self.src[j]
    out = np.concatenate([np.where(src >= 0, k * c_old + src, -1) for k in range(nodes)])
    return self._map(out, np.tile(self.counts[j], nodes), True)


def _darts_leaf(key: tuple[str, ...], old: np.ndarray, fresh: np.ndarray,
                maps: _Maps) -> np.ndarray:
  """The grown value of one parameter / batch-stat leaf (path ``key``)."""
  top = key[0]
  preserving = maps.preserving
  if top == 'classifier' and key[-1] == 'kernel':
    return _take(old, fresh.shape, {0: maps.output(maps.old.layers - 1)}, fresh, preserving)
  if top == 'aux_head' and key[1] == 'conv1':
    return _take(old, fresh.shape, {2: maps.output(maps.old.reductions[1])}, fresh, preserving)
  if not top.startswith('cell'):
    return _take(old, fresh.shape, {}, fresh, preserving)
  i = int(top[4:])
  module, sub = key[1], key[2]
  out = maps.cell(i)
  if module in ('preprocess0', 'preprocess1'):
    j = i - 2 if module == 'preprocess0' else i - 1
    reads = maps.output(j if j >= 0 else -1)
  else:
    reads = maps.cell(i, reads=True)
  if sub.startswith('bn'):
    return _take(old, fresh.shape, {0: out}, fresh, preserving)
  if sub in ('conv', 'pw', 'pw1', 'pw2'):
    return _take(old, fresh.shape, {2: reads, 3: out}, fresh, preserving)
  if sub in ('conv1', 'conv2'):
    half = maps.half(i, 0 if sub == 'conv1' else 1)
    return _take(old, fresh.shape, {2: reads, 3: half}, fresh, preserving)
  if sub.startswith('dw'):
    return _grouped_leaf(old, fresh, out, reads, preserving)
  raise AssertionError(f'no transfer rule for parameter {"/".join(key)}')


def _grouped_leaf(old: np.ndarray, fresh: np.ndarray, out: _AxisMap, reads: _AxisMap,
                  preserving: bool) -> np.ndarray:
  """A ``(k, k, C/groups, C)`` kernel of a separable / dilated convolution."""
  old = np.asarray(old)
  g_old = old.shape[3] // old.shape[2]
  g_new = fresh.shape[3] // fresh.shape[2]
  if old.shape[3] == fresh.shape[3]:  # same width: same groups, or densified
    if g_old == g_new:
      return old.copy()
    if not preserving:  # the release re-initialises densified convolutions
      return np.asarray(fresh)
    return _dense_to_grouped(_grouped_to_dense(old, g_old), g_new)
  if old.shape[2] == 1 and fresh.shape[2] == 1:  # depthwise: per-channel, no division
    return _take(old, fresh.shape, {3: out}, fresh, preserving)
  dense = _take(_grouped_to_dense(old, g_old), (*fresh.shape[:2], fresh.shape[3], fresh.shape[3]),
                {2: reads, 3: out}, _grouped_to_dense(np.asarray(fresh), g_new), preserving)
  return _dense_to_grouped(dense, g_new)


def _transfer_darts(old: _Darts, new: _Darts, variables: Variables, base_cfg: dict,
                    key: jax.Array, preserving: bool, input_shape: tuple[int, ...]) -> Variables:
  """Variables of ``new`` holding ``variables`` (of ``old``) as described in the module doc."""
  for i in range(old.layers):
    if old.chans[i] != new.chans[i] and old.groups[i] != new.groups[i]:
      raise AssertionError('a step may widen or densify a cell, not both')
  fresh = init_variables(create_model(**new.config(base_cfg)), jax.random.fold_in(key, 0),
                         input_shape)
  maps = _Maps(old, new, jax.random.fold_in(key, 1), preserving)
  result = {}
  for collection in ('params', 'batch_stats'):
    flat_old = traverse_util.flatten_dict(variables.get(collection, {}))
    flat_new = traverse_util.flatten_dict(fresh.get(collection, {}))
    missing = sorted('/'.join(k) for k in flat_new if k not in flat_old)
    if missing:
      raise ValueError(f'variables lack {collection}/{missing[0]} of the student network; '
                       f'allowed: variables of create_model(**model_config)')
    out = {}
    for k, fresh_leaf in flat_new.items():
      out[k] = jnp.asarray(_darts_leaf(k, np.asarray(flat_old[k]), np.asarray(fresh_leaf),
                                             maps))
    result[collection] = traverse_util.unflatten_dict(out)
  return result


# ----------------------------------------------------------------------------- selection


def _fisher_scores(fisher: FisherFn | Mapping[str, Any], layout: _Darts, cfg: dict,
                   variables: Variables, reduce: str, check_sizes: bool) -> list[float]:
  """Per-cell score of a Fisher estimate: max (widen) or sum (denser) over its channels."""
  delta = fisher(cfg, variables) if callable(fisher) else fisher
  if not isinstance(delta, Mapping):
    raise ValueError(
        f'fisher must return a dict {{"cell{{i}}/output": Δ}}; got {type(delta).__name__}')
  scores = []
  for i in range(layout.layers):
    name = f'cell{i}/output'
    if name not in delta:
      raise ValueError(f'the Fisher estimate lacks {name!r}; required: cell0/output .. '
                       f'cell{layout.layers - 1}/output')
    d = np.asarray(delta[name], np.float64).reshape(-1)
    if check_sizes and d.size != layout.out_channels(i):
      raise ValueError(f'Fisher {name} has {d.size} channels; cell {i} outputs '
                       f'{layout.out_channels(i)}')
    scores.append(float(np.max(d) if reduce == 'max' else np.sum(d)))
  return scores


def _entry(step: int, cell: int | None, score: float | None, layout: _Darts,
           **extra: Any) -> dict:
  return {'step': step, 'cell': cell, 'score': score, 'num_params': layout.count(),
          'cell_channels': [int(c) for c in layout.chans],
          'cell_groups': [None if g is None else int(g) for g in layout.groups], **extra}


def _with_width(layout: _Darts, i: int, width: int) -> _Darts:
  chans = list(layout.chans)
  chans[i] = width
  return layout.replace(chans=tuple(chans))


def _uniform_channels(student: _Darts, target: float) -> tuple[_Darts, float]:
  """Bisection on the scale ``s`` of ``C_i' = m_i * round(s * C_i / m_i)``."""
  def width(i: int, s: float) -> int:
    c, m = student.chans[i], student.multiple(i)
    return max(_round_to(s * c, m), -(-c // m) * m)  # never narrower than the student

  def at(s: float) -> _Darts:
    return student.replace(chans=tuple(width(i, s) for i in range(student.layers)))

  lo, hi = 1.0, 2.0
  while at(hi).count() < target:
    hi *= 2
    if hi > 1e4:
      raise ValueError(f'uniform widening cannot reach {target:.0f} parameters')
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if at(mid).count() >= target:
      hi = mid
    else:
      lo = mid
  below, above = at(lo), at(hi)
  candidates = [(below, lo), (above, hi)]
  # Cells of equal width jump together: also try subsets of the jump's cells (prefixes in
  # index order when there are many).
  changed = [i for i in range(student.layers) if below.chans[i] != above.chans[i]]
  if len(changed) <= 10:
    subsets = [[c for b, c in enumerate(changed) if mask >> b & 1]
               for mask in range(1, 2 ** len(changed) - 1)]
  else:
    subsets = [changed[:n] for n in range(1, len(changed))]
  for subset in subsets:
    chans = list(below.chans)
    for i in subset:
      chans[i] = above.chans[i]
    candidates.append((below.replace(chans=tuple(chans)), hi))
  layout, s = min(candidates, key=lambda c: abs(c[0].count() - target))
  if not _in_band(layout.count(), target):
    raise ValueError(
        f'uniform widening cannot land within ±{TOLERANCE:.0%} of {target:.0f} parameters '
        f'(closest: {layout.count()} with cell_channels {list(layout.chans)})')
  return layout, s


def _widen_step(layout: _Darts, i: int) -> int:
  m = layout.multiple(i)
  return max(m, _round_to(WIDEN_STEP * layout.chans[i], m))


def _step_options(layout: _Darts, i: int, target: float) -> tuple[int | None, int | None]:
  """Widths of cell ``i`` up to one full step: the one closest to ``target`` if its count is
  within the band, and the widest one whose count stays below ``target``."""
  m, c = layout.multiple(i), layout.chans[i]
  closest, below = None, None
  for w in range(c + m, c + _widen_step(layout, i) + 1, m):
    n = _with_width(layout, i, w).count()
    if closest is None or abs(n - target) < abs(closest[1] - target):
      closest = (w, n)
    if n < target:
      below = w
  in_band = closest[0] if closest is not None and _in_band(closest[1], target) else None
  return in_band, below


def _can_get_closer(layout: _Darts, target: float) -> bool:
  """Whether widening some cell by up to one step ends closer to ``target``."""
  err = abs(layout.count() - target)
  for i in range(layout.layers):
    m, c = layout.multiple(i), layout.chans[i]
    if abs(_with_width(layout, i, c + m).count() - target) < err:
      return True
  return False


def _choose_widening(layout: _Darts, order: list[int], target: float
                     ) -> tuple[int, int, bool] | None:
  """``(cell, width, fallback)`` of the next widening step; None = stop here.

  The top-scoring cell takes a full step while the count stays at most ``target``. The
  step that would overshoot lands as close to the target as possible inside the band
  (or stops, if the current count is closer); when the top cell cannot land inside the
  band it takes the widest partial step that stays below the target, and only when
  neither exists do lower-scoring cells step in (``fallback``).
  """
  n = layout.count()
  top = order[0]
  full = layout.chans[top] + _widen_step(layout, top)
  if _with_width(layout, top, full).count() <= target:
    return top, full, False
  in_band, below = _step_options(layout, top, target)
  if in_band is not None:
    stepped = _with_width(layout, top, in_band).count()
    if _in_band(n, target) and abs(n - target) <= abs(stepped - target):
      return None
    return top, in_band, False
  if _in_band(n, target):
    return None
  if below is not None:
    return top, below, False
  options = [(cell, *_step_options(layout, cell, target)) for cell in order[1:]]
  for cell, in_band, _ in options:
    if in_band is not None:
      return cell, in_band, True
  for cell, _, below in options:
    if below is not None:
      return cell, below, True
  raise ValueError(f'fisher widening cannot land within ±{TOLERANCE:.0%} of {target:.0f} '
                   f'parameters from {n} (cell_channels {list(layout.chans)})')


def _grow_darts_fisher_widen(student: _Darts, variables: Variables, cfg: dict, fisher: Any,
                             target: float, key: jax.Array, preserving: bool,
                             input_shape: tuple[int, ...], max_steps: int
                             ) -> tuple[_Darts, Variables, History]:
  stepwise = callable(fisher)
  layout, current, history = student, variables, []
  for step in range(1, max_steps + 1):
    if layout.count() >= target or (_in_band(layout.count(), target)
                                    and not _can_get_closer(layout, target)):
      break  # (checked before estimating Fisher, which may be expensive)
    scores = _fisher_scores(fisher, layout, layout.config(cfg), current, 'max',
                            stepwise or step == 1)
    order = sorted(range(layout.layers), key=lambda i: (-scores[i], i))
    choice = _choose_widening(layout, order, target)
    if choice is None:
      break
    cell, width, fallback = choice
    grown = _with_width(layout, cell, width)
    if stepwise:
      current = _transfer_darts(layout, grown, current, cfg, jax.random.fold_in(key, step),
                                preserving, input_shape)
    layout = grown
    history.append(_entry(step, cell, scores[cell], layout, scores=scores, fallback=fallback))
  if not _in_band(layout.count(), target):
    raise ValueError(f'fisher widening stopped after max_steps={max_steps} at {layout.count()} '
                     f'parameters, outside ±{TOLERANCE:.0%} of {target:.0f}; raise max_steps')
  if not stepwise:
    current = _transfer_darts(student, layout, variables, cfg, key, preserving, input_shape)
  return layout, current, history


def _densified(layout: _Darts, i: int) -> _Darts | None:
  """``layout`` with cell ``i``'s group count halved, or None when it cannot be."""
  if not layout.has_grouped_ops(i):
    return None
  g = layout.chans[i] if layout.groups[i] is None else layout.groups[i]
  if g < 2 or g % 2:
    return None
  groups = list(layout.groups)
  groups[i] = g // 2
  return layout.replace(groups=tuple(groups))


def _grow_darts_denser(student: _Darts, variables: Variables, cfg: dict, strategy: str,
                       fisher: Any, target: float, key: jax.Array, preserving: bool,
                       input_shape: tuple[int, ...], max_steps: int
                       ) -> tuple[_Darts, Variables, History]:
  stepwise = strategy == 'fisher' and callable(fisher)
  layout, current, history = student, variables, []
  pointer = 0
  for step in range(1, max_steps + 1):
    n = layout.count()
    if n >= target:
      break
    options = {i: g for i in range(layout.layers) if (g := _densified(layout, i)) is not None}
    if not options:
      break
    scores = None
    if strategy == 'uniform':
      cell = min(options, key=lambda i: (i - pointer) % layout.layers)
      pointer = cell + 1
      score = None
    else:
      scores = _fisher_scores(fisher, layout, layout.config(cfg), current, 'sum',
                              stepwise or step == 1)
      cell = min(options, key=lambda i: (-scores[i], i))
      score = scores[cell]
    grown = options[cell]
    if grown.count() > target and abs(grown.count() - target) >= abs(n - target):
      break
    if stepwise:
      current = _transfer_darts(layout, grown, current, cfg, jax.random.fold_in(key, step),
                                preserving, input_shape)
    layout = grown
    extra = {} if scores is None else {'scores': scores}
    history.append(_entry(step, cell, score, layout, **extra))
  if not _in_band(layout.count(), target):
    warnings.warn(f'denser growth stopped at {layout.count()} parameters, outside '
                  f'±{TOLERANCE:.0%} of the target {target:.0f}', stacklevel=3)
  if not stepwise:
    current = _transfer_darts(student, layout, variables, cfg, key, preserving, input_shape)
  return layout, current, history


# ------------------------------------------------------------------------------- depth


def _default_chans(cfg: dict, layers: int) -> tuple[int, ...]:
  model = create_model(**{**cfg, 'layers': layers, 'cell_channels': None, 'cell_groups': None})
  return tuple(model.resolved_cell_channels())


def grown_depth_config(model_config: Any, variables: Variables, *,
                       target_param_ratio: float = 2.0, layers: int | None = None) -> dict:
  """The config of the ``depth`` strategy: the student's genotype with more cells.

  Args:
    model_config: the student's DARTS config (default per-cell widths; per-cell groups
      None or one value for every cell).
    variables: the student's variables (its parameter count sets the target).
    target_param_ratio: target count / student count (without the auxiliary head).
    layers: explicit number of cells (e.g. 25, the paper's teacher); None picks the
      number (more than the student's) whose count is closest to the target (ties:
      fewer cells).

  Returns:
    A plain config dict (``cell_channels`` None, ``cell_groups`` None or a tuple).
  """
  cfg = _plain_config(model_config)
  if cfg['name'] != 'darts':
    raise ValueError(f'strategy depth is not available for model {cfg["name"]!r}; {_SUPPORTED}')
  in_ch = int(np.shape(variables['params']['stem_conv']['kernel'])[2])
  student = _Darts.from_config(cfg, in_ch)
  if student.chans != _default_chans(cfg, student.layers):
    raise ValueError(f'strategy depth needs the default per-cell widths; got cell_channels '
                     f'{list(student.chans)}')
  distinct = set(student.groups)
  if len(distinct) > 1:
    raise ValueError(f'strategy depth needs one group count for every cell; got cell_groups '
                     f'{list(student.groups)}')
  g = distinct.pop()

  def config(n_layers: int) -> dict:
    return {**cfg, 'layers': n_layers, 'cell_channels': None,
            'cell_groups': None if g is None else (g,) * n_layers}

  if layers is None:
    target = target_param_ratio * student.count()
    best = None
    n_layers = student.layers + 1
    while n_layers <= 1000:
      n = _Darts.from_config(config(n_layers), in_ch).count()
      if best is None or abs(n - target) < abs(best[1] - target):
        best = (n_layers, n)
      if n > target:
        break
      n_layers += 1
    layers = best[0]
  return config(int(layers))


# -------------------------------------------------------------------------------- DARTS


def _grow_darts(cfg: dict, variables: Variables, *, strategy: str, ratio: float, fisher: Any,
                preserving: bool, key: jax.Array, input_shape: tuple[int, ...],
                operator: str, max_steps: int, layers: int | None
                ) -> tuple[dict, Variables, History]:
  in_ch = int(np.shape(variables['params']['stem_conv']['kernel'])[2])
  if input_shape[-1] != in_ch:
    raise ValueError(f'input_shape={tuple(input_shape)} has {input_shape[-1]} channels; the '
                     f'student stem reads {in_ch}')
  student = _Darts.from_config(cfg, in_ch)
  n0 = count_params_without_aux(variables['params'])
  if student.count() != n0:
    raise ValueError(f'variables hold {n0} parameters (without the auxiliary head) but '
                     f'model_config describes {student.count()}; pass the student\'s config')
  target = ratio * n0

  if strategy == 'depth':
    if preserving:
      raise ValueError('function_preserving=True is not available for strategy depth '
                       '(fresh init); allowed with uniform and fisher')
    if operator != 'widen':
      raise ValueError(f'operator={operator!r} does not apply to strategy depth; allowed: widen')
    new_cfg = grown_depth_config(cfg, variables, target_param_ratio=ratio, layers=layers)
    grown = init_variables(create_model(**new_cfg), key, input_shape)
    n = count_params_without_aux(grown['params'])
    history = [{'step': 1, 'cell': None, 'score': None, 'num_params': n,
                'layers': new_cfg['layers']}]
    return new_cfg, grown, history

  if fisher is None and strategy == 'fisher':
    raise ValueError('strategy fisher needs fisher= (a callable (config, variables) -> '
                     '{"cell{i}/output": Δ} or such a dict)')
  for i in range(student.layers):
    if student.chans[i] % student.blocks(i):
      raise ValueError(f'cell {i} has {student.chans[i]} channels; growing it needs a multiple '
                       f'of {student.blocks(i)} (FactorizedReduce halves / groups)')

  if operator == 'denser':
    layout, grown, history = _grow_darts_denser(student, variables, cfg, strategy, fisher,
                                                target, key, preserving, input_shape, max_steps)
  elif strategy == 'uniform':
    layout, scale = _uniform_channels(student, target)
    grown = _transfer_darts(student, layout, variables, cfg, key, preserving, input_shape)
    history = [_entry(1, None, None, layout, scale=scale)]
  else:
    layout, grown, history = _grow_darts_fisher_widen(student, variables, cfg, fisher, target,
                                                      key, preserving, input_shape, max_steps)
  return layout.config(cfg), grown, history


# ---------------------------------------------------------------------------------- WRN


def _grow_wrn(cfg: dict, variables: Variables, *, strategy: str, ratio: float,
              preserving: bool, key: jax.Array, input_shape: tuple[int, ...], operator: str
              ) -> tuple[dict, Variables, History]:
  if strategy != 'uniform' or operator != 'widen' or preserving:
    raise ValueError(f'wrn supports only strategy uniform, operator widen, function_preserving '
                     f'False; got strategy={strategy!r}, operator={operator!r}, '
                     f'function_preserving={preserving}; {_SUPPORTED}')
  n0 = count_params(variables['params'])
  target = ratio * n0
  k0 = int(cfg.get('widen_factor', 2))
  best = None
  for k in range(k0 + 1, 64 * k0 + 1):
    shapes = param_shapes(create_model(**{**cfg, 'widen_factor': k}), input_shape)
    n = count_params(shapes['params'])
    if best is None or abs(n - target) < abs(best[1] - target):
      best = (k, n)
    if n > target:
      break
  new_cfg = {**cfg, 'widen_factor': best[0]}
  fresh = init_variables(create_model(**new_cfg), key, input_shape)
  result = {}
  for collection in ('params', 'batch_stats'):
    flat_old = traverse_util.flatten_dict(variables.get(collection, {}))
    flat_new = traverse_util.flatten_dict(fresh.get(collection, {}))
    out = {}
    for k, leaf in flat_new.items():
      leaf = np.array(leaf, copy=True)
      if k in flat_old:
        old = np.asarray(flat_old[k])
        if old.ndim != leaf.ndim or any(a > b for a, b in zip(old.shape, leaf.shape)):
          raise ValueError(f'wrn: cannot copy {collection}/{"/".join(k)} of shape {old.shape} '
                           f'into {leaf.shape}')
        leaf[tuple(slice(0, s) for s in old.shape)] = old
      out[k] = jnp.asarray(leaf)
    result[collection] = traverse_util.unflatten_dict(out)
  n = count_params(result['params'])
  if not _in_band(n, target):
    warnings.warn(f'wrn widen_factor {best[0]} gives {n} parameters, outside ±{TOLERANCE:.0%} '
                  f'of the target {target:.0f} (integer widen factors only)', stacklevel=3)
  history = [{'step': 1, 'cell': None, 'score': None, 'num_params': n,
              'widen_factor': best[0]}]
  return new_cfg, result, history


# ---------------------------------------------------------------------------- public API


def grow_with_history(model_config: Any, variables: Variables, *, strategy: str,
                      target_param_ratio: float = 2.0,
                      fisher: FisherFn | Mapping[str, Any] | None = None,
                      function_preserving: bool = False, rng: Any = None,
                      input_shape: Sequence[int] = (1, 32, 32, 3), operator: str = 'widen',
                      max_steps: int = DEFAULT_MAX_STEPS, layers: int | None = None
                      ) -> tuple[dict, Variables, History]:
  """Grows a trained student; returns ``(grown_config, grown_variables, history)``.

  Args:
    model_config: the student's config (dict or ConfigDict; ``create_model(**config)``).
    variables: the student's ``{'params', 'batch_stats'}``.
    strategy: 'uniform', 'fisher' or 'depth' (see the module docstring).
    target_param_ratio: grown count / student count (> 1; DARTS counts exclude the
      auxiliary head).
    fisher: for 'fisher': a callable ``(model_config, variables) -> {'cell{i}/output':
      (len(concat) * C_i,) Δ}`` re-estimated before every step, or such a dict (used
      unchanged for every step).
    function_preserving: Net2WiderNet widening (the grown network computes the student's
      logits); for 'denser', embeds the old kernels instead of re-initialising them.
    rng: a JAX key or an int seed (None: key 0); fixes fresh slices and the replication
      mapping.
    input_shape: ``(batch, height, width, channels)`` used to initialise the grown network.
    operator: 'widen' (the seed's text) or 'denser' (the author's release).
    max_steps: bound on growth steps of 'fisher' and 'denser'.
    layers: explicit number of cells for strategy 'depth'.

  Returns:
    A plain config dict (DARTS: ``cell_channels`` and ``cell_groups`` tuples; 'depth':
    ``layers``), the grown variables and the history, a list of
    ``{'step', 'cell', 'score', 'num_params', ...}`` dicts (one per growth step; ``cell``
    and ``score`` are None for one-shot strategies; ``num_params`` after the step).

  Raises:
    ValueError: unsupported network / strategy / operator, a Fisher estimate without the
      cell outputs, variables that do not match the config, or a target that cannot be
      reached within ±3% (uniform / fisher widening).
  """
  cfg = _plain_config(model_config)
  if strategy not in STRATEGIES:
    raise ValueError(f'strategy={strategy!r} is unknown; allowed: {", ".join(STRATEGIES)}')
  if operator not in OPERATORS:
    raise ValueError(f'operator={operator!r} is unknown; allowed: {", ".join(OPERATORS)}')
  if not target_param_ratio > 1.0:
    raise ValueError(f'target_param_ratio={target_param_ratio!r} must be > 1')
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError('variables must be a dict with "params" and "batch_stats"')
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  key = _as_key(rng)
  input_shape = tuple(int(s) for s in input_shape)
  name = cfg['name']
  if name == 'darts':
    return _grow_darts(cfg, variables, strategy=strategy, ratio=float(target_param_ratio),
                       fisher=fisher, preserving=bool(function_preserving), key=key,
                       input_shape=input_shape, operator=operator, max_steps=int(max_steps),
                       layers=layers)
  if name == 'wrn':
    return _grow_wrn(cfg, variables, strategy=strategy, ratio=float(target_param_ratio),
                     preserving=bool(function_preserving), key=key, input_shape=input_shape,
                     operator=operator)
  raise ValueError(f'growing model {name!r} is not supported; {_SUPPORTED}')


def grow(model_config: Any, variables: Variables, *, strategy: str,
         target_param_ratio: float = 2.0, fisher: FisherFn | Mapping[str, Any] | None = None,
         function_preserving: bool = False, rng: Any = None,
         input_shape: Sequence[int] = (1, 32, 32, 3), operator: str = 'widen',
         max_steps: int = DEFAULT_MAX_STEPS, layers: int | None = None
         ) -> tuple[dict, Variables]:
  """:func:`grow_with_history` without the history: ``(grown_config, grown_variables)``."""
  config, grown, _ = grow_with_history(
      model_config, variables, strategy=strategy, target_param_ratio=target_param_ratio,
      fisher=fisher, function_preserving=function_preserving, rng=rng,
      input_shape=input_shape, operator=operator, max_steps=max_steps, layers=layers)
  return config, grown


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.bool_,)):
    return bool(x)
  return x


def save_history(path: str | os.PathLike, history: History) -> None:
  """Writes the growth history as JSON (a list of step dicts)."""
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(_jsonable(history), f, indent=1)
    f.write('\n')


def load_history(path: str | os.PathLike) -> History:
  """Reads a history written by :func:`save_history`."""
  with open(path) as f:
    return json.load(f)
