"""DARTS network layout without weights: layer names, parameter count, channel axes per layer.

:mod:`distill_jax.models.darts` builds the network (Liu, Simonyan & Yang, "DARTS:
Differentiable Architecture Search", ICLR 2019, arXiv:1806.09055; structure of the
authors' release github.com/quark0/darts, ``cnn/model.py`` and ``cnn/operations.py``).
Readers that reason about its variables without building them (growth in
:mod:`distill_jax.grow`) use this module:

- the layer names of the variables tree (the stem, the cells' preprocessing and
  operations, the layers inside each operation, the auxiliary head, the classifier);
  names shared with other networks come from :mod:`distill_jax.models.names`;
- :class:`DartsLayout`, the shape-relevant facts of a network (genotype, per-cell widths
  and groups, reduction cells, stem width) and :meth:`DartsLayout.count`, its number of
  trainable parameters computed from the shapes, with or without the auxiliary head
  (the release reports the count without it);
- :func:`channel_axes`, for every leaf of a ``params`` / ``batch_stats`` tree, which of
  its axes index which channel space (a cell's ``C`` channels, half of them, or a cell's
  concatenated output).

The networks (:mod:`distill_jax.models.darts_ops`, :mod:`distill_jax.models.darts`)
name their layers with these constants, so each name has one spelling; the tests build
real variables trees and check all three against them. This module imports only
:mod:`distill_jax.genotypes` and :mod:`distill_jax.models.names` (no import cycle with
the networks that use it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from distill_jax.genotypes import Genotype
from distill_jax.models import names

# ------------------------------------------------------------------------ layer names

# Top-level submodules of DartsNetwork besides the cells (names.cell_name(i)),
# names.AUX_HEAD and names.CLASSIFIER.
STEM_CONV = 'stem_conv'
STEM_BN = 'stem_bn'

# Inside a cell: the two preprocessing layers and the operation of edge e (op_name(e)).
PREPROCESS0 = 'preprocess0'
PREPROCESS1 = 'preprocess1'


def op_name(edge: int) -> str:
  """The submodule name of a cell's operation on edge ``edge`` (``'op3'``)."""
  return f'op{edge}'


# Inside ReLUConvBN (non-reducing preprocessing): its conv and batch norm.
CONV = 'conv'
BN = 'bn'
# Inside FactorizedReduce (reducing preprocessing, skip_connect at stride 2): the convs
# writing the first and the second half of the channels, then BN.
FR_CONVS = ('conv1', 'conv2')
# Inside SepConv: two (grouped k x k conv, 1x1 conv, BN) stacks.
SEP_LAYERS = (('dw1', 'pw1', 'bn1'), ('dw2', 'pw2', 'bn2'))
# Inside DilConv: one (grouped k x k dilated conv, 1x1 conv, BN) stack.
DIL_LAYERS = ('dw', 'pw', 'bn')
# Inside the auxiliary head: 1x1 conv, BN, 2x2 conv, BN, linear classifier.
AUX_CONV1, AUX_BN1, AUX_CONV2, AUX_BN2 = 'conv1', 'bn1', 'conv2', 'bn2'
AUX_CLASSIFIER = names.CLASSIFIER
AUX_WIDTHS = (128, 768)  # channels of the auxiliary head's two convs

# Leaf names (flax's nn.Conv / nn.Dense / nn.BatchNorm).
KERNEL = 'kernel'
BIAS = 'bias'

# The layers whose kernels are grouped (k, k, C / groups, C); the layers mapping their
# input to C channels (1x1, input axis 2, output axis 3); the batch norms.
GROUPED_CONVS = tuple(layers[0] for layers in SEP_LAYERS) + (DIL_LAYERS[0],)
POINTWISE_CONVS = (CONV,) + tuple(layers[1] for layers in SEP_LAYERS) + (DIL_LAYERS[1],)
BATCH_NORMS = (BN,) + tuple(layers[2] for layers in SEP_LAYERS)

# Primitive-name prefixes of the operations with parameters besides skip_connect.
SEP_CONV, DIL_CONV, SKIP_CONNECT = 'sep_conv', 'dil_conv', 'skip_connect'


# --------------------------------------------------------------------------- the layout


