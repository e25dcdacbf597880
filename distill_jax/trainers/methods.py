r"""Distillation methods by name: what ``config.distill.method`` trains.

The five methods of :func:`distill_jax.losses.distillation_loss` (``none``, ``kd``,
``at``, ``kd_at``, ``hard``) and the field's other methods without learned parts, each
alone (``'sp'``) or with KD (``'kd_sp'``), as RepDistiller (HobbitLong/RepDistiller,
``train_student.py``, ``helper/loops.py``) combines them:

.. math::
  L = \gamma\,\mathrm{CE} + \alpha T^2 \mathrm{KL}_T + \beta\, w(e)\, L_\text{method},

with :math:`\gamma = 1, \alpha = 0` alone and :math:`\gamma = 1 - \alpha` with KD
(``distill.alpha``, ``distill.temperature``, as for ``'kd'``). :math:`\beta` is
``distill.beta``, or, when it is unset (None), the method's published weight
(:data:`DEFAULT_BETA`: RepDistiller's ``scripts/run_cifar_distill.sh``; DKD and DIST
weigh their loss 1 in their releases). :math:`w(e) = \min(e / \text{warmup}, 1)` at
epoch ``e`` when ``distill.warmup_epochs > 0`` (DKD's warm-up, 20 epochs in mdistiller;
other methods have none), else 1.

What each method compares, as in RepDistiller's loops: SP the student's and teacher's
last attention point (RepDistiller's ``feat[-2]``); NST every attention point
(``feat[1:-1]``, as AT); RKD and PKT the pooled embeddings the classifier reads
(``feat[-1]``; networks sow them as ``intermediates/embedding``); DKD the logits and
labels at ``distill.temperature``; DIST the logits at its release's T = 1.

Methods with learned parts (FitNets' regressor, VID, CRD, CC's embedding heads) and
FSP's two-stage schedule are not offered here yet; their losses are in
:mod:`distill_jax.losses`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from distill_jax import losses


@dataclasses.dataclass(frozen=True)
class Method:
  """A method beyond ``distillation_loss``: what it reads and its loss on those inputs."""
  reads: str        # 'last_point' | 'points' | 'embedding' | 'logits'
  beta: float       # the published weight
  reference: str


# Published weights: RepDistiller scripts/run_cifar_distill.sh (-b), mdistiller
# CFG.DKD (loss weight 1, CE weight 1), image_classification_sota KDLoss (kd_loss_weight 1).
ZOO: dict[str, Method] = {
    'sp': Method('last_point', 3000.0, 'Tung & Mori 2019; RepDistiller SP.py'),
    'nst': Method('points', 50.0, 'Huang & Wang 2017; RepDistiller NST.py'),
    'rkd': Method('embedding', 1.0, 'Park et al. 2019; RepDistiller RKD.py'),
    'pkt': Method('embedding', 30000.0, 'Passalis & Tefas 2018; RepDistiller PKT.py'),
    'dkd': Method('logits', 1.0, 'Zhao et al. 2022; mdistiller DKD.py'),
    'dist': Method('logits', 1.0, 'Huang et al. 2022; image_classification_sota dist_kd.py'),
}
DEFAULT_BETA = {'at': 1e3, 'kd_at': 1e3, **{m: spec.beta for m, spec in ZOO.items()},
                **{f'kd_{m}': spec.beta for m, spec in ZOO.items()}}
NAMES = (*losses.METHODS, *ZOO, *(f'kd_{m}' for m in ZOO))


def zoo_method(method: str) -> str | None:
  """The :data:`ZOO` key of ``method`` (``'kd_sp'`` -> ``'sp'``), None for the others."""
  base = method[3:] if method.startswith('kd_') else method
  return base if base in ZOO else None


def reads(method: str) -> str:
  """What ``method`` needs of the networks beyond logits: ``'points'``, ``'last_point'``,
  ``'embedding'`` or ``'logits'`` (nothing more)."""
  if method in ('at', 'kd_at'):
    return 'points'
  zoo = zoo_method(method)
  return ZOO[zoo].reads if zoo else 'logits'


def beta(distill: ml_collections.ConfigDict) -> float:
  """``distill.beta``, or the method's published weight when it is None."""
  if distill.beta is not None:
    return distill.beta
  return DEFAULT_BETA.get(distill.method, 0.0)


def _method_loss(zoo: str, logits, labels, points, teacher_logits, teacher_points,
                 embeddings, temperature) -> jax.Array:
  if zoo == 'sp':
    return losses.sp_loss(points[-1:], teacher_points[-1:])
  if zoo == 'nst':
    return losses.nst_loss(points, teacher_points)
  if zoo == 'rkd':
    return losses.rkd_loss(*embeddings)
  if zoo == 'pkt':
    return losses.pkt_loss(*embeddings)
  if zoo == 'dkd':
    return losses.dkd_loss(logits, teacher_logits, labels, temperature=temperature)
  return losses.dist_loss(logits, teacher_logits)


def make_zoo_loss(distill: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
  """``loss(logits, labels, points, teacher_logits, teacher_points, *, embeddings, step)
  -> (loss, terms)`` for a :data:`ZOO` method (alone or ``kd_``), terms ``ce``, ``kd``
  (with KD) and the method's own, weighted (``'sp'``...)."""
  zoo = zoo_method(distill.method)
  with_kd = distill.method.startswith('kd_')
  alpha, temperature, weight = distill.alpha, distill.temperature, beta(distill)
  warmup_steps = distill.warmup_epochs * steps_per_epoch

  def loss(logits, labels, points, teacher_logits, teacher_points, *, embeddings=None,
           step=0):
    if with_kd:
      total, terms = losses.kd_loss(logits, teacher_logits, labels, alpha=alpha,
                                    temperature=temperature), {}
      terms['ce'] = losses.cross_entropy(logits, labels)
      terms['kd'] = total - (1.0 - alpha) * terms['ce']
    else:
      total = losses.cross_entropy(logits, labels)
      terms = {'ce': total}
    ramp = jnp.minimum(step / warmup_steps, 1.0) if warmup_steps else 1.0
    terms[zoo] = weight * ramp * _method_loss(zoo, logits, labels, points, teacher_logits,
                                              teacher_points, embeddings, temperature)
    return total + terms[zoo], terms
  return loss
