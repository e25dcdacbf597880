"""DARTS layout arithmetic for growth: width multiples, channel blocks, widened/densified layouts.

A layout (:class:`Layout`) is a :class:`distill_jax.models.darts_layout.DartsLayout` (the
network's widths, groups and wiring, and its parameter count, without weights) plus the
constraints growth must keep:

- the widths of cell ``i`` are multiples of ``m_i = lcm(2, groups_i)``: even, since a
  ``FactorizedReduce`` splits them in halves, and divisible by the cell's group count
  (depthwise cells: ``m_i = 2``);
- the channel layout of cell ``i`` is split into ``B_i = lcm(2 if the cell has a
  FactorizedReduce, groups_i if grouped)`` aligned blocks (``B_i = 1`` otherwise), which
  weight transfer (:mod:`distill_jax.grow.transfer`) moves as units.

Densifying (the "denser" operator of the author's release, github.com/DWhettam/
FisherDistillation) halves a cell's group count: depthwise ``C`` groups -> ``C/2`` -> ...
-> 1.
"""

from __future__ import annotations

import math
from distill_jax.models import create_model
from distill_jax.models.darts_layout import DartsLayout


def round_to(x: float, m: int) -> int:
  """The multiple of ``m`` nearest to ``x`` (halves round up), at least ``m``."""
  return m * max(1, int(math.floor(x / m + 0.5)))


def lcm(a: int, b: int) -> int:
  return a * b // math.gcd(a, b)


class Layout(DartsLayout):
  """A DARTS layout with the width constraints of growth."""

  @classmethod
  def from_config(cls, cfg: dict, in_channels: int) -> 'Layout':
    """The layout of ``create_model(**cfg)`` reading ``in_channels``-channel images."""
    return cls.from_model(create_model(**cfg), in_channels)

  def config(self, base: dict) -> dict:
    """``base`` with this layout's ``cell_channels`` and ``cell_groups``."""
    cfg = dict(base)
    cfg['cell_channels'] = tuple(int(c) for c in self.chans)
    cfg['cell_groups'] = tuple(None if g is None else int(g) for g in self.groups)
    return cfg

  def multiple(self, i: int) -> int:
    """Widths of cell ``i`` must be multiples of this: even and divisible by its groups."""
    g = self.groups[i]
    return lcm(2, 1 if g is None else g)

  def blocks(self, i: int) -> int:
    """Aligned blocks of the channel layout of cell ``i`` (see the module docstring)."""
    g = self.groups[i]
    return lcm(2 if self.has_factorized_reduce(i) else 1, 1 if g is None else g)


def with_width(layout: Layout, i: int, width: int) -> Layout:
  """``layout`` with cell ``i`` ``width`` channels wide."""
  chans = list(layout.chans)
  chans[i] = width
  return layout.replace(chans=tuple(chans))


def densified(layout: Layout, i: int) -> Layout | None:
  """``layout`` with cell ``i``'s group count halved, or None when it cannot be."""
  if not layout.has_grouped_ops(i):
    return None
  g = layout.chans[i] if layout.groups[i] is None else layout.groups[i]
  if g < 2 or g % 2:
    return None
  groups = list(layout.groups)
  groups[i] = g // 2
  return layout.replace(groups=tuple(groups))


def densified_as_released(layout: Layout, i: int) -> tuple[Layout, bool]:
  """The release's ``Cell.update_groups``: every separable / dilated convolution of cell
  ``i`` goes from ``g`` groups to ``max(1, g // 2)`` (floor: 3 -> 1); returns the layout and
  the release's answer, True only when some operation still has more than one group
  afterwards. So the step that makes a cell dense answers False, like a cell that was
  already dense or has no grouped operation — the quirk by which the release's Fisher
  loop then densifies the next-ranked cell in the same iteration."""
  if not layout.has_grouped_ops(i):
    return layout, False
  g = layout.chans[i] if layout.groups[i] is None else layout.groups[i]
  if g == 1:
    return layout, False
  groups = list(layout.groups)
  groups[i] = max(1, g // 2)
  return layout.replace(groups=tuple(groups)), groups[i] != 1


def default_chans(cfg: dict, layers: int) -> tuple[int, ...]:
  """The default per-cell widths of ``cfg`` with ``layers`` cells."""
  model = create_model(**{**cfg, 'layers': layers, 'cell_channels': None, 'cell_groups': None})
  return tuple(model.resolved_cell_channels())
