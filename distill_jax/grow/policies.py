"""Selection policies over layouts, without weights: uniform, Fisher choice of cell, denser, depth.

Growth (the seed paper, Whettam 2020, "Finding the Right Teacher for a Difficult
Student", section "Fisher Distillation"; the author's release github.com/DWhettam/
FisherDistillation) scales a trained student up to ``target = ratio * count(student)``
trainable parameters (without the auxiliary head, the figure the DARTS release
github.com/quark0/darts reports). The policies here only choose layouts; weights are
moved by :mod:`distill_jax.grow.transfer`.

- uniform widening: ``C_i' = m_i * round(s * C_i / m_i)`` for one scale ``s`` found by
  bisection on the parameter count (monotone in ``s``; ``m_i`` from
  :meth:`distill_jax.grow.layout.Layout.multiple`). Cells of equal width jump together;
  when such a jump straddles the ±3% band, subsets of the jump's cells are tried (the
  other rounding direction for some cells of the same ``s``), and the list closest to
  the target wins.
- Fisher widening, the paper's rule. With :math:`\\Delta_c` the per-channel Fisher
  information of the cell outputs (Theis, Korshunova, Tejani & Huszár, "Faster gaze
  prediction with dense networks and Fisher pruning", 2018, arXiv:1801.05787),

  .. math::

    \\Delta_c = \\frac{1}{2N}\\sum_{n=1}^{N}\\Big(\\sum_{h,w} a_{nhwc}
                \\frac{\\partial L_n}{\\partial a_{nhwc}}\\Big)^2,

  each step widens the cell :math:`i^* = \\mathrm{cell}(\\arg\\max_c \\Delta_c)` holding the
  single most important channel (cell score = :math:`\\max_c \\Delta_c` over the cell's
  ``len(concat) * C_i`` output channels) by ``WIDEN_STEP`` (25%) of its current width,
  rounded to a multiple of ``m_i`` and at least ``m_i`` (e.g. 16 -> 20 -> 26 -> 32 ...).
  The step that would overshoot is shortened (:func:`choose_widening`).
- denser (the release's densifying step, under this package's band protocol; the
  release's own loop is :mod:`distill_jax.grow.release`): uniform densifies the cells
  one at a time in index
  order, cycling (:func:`next_in_cycle`); Fisher densifies the cell with the highest
  *sum* of Δ over its channels, as in the release (:func:`best_scoring`).
- depth: the same genotype, default per-cell widths and more cells
  (:func:`grown_depth_config`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from distill_jax.grow.layout import Layout, default_chans, round_to, with_width
from distill_jax.grow.settings import (FISHER_KEY_PATTERN, SUPPORTED, TOLERANCE, WIDEN_STEP,
                                       FisherFn, Variables, in_band, plain_config)
from distill_jax.models import darts_layout, names


def fisher_scores(fisher: FisherFn | Mapping[str, Any], layout: Layout, cfg: dict,
                  variables: Variables, reduce: str, check_sizes: bool) -> list[float]:
  """Per-cell score of a Fisher estimate: max (widen) or sum (denser) over its channels."""
  delta = fisher(cfg, variables) if callable(fisher) else fisher
  if not isinstance(delta, Mapping):
    raise ValueError(
        f'fisher must return a dict {{"{FISHER_KEY_PATTERN}": Δ}}; got {type(delta).__name__}')
  scores = []
  for i in range(layout.layers):
    name = names.cell_output(i)
    if name not in delta:
      raise ValueError(f'the Fisher estimate lacks {name!r}; required: {names.cell_output(0)} .. '
                       f'{names.cell_output(layout.layers - 1)}')
    d = np.asarray(delta[name], np.float64).reshape(-1)
    if check_sizes and d.size != layout.out_channels(i):
      raise ValueError(f'Fisher {name} has {d.size} channels; cell {i} outputs '
                       f'{layout.out_channels(i)}')
    scores.append(float(np.max(d) if reduce == 'max' else np.sum(d)))
  return scores


# ----------------------------------------------------------------------------- uniform


def uniform_channels(student: Layout, target: float) -> tuple[Layout, float]:
  """Bisection on the scale ``s`` of ``C_i' = m_i * round(s * C_i / m_i)``."""
  def width(i: int, s: float) -> int:
    c, m = student.chans[i], student.multiple(i)
    return max(round_to(s * c, m), -(-c // m) * m)  # never narrower than the student

  def at(s: float) -> Layout:
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
  if not in_band(layout.count(), target):
    raise ValueError(
        f'uniform widening cannot land within ±{TOLERANCE:.0%} of {target:.0f} parameters '
        f'(closest: {layout.count()} with cell_channels {list(layout.chans)})')
  return layout, s


# ------------------------------------------------------------------------ Fisher widening


def widen_step(layout: Layout, i: int) -> int:
  """Channels a full Fisher widening step adds to cell ``i``."""
  m = layout.multiple(i)
  return max(m, round_to(WIDEN_STEP * layout.chans[i], m))


def step_options(layout: Layout, i: int, target: float) -> tuple[int | None, int | None]:
  """Widths of cell ``i`` up to one full step: the one closest to ``target`` if its count is
  within the band, and the widest one whose count stays below ``target``."""
  m, c = layout.multiple(i), layout.chans[i]
  closest, below = None, None
  for w in range(c + m, c + widen_step(layout, i) + 1, m):
    n = with_width(layout, i, w).count()
    if closest is None or abs(n - target) < abs(closest[1] - target):
      closest = (w, n)
    if n < target:
      below = w
  band = closest[0] if closest is not None and in_band(closest[1], target) else None
  return band, below


def can_get_closer(layout: Layout, target: float) -> bool:
  """Whether widening some cell by up to one step ends closer to ``target``."""
  err = abs(layout.count() - target)
  for i in range(layout.layers):
    m, c = layout.multiple(i), layout.chans[i]
    if abs(with_width(layout, i, c + m).count() - target) < err:
      return True
  return False


def choose_widening(layout: Layout, order: list[int], target: float
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
  full = layout.chans[top] + widen_step(layout, top)
  if with_width(layout, top, full).count() <= target:
    return top, full, False
  band, below = step_options(layout, top, target)
  if band is not None:
    stepped = with_width(layout, top, band).count()
    if in_band(n, target) and abs(n - target) <= abs(stepped - target):
      return None
    return top, band, False
  if in_band(n, target):
    return None
  if below is not None:
    return top, below, False
  options = [(cell, *step_options(layout, cell, target)) for cell in order[1:]]
  for cell, band, _ in options:
    if band is not None:
      return cell, band, True
  for cell, _, below in options:
    if below is not None:
      return cell, below, True
  raise ValueError(f'fisher widening cannot land within ±{TOLERANCE:.0%} of {target:.0f} '
                   f'parameters from {n} (cell_channels {list(layout.chans)})')


def score_order(scores: list[float]) -> list[int]:
  """Cells by decreasing score (ties: lower index first)."""
  return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


# ------------------------------------------------------------------------------ denser


def next_in_cycle(options: Mapping[int, Any], pointer: int, layers: int) -> int:
  """The first cell of ``options`` at or after ``pointer``, cycling over ``layers``."""
  return min(options, key=lambda i: (i - pointer) % layers)


def best_scoring(options: Mapping[int, Any], scores: list[float]) -> int:
  """The cell of ``options`` with the highest score (ties: lower index)."""
  return min(options, key=lambda i: (-scores[i], i))


# ------------------------------------------------------------------------------- depth


def grown_depth_config(model_config: Any, variables: Variables, *,
                       target_param_ratio: float = 2.0, layers: int | None = None) -> dict:
  """The config of the ``depth`` strategy: the student's genotype with more cells.

  The paper's 25-layer teacher of a 10-layer student is ``layers=25`` (for DARTS_V1 with
  C = 16 that is 2.7x the 10-layer count; 19 layers is the closest to 2x). The ±3% band
  is not enforced (layers are discrete).

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
  cfg = plain_config(model_config)
  if cfg['name'] != 'darts':
    raise ValueError(f'strategy depth is not available for model {cfg["name"]!r}; {SUPPORTED}')
  in_ch = stem_in_channels(variables)
  student = Layout.from_config(cfg, in_ch)
  if student.chans != default_chans(cfg, student.layers):
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
      n = Layout.from_config(config(n_layers), in_ch).count()
      if best is None or abs(n - target) < abs(best[1] - target):
        best = (n_layers, n)
      if n > target:
        break
      n_layers += 1
    layers = best[0]
  return config(int(layers))


def stem_in_channels(variables: Variables) -> int:
  """Image channels the student's stem reads."""
  return int(np.shape(variables['params'][darts_layout.STEM_CONV][darts_layout.KERNEL])[2])
