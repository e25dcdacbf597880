"""Knowledge-distillation losses: logits, attention, feature maps, relations.

Pure functions on arrays; they import only JAX, NumPy and optax (no Flax, no
configuration, no TensorFlow), so other JAX projects can use them directly. All
of them work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. Inputs of any
floating dtype are accepted; anything narrower than float32 (bfloat16, float16)
is cast to float32 before softmaxes and reductions, so losses come back as
float32 (float64 inputs, with x64 enabled, stay float64).

Every loss of the classification, attention and combined groups below has a
per-example core, returning one value per example (shape ``(N,)``), and a
batch-mean wrapper with the historical name, which is exactly the mean of its
core over the batch:

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

The losses of the distillation zoo below follow the authors' public releases
(each docstring names the file, and says where the release departs from the
paper). They are batch-level: each returns one scalar, and the relational
ones (SP, RKD, PKT, CC, DIST's intra-class term) compare the examples of a
batch with each other, so they have no per-example core. None of them is
wired into :func:`distillation_loss` or the trainer. Feature maps are NHWC;
the value equals the release's on the same data in its NCHW layout.

Logits (:mod:`distill_jax.losses.logits`):

* :func:`dkd_loss`: decoupled KD (Zhao et al., 2022), ``alpha * TCKD + beta *
  NCKD``, as mdistiller computes it (without its trainer's warm-up factor).
* :func:`dist_loss`: DIST (Huang et al., 2022), inter- and intra-class
  Pearson-correlation relations, both times ``T**2``.

Feature maps (sequences of ``(N, H, W, C)``, :mod:`distill_jax.losses.features`):

* :func:`sp_loss`: similarity preserving (Tung & Mori, 2019), row-normalised
  batch Gram matrices.
* :func:`nst_loss`: neuron selectivity transfer (Huang & Wang, 2017), MMD^2
  with the squared polynomial kernel.
* :func:`fsp_loss`: flow of solution procedure (Yim et al., 2017), FSP
  matrices of consecutive maps.
* :func:`fitnet_loss`: FitNet hint MSE (Romero et al., 2015) of an already
  regressed student map.

Embeddings (``(N, D)``, :mod:`distill_jax.losses.embeddings`):

* :func:`rkd_loss`: relational KD (Park et al., 2019), distance and angle
  terms.
* :func:`pkt_loss`: probabilistic knowledge transfer (Passalis & Tefas, 2018).
* :func:`cc_loss`: correlation congruence as RepDistiller's release computes
  it (which differs from the paper of Peng et al., 2019).

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

  Zhao, Cui, Song, Qiu & Liang, `Decoupled knowledge distillation
  <https://arxiv.org/abs/2203.08679>`_, CVPR 2022; released code:
  https://github.com/megvii-research/mdistiller
  (``mdistiller/distillers/DKD.py``).

  Huang, You, Wang, Qian & Xu, `Knowledge distillation from a stronger
  teacher <https://arxiv.org/abs/2205.10536>`_, NeurIPS 2022; released code:
  https://github.com/hunto/image_classification_sota
  (``lib/models/losses/dist_kd.py``).

  Tung & Mori, `Similarity-preserving knowledge distillation
  <https://arxiv.org/abs/1907.09682>`_, ICCV 2019.

  Huang & Wang, `Like what you like: knowledge distill via neuron selectivity
  transfer <https://arxiv.org/abs/1707.01219>`_, 2017.

  Yim, Joo, Bae & Kim, A gift from knowledge distillation: fast optimization,
  network minimization and transfer learning, CVPR 2017.

  Romero et al., `FitNets: hints for thin deep nets
  <https://arxiv.org/abs/1412.6550>`_, ICLR 2015.

  Park, Kim, Lu & Cho, `Relational knowledge distillation
  <https://arxiv.org/abs/1904.05068>`_, CVPR 2019.

  Passalis & Tefas, `Learning deep representations with probabilistic
  knowledge transfer <https://arxiv.org/abs/1803.10837>`_, ECCV 2018.

  Peng et al., `Correlation congruence for knowledge distillation
  <https://arxiv.org/abs/1904.01802>`_, ICCV 2019.

  The releases of the last seven are the files ``SP.py``, ``NST.py``,
  ``FSP.py``, ``FitNet.py``, ``RKD.py``, ``PKT.py`` and ``CC.py`` of
  RepDistiller's ``distiller_zoo/`` (https://github.com/HobbitLong/RepDistiller).

Layout (everything public is re-exported here, so import from
``distill_jax.losses``):

* :mod:`distill_jax.losses.classification`: :func:`cross_entropy`,
  :func:`soft_kl`, :func:`kd_loss` and their per-example cores.
* :mod:`distill_jax.losses.attention`: :func:`attention_map`,
  :func:`at_layer_losses`, :func:`at_distance_per_example`, :func:`at_loss`,
  their per-example cores and :data:`AT_FORMS`.
* :mod:`distill_jax.losses.distillation`: :func:`distillation_loss`, its
  per-example core and :data:`METHODS`.
* :mod:`distill_jax.losses.logits`: :func:`dkd_loss`, :func:`dist_loss`.
* :mod:`distill_jax.losses.features`: :func:`sp_loss`, :func:`nst_loss`,
  :func:`fsp_loss`, :func:`fitnet_loss`.
* :mod:`distill_jax.losses.embeddings`: :func:`rkd_loss`, :func:`pkt_loss`,
  :func:`cc_loss`.
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
from distill_jax.losses.embeddings import cc_loss
from distill_jax.losses.embeddings import pkt_loss
from distill_jax.losses.embeddings import rkd_loss
from distill_jax.losses.features import fitnet_loss
from distill_jax.losses.features import fsp_loss
from distill_jax.losses.features import nst_loss
from distill_jax.losses.features import sp_loss
from distill_jax.losses.logits import dist_loss
from distill_jax.losses.logits import dkd_loss

__all__ = (
    'AT_FORMS',
    'METHODS',
    'at_distance_per_example',
    'at_layer_losses',
    'at_layer_losses_per_example',
    'at_loss',
    'at_loss_per_example',
    'attention_map',
    'cc_loss',
    'cross_entropy',
    'cross_entropy_per_example',
    'dist_loss',
    'distillation_loss',
    'distillation_loss_per_example',
    'dkd_loss',
    'fitnet_loss',
    'fsp_loss',
    'kd_loss',
    'kd_loss_per_example',
    'nst_loss',
    'pkt_loss',
    'rkd_loss',
    'soft_kl',
    'soft_kl_per_example',
    'sp_loss',
)
