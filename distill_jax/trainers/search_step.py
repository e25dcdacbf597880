r"""The DARTS search step: bilevel optimisation of a supernet's weights and alphas.

Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search" (ICLR 2019,
arXiv:1806.09055): section 2.3 (the approximate architecture gradient), Algorithm 1,
section 2.4 (deriving the discrete cells) and the search recipe of section 3.1 /
appendix A.1; the details follow the authors' release (github.com/quark0/darts,
``cnn/architect.py`` for the architecture step, ``cnn/train_search.py`` for the loop).
Written anew in JAX.

The problem. The training split is halved (``data.validation_fraction = 0.5``): the
weights ``w`` of :class:`~distill_jax.models.supernet.SuperNetwork` minimise
``L_train(w, alpha)`` on one half, the architecture ``alpha`` minimises
``L_val(w*(alpha), alpha)`` on the other. Every step (:func:`search_step`) is Algorithm 1:

1. the architecture step, on a validation batch (:func:`architecture_gradient`):

   * ``order=1``: ``d_alpha = grad_alpha L_val(w, alpha)``;
   * ``order=2``: with the virtual step ``w' = w - xi (momentum * buffer + grad_w
     L_train(w, alpha) + wd * w)`` (the SGD step without clipping, ``buffer`` the momentum
     buffer, as ``_compute_unrolled_model`` in ``cnn/architect.py``),
     ``d_alpha = d/d_alpha L_val(w'(alpha), alpha)``, either ``hessian='exact'`` (the
     total derivative, by differentiating through the virtual step) or
     ``hessian='finite_difference'`` (the release's ``_hessian_vector_product``)
     ``grad_alpha L_val(w', alpha) - xi [grad_alpha L_train(w+, alpha) - grad_alpha
     L_train(w-, alpha)] / (2 eps)`` with ``w+- = w +- eps v``, ``v = grad_w' L_val(w',
     alpha)``, ``eps = fd_epsilon / ||v||`` (``fd_epsilon`` = 0.01);

   then ``alpha <- Adam(d_alpha)`` (lr 3e-4, betas (0.5, 0.999), weight decay 1e-3 added
   to the gradient: ``add_decayed_weights`` then ``adam``, as the release's
   ``Adam(weight_decay)``);
2. the weight step, on a training batch: ``w <- SGD(grad_w L_train(w, alpha'))`` with
   learning rate ``xi`` cosine from 0.025 to 0.001 (constant within an epoch, as the
   release's per-epoch scheduler), momentum 0.9, weight decay 3e-4 added to the gradient,
   global-norm clipping at 5.

Batch norm runs in train mode (batch statistics) in all of these losses, as in the
release. The running statistics (used only by the evaluation of the validation half)
come from the forward pass whose weight gradient is applied; the release's every
training-mode pass (the architecture passes too) updates them, and PyTorch averages the
unbiased batch variance where Flax averages the biased one (README, "Fidelity").

Reusing the training gradient (``arch.reuse_train_grad``, default off, second order
only): the weight step then applies ``grad_w L_train(w, alpha)`` computed for the virtual
step (same batch, same ``w``) instead of recomputing it after the alpha update, saving one
forward and backward pass. Algorithm 1 of the paper and the release take the weight step
at the updated alpha, which is the default; the reused gradient differs by one Adam step
of alpha (lr 3e-4) in the gradient's alpha (README, "Fidelity", gives the measured cost
and difference).

What the step needs is built once from the config (:func:`build_setup`): the network, the
two optax optimizers, the learning-rate schedule, the augmentation and the few static
choices above (:class:`SearchSetup`). Each pass through the network is its own line of
the step. On CPU the compile time grows with the number of network copies in the
program, so ``arch.phase_scan=True`` (first order and finite differences) runs the same
passes as one ``lax.scan`` around a single copy (:func:`scanned_passes`, tested equal to
the straight-line step). Measured at the ``:demo`` sizes on 2 CPU cores
(``benchmarks/darts_search.py [--phase-scan]``): finite differences compile in ~31 s
instead of ~70 s for a step ~50-70 ms (7-10%) slower, so the scan pays for searches
shorter than ~600 steps; first order compiles 5-11 s faster for ~67 ms (20%) more per
step, even at the demo's 66 steps. It is off by default: long searches are faster without.

Genotype (section 2.4): per intermediate node, the two incoming edges with the largest
non-``none`` softmax weight, each with its best non-``none`` operation
(:func:`derive_genotype`, the release's ``genotype()`` in ``cnn/model_search.py``).

The loop, its files and the job interface are in :mod:`distill_jax.trainers.search`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distill_jax import data as data_lib
from distill_jax import genotypes as genotypes_lib
from distill_jax.genotypes import NUM_INPUTS, NUM_NODES, PRIMITIVES, Genotype
from distill_jax.models.supernet import EDGES, NUM_EDGES, SuperNetwork, init_alphas, init_supernet

ORDERS = (1, 2)
HESSIANS = ('exact', 'finite_difference')
# Validation batches are drawn from their own permutation stream: seed + this offset.
VAL_SEED_OFFSET = 1_000_003


# ---------------------------------------------------------------------------
# State, and what the step needs, built once from the config.


@flax.struct.dataclass
class SearchState:
  """Everything a search needs to continue: checkpointed whole.

  ``alphas`` (``{'normal', 'reduce'}``, each (14, 8)) and ``arch_opt_state`` (their Adam
  state) sit beside the weights; step ``s`` draws its augmentation from
  ``fold_in(rng, s)``.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  alphas: Any
  arch_opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class SearchSetup:
  """The pieces of the compiled step, built from the config by :func:`build_setup`.

  ``tx`` updates the weights (``learning_rate(step)`` is its schedule, also the virtual
  step's ``xi``), ``arch_tx`` the alphas; ``augment(images, key)`` turns a raw uint8
  training batch into the network's float input, ``normalize(images)`` an evaluation
  batch. ``order``, ``hessian``, ``reuse_train_grad`` and ``fd_epsilon`` choose the
  architecture gradient; ``momentum`` and ``weight_decay`` are the weight optimizer's,
  repeated for the virtual step.
  """
  model: SuperNetwork
  tx: optax.GradientTransformation
  arch_tx: optax.GradientTransformation
  learning_rate: Callable[[Any], jax.Array]
  augment: Callable[[jax.Array, jax.Array], jax.Array]
  normalize: Callable[[jax.Array], jax.Array]
  order: int = 1
  hessian: str = 'exact'
  reuse_train_grad: bool = False
  fd_epsilon: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 3e-4
  phase_scan: bool = False


