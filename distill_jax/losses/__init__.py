"""Knowledge-distillation and attention-transfer losses.

Pure functions on arrays; they import only JAX, NumPy and optax (no Flax, no
configuration, no TensorFlow), so other JAX projects can use them directly. All
of them work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. Inputs of any
floating dtype are accepted; anything narrower than float32 (bfloat16, float16)
is cast to float32 before softmaxes and reductions, so losses come back as
float32 (float64 inputs, with x64 enabled, stay float64).

Every loss has a per-example core, returning one value per example (shape
``(N,)``), and a batch-mean wrapper with the historical name, which is exactly
the mean of its core over the batch:

* :func:`cross_entropy_per_example` -> :func:`cross_entropy`
* :func:`soft_kl_per_example` -> :func:`soft_kl`
* :func:`kd_loss_per_example` -> :func:`kd_loss`
* :func:`at_layer_losses_per_example` -> :func:`at_layer_losses`
* :func:`at_distance_per_example` -> ``sum(at_layer_losses(...))``
* :func:`at_loss_per_example` -> :func:`at_loss`
* :func:`distillation_loss_per_example` -> :func:`distillation_loss`

Classification losses (logits ``(N, K)``, integer labels ``(N,)``; any leading
batch shape ``(..., K)`` works: the cores return that shape, the wrappers
average over all of it):

* :func:`cross_entropy`: mean softmax cross-entropy.
* :func:`soft_kl`: ``KL(softmax(t / T) || softmax(s / T))``, batch mean.
* :func:`kd_loss`: Hinton et al.'s objective,
  ``(1 - alpha) * CE + alpha * T**2 * soft_kl``.

Attention transfer (activations ``(N, H, W, C)``, channels last):

* :func:`attention_map`: L2-normalised channel mean of ``|a|**p``, ``(N, H*W)``.
* :func:`at_layer_losses`: the per-layer attention-transfer terms, without beta.
* :func:`at_loss`: ``beta * sum(at_layer_losses(...))``.

Combined objective:

* :func:`distillation_loss`: the loss the trainer optimises for each method
  (``'none'``, ``'kd'``, ``'at'``, ``'kd_at'``, ``'hard'``) plus its terms for
  logging.

Teachers never receive gradients: every teacher input goes through
``jax.lax.stop_gradient``. Only shapes (and static string choices) are checked
here; ranges of hyper-parameters (``temperature > 0``, ``alpha`` in
``[0, 1]``, ``beta >= 0``, ``p > 0``) are the caller's responsibility (the
configuration validation checks them), so they may be traced values.

References:
  Hinton, Vinyals & Dean, `Distilling the knowledge in a neural network
  <https://arxiv.org/abs/1503.02531>`_, NIPS Deep Learning Workshop, 2015.

  Zagoruyko & Komodakis, `Paying more attention to attention: improving the
  performance of convolutional neural networks via attention transfer
  <https://arxiv.org/abs/1612.03928>`_, ICLR 2017; released code:
  https://github.com/szagoruyko/attention-transfer.

Layout (everything public is re-exported here, so import from
``distill_jax.losses``):

* :mod:`distill_jax.losses.classification`: :func:`cross_entropy`,
  :func:`soft_kl`, :func:`kd_loss` and their per-example cores.
* :mod:`distill_jax.losses.attention`: :func:`attention_map`,
  :func:`at_layer_losses`, :func:`at_distance_per_example`, :func:`at_loss`,
  their per-example cores and :data:`AT_FORMS`.
* :mod:`distill_jax.losses.distillation`: :func:`distillation_loss`, its
  per-example core and :data:`METHODS`.
* ``distill_jax.losses._checks``: private shape, dtype and container checks.
"""

from distill_jax.losses.attention import AT_FORMS
from distill_jax.losses.attention import at_distance_per_example
from distill_jax.losses.attention import at_layer_losses
from distill_jax.losses.attention import at_layer_losses_per_example
from distill_jax.losses.attention import at_loss
from distill_jax.losses.attention import at_loss_per_example
from distill_jax.losses.attention import attention_map
from distill_jax.losses.classification import cross_entropy
from distill_jax.losses.classification import cross_entropy_per_example
from distill_jax.losses.classification import kd_loss
from distill_jax.losses.classification import kd_loss_per_example
from distill_jax.losses.classification import soft_kl
from distill_jax.losses.classification import soft_kl_per_example
from distill_jax.losses.distillation import METHODS
from distill_jax.losses.distillation import distillation_loss
from distill_jax.losses.distillation import distillation_loss_per_example

__all__ = (
    'AT_FORMS',
    'METHODS',
    'at_distance_per_example',
    'at_layer_losses',
    'at_layer_losses_per_example',
    'at_loss',
    'at_loss_per_example',
    'attention_map',
    'cross_entropy',
    'cross_entropy_per_example',
    'distillation_loss',
    'distillation_loss_per_example',
    'kd_loss',
    'kd_loss_per_example',
    'soft_kl',
    'soft_kl_per_example',
)
