"""The DARTS evaluation network for CIFAR-sized images (Flax linen).

Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search" (ICLR 2019,
arXiv:1806.09055), section 3 and appendix A.2; structure as in the authors' public
release (github.com/quark0/darts, ``NetworkCIFAR`` and ``AuxiliaryHeadCIFAR`` in
``cnn/model.py``; genotypes in ``cnn/genotypes.py``), written anew. The release reports
3.349342M parameters (auxiliary head excluded) for DARTS_V2 with C=36 and 20 cells.

Structure: stem 3x3 conv (``in -> stem_multiplier * C``) + BN; ``layers`` cells, the ones
at ``layers // 3`` and ``2 * layers // 3`` reduction cells (stride 2, channels doubled);
global average pooling and a linear classifier. Each cell maps its two inputs (the
outputs of the two previous cells; the stem output for the first cells) to ``C``
channels (``FactorizedReduce`` for the older input when the previous cell reduced,
else ReLU-1x1 conv-BN), builds four nodes, each the sum of two operations of the
genotype, and concatenates nodes 2-5 (``4 * C`` channels).

Interface (common to ``distill_jax.models``)::

  logits, points = model.apply(variables, x, train=False)
  (logits, points), state = model.apply(
      variables, x, train=True, drop_path_prob=p,          # p may be a traced scalar
      rngs={'dropout': key}, mutable=['batch_stats', 'intermediates'])
  aux_logits = state['intermediates']['aux_logits'][0]    # only when auxiliary=True

``points`` are the attention-transfer points of the author's setting (AT at 32/16/8 px
on CIFAR): the outputs of cell 0, of the first reduction cell and of the second
reduction cell.

Parameter names are predictable: ``stem_conv``, ``stem_bn``, ``cell{i}``
(:func:`names.cell_name`; inside: ``preprocess0``, ``preprocess1``, ``op{e}`` for edge
``e`` of the genotype in its order), ``aux_head`` (:data:`names.AUX_HEAD`) and
``classifier`` (:data:`names.CLASSIFIER`). Each cell marks its output with
``layers.mark(self, names.OUTPUT, ...)`` (a perturbation plus the value sown in
``'intermediates'``), so with the ``'perturbations'`` collection the gradient
with respect to cell ``i``'s output is ``grads['perturbations'][f'cell{i}']['output']``
and its Fisher point is :func:`names.cell_output` (``'cell{i}/output'``; a perturbation
can not share the name ``cell{i}`` with the submodule at the network level, so it lives
inside the cell).

Implementation. ``impl`` ('auto', 'fast' or 'lax'; see
:func:`distill_jax.models.darts_ops.resolve_impl`) picks how the cell operations are
computed: 'auto' is the shifted-slice forms on CPU and library convolutions on GPU/TPU.
Parameters and outputs do not depend on it.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.genotypes import NUM_NODES, Genotype, GenotypeLike, get_genotype
from distill_jax.models import darts_layout as L
from distill_jax.models import names
from distill_jax.models.darts_ops import (Conv, FactorizedReduce, ReLUConvBN, check_impl,
                                          is_identity, make_op, torch_default_init)
from distill_jax.models.layers import batch_norm, mark

Dtype = Any


def drop_path(x: jnp.ndarray, drop_prob: Any, key: jax.Array) -> jnp.ndarray:
  """Per-sample drop path: zero whole examples with probability ``drop_prob`` and divide
  the survivors by the keep probability (Larsson et al. 2017, as used by DARTS)."""
  keep = 1.0 - jnp.asarray(drop_prob, jnp.float32)
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / keep.astype(x.dtype))


def _linear_bias_init(fan_in: int):
  """PyTorch's default ``nn.Linear`` bias init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jnp.ndarray:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _dense(features: int, fan_in: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=torch_default_init,
                  bias_init=_linear_bias_init(fan_in), name=name)


