"""DARTS growth loops: check the student, run a policy step by step, transfer the weights.

``fisher`` is either a callable ``fisher(model_config, variables) -> {'cell{i}/output':
Δ}`` (:func:`distill_jax.models.names.cell_output`), re-estimated on the grown network
before every step (the grown variables are built step by step for it; no estimate is
requested once no step can bring the count closer to the target), or a precomputed
dict, used unchanged for every step (no re-estimation: the same cell keeps winning; the
variables are built once at the end).

Widening (``uniform``, ``fisher``) lands within ``±TOLERANCE`` (3%) of the target or
raises a ``ValueError``; the stem (``stem_multiplier * init_channels`` channels) is never
widened: ``init_channels`` stays, the grown widths live in ``cell_channels``.

``denser`` (the densifying step of the author's release, github.com/DWhettam/
FisherDistillation, in this package's band protocol: first-to-last order, only the
grouped kernels re-initialised, the band's stopping rule; ``protocol='release'`` runs
the release's own loop, :mod:`distill_jax.grow.release`) halves a
cell's group count per step; cells without separable/dilated convolutions (e.g. the
DARTS_V1 reduction cell) are skipped. Growth stops when the count reaches the target (a
last step is taken only if it ends closer to the target than stopping) or when nothing
can be densified; the ±3% band is not guaranteed (a warning is issued).

``depth`` freshly initialises the deeper network (no copying).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax

from distill_jax.grow import policies, release
from distill_jax.grow.history import entry
from distill_jax.grow.layout import Layout, densified, with_width
from distill_jax.grow.settings import FISHER_KEY_PATTERN, TOLERANCE, History, Variables, in_band
from distill_jax.grow.transfer import transfer_darts
from distill_jax.models import create_model, init_variables
from distill_jax.models.darts import count_params_without_aux


def _grow_fisher_widen(student: Layout, variables: Variables, cfg: dict, fisher: Any,
                       target: float, key: jax.Array, preserving: bool,
                       input_shape: tuple[int, ...], max_steps: int
                       ) -> tuple[Layout, Variables, History]:
  stepwise = callable(fisher)
  layout, current, history = student, variables, []
  for step in range(1, max_steps + 1):
    if layout.count() >= target or (in_band(layout.count(), target)
                                    and not policies.can_get_closer(layout, target)):
      break  # (checked before estimating Fisher, which may be expensive)
    scores = policies.fisher_scores(fisher, layout, layout.config(cfg), current, 'max',
                                    stepwise or step == 1)
    choice = policies.choose_widening(layout, policies.score_order(scores), target)
    if choice is None:
      break
    cell, width, fallback = choice
    grown = with_width(layout, cell, width)
    if stepwise:
      current = transfer_darts(layout, grown, current, cfg, jax.random.fold_in(key, step),
                               preserving, input_shape)
    layout = grown
    history.append(entry(step, cell, scores[cell], layout, scores=scores, fallback=fallback))
  if not in_band(layout.count(), target):
    raise ValueError(f'fisher widening stopped after max_steps={max_steps} at {layout.count()} '
                     f'parameters, outside ±{TOLERANCE:.0%} of {target:.0f}; raise max_steps')
  if not stepwise:
    current = transfer_darts(student, layout, variables, cfg, key, preserving, input_shape)
  return layout, current, history


def _grow_denser(student: Layout, variables: Variables, cfg: dict, strategy: str,
                 fisher: Any, target: float, key: jax.Array, preserving: bool,
                 input_shape: tuple[int, ...], max_steps: int
                 ) -> tuple[Layout, Variables, History]:
  stepwise = strategy == 'fisher' and callable(fisher)
  layout, current, history = student, variables, []
  pointer = 0
  for step in range(1, max_steps + 1):
    n = layout.count()
    if n >= target:
      break
    options = {i: g for i in range(layout.layers) if (g := densified(layout, i)) is not None}
    if not options:
      break
    scores = None
    if strategy == 'uniform':
      cell = policies.next_in_cycle(options, pointer, layout.layers)
      pointer = cell + 1
      score = None
    else:
      scores = policies.fisher_scores(fisher, layout, layout.config(cfg), current, 'sum',
                                      stepwise or step == 1)
      cell = policies.best_scoring(options, scores)
      score = scores[cell]
    grown = options[cell]
    if grown.count() > target and abs(grown.count() - target) >= abs(n - target):
      break
    if stepwise:
      current = transfer_darts(layout, grown, current, cfg, jax.random.fold_in(key, step),
                               preserving, input_shape)
    layout = grown
    extra = {} if scores is None else {'scores': scores}
    history.append(entry(step, cell, score, layout, **extra))
  if not in_band(layout.count(), target):
    warnings.warn(f'denser growth stopped at {layout.count()} parameters, outside '
                  f'±{TOLERANCE:.0%} of the target {target:.0f}', stacklevel=3)
  if not stepwise:
    current = transfer_darts(student, layout, variables, cfg, key, preserving, input_shape)
  return layout, current, history


def grow_darts(cfg: dict, variables: Variables, *, strategy: str, ratio: float, fisher: Any,
               preserving: bool, key: jax.Array, input_shape: tuple[int, ...],
               operator: str, max_steps: int, layers: int | None,
               protocol: str = 'band', param_goal: float | None = None
               ) -> tuple[dict, Variables, History]:
  """:func:`distill_jax.grow.grow_with_history` for a DARTS student (arguments checked)."""
  in_ch = policies.stem_in_channels(variables)
  if input_shape[-1] != in_ch:
    raise ValueError(f'input_shape={tuple(input_shape)} has {input_shape[-1]} channels; the '
                     f'student stem reads {in_ch}')
  student = Layout.from_config(cfg, in_ch)
  n0 = count_params_without_aux(variables['params'])
  if student.count() != n0:
    raise ValueError(f'variables hold {n0} parameters (without the auxiliary head) but '
                     f'model_config describes {student.count()}; pass the student\'s config')
  target = ratio * n0

  if strategy == 'depth':
    if protocol != 'band':
      raise ValueError(f'protocol={protocol!r} does not apply to strategy depth; allowed: band')
    if preserving:
      raise ValueError('function_preserving=True is not available for strategy depth '
                       '(fresh init); allowed with uniform and fisher')
    if operator != 'widen':
      raise ValueError(f'operator={operator!r} does not apply to strategy depth; allowed: widen')
    new_cfg = policies.grown_depth_config(cfg, variables, target_param_ratio=ratio,
                                          layers=layers)
    grown = init_variables(create_model(**new_cfg), key, input_shape)
    n = count_params_without_aux(grown['params'])
    history = [{'step': 1, 'cell': None, 'score': None, 'num_params': n,
                'layers': new_cfg['layers']}]
    return new_cfg, grown, history

  if fisher is None and strategy == 'fisher':
    raise ValueError(f'strategy fisher needs fisher= (a callable (config, variables) -> '
                     f'{{"{FISHER_KEY_PATTERN}": Δ}} or such a dict)')
  for i in range(student.layers):
    if student.chans[i] % student.blocks(i):
      raise ValueError(f'cell {i} has {student.chans[i]} channels; growing it needs a multiple '
                       f'of {student.blocks(i)} (FactorizedReduce halves / groups)')

  if protocol == 'release':
    if operator != 'denser' or strategy not in ('uniform', 'fisher') or preserving:
      raise ValueError(f'protocol release densifies (operator denser, strategy uniform or '
                       f'fisher, function_preserving False); got operator={operator!r}, '
                       f'strategy={strategy!r}, function_preserving={preserving}')
    goal = ratio * student.state_dict_count() if param_goal is None else float(param_goal)
    layout, grown, history = release.grow_as_released(
        student, variables, cfg, strategy=strategy, goal=goal, fisher=fisher, key=key,
        input_shape=input_shape)
  elif operator == 'denser':
    layout, grown, history = _grow_denser(student, variables, cfg, strategy, fisher, target,
                                          key, preserving, input_shape, max_steps)
  elif strategy == 'uniform':
    layout, scale = policies.uniform_channels(student, target)
    grown = transfer_darts(student, layout, variables, cfg, key, preserving, input_shape)
    history = [entry(1, None, None, layout, scale=scale)]
  else:
    layout, grown, history = _grow_fisher_widen(student, variables, cfg, fisher, target, key,
                                                preserving, input_shape, max_steps)
  return layout.config(cfg), grown, history