def learning_rate_schedule(optimizer: ml_collections.ConfigDict, num_epochs: int,
                           steps_per_epoch: int) -> Callable[[Any], jax.Array]:
  """The weights' learning rate ``xi`` at a step: ``optimizer.schedule='cosine'`` anneals
  from ``learning_rate`` to ``final_learning_rate`` over the epochs, constant within an
  epoch (``cnn/train_search.py`` steps its ``CosineAnnealingLR`` once per epoch);
  ``'constant'`` keeps ``learning_rate``."""
  lr, final_lr = float(optimizer.learning_rate), float(optimizer.final_learning_rate)
  if optimizer.schedule == 'constant':
    return lambda step: jnp.asarray(lr, jnp.float32)

  def cosine(step):
    epoch = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    return final_lr + (lr - final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / num_epochs))

  return cosine


def weight_optimizer(optimizer: ml_collections.ConfigDict, schedule: Callable
                     ) -> optax.GradientTransformation:
  """Clip (global norm) -> L2 weight decay added to the gradient -> SGD with momentum."""
  parts = []
  if optimizer.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(float(optimizer.grad_clip_norm)))
  parts.append(optax.add_decayed_weights(float(optimizer.weight_decay)))
  parts.append(optax.sgd(schedule, momentum=float(optimizer.momentum) or None))
  return optax.chain(*parts)


