"""Seed statistics of the reports: t-intervals of a row's mean and of paired differences.

A row of a report is one configuration run with several seeds; its uncertainty is the
seed-to-seed spread (initialisation, data order, augmentation), which is what a rerun
with other seeds would see. For ``n`` values with mean :math:`\\bar x` and sample
standard deviation :math:`s` (ddof = 1) the two-sided interval at level ``1 - a`` is
Student's

.. math::

  \\bar x \\pm t_{1 - a/2,\\, n - 1}\\, \\frac{s}{\\sqrt n}.

A teacher's effect is measured against the student trained alone *with the same seeds*:
the per-seed differences :math:`d_s = e_s^{teacher} - e_s^{alone}` (same seed: same
initialisation and data order of the student) and the t-interval of their mean (the
paired t-test's interval). It is narrower than comparing two independent intervals when
seeds move both runs alike. An interval that contains 0 means the rows cannot be told
apart at that level with these seeds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean, sample std, count and the two-sided t-interval of the mean (``None`` where
  undefined: the std and interval of one value, everything of none)."""
  mean: float | None
  std: float | None
  n: int
  low: float | None
  high: float | None

  @property
  def excludes_zero(self) -> bool | None:
    """Whether the interval lies on one side of 0 (None without an interval)."""
    if self.low is None:
      return None
    return self.low > 0 or self.high < 0


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
  """:class:`Interval` of ``values`` at ``confidence`` (Student's t, ``n - 1`` degrees)."""
  x = np.asarray(list(values), np.float64)
  n = len(x)
  if n == 0:
    return Interval(None, None, 0, None, None)
  mean = float(x.mean())
  if n == 1:
    return Interval(mean, None, 1, None, None)
  std = float(x.std(ddof=1))
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
  return Interval(mean, std, n, mean - half, mean + half)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Interval:
  """:class:`Interval` of ``a[s] - b[s]`` over the seeds ``s`` both have."""
  common = sorted(set(a) & set(b))
  return t_interval([a[s] - b[s] for s in common], confidence)
