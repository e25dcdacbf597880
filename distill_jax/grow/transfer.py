"""Weight surgery of DARTS growth: widening with transfer, Net2WiderNet, denser kernels.

Widening
--------
Channel ``c`` of a cell's ``C``-channel space (the width of its preprocessing, of every
operation and of every node) is placed at ``pos(c)`` of the ``C'``-channel space. The
space is split into ``B`` equal blocks (:meth:`distill_jax.grow.layout.Layout.blocks`);
block ``b`` of size ``C/B`` goes to the start of new block ``b`` of size ``C'/B``:
``pos(c) = (c // (C/B)) * (C'/B) + c % (C/B)``. With ``B = 1`` this is the prefix layout;
with ``B = 2`` the two ``FactorizedReduce`` halves (conv1 -> first half, conv2 -> second
half) stay aligned; grouped convolutions keep their groups. A cell's output concatenates
its nodes, so node ``k``'s channel ``c`` moves from ``k*C + c`` to ``k*C' + pos(c)``; the
layers that read it (the next cell's ``preprocess1``, the ``preprocess0`` of the cell after
next, the auxiliary head after the second reduction cell, the classifier after the last
cell) get their input weights at those positions. Which axis of which layer indexes
which channel space is :func:`distill_jax.models.darts_layout.channel_axes`. Every
widened tensor keeps the student's values (kernels, batch-norm scale/bias and running
mean/var) at the original positions; the other entries come from ``init_variables`` of
the grown network with ``rng`` (fresh, PyTorch-style init as in the DARTS release
github.com/quark0/darts; BN scale 1, bias 0, mean 0, var 1).

Function preserving (Net2WiderNet; Chen, Goodfellow & Shlens, "Net2Net: Accelerating
learning via knowledge transfer", ICLR 2016, arXiv:1511.05641)
----------------------------------------------------------------------------------
With ``preserving`` every new position ``j`` of a cell copies an old channel ``g(j)``
drawn uniformly (from ``rng``) within its block (so halves and groups stay consistent);
``g(pos(c)) = c``. Every output-side tensor (kernel columns, BN parameters and
statistics) is gathered with ``g``; every input-side kernel row is gathered with ``g``
and divided by the replication count ``n(g(j)) = |{j' : g(j') = g(j)}|``:

.. math::

  W'_{\\cdot, j} = W_{\\cdot, g(j)}, \\qquad
  U'_{j, \\cdot} = U_{g(j), \\cdot} / n(g(j)).

Depthwise kernels are per-channel (gathered, not divided); grouped kernels are handled
as block-diagonal dense kernels. Because every operation of a cell (and ReLU, pooling,
identity, node sums, drop path) acts on the same ``C_i`` channels with the same ``g``, the
grown network computes the student's logits exactly (up to float rounding) in
inference mode. Caveat (as in Net2Net): replicas have identical incoming and outgoing
weights, so plain SGD keeps them identical.

Denser (the author's release, github.com/DWhettam/FisherDistillation)
----------------------------------------------------------------------
A cell whose group count was halved keeps its width; its changed ``k x k`` kernels are
re-initialised, or with ``preserving`` embed the old kernel (zero weights between
channels that were in different groups), which is exact. The release's own protocol
(``rebuild_ops``, :mod:`distill_jax.grow.release`) re-initialises the whole operation
instead (its 1x1 kernels and batch norms too).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from distill_jax.grow.layout import Layout
from distill_jax.grow.settings import Variables
from distill_jax.models import create_model, darts_layout, init_variables, names


@dataclasses.dataclass(frozen=True)
class AxisMap:
  """New index -> old index along one axis (-1: new, fresh init) and, on input axes of a
  function-preserving transfer, the factor ``1 / n(g(j))`` of each new index."""
  src: np.ndarray
  scale: np.ndarray | None = None


def cell_mapping(c_old: int, c_new: int, blocks: int, preserving: bool,
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


def take(old: np.ndarray, fresh_shape: tuple[int, ...], axes: Mapping[int, AxisMap],
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


def grouped_to_dense(kernel: np.ndarray, groups: int) -> np.ndarray:
  """``(k, k, C/groups, C)`` grouped kernel -> block-diagonal ``(k, k, C, C)``."""
  kh, kw, cpg, c = kernel.shape
  dense = np.zeros((kh, kw, c, c), kernel.dtype)
  for j in range(groups):
    s = slice(j * cpg, (j + 1) * cpg)
    dense[:, :, s, s] = kernel[:, :, :, s]
  return dense


def dense_to_grouped(dense: np.ndarray, groups: int) -> np.ndarray:
  """Block-diagonal ``(k, k, C, C)`` -> ``(k, k, C/groups, C)`` (off-block entries dropped)."""
  c = dense.shape[-1]
  cpg = c // groups
  return np.concatenate([dense[:, :, j * cpg:(j + 1) * cpg, j * cpg:(j + 1) * cpg]
                         for j in range(groups)], axis=-1)


class Maps:
  """Per-cell channel mappings of one growth step and the axis maps derived from them."""

  def __init__(self, old: Layout, new: Layout, key: jax.Array, preserving: bool):
    self.old, self.new, self.preserving = old, new, preserving
    self.src, self.counts = [], []
    for i, (c_old, c_new) in enumerate(zip(old.chans, new.chans)):
      if c_new == c_old:
        src = np.arange(c_old)
      else:
        src = cell_mapping(c_old, c_new, old.blocks(i), preserving, jax.random.fold_in(key, i))
      self.src.append(src)
      self.counts.append(np.bincount(src[src >= 0], minlength=c_old))

  def _map(self, src: np.ndarray, counts: np.ndarray, reads: bool) -> AxisMap:
    if reads and self.preserving:
      return AxisMap(src, 1.0 / counts[src])
    return AxisMap(src)

  def cell(self, i: int, reads: bool = False) -> AxisMap:
    """Cell ``i``'s ``C``-channel space (``reads``: as a layer's input axis)."""
    return self._map(self.src[i], self.counts[i], reads)

  def half(self, i: int, which: int) -> AxisMap:
    """Output axis of a FactorizedReduce half (0: conv1, 1: conv2) in cell ``i``."""
    src = self.src[i]
    h_new, h_old = len(src) // 2, self.old.chans[i] // 2
    part = src[:h_new] if which == 0 else src[h_new:]
    kept = part[part >= 0]
    if np.any(kept >= h_old) if which == 0 else np.any(kept < h_old):
      raise AssertionError(f'cell {i}: FactorizedReduce halves are not aligned')
    return AxisMap(part if which == 0 else np.where(part >= 0, part - h_old, -1))

  def output(self, j: int) -> AxisMap:
    """Cell ``j``'s concatenated output as a layer's input axis (``j < 0``: the stem)."""
    if j < 0:
      n = self.old.stem
      return self._map(np.arange(n), np.ones(n, np.int64), True)
    c_old = self.old.chans[j]
    nodes = len(self.old.concat(j))
    src = self.src[j]
    out = np.concatenate([np.where(src >= 0, k * c_old + src, -1) for k in range(nodes)])
    return self._map(out, np.tile(self.counts[j], nodes), True)

  def space(self, space: darts_layout.Space, reads: bool) -> AxisMap:
    """The axis map of a channel space of :mod:`distill_jax.models.darts_layout`."""
    if space.kind == darts_layout.CELL:
      return self.cell(space.index, reads)
    if space.kind == darts_layout.HALF:
      return self.half(space.index, space.half)
    if space.kind == darts_layout.OUTPUT:
      return self.output(space.index)
    raise AssertionError(f'unknown channel space {space}')


def darts_leaf(key: tuple[str, ...], old: np.ndarray, fresh: np.ndarray,
               maps: Maps) -> np.ndarray:
  """The grown value of one parameter / batch-stat leaf (path ``key``)."""
  rule = darts_layout.channel_axes(key, maps.old)
  if rule is None:
    raise AssertionError(f'no transfer rule for parameter {"/".join(key)}')
  preserving = maps.preserving
  if rule.grouped:
    return grouped_leaf(old, fresh, maps.space(rule.writes, False),
                        maps.space(rule.reads, True), preserving)
  axes = {}
  if rule.reads is not None:
    axes[rule.in_axis] = maps.space(rule.reads, True)
  if rule.writes is not None:
    axes[rule.out_axis] = maps.space(rule.writes, False)
  return take(old, fresh.shape, axes, fresh, preserving)


def grouped_leaf(old: np.ndarray, fresh: np.ndarray, out: AxisMap, reads: AxisMap,
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
    return dense_to_grouped(grouped_to_dense(old, g_old), g_new)
  if old.shape[2] == 1 and fresh.shape[2] == 1:  # depthwise: per-channel, no division
    return take(old, fresh.shape, {3: out}, fresh, preserving)
  dense = take(grouped_to_dense(old, g_old), (*fresh.shape[:2], fresh.shape[3], fresh.shape[3]),
               {2: reads, 3: out}, grouped_to_dense(np.asarray(fresh), g_new), preserving)
  return dense_to_grouped(dense, g_new)


def rebuilt_ops(old: Layout, new: Layout) -> set[tuple[str, str]]:
  """``(cell, op)`` names of the separable / dilated operations of every cell whose group
  count differs between ``old`` and ``new``: the operations the release rebuilds whole."""
  out = set()
  for i in range(old.layers):
    if old.groups[i] != new.groups[i]:
      for e, (op, _) in enumerate(new.pairs(i)):
        if op.startswith((darts_layout.SEP_CONV, darts_layout.DIL_CONV)):
          out.add((names.cell_name(i), darts_layout.op_name(e)))
  return out


def transfer_darts(old: Layout, new: Layout, variables: Variables, base_cfg: dict,
                   key: jax.Array, preserving: bool, input_shape: tuple[int, ...],
                   rebuild_ops: bool = False) -> Variables:
  """Variables of ``new`` holding ``variables`` (of ``old``) as the module docstring says.

  ``rebuild_ops``: a densified cell's separable / dilated operations are re-initialised
  whole — grouped and 1x1 kernels, batch-norm scale, bias and running statistics — as
  the release's ``update()`` builds a new ``nn.Sequential`` (its growth protocol).
  """
  for i in range(old.layers):
    if old.chans[i] != new.chans[i] and old.groups[i] != new.groups[i]:
      raise AssertionError('a step may widen or densify a cell, not both')
  rebuilt = rebuilt_ops(old, new) if rebuild_ops else set()
  fresh = init_variables(create_model(**new.config(base_cfg)), jax.random.fold_in(key, 0),
                         input_shape)
  maps = Maps(old, new, jax.random.fold_in(key, 1), preserving)
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
      if k[:2] in rebuilt:
        out[k] = jnp.asarray(fresh_leaf)
      else:
        out[k] = jnp.asarray(darts_leaf(k, np.asarray(flat_old[k]), np.asarray(fresh_leaf),
                                        maps))
    result[collection] = traverse_util.unflatten_dict(out)
  return result