def arch_optimizer(arch: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """L2 weight decay added to the gradient, then Adam (the release's ``Adam(weight_decay)``)."""
  return optax.chain(optax.add_decayed_weights(float(arch.weight_decay)),
                     optax.adam(float(arch.learning_rate), b1=float(arch.b1), b2=float(arch.b2)))


def build_model(model: ml_collections.ConfigDict) -> SuperNetwork:
  """The supernet of ``config.model``."""
  return SuperNetwork(layers=model.layers, init_channels=model.init_channels,
                      num_classes=model.num_classes, stem_multiplier=model.stem_multiplier,
                      impl=model.impl)


def build_setup(config: ml_collections.ConfigDict, *, mean: tuple[float, ...],
                std: tuple[float, ...], steps_per_epoch: int) -> SearchSetup:
  """What the step of a (validated) search config needs; ``mean``/``std`` are the
  dataset's per-channel statistics, ``steps_per_epoch`` sets the schedule's epochs."""
  mean, std = tuple(mean), tuple(std)
  schedule = learning_rate_schedule(config.optimizer, config.num_epochs, steps_per_epoch)
  data = config.data
  return SearchSetup(
      model=build_model(config.model), tx=weight_optimizer(config.optimizer, schedule),
      arch_tx=arch_optimizer(config.arch), learning_rate=schedule,
      augment=functools.partial(data_lib.augment, crop_padding=data.crop_padding,
                                flip=data.flip, cutout=data.cutout, pad_mode=data.pad_mode,
                                mean=mean, std=std),
      normalize=functools.partial(data_lib.normalize, mean=mean, std=std),
      order=config.order, hessian=config.hessian,
      reuse_train_grad=config.arch.reuse_train_grad, fd_epsilon=float(config.arch.fd_epsilon),
      momentum=float(config.optimizer.momentum),
      weight_decay=float(config.optimizer.weight_decay), phase_scan=config.arch.phase_scan)


def momentum_buffer(opt_state: Any, params: Any) -> Any:
  """The SGD momentum buffer in ``opt_state`` (zeros before the first step or without
  momentum)."""
  trace = optax.tree_utils.tree_get(opt_state, 'trace')
  return jax.tree.map(jnp.zeros_like, params) if trace is None else trace


def initial_alphas(seed: int, dtype: Any = jnp.float32) -> dict:
  """The alphas a search with ``seed`` starts from: ``1e-3 * N(0, 1)``, (14, 8) per cell type."""
  return jax.tree.map(lambda x: np.asarray(x, jnp.dtype(dtype)),
                      init_alphas(jax.random.fold_in(jax.random.PRNGKey(seed), 1)))


def create_search_state(setup: SearchSetup, seed: int, input_shape: tuple[int, ...]
                        ) -> SearchState:
  """A fresh state at step 0 (host arrays, in the model's dtype): weights by PyTorch's
  default initialisers, alphas ``1e-3 * N(0, 1)``."""
  dtype = jnp.dtype(setup.model.dtype)
  variables = init_supernet(setup.model, seed, input_shape)
  cast = functools.partial(jax.tree.map, lambda x: np.asarray(x, dtype))
  params = cast(variables['params'])
  alphas = initial_alphas(seed, dtype)
  return SearchState(step=np.zeros((), np.int32), params=params,
                     batch_stats=cast(variables['batch_stats']),
                     opt_state=setup.tx.init(params), alphas=alphas,
                     arch_opt_state=setup.arch_tx.init(alphas),
                     rng=np.asarray(jax.random.PRNGKey(seed)))


# ---------------------------------------------------------------------------
# Losses and the architecture gradient.


class Pass(NamedTuple):
  """One forward and backward pass: the loss, logits, updated running statistics and the
  gradient (in the weights, the alphas, or both as ``(gw, ga)``)."""
  loss: jax.Array
  logits: jax.Array
  batch_stats: Any
  grad: Any


@dataclasses.dataclass(frozen=True)
class Losses:
  """The supernet's training-mode loss and its gradients at a given batch-norm state."""
  model: SuperNetwork
  batch_stats: Any

  def loss(self, params: Any, alphas: Any, x: jax.Array, y: jax.Array
           ) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    """Mean cross-entropy in train mode; aux: (logits, updated running statistics)."""
    logits, new_vars = self.model.apply({'params': params, 'batch_stats': self.batch_stats}, x,
                                        alphas, train=True, mutable=['batch_stats'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.mean(ce), (logits, new_vars['batch_stats'])

  def _pass(self, argnums, params, alphas, x, y) -> Pass:
    (loss, (logits, stats)), grad = jax.value_and_grad(self.loss, argnums=argnums,
                                                       has_aux=True)(params, alphas, x, y)
    return Pass(loss, logits, stats, grad)

  def grad_params(self, params: Any, alphas: Any, x: jax.Array, y: jax.Array) -> Pass:
    """``grad_w L(w, alpha)``."""
    return self._pass(0, params, alphas, x, y)

  def grad_alphas(self, params: Any, alphas: Any, x: jax.Array, y: jax.Array) -> Pass:
    """``grad_alpha L(w, alpha)``."""
    return self._pass(1, params, alphas, x, y)

  def grads(self, params: Any, alphas: Any, x: jax.Array, y: jax.Array) -> Pass:
    """``(grad_w L(w, alpha), grad_alpha L(w, alpha))``."""
    return self._pass((0, 1), params, alphas, x, y)


def virtual_step(setup: SearchSetup, params: Any, grad: Any, buffer: Any, lr: jax.Array) -> Any:
  """``w' = w - xi (momentum * buffer + grad + wd * w)``: one SGD step without clipping."""
  return jax.tree.map(
      lambda w, g, b: w - lr * (setup.momentum * b + g + setup.weight_decay * w),
      params, grad, buffer)


def _axpy(a: Any, x: Any, y: Any) -> Any:
  """``a * x + y`` over pytrees."""
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


class ArchGradient(NamedTuple):
  """``d_alpha`` and its by-products: the validation pass it came from (at ``w`` for first
  order, at ``w'`` for second order) and, for second order, the training pass at ``(w,
  alpha)`` of the virtual step (``grad`` = ``grad_w L_train``; reusable by the weight step)."""
  dalpha: Any
  val: Pass
  train: Pass | None


def architecture_gradient(setup: SearchSetup, losses: Losses, params: Any, buffer: Any,
                          alphas: Any, train: tuple[jax.Array, jax.Array],
                          val: tuple[jax.Array, jax.Array], lr: jax.Array) -> ArchGradient:
  """The architecture gradient of ``setup.order`` / ``setup.hessian`` (module docstring)
  on preprocessed ``(images, labels)`` batches; ``lr`` is the virtual step's ``xi``."""
  if setup.order == 1:
    # d_alpha = grad_alpha L_val(w, alpha).
    val_pass = losses.grad_alphas(params, alphas, *val)
    return ArchGradient(val_pass.grad, val_pass, None)

  if setup.hessian == 'exact':
    # d_alpha = d/d_alpha L_val(w'(alpha), alpha), w'(alpha) = w - xi (m b + grad_w
    # L_train(w, alpha) + wd w): differentiate through the virtual step.
    def unrolled_val_loss(a):
      train_pass = losses.grad_params(params, a, *train)
      w_prime = virtual_step(setup, params, train_pass.grad, buffer, lr)
      val_loss, (val_logits, val_stats) = losses.loss(w_prime, a, *val)
      return val_loss, (train_pass, val_logits, val_stats)

    (val_loss, (train_pass, val_logits, val_stats)), dalpha = jax.value_and_grad(
        unrolled_val_loss, has_aux=True)(alphas)
    return ArchGradient(dalpha, Pass(val_loss, val_logits, val_stats, dalpha), train_pass)

  # Finite differences (cnn/architect.py, _backward_step_unrolled):
  # w' = w - xi (m b + grad_w L_train(w, alpha) + wd w)
  train_pass = losses.grad_params(params, alphas, *train)
  w_prime = virtual_step(setup, params, train_pass.grad, buffer, lr)
  # v = grad_w' L_val(w', alpha) and grad_alpha L_val(w', alpha), from one pass
  val_pass = losses.grads(w_prime, alphas, *val)
  v, dalpha = val_pass.grad
  # eps = fd_epsilon / ||v||; w+- = w +- eps v
  eps = setup.fd_epsilon / jnp.maximum(optax.tree.norm(v), 1e-30)
  g_plus = losses.grad_alphas(_axpy(eps, v, params), alphas, *train).grad
  g_minus = losses.grad_alphas(_axpy(-eps, v, params), alphas, *train).grad
  # d_alpha = grad_alpha L_val(w', alpha) - xi (g+ - g-) / (2 eps)
  hvp = jax.tree.map(lambda p, m: (p - m) / (2 * eps.astype(p.dtype)), g_plus, g_minus)
  dalpha = jax.tree.map(lambda d, h: d - lr.astype(h.dtype) * h, dalpha, hvp)
  return ArchGradient(dalpha, val_pass, train_pass)


def arch_gradient(setup: SearchSetup, params: Any, batch_stats: Any, opt_state: Any,
                  alphas: Any, train: tuple[jax.Array, jax.Array],
                  val: tuple[jax.Array, jax.Array], lr: jax.Array) -> Any:
  """``d_alpha`` of :func:`architecture_gradient` as :func:`search_step` computes it (the
  momentum buffer read from the weights' ``opt_state``), without any update. For tests
  and analysis."""
  return architecture_gradient(setup, Losses(setup.model, batch_stats), params,
                               momentum_buffer(opt_state, params), alphas, train, val,
                               lr).dalpha


def scanned_passes(setup: SearchSetup, losses: Losses, params: Any, buffer: Any, alphas: Any,
                   arch_opt_state: Any, train: tuple, val: tuple, lr: jax.Array
                   ) -> tuple[Any, Any, Any, Pass, Pass]:
  """The passes of :func:`search_step` (first order or finite differences: the same
  points, batches and arithmetic) as one ``lax.scan`` over the pass index around a single
  forward and backward pass (``setup.phase_scan``): XLA then compiles the network once
  instead of two to five times, for a slower step (every pass computes both gradients).

  Returns ``(d_alpha, alpha', arch_opt_state', validation pass, weight-step pass)``.
  """
  first = setup.order == 1
  # Pass i runs at weights[i] on batches[i] (0 train, 1 val), with the carry's alphas:
  # first order: val at (w, alpha); then train at (w, alpha').
  # finite differences: train at w; val at w'; train at w+ and w-; then (unless reused)
  # train at (w, alpha').
  weights = [lambda c: params] * 2 if first else [
      lambda c: params, lambda c: virtual_step(setup, params, c['g_train'], buffer, lr),
      lambda c: _axpy(c['eps'], c['v'], params), lambda c: _axpy(-c['eps'], c['v'], params),
      lambda c: params]
  batches = [1, 0] if first else [0, 1, 0, 0, 0]
  num_arch = 1 if first else 4          # the alpha update follows pass num_arch - 1
  weight_pass = 0 if not first and setup.reuse_train_grad else num_arch
  num_passes = max(num_arch, weight_pass + 1)
  xs, ys = jnp.stack([train[0], val[0]]), jnp.stack([train[1], val[1]])

  def select(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)

  def body(c, i):
    which = jnp.asarray(batches)[i]
    out = losses.grads(lax.switch(i, weights[:num_passes], c), c['alphas'], xs[which],
                       ys[which])
    (gw, ga), record = out.grad, (out.loss, out.logits, out.batch_stats)
    if first:
      c = {**c, 'dalpha': select(i == 0, ga, c['dalpha']),
           'val': select(i == 0, record, c['val'])}
    else:
      eps = setup.fd_epsilon / jnp.maximum(optax.tree.norm(gw), 1e-30)
      hvp = jax.tree.map(lambda p, m: (p - m) / (2 * c['eps'].astype(p.dtype)), c['g_plus'], ga)
      finished = jax.tree.map(lambda d, h: d - lr.astype(h.dtype) * h, c['dalpha'], hvp)
      c = {**c, 'g_train': select(i == 0, gw, c['g_train']), 'v': select(i == 1, gw, c['v']),
           'eps': jnp.where(i == 1, eps.astype(c['eps'].dtype), c['eps']),
           'val': select(i == 1, record, c['val']), 'g_plus': select(i == 2, ga, c['g_plus']),
           'dalpha': select(i == 1, ga, select(i == 3, finished, c['dalpha']))}
    updates, opt_state = setup.arch_tx.update(c['dalpha'], c['arch_opt_state'], c['alphas'])
    c = {**c, 'train': select(i == weight_pass, (*record, gw), c['train']),
         **select(i == num_arch - 1, {'alphas': optax.apply_updates(c['alphas'], updates),
                                      'arch_opt_state': opt_state},
                  {'alphas': c['alphas'], 'arch_opt_state': c['arch_opt_state']})}
    return c, None

  # The carry's shapes: one pass traced abstractly (nothing is computed).
  shapes = jax.eval_shape(losses.grads, params, alphas, train[0], train[1])
  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)  # noqa: E731
  gw0, ga0 = zeros(shapes.grad)
  record0 = zeros((shapes.loss, shapes.logits, shapes.batch_stats))
  carry = {'alphas': alphas, 'arch_opt_state': arch_opt_state, 'dalpha': ga0, 'val': record0,
           'train': (*record0, gw0)}
  if not first:
    carry.update(g_train=gw0, v=gw0, g_plus=ga0, eps=jnp.ones((), shapes.loss.dtype))
  c, _ = lax.scan(body, carry, jnp.arange(num_passes))
  val_pass = Pass(*c['val'], grad=c['dalpha'])
  return c['dalpha'], c['alphas'], c['arch_opt_state'], val_pass, Pass(*c['train'])


# ---------------------------------------------------------------------------
# The compiled steps.


def _top1_error(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, -1) != labels).astype(jnp.float32))


