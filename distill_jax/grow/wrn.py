"""WRN growth: the integer widen factor closest to the target, student weights in leading slices.

Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016,
arXiv:1605.07146) support ``strategy='uniform'`` with ``operator='widen'`` only: the
integer ``widen_factor`` whose parameter count is closest to the target (no ±3%
guarantee; a warning outside it), the student's weights copied into the leading slices
of every tensor (prefix layout), new shortcut convolutions fresh.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from distill_jax.grow.settings import SUPPORTED, TOLERANCE, History, Variables, in_band
from distill_jax.models import count_params, create_model, init_variables, param_shapes


def grow_wrn(cfg: dict, variables: Variables, *, strategy: str, ratio: float,
             preserving: bool, key: jax.Array, input_shape: tuple[int, ...], operator: str
             ) -> tuple[dict, Variables, History]:
  """:func:`distill_jax.grow.grow_with_history` for a WRN student (arguments checked)."""
  if strategy != 'uniform' or operator != 'widen' or preserving:
    raise ValueError(f'wrn supports only strategy uniform, operator widen, function_preserving '
                     f'False; got strategy={strategy!r}, operator={operator!r}, '
                     f'function_preserving={preserving}; {SUPPORTED}')
  n0 = count_params(variables['params'])
  target = ratio * n0
  k0 = int(cfg.get('widen_factor', 2))
  best = None
  for k in range(k0 + 1, 64 * k0 + 1):
    shapes = param_shapes(create_model(**{**cfg, 'widen_factor': k}), input_shape)
    n = count_params(shapes['params'])
    if best is None or abs(n - target) < abs(best[1] - target):
      best = (k, n)
    if n > target:
      break
  new_cfg = {**cfg, 'widen_factor': best[0]}
  fresh = init_variables(create_model(**new_cfg), key, input_shape)
  result = {}
  for collection in ('params', 'batch_stats'):
    flat_old = traverse_util.flatten_dict(variables.get(collection, {}))
    flat_new = traverse_util.flatten_dict(fresh.get(collection, {}))
    out = {}
    for k, leaf in flat_new.items():
      leaf = np.array(leaf, copy=True)
      if k in flat_old:
        old = np.asarray(flat_old[k])
        if old.ndim != leaf.ndim or any(a > b for a, b in zip(old.shape, leaf.shape)):
          raise ValueError(f'wrn: cannot copy {collection}/{"/".join(k)} of shape {old.shape} '
                           f'into {leaf.shape}')
        leaf[tuple(slice(0, s) for s in old.shape)] = old
      out[k] = jnp.asarray(leaf)
    result[collection] = traverse_util.unflatten_dict(out)
  n = count_params(result['params'])
  if not in_band(n, target):
    warnings.warn(f'wrn widen_factor {best[0]} gives {n} parameters, outside ±{TOLERANCE:.0%} '
                  f'of the target {target:.0f} (integer widen factors only)', stacklevel=3)
  history = [{'step': 1, 'cell': None, 'score': None, 'num_params': n,
              'widen_factor': best[0]}]
  return new_cfg, result, history