class Cell(nn.Module):
  """One DARTS cell of the evaluation network.

  Attributes:
    genotype: the (validated) genotype.
    channels: ``C`` of this cell: its preprocessing maps both inputs to ``C`` channels,
      every operation is ``C -> C`` and the output has ``len(concat) * C`` channels.
    reduction: reduction cell (edges from the two cell inputs use stride 2).
    reduction_prev: the previous cell reduced (``s0`` has twice ``s1``'s spatial size).
    groups: groups of the separable / dilated convolutions (None = depthwise).
    dtype: computation dtype.
    impl: darts_ops implementation ('auto', 'fast', 'lax').
  """
  genotype: Genotype
  channels: int
  reduction: bool
  reduction_prev: bool
  groups: int | None = None
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, s0: jnp.ndarray, s1: jnp.ndarray, *, train: bool,
               drop_prob: Any = None) -> jnp.ndarray:
    """Applies the cell; ``drop_prob`` (None = no drop path) needs the 'dropout' rng."""
    c = self.channels
    if self.reduction_prev:
      s0 = FactorizedReduce(c, dtype=self.dtype, impl=self.impl, name=L.PREPROCESS0)(
          s0, train=train)
    else:
      s0 = ReLUConvBN(c, dtype=self.dtype, impl=self.impl, name=L.PREPROCESS0)(s0, train=train)
    s1 = ReLUConvBN(c, dtype=self.dtype, impl=self.impl, name=L.PREPROCESS1)(s1, train=train)

    if self.reduction:
      pairs, concat = self.genotype.reduce, self.genotype.reduce_concat
    else:
      pairs, concat = self.genotype.normal, self.genotype.normal_concat
    states = [s0, s1]
    for node in range(NUM_NODES):
      total = None
      for e in (2 * node, 2 * node + 1):
        op_name, idx = pairs[e]
        stride = 2 if self.reduction and idx < 2 else 1
        op = make_op(op_name, c, c, stride, True, self.groups, self.dtype, impl=self.impl,
                     name=L.op_name(e))
        h = op(states[idx], train=train)
        if drop_prob is not None and not is_identity(op):
          h = drop_path(h, drop_prob, self.make_rng('dropout'))
        total = h if total is None else total + h
      states.append(total)
    out = jnp.concatenate([states[i] for i in concat], axis=-1)
    return mark(self, names.OUTPUT, out)


class AuxiliaryHead(nn.Module):
  """The release's CIFAR auxiliary classifier (``AuxiliaryHeadCIFAR``) on an 8x8 map.

  ReLU -> avg pool 5 stride 3 (no padding) -> 1x1 conv 128 -> BN -> ReLU -> 2x2 conv 768
  -> BN -> ReLU -> linear. On maps smaller than 8x8 (small images) the pooling window is
  clipped to the map and the 2x2 conv is zero-padded at the bottom/right when the pooled
  map is 1x1; any remaining spatial extent is averaged. Parameters do not depend on the
  image size.
  """
  num_classes: int
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    x = nn.relu(x)
    _, h, w, _ = x.shape
    x = nn.avg_pool(x, (min(5, h), min(5, w)), strides=(3, 3), padding='VALID')
    x = Conv(L.AUX_WIDTHS[0], 1, dtype=self.dtype, impl=self.impl, name=L.AUX_CONV1)(x)
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name=L.AUX_BN1)(x))
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, max(0, 2 - h)), (0, max(0, 2 - w)), (0, 0)))
    x = Conv(L.AUX_WIDTHS[1], 2, dtype=self.dtype, impl=self.impl, name=L.AUX_CONV2)(x)
    x = nn.relu(batch_norm(train=train, dtype=self.dtype, name=L.AUX_BN2)(x))
    x = jnp.mean(x, axis=(1, 2))
    logits = _dense(self.num_classes, L.AUX_WIDTHS[1], self.dtype, L.AUX_CLASSIFIER)(x)
    return logits.astype(jnp.float32)


