"""The linear embedding heads of CC and CRD."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.connectors._layers import Dtype, torch_bias_init, torch_kernel_init
from distill_jax.losses.features import _normalize

FEAT_DIM = 128  # width of the CRD and CC heads (the release's feat_dim)

def _flat_dense(module: nn.Module, x: jax.Array) -> jax.Array:
  """A dense layer named ``'linear'`` of ``module`` on ``x`` flattened per example."""
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f'{type(module).__name__}: input needs a batch axis and features, '
                     f'got shape {x.shape}.')
  x = x.reshape(x.shape[0], -1)
  return nn.Dense(module.features, kernel_init=torch_kernel_init,
                  bias_init=torch_bias_init(x.shape[-1]), dtype=module.dtype,
                  param_dtype=jnp.float32, name='linear')(x)

class LinearEmbed(nn.Module):
  """A linear head on the flattened input: CC's embeddings.

  ``(N, ...) -> (N, features)``, one dense layer with bias on the features of each
  example flattened (RepDistiller ``models/util.py`` ``LinearEmbed``). The release's
  ``train_student.py`` puts one on the student's and one on the teacher's pooled
  embedding (``feat[-1]``, already ``(N, C)``), both of width ``feat_dim=128``, and
  trains *both* with the student: the teacher-side head is learned through the CC
  loss. :func:`distill_jax.losses.cc_loss` stops gradients at its teacher input, so
  a caller that wants the release's behaviour trains the teacher-side head with a
  loss that keeps its output differentiable. Flattening an NHWC map orders the
  features differently from NCHW, which only permutes the rows of the learned
  matrix.

  Attributes:
    features: output width (the release's ``feat_dim``, 128).
    dtype: compute dtype (``None``: promoted from inputs and float32 parameters).
  """

  features: int = FEAT_DIM
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``(N, ...) -> (N, features)``."""
    return _flat_dense(self, x)


class NormalizedEmbed(LinearEmbed):
  """CRD's head: :class:`LinearEmbed` (same attributes), then each row L2-normalised.

  RepDistiller ``crd/criterion.py`` ``Embed`` (a linear layer and ``Normalize(2)``),
  one on each network's pooled embedding, both trained with the student. The release
  divides by the row norm itself, so an all-zero row gives NaN there; here it is
  divided by ``max(norm, 1e-12)`` (zero instead), the same value elsewhere.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``(N, ...) -> (N, features)``, rows of unit norm."""
    return _normalize(_flat_dense(self, x), axis=-1)
