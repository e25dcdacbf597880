"""The growth history: one dict per growth step, and its JSON file.

Every entry has ``step`` (1, 2, ...), ``cell`` (the grown cell; None for one-shot
strategies), ``score`` (the selection score of that cell: max Δ for widening, sum Δ for
'denser'; None without Fisher) and ``num_params`` (after the step); DARTS entries add
``cell_channels`` and ``cell_groups`` (after the step) and, by strategy, ``scores``
(every cell's score, Fisher strategies), ``fallback`` (Fisher widening), ``scale``
(uniform widening), ``layers`` (depth); WRN entries add ``widen_factor``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from distill_jax.grow.layout import Layout
from distill_jax.grow.settings import History


def entry(step: int, cell: int | None, score: float | None, layout: Layout,
          **extra: Any) -> dict:
  """The history entry of a DARTS growth step that ended at ``layout``."""
  return {'step': step, 'cell': cell, 'score': score, 'num_params': layout.count(),
          'cell_channels': [int(c) for c in layout.chans],
          'cell_groups': [None if g is None else int(g) for g in layout.groups], **extra}


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
