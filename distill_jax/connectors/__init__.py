r"""The learned parts of FitNets, VID, CC and CRD: regressors, heads and CRD's memory.

:mod:`distill_jax.losses` holds pure losses without parameters. Four methods of the
distillation zoo also train something besides the student: a module that maps the
student's features into the teacher's space, or a memory of past embeddings. Those
parts live here, translated from the authors' PyTorch release (NCHW) to Flax linen
and NHWC:

* :class:`ConvRegressor`: FitNets' hint regressor (Romero et al., 2015), as
  RepDistiller's ``ConvReg``; its output goes to
  :func:`distill_jax.losses.fitnet_loss`.
* :class:`VIDRegressor` and :func:`vid_loss`: variational information distillation
  (Ahn et al., 2019), the per-point regressor with its learned per-channel variance,
  and the Gaussian negative log-likelihood of the teacher's map under it.
* :class:`LinearEmbed`: the linear heads that correlation congruence (Peng et al.,
  2019) puts on both networks before :func:`distill_jax.losses.cc_loss`.
* :class:`NormalizedEmbed`, :func:`init_crd_memory`, :func:`sample_negatives`,
  :func:`crd_loss` and :func:`update_crd_memory`: contrastive representation
  distillation (Tian et al., 2020), its L2-normalised heads and its memory bank held as
  plain arrays (no Flax state), so that a training step can be a pure function.

A CRD step, given the teacher's and student's penultimate features ``f_t`` and ``f_s``
of the examples ``indices`` (their dataset indices) with labels ``labels``::

  contrast = sample_negatives(key, labels, indices, class_of_example, NCE_K)
  emb_s = NormalizedEmbed().apply(head_s, f_s)
  emb_t = NormalizedEmbed().apply(head_t, jax.lax.stop_gradient(f_t))
  loss, new_z = crd_loss(emb_s, emb_t, memory, indices, contrast)
  # with the same embeddings (e.g. the aux output of the differentiated function):
  memory = update_crd_memory({**memory, **new_z}, indices, emb_s, emb_t)

The modules keep float32 parameters; ``dtype`` is their compute dtype (``None``: the
promoted dtype of inputs and parameters) and they run at the default matmul precision,
as the networks of :mod:`distill_jax.models` do (the losses run at
``Precision.HIGHEST``). Weights and biases are initialised as
PyTorch's defaults (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), as the release's layers
are; batch norm has PyTorch's defaults (momentum 0.1 there is 0.9 in Flax, epsilon
1e-5). The losses return float32 scalars for inputs of at most 32 bits.

References:
  Romero et al., `FitNets: hints for thin deep nets
  <https://arxiv.org/abs/1412.6550>`_, ICLR 2015.

  Ahn, Hu, Damianou, Lawrence & Dai, `Variational information distillation for
  knowledge transfer <https://arxiv.org/abs/1904.05835>`_, CVPR 2019.

  Peng et al., `Correlation congruence for knowledge distillation
  <https://arxiv.org/abs/1904.01802>`_, ICCV 2019.

  Tian, Krishnan & Isola, `Contrastive representation distillation
  <https://arxiv.org/abs/1910.10699>`_, ICLR 2020.

  The release is RepDistiller (https://github.com/HobbitLong/RepDistiller):
  ``models/util.py`` (``ConvReg``, ``LinearEmbed``), ``distiller_zoo/VID.py``
  (``VIDLoss``), ``distiller_zoo/CC.py``, ``crd/criterion.py`` (``CRDLoss``,
  ``ContrastLoss``, ``Embed``), ``crd/memory.py`` (``ContrastMemory``),
  ``dataset/cifar100.py`` (``CIFAR100InstanceSample``) and ``train_student.py``
  (which builds them and sets the defaults below).
"""

from distill_jax.connectors._layers import BN_EPSILON, BN_MOMENTUM
from distill_jax.connectors.crd import CRD_EPS, NCE_K, NCE_M, NCE_T, Z_UNSET
from distill_jax.connectors.crd import crd_loss, init_crd_memory, sample_negatives
from distill_jax.connectors.crd import update_crd_memory
from distill_jax.connectors.heads import FEAT_DIM, LinearEmbed, NormalizedEmbed
from distill_jax.connectors.hints import VID_EPS, VID_INIT_PRED_VAR, ConvRegressor
from distill_jax.connectors.hints import VIDRegressor, vid_loss

__all__ = [
    'BN_EPSILON', 'BN_MOMENTUM', 'CRD_EPS', 'FEAT_DIM', 'NCE_K', 'NCE_M', 'NCE_T', 'VID_EPS',
    'VID_INIT_PRED_VAR', 'Z_UNSET', 'ConvRegressor', 'LinearEmbed', 'NormalizedEmbed',
    'VIDRegressor', 'crd_loss', 'init_crd_memory', 'sample_negatives', 'update_crd_memory',
    'vid_loss',
]
