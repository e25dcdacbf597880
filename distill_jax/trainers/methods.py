r"""Distillation methods by name: what ``config.distill.method`` trains.

The five methods of :func:`distill_jax.losses.distillation_loss` (``none``, ``kd``,
``at``, ``kd_at``, ``hard``) and the field's other methods, each alone (``'sp'``) or
with KD (``'kd_sp'``), as RepDistiller (HobbitLong/RepDistiller, ``train_student.py``,
``helper/loops.py``) combines them:

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

Methods with learned parts (:class:`Connector`, modules of :mod:`distill_jax.connectors`
trained with the student by the same optimiser, checkpointed with it and not counted in
its parameters): FitNets (``'fitnet'``) regresses the student's middle attention point
(RepDistiller's ``hint_layer=2``, ``feat[2]``) onto the teacher's with a
:class:`~distill_jax.connectors.ConvRegressor` and takes the mean squared difference; VID
(``'vid'``) puts a :class:`~distill_jax.connectors.VIDRegressor` on every attention point
(``feat[1:-1]``) and sums :func:`~distill_jax.connectors.vid_loss` over them; CC (``'cc'``)
projects both pooled embeddings with a :class:`~distill_jax.connectors.LinearEmbed` of
width 128 and scores them with :func:`distill_jax.losses.cc_loss`, training the
teacher-side head too, as the release does; CRD (``'crd'``) projects them with two
:class:`~distill_jax.connectors.NormalizedEmbed` heads and contrasts them against a
momentum memory bank of every training example (:func:`init_memory`, kept in the train
state, sharded over the devices by rows and checkpointed with it): each step draws
``distill.nce_k`` negatives of other classes per example (the release's ``'exact'``
mode), scores with :func:`~distill_jax.connectors.crd_loss` at ``distill.nce_t`` and
updates the batch's rows with momentum ``distill.nce_m``
(:func:`~distill_jax.connectors.update_crd_memory`). FSP (``'fsp'``) compares the flow
matrices of consecutive attention points (RepDistiller pairs the stem's output with the
first group too; the networks here expose the group outputs only).

An initialisation stage (``distill.init_epochs > 0``, FSP and FitNets only): the run first
trains every student layer below the classifiers on the method's loss alone
(:func:`make_init_loss`; FitNets with its regressor) for ``init_epochs`` epochs at the
constant learning rate with a fresh SGD, as RepDistiller's ``helper/pretrain.py`` (30
epochs for FSP, ``configs/distill.py:fsp``), then trains as usual from those weights
without the method's term (:func:`make_zoo_loss`), which is how the release trains FSP
and how Romero et al. train FitNets (hints, then KD: ``kd_fitnet``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from distill_jax import connectors
from distill_jax import losses
from distill_jax.models import names


@dataclasses.dataclass(frozen=True)
class Method:
  """A method beyond ``distillation_loss``: what it reads and its loss on those inputs."""
  reads: str        # 'last_point' | 'hint_point' | 'points' | 'embedding' | 'logits'
  beta: float       # the published weight
  reference: str
  learned: bool = False  # trains a Connector with the student


# Published weights: RepDistiller scripts/run_cifar_distill.sh (-b), mdistiller
# CFG.DKD (loss weight 1, CE weight 1), image_classification_sota KDLoss (kd_loss_weight 1).
ZOO: dict[str, Method] = {
    'sp': Method('last_point', 3000.0, 'Tung & Mori 2019; RepDistiller SP.py'),
    'nst': Method('points', 50.0, 'Huang & Wang 2017; RepDistiller NST.py'),
    'fsp': Method('points', 50.0, 'Yim et al. 2017; RepDistiller FSP.py'),
    'rkd': Method('embedding', 1.0, 'Park et al. 2019; RepDistiller RKD.py'),
    'pkt': Method('embedding', 30000.0, 'Passalis & Tefas 2018; RepDistiller PKT.py'),
    'dkd': Method('logits', 1.0, 'Zhao et al. 2022; mdistiller DKD.py'),
    'dist': Method('logits', 1.0, 'Huang et al. 2022; image_classification_sota dist_kd.py'),
    'fitnet': Method('hint_point', 100.0, 'Romero et al. 2015; RepDistiller FitNet.py', True),
    'vid': Method('points', 1.0, 'Ahn et al. 2019; RepDistiller VID.py', True),
    'cc': Method('embedding', 0.02, 'Peng et al. 2019; RepDistiller CC.py', True),
    'crd': Method('embedding', 0.8, 'Tian et al. 2020; RepDistiller crd/', True),
}
# The fields of config.distill that CRD alone reads, with their release defaults.
CRD_FIELDS = {'nce_k': connectors.NCE_K, 'nce_t': connectors.NCE_T, 'nce_m': connectors.NCE_M}
DEFAULT_BETA = {'at': 1e3, 'kd_at': 1e3, **{m: spec.beta for m, spec in ZOO.items()},
                **{f'kd_{m}': spec.beta for m, spec in ZOO.items()}}
NAMES = (*losses.METHODS, *ZOO, *(f'kd_{m}' for m in ZOO))


def zoo_method(method: str) -> str | None:
  """The :data:`ZOO` key of ``method`` (``'kd_sp'`` -> ``'sp'``), None for the others."""
  base = method[3:] if method.startswith('kd_') else method
  return base if base in ZOO else None


def reads(method: str) -> str:
  """What ``method`` needs of the networks beyond logits: ``'points'``, ``'last_point'``,
  ``'hint_point'`` (the middle one), ``'embedding'`` or ``'logits'`` (nothing more)."""
  if method in ('at', 'kd_at'):
    return 'points'
  zoo = zoo_method(method)
  return ZOO[zoo].reads if zoo else 'logits'


def beta(distill: ml_collections.ConfigDict) -> float:
  """``distill.beta``, or the method's published weight when it is None."""
  if distill.beta is not None:
    return distill.beta
  return DEFAULT_BETA.get(distill.method, 0.0)