def _preprocess(setup: SearchSetup, batch: dict, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  return setup.augment(batch['image'], key).astype(setup.model.dtype), batch['label']


def search_step(state: SearchState, train_batch: dict, val_batch: dict, *, setup: SearchSetup
                ) -> tuple[SearchState, dict]:
  """One DARTS step (Algorithm 1) on raw uint8 batches: the architecture step on
  ``val_batch``, then the weight step on ``train_batch``. Returns the new state and
  scalar metrics."""
  k_train, k_val = jax.random.split(jax.random.fold_in(state.rng, state.step))
  train = _preprocess(setup, train_batch, k_train)
  val = _preprocess(setup, val_batch, k_val)
  lr = setup.learning_rate(state.step)
  losses = Losses(setup.model, state.batch_stats)

  buffer = momentum_buffer(state.opt_state, state.params)

  if setup.phase_scan and not (setup.order == 2 and setup.hessian == 'exact'):
    dalpha, alphas, arch_opt_state, val_pass, train_pass = scanned_passes(
        setup, losses, state.params, buffer, state.alphas, state.arch_opt_state, train, val, lr)
  else:
    # 1. Architecture step: alpha <- alpha - Adam(d_alpha).
    arch = architecture_gradient(setup, losses, state.params, buffer, state.alphas, train, val,
                                 lr)
    dalpha, val_pass = arch.dalpha, arch.val
    updates, arch_opt_state = setup.arch_tx.update(dalpha, state.arch_opt_state, state.alphas)
    alphas = optax.apply_updates(state.alphas, updates)

    # 2. Weight step: w <- w - SGD(grad_w L_train(w, alpha')), or the virtual step's
    # grad_w L_train(w, alpha) when reused (second order, arch.reuse_train_grad).
    if arch.train is not None and setup.reuse_train_grad:
      train_pass = arch.train
    else:
      train_pass = losses.grad_params(state.params, alphas, *train)
  updates, opt_state = setup.tx.update(train_pass.grad, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  metrics = {
      'train_loss': train_pass.loss, 'train_top1_error': _top1_error(train_pass.logits, train[1]),
      'search_val_loss': val_pass.loss, 'search_val_top1_error': _top1_error(val_pass.logits,
                                                                             val[1]),
      'learning_rate': lr, 'grad_norm': optax.tree.norm(train_pass.grad),
      'arch_grad_norm': optax.tree.norm(dalpha),
      'param_norm': optax.tree.norm(params), 'alpha_norm': optax.tree.norm(alphas)}
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=train_pass.batch_stats, opt_state=opt_state,
                            alphas=alphas, arch_opt_state=arch_opt_state)
  return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)


