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

import importlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
  fields = [f for f in cls.__dataclass_fields__ if f not in ('parent', 'name')]
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(
        f'model.{unknown[0]} is not a field of model {name!r}; allowed: {", ".join(fields)}')
  return cls(**kwargs)


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