def is_learned(method: str) -> bool:
  """Whether ``method`` trains a :class:`Connector` with the student."""
  zoo = zoo_method(method)
  return bool(zoo) and ZOO[zoo].learned


def hint_index(num_points: int) -> int:
  """FitNets' hint point: the middle attention point (RepDistiller's ``feat[2]`` of a
  WRN's ``[stem, group 1, group 2, group 3, embedding]``: point 1 of 3)."""
  return num_points // 2


class Connector(nn.Module):
  """The learned part of a method of :data:`ZOO` (``fitnet``, ``vid``, ``cc``, ``crd``):
  its unweighted loss from both networks' attention points and embeddings.

  ``__call__(points, teacher_points, embedding, teacher_embedding, *, train, memory=None,
  labels=None, index=None, key=None) -> (loss, memory)``; the teacher's inputs are
  constants (the caller stops their gradient), the modules' outputs on them are not (CC's
  and CRD's teacher-side heads learn). Shapes are read from the inputs. CRD also takes its
  memory bank (:func:`init_memory`), the batch's ``labels`` and dataset ``index`` and a
  PRNG ``key`` for its negatives, and returns the updated bank (without ``memory`` it
  builds its heads only and returns a zero loss: initialisation); the others return
  ``memory`` None.
  """
  method: str
  nce_k: int = connectors.NCE_K
  nce_t: float = connectors.NCE_T
  nce_m: float = connectors.NCE_M

  @nn.compact
  def __call__(self, points, teacher_points, embedding, teacher_embedding, *,
               train: bool, memory: dict | None = None, labels: jax.Array | None = None,
               index: jax.Array | None = None, key: jax.Array | None = None
               ) -> tuple[jax.Array, dict | None]:
    if self.method == 'fitnet':
      student = points[hint_index(len(points))]
      teacher = teacher_points[hint_index(len(teacher_points))]
      regressed = connectors.ConvRegressor(teacher.shape[-1], teacher.shape[1:3],
                                           name='regressor')(student, train=train)
      return losses.fitnet_loss(regressed, teacher), None
    if self.method == 'vid':
      total = 0.0
      for i, (student, teacher) in enumerate(zip(points, teacher_points)):
        mean, log_scale = connectors.VIDRegressor(teacher.shape[-1], teacher.shape[1:3],
                                                  name=f'vid{i}')(student)
        total = total + connectors.vid_loss(mean, log_scale, teacher)
      return total, None
    if self.method == 'cc':
      student = connectors.LinearEmbed(name='student_head')(embedding)
      teacher = connectors.LinearEmbed(name='teacher_head')(teacher_embedding)
      # The release's loss is a function of the difference alone: this form trains both
      # heads through it, as the release does (cc_loss stops its teacher input).
      return losses.cc_loss(student - teacher, jnp.zeros_like(teacher)), None
    if self.method == 'crd':
      student = connectors.NormalizedEmbed(name='student_head')(embedding)
      teacher = connectors.NormalizedEmbed(name='teacher_head')(teacher_embedding)
      if memory is None:
        return jnp.zeros((), jnp.float32), None
      classes = memory[CLASS_OF_EXAMPLE]
      contrast = connectors.sample_negatives(key, labels, index, classes, self.nce_k)
      loss, z = connectors.crd_loss(student, teacher, memory, index, contrast,
                                    nce_t=self.nce_t, num_examples=classes.shape[0])
      memory = connectors.update_crd_memory({**memory, **z}, index, student, teacher,
                                            nce_m=self.nce_m)
      return loss, memory
    raise ValueError(f'Connector: no learned part for method {self.method!r}')