def eval_step(state: SearchState, batch: dict, *, setup: SearchSetup) -> dict:
  """Sums over a (padded, masked) batch in inference mode: loss, top-1 error, count."""
  images = setup.normalize(batch['image']).astype(setup.model.dtype)
  logits = setup.model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                             images, state.alphas, train=False)
  mask = batch['mask']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['label'])
  wrong = (jnp.argmax(logits, -1) != batch['label']).astype(jnp.float32)
  return {'loss': jnp.sum(ce * mask), 'top1_error': jnp.sum(wrong * mask), 'count': jnp.sum(mask)}


def jit_search_steps(setup: SearchSetup, mesh: Mesh) -> tuple[Callable, Callable]:
  """``search_step(state, train_batch, val_batch)`` and ``eval_step(state, batch)`` jitted
  over ``mesh``: state replicated, batches sharded on ``'data'``, the state donated."""
  replicated = NamedSharding(mesh, P())
  step = jax.jit(functools.partial(search_step, setup=setup),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
  evaluate = jax.jit(functools.partial(eval_step, setup=setup), out_shardings=replicated)
  return step, evaluate


# The fields :func:`build_setup` reads: searches that agree on them share compiled steps.
STEP_FIELDS = ('model', 'data', 'optimizer', 'arch', 'order', 'hessian', 'num_epochs')
_COMPILED: dict[tuple, tuple[SearchSetup, Callable, Callable]] = {}
_MAX_COMPILED = 16


def compile_search_steps(config: ml_collections.ConfigDict, mesh: Mesh,
                         dataset: data_lib.Dataset) -> tuple[SearchSetup, Callable, Callable]:
  """``(setup, step, evaluate)`` of :func:`build_setup` and :func:`jit_search_steps` for a
  (validated) config on ``dataset``.

  Cached per (the config's :data:`STEP_FIELDS`, mesh, dataset statistics), so searches
  in one process that differ only in seed, logging or checkpointing (a resumed one,
  tests) compile once.
  """
  fields = config.to_dict()
  steps_per_epoch = len(dataset.train_labels) // config.batch_size
  key = (json.dumps({k: fields[k] for k in STEP_FIELDS}, sort_keys=True, default=str), mesh,
         tuple(dataset.mean), tuple(dataset.std), steps_per_epoch)
  if key not in _COMPILED:
    setup = build_setup(config, mean=tuple(dataset.mean), std=tuple(dataset.std),
                        steps_per_epoch=steps_per_epoch)
    if len(_COMPILED) >= _MAX_COMPILED:
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = (setup, *jit_search_steps(setup, mesh))
  return _COMPILED[key]


# ---------------------------------------------------------------------------
# Genotype.


def alpha_weights(alphas: Any) -> dict[str, np.ndarray]:
  """Softmax over the operations of each edge: ``{'normal', 'reduce'}`` (14, 8) numpy."""
  out = {}
  for kind in ('normal', 'reduce'):
    a = np.asarray(jax.device_get(alphas[kind]), np.float64)
    e = np.exp(a - a.max(-1, keepdims=True))
    out[kind] = e / e.sum(-1, keepdims=True)
  return out


def derive_cell(weights: np.ndarray) -> tuple[tuple[str, int], ...]:
  """The 8 ``(op, input)`` pairs of one cell from its (14, 8) operation weights.

  Per node, the two incoming edges whose strongest non-``none`` weight is largest (ties:
  the earlier input), strongest first, each with its argmax op excluding ``none`` (ties:
  the earlier primitive), as in the paper's section 2.4 and the release.
  """
  weights = np.asarray(weights)
  if weights.shape != (NUM_EDGES, len(PRIMITIVES)):
    raise ValueError(
        f'weights have shape {weights.shape}; expected ({NUM_EDGES}, {len(PRIMITIVES)})')
  none = PRIMITIVES.index('none')
  masked = weights.copy()
  masked[:, none] = -np.inf
  pairs = []
  for node in range(NUM_NODES):
    rows = [e for e, (n, _) in enumerate(EDGES) if n == node]
    strength = np.array([masked[e].max() for e in rows])
    best = np.argsort(-strength, kind='stable')[:2]
    for j in best:
      e = rows[j]
      pairs.append((PRIMITIVES[int(np.argmax(masked[e]))], EDGES[e][1]))
  return tuple(pairs)


def derive_genotype(alphas: Any) -> Genotype:
  """The discrete architecture of ``alphas`` (raw, before softmax); concat nodes 2-5."""
  weights = alpha_weights(alphas)
  concat = tuple(range(NUM_INPUTS, NUM_INPUTS + NUM_NODES))
  return genotypes_lib.validate_genotype(Genotype(
      normal=derive_cell(weights['normal']), normal_concat=concat,
      reduce=derive_cell(weights['reduce']), reduce_concat=concat))
