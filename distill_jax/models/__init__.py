"""CIFAR networks in Flax linen, chosen by name.

Every network is called as ``model.apply(variables, x, train=...)`` on NHWC images
of any size and channel count and returns ``(logits, attention_points)``, where
``attention_points`` is a tuple of the three stage outputs (32, 16 and 8 px on
CIFAR), so any two networks pair for attention transfer.

``variables['params']`` holds exactly the trainable parameters and
``variables['batch_stats']`` the batch-norm running statistics. Networks also mark
their block outputs with ``Module.perturb`` (collection ``'perturbations'``), which is
a no-op unless that collection is passed to ``apply``; it is how per-channel Fisher
information reads activation gradients. :func:`init_variables` leaves it out.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax import genotypes

# name -> "module:attribute" of a flax.linen.Module class; imported lazily.
_REGISTRY: dict[str, str] = {
    'wrn': 'distill_jax.models.wrn:WideResNet',
    'densenet_bc': 'distill_jax.models.densenet:DenseNetBC',
    'darts': 'distill_jax.models.darts:DartsNetwork',
}


def model_names() -> list[str]:
  """Names accepted by :func:`create_model`."""
  return sorted(_REGISTRY)


def model_class(name: str) -> type[nn.Module]:
  """The Flax module class registered under ``name``."""
  if name not in _REGISTRY:
    raise ValueError(
        f'model.name={name!r} is not a known network; known: {", ".join(model_names())}')
  module_name, attr = _REGISTRY[name].split(':')
  return getattr(importlib.import_module(module_name), attr)


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered network, e.g. ``create_model('wrn', depth=16, widen_factor=2)``.

  A model config is this call's keyword arguments including ``name``, so
  ``create_model(**config.model)`` works. Unknown names or fields fail with one line
  naming the allowed values.
  """
  cls = model_class(name)
  _check_known_fields(cls, name, kwargs)
  return cls(**kwargs)


def _check_known_fields(cls: type[nn.Module], name: str, kwargs: dict) -> None:
  fields = [f for f in cls.__dataclass_fields__ if f not in ('parent', 'name')]
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(
        f'model.{unknown[0]} is not a field of model {name!r}; allowed: {", ".join(fields)}')


def _fields(cls: type[nn.Module], kwargs: dict) -> dict:
  """The network's fields: the dataclass defaults overridden by ``kwargs``."""
  out = {f: d.default for f, d in cls.__dataclass_fields__.items()
         if f not in ('parent', 'name') and d.default is not dataclasses.MISSING}
  return {**out, **kwargs}


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ValueError(f'model.{field}={value!r} is invalid: {allowed}')


def _is_int(value: Any, minimum: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_int(f: dict, field: str, minimum: int = 1) -> None:
  _require(_is_int(f[field], minimum), field, f[field], f'must be an integer >= {minimum}')


def _check_fraction(f: dict, field: str, low_open: bool = False, high_closed: bool = False) -> None:
  """A finite number in [0, 1) (``low_open``: (0, ...; ``high_closed``: ..., 1])."""
  v = f[field]
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
      (v > 0 if low_open else v >= 0) and (v <= 1 if high_closed else v < 1))
  _require(ok, field, v, f'must be in {"(" if low_open else "["}0, 1{"]" if high_closed else ")"}')


def _check_depth(f: dict, family: str, why: str) -> None:
  d = f['depth']
  _require(_is_int(d, 10) and (d - 4) % 6 == 0, 'depth', d,
           f'{family} depth must be 6n+4 with n >= 1 ({why}): 10, 16, 22, 28, 40, 100, ...')


def _check_wrn(f: dict) -> None:
  _check_depth(f, 'WRN', 'n basic blocks of 2 convolutions per group')
  _check_int(f, 'widen_factor')
  _check_fraction(f, 'dropout_rate')


def _check_densenet(f: dict) -> None:
  _check_depth(f, 'DenseNet-BC', 'n bottleneck layers of 2 convolutions per block')
  _check_int(f, 'growth_rate')
  _check_fraction(f, 'compression', low_open=True, high_closed=True)
  n, k, channels = (f['depth'] - 4) // 6, f['growth_rate'], 2 * f['growth_rate']
  for i in range(2):  # each transition keeps floor(channels * compression) >= 1 of them
    channels = math.floor((channels + n * k) * f['compression'])
    _require(channels >= 1, 'compression', f['compression'],
             f'transition {i} would keep {channels} channels; use a larger compression')


def _check_darts(f: dict) -> None:
  _check_int(f, 'layers', 3)
  _check_int(f, 'init_channels')
  _check_int(f, 'stem_multiplier')
  _check_fraction(f, 'drop_path_prob')
  _require(isinstance(f['auxiliary'], bool), 'auxiliary', f['auxiliary'], 'must be True or False')
  from distill_jax.models import darts_ops  # pylint: disable=g-import-not-at-top
  _require(f['impl'] in darts_ops.IMPLS, 'impl', f['impl'], 'allowed: ' + ', '.join(darts_ops.IMPLS))
  genotype = f['genotype']
  if not isinstance(genotype, genotypes.Genotype):
    try:
      genotypes.get_genotype(genotype)
    except ValueError as e:
      msg = str(e)
      prefix = f'genotype={genotype!r} '
      raise ValueError('model.' + msg if msg.startswith(prefix) else
                       f'model.genotype={genotype!r} is invalid: {msg}') from None


# name -> the checks of its fields (see check_model).
_FIELD_CHECKS = {'wrn': _check_wrn, 'densenet_bc': _check_densenet, 'darts': _check_darts}


def check_model(name: str, **kwargs: Any) -> nn.Module:
  """:func:`create_model` after checking what the network's ``init`` would fail on later
  (sizes, types, the DARTS genotype and per-cell channels/groups); computes nothing.

  Raises a one-line ValueError starting ``model.FIELD=VALUE``.
  """
  cls = model_class(name)
  _check_known_fields(cls, name, kwargs)
  f = _fields(cls, kwargs)
  _check_int(f, 'num_classes')
  _FIELD_CHECKS.get(name, lambda f: None)(f)
  model = cls(**kwargs)
  if name == 'darts':
    model.resolved_cell_groups()  # cell_channels, cell_groups: one-line ValueErrors
  return model


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  """``'float32'`` or ``'bfloat16'`` -> the dtype a model's ``dtype`` field takes."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'compute_dtype={name!r}; allowed: {", ".join(COMPUTE_DTYPES)}')
  return COMPUTE_DTYPES[name]


def init_variables(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
  """Initialises ``{'params', 'batch_stats'}`` for NHWC inputs of ``input_shape``.

  Runs eagerly (not under ``jit``): compiling ``init`` of a deep network costs far
  more than running it once. ``input_shape`` is ``(batch, height, width, channels)``.
  """
  x = jnp.zeros(input_shape, jnp.float32)
  variables = model.init(rng, x, train=False)
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (or in its shape structs)."""
  return int(sum(math.prod(x.shape) if hasattr(x, 'shape') else 0 for x in jax.tree.leaves(params)))


def param_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
  """``{'params', 'batch_stats'}`` as ``jax.ShapeDtypeStruct`` trees, without compute."""
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False))
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