# The memory's table of every training example's class (CRD's negatives are drawn from it).
CLASS_OF_EXAMPLE = 'class_of_example'
# The memory's entries sharded by rows over the devices (the others are replicated).
MEMORY_ROWS = ('student', 'teacher')


def make_connector(distill: ml_collections.ConfigDict, stage: str = 'main'
                   ) -> Connector | None:
  """The :class:`Connector` of ``distill.method`` (alone or ``kd_``), None for a method
  without learned parts and for the main training after an initialisation stage (the
  FitNets regressor serves the hint stage only); CRD's reads ``distill.nce_k``,
  ``nce_t``, ``nce_m``."""
  if not is_learned(distill.method) or (stage == 'main' and has_init_stage(distill)):
    return None
  zoo = zoo_method(distill.method)
  if zoo != 'crd':
    return Connector(zoo)
  return Connector(zoo, nce_k=int(distill.nce_k), nce_t=float(distill.nce_t),
                   nce_m=float(distill.nce_m))


def has_memory(method: str) -> bool:
  """Whether ``method`` keeps a memory of the training set in the train state (CRD)."""
  return zoo_method(method) == 'crd'


def init_memory(key: jax.Array, class_of_example, num_shards: int = 1) -> dict:
  """CRD's memory (:func:`~distill_jax.connectors.init_crd_memory` at the heads' width)
  for a training set whose classes are ``class_of_example`` (N,), plus that table; the
  banks padded to a multiple of ``num_shards`` rows so they shard evenly (the padding is
  never read)."""
  n = len(class_of_example)
  rows = -(-n // num_shards) * num_shards
  memory = connectors.init_crd_memory(key, n, connectors.FEAT_DIM, rows=rows)
  return {**memory, CLASS_OF_EXAMPLE: jnp.asarray(class_of_example, jnp.int32)}


def init_connector(connector: Connector, key: jax.Array, model: nn.Module,
                   teacher_model: nn.Module, input_shape: tuple[int, ...]) -> dict:
  """``{'params', 'batch_stats'}`` of ``connector`` for ``model`` and ``teacher_model`` on
  NHWC inputs of ``input_shape``: both networks' outputs from shapes alone, the connector
  initialised eagerly on zeros of those shapes (a batch of 2)."""
  def outputs(network):
    (_, points), variables = jax.eval_shape(lambda: network.init_with_output(
        jax.random.key(0), jnp.zeros((2, *input_shape[1:])), train=False, mutable=True))
    embedding = variables.get(names.INTERMEDIATES, {}).get(names.EMBEDDING, (None,))[0]
    zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
    return [zeros(p) for p in points], zeros(embedding)

  (points, embedding), (teacher_points, teacher_embedding) = outputs(model), outputs(teacher_model)
  variables = connector.init(key, points, teacher_points, embedding, teacher_embedding,
                             train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def _method_loss(zoo: str, logits, labels, points, teacher_logits, teacher_points,
                 embeddings, temperature, learned) -> jax.Array:
  if ZOO[zoo].learned:
    return learned
  if zoo == 'sp':
    return losses.sp_loss(points[-1:], teacher_points[-1:])
  if zoo == 'nst':
    return losses.nst_loss(points, teacher_points)
  if zoo == 'fsp':
    return losses.fsp_loss(points, teacher_points)
  if zoo == 'rkd':
    return losses.rkd_loss(*embeddings)
  if zoo == 'pkt':
    return losses.pkt_loss(*embeddings)
  if zoo == 'dkd':
    return losses.dkd_loss(logits, teacher_logits, labels, temperature=temperature)
  return losses.dist_loss(logits, teacher_logits)


def has_init_stage(distill: ml_collections.ConfigDict) -> bool:
  """Whether the run first trains an initialisation stage (``distill.init_epochs > 0``:
  FSP, FitNets), whose method term is then left out of the main training."""
  return bool(distill.get('init_epochs', 0))


# The top-level modules an initialisation stage leaves as they are: the classifiers.
INIT_FROZEN = (names.CLASSIFIER, names.AUX_HEAD)


def make_init_loss(distill: ml_collections.ConfigDict) -> Callable:
  """The initialisation stage's ``loss(logits, labels, points, teacher_logits,
  teacher_points, *, embeddings, step, learned=None) -> (loss, terms)``: the method's
  own loss alone, unweighted, as RepDistiller's ``helper/pretrain.py`` trains FSP
  (``sum`` of its pair terms) and Romero et al. the FitNets hint (the regressed MSE);
  the term is logged under the method's name."""
  zoo = zoo_method(distill.method)

  def loss(logits, labels, points, teacher_logits, teacher_points, *, embeddings=None,
           step=0, learned=None):
    del logits, labels, teacher_logits, embeddings, step
    own = learned if ZOO[zoo].learned else losses.fsp_loss(points, teacher_points)
    return own, {zoo: own}
  return loss


def make_zoo_loss(distill: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
  """``loss(logits, labels, points, teacher_logits, teacher_points, *, embeddings, step)
  -> (loss, terms)`` for a :data:`ZOO` method (alone or ``kd_``), terms ``ce``, ``kd``
  (with KD) and the method's own, weighted (``'sp'``...). For a learned method the
  step passes its :class:`Connector`'s unweighted loss as ``learned``. After an
  initialisation stage (:func:`has_init_stage`) the method's term is left out, as
  RepDistiller's FSP training does: CE (and KD) alone."""
  zoo = zoo_method(distill.method)
  with_kd, with_term = distill.method.startswith('kd_'), not has_init_stage(distill)
  alpha, temperature, weight = distill.alpha, distill.temperature, beta(distill)
  warmup_steps = distill.warmup_epochs * steps_per_epoch

  def loss(logits, labels, points, teacher_logits, teacher_points, *, embeddings=None,
           step=0, learned=None):
    terms = {'ce': losses.cross_entropy(logits, labels)}
    total = terms['ce']
    if with_kd:
      total = losses.kd_loss(logits, teacher_logits, labels, alpha=alpha,
                             temperature=temperature)
      terms['kd'] = total - (1.0 - alpha) * terms['ce']
    if not with_term:
      return total, terms
    ramp = jnp.minimum(step / warmup_steps, 1.0) if warmup_steps else 1.0
    terms[zoo] = weight * ramp * _method_loss(zoo, logits, labels, points, teacher_logits,
                                              teacher_points, embeddings, temperature,
                                              learned)
    return total + terms[zoo], terms
  return loss