@dataclasses.dataclass(frozen=True)
class DartsLayout:
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
  def from_model(cls, model: Any, in_channels: int) -> 'DartsLayout':
    """The layout of a ``DartsNetwork`` reading ``in_channels``-channel images."""
    return cls(model.resolved_genotype(), tuple(model.resolved_cell_channels()),
               tuple(model.resolved_cell_groups()), tuple(model.reduction_indices()),
               model.stem_multiplier * model.init_channels, model.num_classes,
               bool(model.auxiliary), in_channels)

  @property
  def layers(self) -> int:
    return len(self.chans)

  def replace(self, **kw: Any) -> 'DartsLayout':
    return dataclasses.replace(self, **kw)

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
    return self.reduction_prev(i) or any(op == SKIP_CONNECT and s == 2
                                         for op, s in self.strides(i))

  def has_grouped_ops(self, i: int) -> bool:
    return any(op.startswith((SEP_CONV, DIL_CONV)) for op, _ in self.pairs(i))

  def count(self, include_aux: bool = False) -> int:
    """Trainable parameters, computed from the shapes (the tests check it against real
    variables trees)."""
    n = 9 * self.in_channels * self.stem + 2 * self.stem
    for i, c in enumerate(self.chans):
      g = c if self.groups[i] is None else self.groups[i]
      c_in0 = self.out_channels(i - 2) if i >= 2 else self.stem
      c_in1 = self.out_channels(i - 1) if i >= 1 else self.stem
      n += (c_in0 + c_in1) * c + 4 * c  # preprocess0/1 (1x1 or factorized) + BN
      for op, stride in self.strides(i):
        if op.startswith((SEP_CONV, DIL_CONV)):
          k = int(op[-1])
          one = k * k * (c // g) * c + c * c + 2 * c
          n += 2 * one if op.startswith(SEP_CONV) else one
        elif op == SKIP_CONNECT and stride == 2:
          n += c * c + 2 * c
    n += self.out_channels(self.layers - 1) * self.num_classes + self.num_classes
    if include_aux and self.auxiliary:
      a = self.out_channels(self.reductions[1])
      w1, w2 = AUX_WIDTHS
      n += a * w1 + 2 * w1 + 4 * w1 * w2 + 2 * w2 + w2 * self.num_classes + self.num_classes
    return n


  def batch_norm_widths(self, include_aux: bool = False) -> list[int]:
    """The channels of every batch norm of the network (the stem's first)."""
    widths = [self.stem]
    for i, c in enumerate(self.chans):
      widths += [c, c]  # preprocess0 / preprocess1
      for op, stride in self.strides(i):
        if op.startswith(SEP_CONV):
          widths += [c, c]
        elif op.startswith(DIL_CONV) or (op == SKIP_CONNECT and stride == 2):
          widths.append(c)
    if include_aux and self.auxiliary:
      widths += list(AUX_WIDTHS)
    return widths

  def state_dict_count(self, include_aux: bool = False) -> int:
    """The size of the author's release network's PyTorch ``state_dict``, which its growth
    loop measures (``funcs.get_no_params`` of github.com/DWhettam/FisherDistillation):
    the trainable parameters, each batch norm's running mean and variance and its
    ``num_batches_tracked`` counter, and each cell's ``mask`` buffer (one entry per
    output channel)."""
    buffers = sum(2 * c + 1 for c in self.batch_norm_widths(include_aux))
    masks = sum(self.out_channels(i) for i in range(self.layers))
    return self.count(include_aux) + buffers + masks


# ------------------------------------------------------------------------- channel axes

CELL = 'cell'      # the C channels of cell ``index``
HALF = 'half'      # half ``half`` (0: first, 1: second) of cell ``index``'s C channels
OUTPUT = 'output'  # the concatenated output of cell ``index`` (-1: the stem)


@dataclasses.dataclass(frozen=True)
class Space:
  """A channel space of the network."""
  kind: str
  index: int
  half: int = 0


@dataclasses.dataclass(frozen=True)
class ChannelAxes:
  """Which axes of one leaf index channel spaces.

  ``in_axis`` reads ``reads`` (the layer's input channels); ``out_axis`` holds ``writes``
  (its output channels); None: no such axis. ``grouped``: a ``(k, k, C / groups, C)``
  kernel, whose input axis 2 holds ``C / groups`` channels of each group. A leaf with
  neither axis (the stem, the auxiliary head after its first conv, the classifier bias)
  does not depend on the cell widths.
  """
  in_axis: int | None = None
  reads: Space | None = None
  out_axis: int | None = None
  writes: Space | None = None
  grouped: bool = False


FIXED = ChannelAxes()


def _output_of(j: int) -> Space:
  return Space(OUTPUT, j if j >= 0 else -1)


def channel_axes(path: tuple[str, ...], layout: DartsLayout) -> ChannelAxes | None:
  """The channel axes of the leaf at ``path`` (e.g. ``('cell4', 'op1', 'pw2', 'kernel')``)
  of a ``params`` or ``batch_stats`` tree of ``layout``; None for a path the network does
  not have."""
  top = path[0]
  if top in (STEM_CONV, STEM_BN):
    return FIXED
  if top == names.CLASSIFIER:
    if path[-1] == KERNEL:
      return ChannelAxes(0, _output_of(layout.layers - 1))
    return FIXED
  if top == names.AUX_HEAD:
    if path[1] == AUX_CONV1:
      return ChannelAxes(2, _output_of(layout.reductions[1]))
    if path[1] in (AUX_BN1, AUX_CONV2, AUX_BN2, AUX_CLASSIFIER):
      return FIXED
    return None
  cells = {names.cell_name(i): i for i in range(layout.layers)}
  if top not in cells or len(path) != 4:
    return None
  i = cells[top]
  module, sub = path[1], path[2]
  if module == PREPROCESS0:
    reads = _output_of(i - 2)
  elif module == PREPROCESS1:
    reads = _output_of(i - 1)
  elif module in {op_name(e) for e in range(len(layout.pairs(i)))}:
    reads = Space(CELL, i)
  else:
    return None
  out = Space(CELL, i)
  if sub in BATCH_NORMS:
    return ChannelAxes(out_axis=0, writes=out)
  if sub in POINTWISE_CONVS:
    return ChannelAxes(2, reads, 3, out)
  if sub in FR_CONVS:
    return ChannelAxes(2, reads, 3, Space(HALF, i, FR_CONVS.index(sub)))
  if sub in GROUPED_CONVS:
    return ChannelAxes(2, reads, 3, out, grouped=True)
  return None


def rule_layer_names() -> frozenset[str]:
  """Every layer name :func:`channel_axes` matches (below the cells, whose names come
  from :func:`names.cell_name`, and the operations, from :func:`op_name`)."""
  return frozenset({STEM_CONV, STEM_BN, names.CLASSIFIER, names.AUX_HEAD, AUX_CONV1, AUX_BN1,
                    AUX_CONV2, AUX_BN2, AUX_CLASSIFIER, PREPROCESS0, PREPROCESS1,
                    *BATCH_NORMS, *POINTWISE_CONVS, *FR_CONVS, *GROUPED_CONVS})
