"""Growth settings: strategy/operator names, the ±3% band, step size, argument coercion.

A model config is the plain dict that ``create_model(**model_config)`` takes (an
``ml_collections.ConfigDict`` is accepted and copied into one); variables are
``{'params', 'batch_stats'}``; ``rng`` is a JAX key or an int seed.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from distill_jax.models import names

STRATEGIES: tuple[str, ...] = ('uniform', 'fisher', 'depth')
OPERATORS: tuple[str, ...] = ('widen', 'denser')
# 'band': within ±TOLERANCE of a ratio of the trainable count; 'release': the author's
# release's loop and stopping rule (distill_jax.grow.release).
PROTOCOLS: tuple[str, ...] = ('band', 'release')
# Allowed relative deviation of the grown parameter count from the target.
TOLERANCE = 0.03
# A Fisher widening step adds this fraction of the chosen cell's current width.
WIDEN_STEP = 0.25
DEFAULT_MAX_STEPS = 200

Variables = dict[str, Any]
FisherFn = Callable[[dict, Variables], Mapping[str, Any]]
History = list[dict[str, Any]]

# The keys of a Fisher estimate, 'cell{i}/output' (names.cell_output), as messages spell them.
FISHER_KEY_PATTERN = names.cell_output('{i}')  # type: ignore[arg-type]

SUPPORTED = ('supported: darts (strategies uniform, fisher, depth; operators widen, denser), '
             'wrn (strategy uniform, operator widen)')


def plain_config(model_config: Any) -> dict:
  """A plain dict copy of a model config (dict or ml_collections ConfigDict)."""
  if hasattr(model_config, 'to_dict'):
    cfg = dict(model_config.to_dict())
  elif isinstance(model_config, Mapping):
    cfg = dict(model_config)
  else:
    raise ValueError(
        f'model_config must be a dict or ConfigDict; got {type(model_config).__name__}')
  if 'name' not in cfg:
    raise ValueError('model_config lacks "name"; allowed: a config accepted by create_model')
  for key in ('cell_channels', 'cell_groups'):
    if cfg.get(key) is not None:
      cfg[key] = tuple(cfg[key])
  return cfg


def as_key(rng: Any) -> jax.Array:
  """A JAX key from a key, an int seed or None (key 0)."""
  if rng is None:
    return jax.random.key(0)
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    return jax.random.key(int(rng))
  return rng


def in_band(n: float, target: float) -> bool:
  """Whether the count ``n`` lies within ``±TOLERANCE`` of ``target``."""
  return abs(n - target) <= TOLERANCE * target

