"""Building blocks shared by the CIFAR networks (:mod:`wrn`, :mod:`densenet`).

Convolutions have no bias and use explicit PyTorch-style padding (k // 2 on each
side), so strided layers sample the same pixels as the PyTorch releases of the
networks (github.com/szagoruyko/attention-transfer for WRN, Zagoruyko & Komodakis;
github.com/liuzhuang13/DenseNet for DenseNet-BC, Huang et al. 2017). Every layer
computes in ``dtype`` and keeps float32 parameters. :func:`batch_norm` serves these
networks and the DARTS ones (``affine=False`` in the search supernet).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import names

Dtype = Any

# He et al. (2015, arXiv:1502.01852) normal initialisation over the fan-out, as in the
# DenseNet and torchvision releases.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, name: str) -> nn.Conv:
  """A bias-free ``kernel``x``kernel`` convolution padded by ``kernel // 2``."""
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      use_bias=False, kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32, name=name)


# Batch-norm constants as PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5),
# used by every network here and by the DARTS release (quark0/darts).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(*, train: bool, affine: bool = True, dtype: Dtype, name: str) -> nn.BatchNorm:
  """Batch norm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5).

  Running statistics live in the ``'batch_stats'`` collection; ``train=True`` uses
  batch statistics and updates them (apply with ``mutable=['batch_stats']``).
  ``affine=False`` drops the learned scale and bias (PyTorch's ``affine=False``, used by
  the DARTS search supernet). Parameters are float32; ``dtype`` is the compute dtype.

  One difference from PyTorch remains: the running variance averages the *biased* batch
  variance (Flax), PyTorch's the unbiased one (times ``n / (n - 1)``, ``n = N * H * W``).
  Training-mode outputs are identical; the running variance is smaller by a factor
  ``1 - 1/n`` in each update's share (2.4e-4 relative at batch 64 on 8x8 maps, 1.5e-5 on
  32x32), which only inference-mode outputs see.
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
      use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=jnp.float32, name=name)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, C)."""
  return jnp.mean(x, axis=(1, 2))


def mark(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
  """Marks an activation for gradient and value read-out; returns ``x`` unchanged.

  Adds ``module.perturb(name, x)`` (collection :data:`names.PERTURBATIONS`: a zero
  variable whose gradient is the gradient of ``x``) and sows the value under the same
  name in :data:`names.INTERMEDIATES`. Both are no-ops unless their collection is passed
  to / mutable in ``apply``.
  """
  x = module.perturb(name, x, collection=names.PERTURBATIONS)
  module.sow(names.INTERMEDIATES, name, x)
  return x


def check_depth(model: str, depth: int) -> None:
  """Raises a one-line ValueError unless ``depth`` is 6n + 4 with n >= 1."""
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
    raise ValueError(
        f'model.depth={depth!r} is not allowed for {model}; depth must be 6n+4 with n >= 1 '
        f'(10, 16, 22, 28, 40, 100, ...)')


def check_range(model: str, field: str, value: Any, low: float, high: float,
                allowed: str) -> None:
  """Raises a one-line ValueError unless ``low <= value <= high``."""
  if not low <= value <= high:
    raise ValueError(f'model.{field}={value!r} is not allowed for {model}; {field} must be {allowed}')
