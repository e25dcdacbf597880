"""The author's release's growth protocol, exactly: densify cells until an absolute goal.

The seed paper's teachers came from ``fisher_expand.py`` of github.com/DWhettam/
FisherDistillation (with ``operations.py``, ``models/darts.py`` and ``funcs.py``). Its loop,
which this module reproduces step for step on a :class:`~distill_jax.grow.layout.Layout`:

- the measure is the size of the network's PyTorch ``state_dict``
  (:meth:`~distill_jax.models.darts_layout.DartsLayout.state_dict_count`: trainable
  parameters, batch-norm running statistics and counters, the cells' mask buffers);
- growth stops once that measure exceeds ``goal - 0.025 * goal`` (``--param_goal``,
  1,400,000 by default: about 4.4x DARTS_V1-10 with C = 16); here ``goal`` may also be a
  ratio times the student's own measure; at most 100 iterations (the release returns no
  network then; here a ``ValueError``);
- one step densifies a cell (:func:`~distill_jax.grow.layout.densified_as_released`:
  every separable / dilated convolution from ``g`` groups to ``max(1, g // 2)``) and
  rebuilds its grouped operations whole (grouped and 1x1 kernels, batch norms freshly
  initialised: :func:`~distill_jax.grow.transfer.transfer_darts` with ``rebuild_ops``);
- ``uniform`` (the release's ``--naive``) visits the cells from the last to the first,
  cycling, and checks the measure after every cell;
- ``fisher`` measures the Fisher information once per iteration, checks the measure
  (taken before the iteration's step), then tries the cells by decreasing *sum* of Δ
  over their channels (a stable sort: ties keep index order) until one answers True.
  The release's answer is False for a cell that has no grouped operation, that was
  already dense, *and for the step that makes a cell dense*; so the iteration that
  densifies a cell's last grouped level densifies the next-ranked cell too. This is the
  release's behaviour, kept on purpose: it decides which teacher comes out.

With ``fisher`` a callable ``(model_config, variables) -> (Δ, variables)`` the estimate is
re-measured every iteration on the network grown so far, and its second result replaces
the variables (the release takes an SGD step on the network after each Fisher batch:
:func:`distill_jax.fisher.release_fisher_step`); with a dict (fixed Δ) the same ranking
serves every iteration and the weights are moved once at the end.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

from distill_jax.grow import policies
from distill_jax.grow.history import entry
from distill_jax.grow.layout import Layout, densified_as_released
from distill_jax.grow.settings import FISHER_KEY_PATTERN, History, Variables
from distill_jax.grow.transfer import transfer_darts

RELEASE_GOAL = 1_400_000  # fisher_expand.py's --param_goal
GOAL_SLACK = 0.025        # it stops above goal - GOAL_SLACK * goal
MAX_ITERATIONS = 100      # its loop's bound


def lower_bound(goal: float) -> float:
  """The measure the grown network must exceed: ``goal - 0.025 * goal``."""
  return goal - GOAL_SLACK * goal


def densest_measure(student: Layout) -> int:
  """The release's measure of ``student`` with every grouped cell dense: the most its
  growth can reach (a goal whose bound is not below it fails)."""
  groups = tuple(1 if student.has_grouped_ops(i) else g for i, g in enumerate(student.groups))
  return student.replace(groups=groups).state_dict_count()


def _entry(iteration: int, cell: int, score: float | None, layout: Layout,
           scores: list[float] | None) -> dict:
  extra = {'state_dict_params': layout.state_dict_count()}
  if scores is not None:
    extra['scores'] = scores
  return entry(iteration, cell, score, layout, **extra)


def _estimate(fisher: Any, layout: Layout, cfg: dict, variables: Variables
              ) -> tuple[list[float], Variables]:
  """Per-cell sums of Δ and the variables after the estimate (changed by a callable)."""
  if callable(fisher):
    result = fisher(layout.config(cfg), variables)
    if not (isinstance(result, tuple) and len(result) == 2):
      raise ValueError('with protocol release, fisher must return (Δ, variables): '
                       f'{{"{FISHER_KEY_PATTERN}": Δ}} and the variables after its step')
    delta, variables = result
  else:
    delta = fisher
  if not isinstance(delta, Mapping):
    raise ValueError(f'fisher must give a dict {{"{FISHER_KEY_PATTERN}": Δ}}; '
                     f'got {type(delta).__name__}')
  return policies.fisher_scores(delta, layout, cfg, variables, 'sum', True), variables


def grow_as_released(student: Layout, variables: Variables | None, cfg: dict, *, strategy: str,
                     goal: float, fisher: Any, key: jax.Array, input_shape: tuple[int, ...],
                     max_iterations: int = MAX_ITERATIONS
                     ) -> tuple[Layout, Variables, History]:
  """The release's ``uniform`` (``--naive``) or ``fisher`` loop from ``student``;
  ``variables`` None (fixed Δ or uniform only): the layout alone."""
  bound = lower_bound(goal)
  stepwise = strategy == 'fisher' and callable(fisher)
  layout, current, history = student, variables, []
  steps = 0

  def densify(cell: int, iteration: int, score, scores) -> bool:
    nonlocal layout, current, steps
    grown, answer = densified_as_released(layout, cell)
    if grown != layout:
      steps += 1
      if stepwise:
        current = transfer_darts(layout, grown, current, cfg, jax.random.fold_in(key, steps),
                                 False, input_shape, rebuild_ops=True)
      layout = grown
      history.append(_entry(iteration, cell, score, layout, scores))
    return answer

  done = False
  for iteration in range(1, max_iterations + 1):
    if strategy == 'uniform':
      for cell in reversed(range(layout.layers)):
        densify(cell, iteration, None, None)
        if layout.state_dict_count() > bound:
          done = True
          break
    else:
      n = layout.state_dict_count()
      scores, current = _estimate(fisher, layout, cfg, current)
      if n < bound:
        for cell in sorted(range(layout.layers), key=lambda i: -scores[i]):
          if densify(cell, iteration, scores[cell], scores):
            break
      done = n > bound
    if done:
      break
  if not done:
    raise ValueError(
        f'release growth did not pass {bound:.0f} (goal {goal:.0f} - {GOAL_SLACK:.1%}) in '
        f'{max_iterations} iterations: it stopped at {layout.state_dict_count()} with cell_groups '
        f'{list(layout.groups)}; lower the goal')
  if not stepwise and variables is not None:
    current = transfer_darts(student, layout, variables, cfg, key, False, input_shape,
                             rebuild_ops=True)
  return layout, current, history


def layout_as_released(student: Layout, *, strategy: str, goal: float,
                       fisher: Mapping[str, Any] | None = None) -> tuple[Layout, History]:
  """The layout :func:`grow_as_released` reaches with fixed Δ (or ``uniform``), without
  weights: ``(layout, history)``."""
  if callable(fisher):
    raise ValueError('layout_as_released takes fixed Δ (a dict), not a callable')
  layout, _, history = grow_as_released(student, None, {}, strategy=strategy, goal=goal,
                                        fisher=fisher, key=jax.random.key(0), input_shape=())
  return layout, history
