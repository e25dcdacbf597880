"""PyTorch's default initialisers and batch-norm constants, which the releases' layers use."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 in Flax), as in
# distill_jax.models.layers.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# PyTorch's default weight init for conv and linear layers, kaiming_uniform(a=sqrt(5)),
# which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

def torch_bias_init(fan_in: int):
  """PyTorch's default bias init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init

def check_map(x: jax.Array, name: str, where: str) -> None:
  if x.ndim != 4:
    raise ValueError(f'{where}: {name} must be NHWC with 4 dimensions, got shape {x.shape}.')