class DartsNetwork(nn.Module):
  """DARTS evaluation network (CIFAR layout) for NHWC images of any size and channels.

  Attributes:
    genotype: built-in name ('DARTS_V1', 'DARTS_V2'), ``.json`` path or Genotype.
    layers: number of cells (>= 3); reductions at ``layers // 3`` and ``2 * layers // 3``.
    init_channels: ``C`` of the first cells.
    num_classes: classifier outputs.
    auxiliary: build the auxiliary head after cell ``2 * layers // 3`` (train mode only;
      its logits are sown as ``intermediates/aux_logits``, :data:`names.AUX_LOGITS`).
    drop_path_prob: default drop-path probability in train mode (overridable per call).
    cell_channels: ``C`` of each cell (length ``layers``); default ``init_channels``
      doubled at each reduction cell. Reductions stay at the same positions.
    cell_groups: groups of each cell's separable/dilated convs (length ``layers``; None
      entries or None = depthwise). Must divide that cell's ``C``.
    stem_multiplier: stem width ``stem_multiplier * C``.
    dtype: computation dtype (parameters are float32; logits are returned as float32).
    impl: how the cell operations are computed: 'auto' (default: 'fast' on CPU, 'lax' on
      GPU/TPU, resolved at trace time), 'fast' or 'lax'
      (:func:`distill_jax.models.darts_ops.resolve_impl`). Same parameters and outputs.
  """
  genotype: GenotypeLike = 'DARTS_V2'
  layers: int = 20
  init_channels: int = 36
  num_classes: int = 10
  auxiliary: bool = False
  drop_path_prob: float = 0.0
  cell_channels: tuple[int, ...] | None = None
  cell_groups: tuple[int | None, ...] | None = None
  stem_multiplier: int = 3
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  def __post_init__(self) -> None:
    check_impl(self.impl)
    super().__post_init__()

  def reduction_indices(self) -> tuple[int, int]:
    """Indices of the two reduction cells."""
    return self.layers // 3, 2 * self.layers // 3

  def resolved_genotype(self) -> Genotype:
    return get_genotype(self.genotype)

  def resolved_cell_channels(self) -> tuple[int, ...]:
    """``C`` of every cell (validated)."""
    if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 3:
      raise ValueError(f'model.layers={self.layers!r} is too small; allowed: integers >= 3')
    if self.cell_channels is None:
      r1, r2 = self.reduction_indices()
      c = self.init_channels
      return tuple(c * (1 if i < r1 else 2 if i < r2 else 4) for i in range(self.layers))
    chans = tuple(self.cell_channels)
    if len(chans) != self.layers:
      raise ValueError(
          f'model.cell_channels has {len(chans)} entries ({list(chans)}); allowed: exactly '
          f'layers={self.layers} positive integers')
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 2 for c in chans):
      raise ValueError(f'model.cell_channels={list(chans)}; allowed: integers >= 2')
    return chans

  def resolved_cell_groups(self) -> tuple[int | None, ...]:
    """Groups of every cell's separable/dilated convs (None = depthwise), validated."""
    chans = self.resolved_cell_channels()
    if self.cell_groups is None:
      return (None,) * self.layers
    groups = tuple(self.cell_groups)
    if len(groups) != self.layers:
      raise ValueError(
          f'model.cell_groups has {len(groups)} entries ({list(groups)}); allowed: exactly '
          f'layers={self.layers} entries (None = depthwise)')
    for i, (g, c) in enumerate(zip(groups, chans)):
      if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1 or c % g):
        raise ValueError(
            f'model.cell_groups[{i}]={g!r} does not divide cell {i} channels C={c}; '
            f'allowed: None or a divisor of {c}')
    return groups

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               drop_path_prob: Any = None) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
    """Returns ``(logits, (cell 0 output, 1st reduction output, 2nd reduction output))``.

    Args:
      x: NHWC images.
      train: batch statistics, drop path and the auxiliary head are used in train mode.
      drop_path_prob: overrides the ``drop_path_prob`` field; may be a traced scalar so a
        trainer can ramp it (``p * epoch / epochs``) without recompiling. Passing it in
        train mode always applies drop path (and needs the 'dropout' rng).
    """
    genotype = self.resolved_genotype()
    chans = self.resolved_cell_channels()
    groups = self.resolved_cell_groups()
    r1, r2 = self.reduction_indices()

    if drop_path_prob is None:
      p = self.drop_path_prob
      use_drop = train and p > 0
    else:
      p = drop_path_prob
      use_drop = train and not (isinstance(p, (int, float)) and p == 0)
    drop_prob = p if use_drop else None

    s = Conv(self.stem_multiplier * self.init_channels, 3, 1, 1, dtype=self.dtype,
             impl=self.impl, name=L.STEM_CONV)(x)
    s = batch_norm(train=train, dtype=self.dtype, name=L.STEM_BN)(s)
    s0 = s1 = s
    points = []
    reduction_prev = False
    for i in range(self.layers):
      reduction = i in (r1, r2)
      cell = Cell(genotype, chans[i], reduction, reduction_prev, groups[i], self.dtype,
                  self.impl, name=names.cell_name(i))
      s0, s1 = s1, cell(s0, s1, train=train, drop_prob=drop_prob)
      if i == 0 or reduction:
        points.append(s1)
      if i == r2 and self.auxiliary and (train or self.is_initializing()):
        aux = AuxiliaryHead(self.num_classes, self.dtype, self.impl, name=names.AUX_HEAD)(
            s1, train=train)
        if train:
          self.sow(names.INTERMEDIATES, names.AUX_LOGITS, aux)
      reduction_prev = reduction
    out = jnp.mean(s1, axis=(1, 2))
    self.sow(names.INTERMEDIATES, names.EMBEDDING, out)  # (N, D): what RKD/PKT/CC read
    logits = _dense(self.num_classes, out.shape[-1], self.dtype, names.CLASSIFIER)(out)
    return logits.astype(jnp.float32), tuple(points)


def count_params_without_aux(params: Any) -> int:
  """Trainable parameters excluding the auxiliary head (the figure the release reports)."""
  params = {k: v for k, v in params.items() if k != names.AUX_HEAD}
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
