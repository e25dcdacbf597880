"""The public API of growing a trained student into a teacher about twice its size.

The seed paper (Whettam 2020, "Finding the Right Teacher for a Difficult Student",
section "Fisher Distillation"; the author's release github.com/DWhettam/
FisherDistillation) builds a bespoke teacher for a NAS student by scaling the student
up: either every cell uniformly, or cell by cell where the per-channel Fisher
information (Theis et al. 2018, arXiv:1801.05787) says the network is most sensitive.
This package implements both for the DARTS evaluation network
(:mod:`distill_jax.models.darts`; Liu et al. 2019, github.com/quark0/darts), plus a
deeper-network baseline, the release's "denser" operator, Net2WiderNet function
preservation (Chen, Goodfellow & Shlens 2016, arXiv:1511.05641) and a uniform widening
of WRN.

Entry points::

  grown_config, grown_variables = grow(model_config, variables, strategy='fisher',
                                       fisher=fisher_fn, rng=key)
  config, variables, history = grow_with_history(...)    # same arguments
  save_history(path, history)                              # JSON

A model config is the plain dict that ``create_model(**model_config)`` takes; variables
are ``{'params', 'batch_stats'}``. For DARTS, ``num_params`` is the number of trainable
parameters *without* the auxiliary head (the figure the DARTS release reports; the
paper's setting trains without it); the target is ``target_param_ratio *
num_params(student)``.

Modules:

- :mod:`~distill_jax.grow.settings`: strategy / operator names, the ±3% band, argument
  coercion;
- :mod:`~distill_jax.grow.layout`: DARTS layout arithmetic (width multiples, channel
  blocks, widened / densified layouts); the parameter count and layer names live in
  :mod:`distill_jax.models.darts_layout`;
- :mod:`~distill_jax.grow.policies`: selection over layouts (uniform widths, Fisher
  choice of cell, denser order, depth);
- :mod:`~distill_jax.grow.transfer`: weight surgery (widening, Net2WiderNet, denser
  kernels);
- :mod:`~distill_jax.grow.darts`: the DARTS growth loops;
- :mod:`~distill_jax.grow.release`: the author's release's loop, exactly (``protocol=
  'release'``);
- :mod:`~distill_jax.grow.wrn`: WRN growth;
- :mod:`~distill_jax.grow.history`: the per-step history and its JSON file.

Everything else (DenseNet-BC, WRN ``fisher``/``depth``/``denser``, function-preserving
WRN) raises a one-line ``ValueError``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from distill_jax.grow.darts import grow_darts
from distill_jax.grow.history import load_history, save_history
from distill_jax.grow.layout import Layout
from distill_jax.grow.policies import grown_depth_config
from distill_jax.grow.settings import (DEFAULT_MAX_STEPS, OPERATORS, PROTOCOLS, STRATEGIES,
                                       SUPPORTED,
                                       TOLERANCE, WIDEN_STEP, FisherFn, History, Variables,
                                       as_key, plain_config)
from distill_jax.grow.wrn import grow_wrn

__all__ = ['DEFAULT_MAX_STEPS', 'OPERATORS', 'PROTOCOLS', 'STRATEGIES', 'TOLERANCE', 'WIDEN_STEP',
           'FisherFn', 'History', 'Layout', 'Variables', 'grow', 'grow_with_history',
           'grown_depth_config', 'load_history', 'save_history']


def grow_with_history(model_config: Any, variables: Variables, *, strategy: str,
                      target_param_ratio: float = 2.0,
                      fisher: FisherFn | Mapping[str, Any] | None = None,
                      function_preserving: bool = False, rng: Any = None,
                      input_shape: Sequence[int] = (1, 32, 32, 3), operator: str = 'widen',
                      max_steps: int = DEFAULT_MAX_STEPS, layers: int | None = None,
                      protocol: str = 'band', param_goal: float | None = None
                      ) -> tuple[dict, Variables, History]:
  """Grows a trained student; returns ``(grown_config, grown_variables, history)``.

  Args:
    model_config: the student's config (dict or ConfigDict; ``create_model(**config)``).
    variables: the student's ``{'params', 'batch_stats'}``.
    strategy: 'uniform', 'fisher' or 'depth' (:mod:`distill_jax.grow.policies`).
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
    operator: 'widen' (the seed's text) or 'denser' (the release's densifying step; with
      protocol 'band' its order, re-initialisation and stopping rule are this package's,
      with protocol 'release' the release's own).
    max_steps: bound on growth steps of 'fisher' and 'denser'.
    layers: explicit number of cells for strategy 'depth'.
    protocol: 'band' (land within ±3% of ``target_param_ratio`` × the trainable count) or
      'release' (the author's release exactly, :mod:`distill_jax.grow.release`: DARTS,
      operator 'denser', strategy 'uniform' or 'fisher'; stops once the release's
      state-dict measure exceeds 0.975 × the goal; ``fisher`` is a dict or a callable
      returning ``(Δ, variables)``).
    param_goal: the release protocol's absolute goal (its default is
      :data:`~distill_jax.grow.release.RELEASE_GOAL`, 1.4M); None:
      ``target_param_ratio`` × the student's state-dict measure.

  Returns:
    A plain config dict (DARTS: ``cell_channels`` and ``cell_groups`` tuples; 'depth':
    ``layers``), the grown variables and the history, a list of
    ``{'step', 'cell', 'score', 'num_params', ...}`` dicts (one per growth step; ``cell``
    and ``score`` are None for one-shot strategies; ``num_params`` after the step;
    :mod:`distill_jax.grow.history`).

  Raises:
    ValueError: unsupported network / strategy / operator, a Fisher estimate without the
      cell outputs, variables that do not match the config, or a target that cannot be
      reached within ±3% (uniform / fisher widening).
  """
  cfg = plain_config(model_config)
  if strategy not in STRATEGIES:
    raise ValueError(f'strategy={strategy!r} is unknown; allowed: {", ".join(STRATEGIES)}')
  if operator not in OPERATORS:
    raise ValueError(f'operator={operator!r} is unknown; allowed: {", ".join(OPERATORS)}')
  if protocol not in PROTOCOLS:
    raise ValueError(f'protocol={protocol!r} is unknown; allowed: {", ".join(PROTOCOLS)}')
  if param_goal is not None and protocol != 'release':
    raise ValueError(f'param_goal={param_goal!r} applies to protocol release only; '
                     'protocol band uses target_param_ratio')
  if param_goal is not None and not param_goal > 0:
    raise ValueError(f'param_goal={param_goal!r} must be > 0')
  if not target_param_ratio > 1.0:
    raise ValueError(f'target_param_ratio={target_param_ratio!r} must be > 1')
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError('variables must be a dict with "params" and "batch_stats"')
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  key = as_key(rng)
  input_shape = tuple(int(s) for s in input_shape)
  name = cfg['name']
  if name == 'darts':
    return grow_darts(cfg, variables, strategy=strategy, ratio=float(target_param_ratio),
                      fisher=fisher, preserving=bool(function_preserving), key=key,
                      input_shape=input_shape, operator=operator, max_steps=int(max_steps),
                      layers=layers, protocol=protocol, param_goal=param_goal)
  if protocol == 'release':
    raise ValueError(f'protocol release grows DARTS networks only; got model {name!r}')
  if name == 'wrn':
    return grow_wrn(cfg, variables, strategy=strategy, ratio=float(target_param_ratio),
                    preserving=bool(function_preserving), key=key, input_shape=input_shape,
                    operator=operator)
  raise ValueError(f'growing model {name!r} is not supported; {SUPPORTED}')


def grow(model_config: Any, variables: Variables, *, strategy: str,
         target_param_ratio: float = 2.0, fisher: FisherFn | Mapping[str, Any] | None = None,
         function_preserving: bool = False, rng: Any = None,
         input_shape: Sequence[int] = (1, 32, 32, 3), operator: str = 'widen',
         max_steps: int = DEFAULT_MAX_STEPS, layers: int | None = None,
         protocol: str = 'band', param_goal: float | None = None
         ) -> tuple[dict, Variables]:
  """:func:`grow_with_history` without the history: ``(grown_config, grown_variables)``."""
  config, grown, _ = grow_with_history(
      model_config, variables, strategy=strategy, target_param_ratio=target_param_ratio,
      fisher=fisher, function_preserving=function_preserving, rng=rng,
      input_shape=input_shape, operator=operator, max_steps=max_steps, layers=layers,
      protocol=protocol, param_goal=param_goal)
  return config, grown
