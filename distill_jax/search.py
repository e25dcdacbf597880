r"""DARTS architecture search: bilevel optimisation of a supernet's weights and alphas.

Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search" (ICLR 2019,
arXiv:1806.09055), section 2.3 (approximate architecture gradient), algorithm 1 and
section 2.4 (deriving discrete architectures); hyper-parameters and details of the
authors' release as collected in ``FACTS.md`` (Search). Written anew in JAX.

The problem. The training split is halved (``data.validation_fraction = 0.5``): the
weights ``w`` of :class:`~distill_jax.models.supernet.SuperNetwork` minimise
``L_train(w, alpha)`` on one half, the architecture ``alpha`` minimises
``L_val(w*(alpha), alpha)`` on the other. Every step (:func:`search_step`) first updates
``alpha`` on a validation batch, then ``w`` on a training batch:

* weights: SGD, learning rate ``xi`` cosine from 0.025 to 0.001 (constant within an
  epoch, as the release's per-epoch scheduler), momentum 0.9, weight decay 3e-4 added to
  the gradient, global-norm clipping at 5;
* alphas: Adam (lr 3e-4, betas (0.5, 0.999)) with weight decay 1e-3 added to the
  gradient (``add_decayed_weights`` then ``adam``, as the release's ``Adam(weight_decay)``);
* ``order=1``: ``d_alpha = grad_alpha L_val(w, alpha)``;
* ``order=2``: with the virtual step ``w' = w - xi (momentum * buffer + grad_w L_train(w,
  alpha) + wd * w)`` (the SGD step without clipping, ``buffer`` the momentum buffer),
  ``d_alpha = d/d_alpha L_val(w'(alpha), alpha)``, either ``hessian='exact'`` (the total
  derivative, by differentiating through the virtual step) or
  ``hessian='finite_difference'`` (the release's approximation)
  ``grad_alpha L_val(w', alpha) - xi [grad_alpha L_train(w+, alpha) - grad_alpha
  L_train(w-, alpha)] / (2 eps)`` with ``w+- = w +- eps v``, ``v = grad_w' L_val(w',
  alpha)``, ``eps = fd_epsilon / ||v||`` (``fd_epsilon`` = 0.01).

Batch norm runs in train mode (batch statistics) in all of these losses, as in the
release. The running statistics (used only by the evaluation of the validation half)
come from the forward pass whose weight gradient is applied.

Reusing the training gradient (``arch.reuse_train_grad``, default on, second order only):
the weight step then applies ``grad_w L_train(w, alpha)`` computed for the virtual step
(same batch, same ``w``) instead of recomputing it after the alpha update. The release
recomputes it at the updated alpha; the two differ by one Adam step of alpha (lr 3e-4)
in the gradient's alpha. Turn it off to follow the release exactly.

Compile size. On CPU the supernet's compile time, not its step time, dominates short
runs (TRAPS.md). The network's forward and backward pass appears once in the compiled
step: the losses of a step are evaluated by one ``lax.scan`` over *phases* (which
weights, which alphas, which batch; what to do with the gradients) around a single
``value_and_grad`` of the loss. First order has two phases (validation at ``(w,
alpha)``, then the alpha update; training at ``(w, alpha')``), finite differences four
or five (training at ``w``; validation at ``w'``; training at ``w+`` and ``w-``, then
the alpha update; training at ``(w, alpha')`` unless reused). ``hessian='exact'``
differentiates through the virtual step directly (a second-order program).

Genotype (section 2.4): per intermediate node, the two incoming edges with the largest
non-``none`` softmax weight, each with its best non-``none`` operation
(:func:`derive_genotype`).

Files in ``workdir``: ``checkpoints/`` (orbax; the whole :class:`SearchState`, alphas and
their Adam state included), TensorBoard events, ``metrics.jsonl``, ``genotype.json``
(rewritten every epoch) and ``genotypes.jsonl`` (one line per epoch), and at the end
``alphas.png``, ``normal_cell.png``, ``reduce_cell.png`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
from clu import metric_writers
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distill_jax import checkpoint as ckpt_lib
from distill_jax import data as data_lib
from distill_jax import genotypes as genotypes_lib
from distill_jax import train as train_lib
from distill_jax import validation
from distill_jax.genotypes import NUM_INPUTS, NUM_NODES, PRIMITIVES, Genotype
from distill_jax.models.supernet import EDGES, NUM_EDGES, SuperNetwork, init_alphas, init_supernet

ORDERS = (1, 2)
HESSIANS = ('exact', 'finite_difference')
RESULTS_FILE = 'results.json'
METRICS_FILE = 'metrics.jsonl'
GENOTYPE_FILE = 'genotype.json'
GENOTYPE_HISTORY_FILE = 'genotypes.jsonl'
# Validation batches are drawn from their own permutation stream: seed + this offset.
VAL_SEED_OFFSET = 1_000_003


# ---------------------------------------------------------------------------
# State and static settings.


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
class SearchConfig:
  """Static (hashable) settings of the compiled search step.

  Equal settings share one compiled step per mesh (:func:`compile_search_steps`).
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int = 10
  layers: int = 8
  init_channels: int = 16
  stem_multiplier: int = 3
  impl: str | None = None
  reductions: tuple[int, ...] | None = None
  dtype: str = 'float32'
  crop_padding: int = 4
  flip: bool = True
  cutout: int = 0
  pad_mode: str = 'constant'
  order: int = 1
  hessian: str = 'exact'
  reuse_train_grad: bool = True
  learning_rate: float = 0.025
  final_learning_rate: float = 0.001
  schedule: str = 'cosine'
  momentum: float = 0.9
  weight_decay: float = 3e-4
  grad_clip_norm: float = 5.0
  arch_learning_rate: float = 3e-4
  arch_b1: float = 0.5
  arch_b2: float = 0.999
  arch_weight_decay: float = 1e-3
  fd_epsilon: float = 0.01
  steps_per_epoch: int = 1
  num_epochs: int = 1

  def model(self) -> SuperNetwork:
    return SuperNetwork(layers=self.layers, init_channels=self.init_channels,
                        num_classes=self.num_classes, stem_multiplier=self.stem_multiplier,
                        dtype=jnp.dtype(self.dtype), impl=self.impl, reductions=self.reductions)


def learning_rate(cfg: SearchConfig, step: Any) -> Any:
  """The weights' learning rate ``xi`` at ``step``: cosine annealing from
  ``learning_rate`` to ``final_learning_rate`` over the epochs, constant within an epoch
  (the release steps its scheduler once per epoch), or constant."""
  if cfg.schedule == 'constant':
    return jnp.asarray(cfg.learning_rate, jnp.float32)
  epoch = (jnp.asarray(step) // cfg.steps_per_epoch).astype(jnp.float32)
  cos = 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / cfg.num_epochs))
  return cfg.final_learning_rate + (cfg.learning_rate - cfg.final_learning_rate) * cos


def weight_optimizer(cfg: SearchConfig) -> optax.GradientTransformation:
  """Clip (global norm) -> L2 weight decay added to the gradient -> SGD with momentum."""
  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(optax.add_decayed_weights(cfg.weight_decay))
  parts.append(optax.sgd(functools.partial(learning_rate, cfg), momentum=cfg.momentum or None))
  return optax.chain(*parts)


def arch_optimizer(cfg: SearchConfig) -> optax.GradientTransformation:
  """L2 weight decay added to the gradient, then Adam (the release's ``Adam(weight_decay)``)."""
  return optax.chain(optax.add_decayed_weights(cfg.arch_weight_decay),
                     optax.adam(cfg.arch_learning_rate, b1=cfg.arch_b1, b2=cfg.arch_b2))


def momentum_buffer(opt_state: Any, params: Any) -> Any:
  """The SGD momentum buffer in ``opt_state`` (zeros before the first step or without
  momentum)."""
  trace = optax.tree_utils.tree_get(opt_state, 'trace')
  return jax.tree.map(jnp.zeros_like, params) if trace is None else trace


def initial_alphas(seed: int, dtype: Any = jnp.float32) -> dict:
  """The alphas a search with ``seed`` starts from: ``1e-3 * N(0, 1)``, (14, 8) per cell type."""
  return jax.tree.map(lambda x: np.asarray(x, jnp.dtype(dtype)),
                      init_alphas(jax.random.fold_in(jax.random.PRNGKey(seed), 1)))


def create_search_state(cfg: SearchConfig, seed: int, input_shape: tuple[int, ...]) -> SearchState:
  """A fresh state at step 0 (host arrays): weights by PyTorch's default initialisers,
  alphas ``1e-3 * N(0, 1)``."""
  variables = init_supernet(cfg.model(), seed, input_shape)
  cast = functools.partial(jax.tree.map, lambda x: np.asarray(x, jnp.dtype(cfg.dtype)))
  params = cast(variables['params'])
  alphas = initial_alphas(seed, cfg.dtype)
  return SearchState(step=np.zeros((), np.int32), params=params,
                     batch_stats=cast(variables['batch_stats']),
                     opt_state=weight_optimizer(cfg).init(params), alphas=alphas,
                     arch_opt_state=arch_optimizer(cfg).init(alphas),
                     rng=np.asarray(jax.random.PRNGKey(seed)))


# ---------------------------------------------------------------------------
# Losses and the architecture gradient.


def _tree_axpy(a: Any, x: Any, y: Any) -> Any:
  """``a * x + y`` over pytrees."""
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def _top1_error(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, -1) != labels).astype(jnp.float32))


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

  def grads(self, params: Any, alphas: Any, x: jax.Array, y: jax.Array) -> dict:
    """Loss, logits, running statistics and the gradients in weights and alphas."""
    (loss, (logits, stats)), (gw, ga) = jax.value_and_grad(self.loss, argnums=(0, 1),
                                                           has_aux=True)(params, alphas, x, y)
    return {'loss': loss, 'logits': logits, 'batch_stats': stats, 'gw': gw, 'ga': ga}


def virtual_step(cfg: SearchConfig, params: Any, grad: Any, buffer: Any, lr: jax.Array) -> Any:
  """``w' = w - xi (momentum * buffer + grad + wd * w)``: one SGD step without clipping."""
  return jax.tree.map(
      lambda w, g, b: w - lr * (cfg.momentum * b + g + cfg.weight_decay * w), params, grad, buffer)


@dataclasses.dataclass(frozen=True)
class Phase:
  """One evaluation of ``Losses.grads`` inside the phase scan.

  ``point(carry) -> (params, alphas, use_val)`` chooses where and on which batch;
  ``then(carry, out) -> carry`` consumes the result.
  """
  point: Callable[[dict], tuple[Any, Any, jax.Array]]
  then: Callable[[dict, dict], dict]


def _run_phases(losses: Losses, phases: Sequence[Phase], carry: dict, train: tuple, val: tuple
                ) -> dict:
  """Runs ``phases`` in order with one compiled copy of the forward and backward pass."""
  xs = jnp.stack([train[0], val[0]])
  ys = jnp.stack([train[1], val[1]])

  def body(carry, i):
    params, alphas, use_val = lax.switch(i, [p.point for p in phases], carry)
    which = use_val.astype(jnp.int32)
    out = losses.grads(params, alphas, xs[which], ys[which])
    return lax.switch(i, [p.then for p in phases], carry, out), None

  carry, _ = lax.scan(body, carry, jnp.arange(len(phases)))
  return carry


def _float_dtype(cfg: SearchConfig) -> Any:
  """The dtype of losses and logits (float32, or float64 for a float64 supernet)."""
  return jnp.promote_types(jnp.dtype(cfg.dtype), jnp.float32)


def _initial_carry(cfg: SearchConfig, params: Any, alphas: Any, batch_stats: Any, batch: int
                   ) -> dict:
  zeros_w = jax.tree.map(jnp.zeros_like, params)
  zeros_a = jax.tree.map(jnp.zeros_like, alphas)
  scalar = jnp.zeros((), _float_dtype(cfg))
  logits = jnp.zeros((batch, cfg.num_classes), _float_dtype(cfg))
  return {'alphas': alphas, 'dalpha': zeros_a, 'hvp': zeros_a, 'g_train': zeros_w,
          'v': zeros_w, 'eps': scalar, 'gw': zeros_w, 'batch_stats': batch_stats,
          'train_loss': scalar, 'train_logits': logits, 'val_loss': scalar, 'val_logits': logits}


def _arch_phases(cfg: SearchConfig, params: Any, buffer: Any, lr: jax.Array,
                 update_alphas: Callable[[dict], dict], with_weight_phase: bool) -> list[Phase]:
  """The phases of order 1 or of the finite-difference second order (see module doc)."""
  false, true = jnp.asarray(False), jnp.asarray(True)

  def at_w(c):
    return params, c['alphas'], false

  def keep_train(c, out):
    return {**c, 'gw': out['gw'], 'batch_stats': out['batch_stats'], 'train_loss': out['loss'],
            'train_logits': out['logits']}

  def keep_val(c, out):
    return {**c, 'dalpha': out['ga'], 'val_loss': out['loss'], 'val_logits': out['logits']}

  weight_phase = [Phase(at_w, keep_train)] if with_weight_phase else []
  if cfg.order == 1:
    return [Phase(lambda c: (params, c['alphas'], true),
                  lambda c, out: update_alphas(keep_val(c, out)))] + weight_phase

  def unrolled(c):
    return virtual_step(cfg, params, c['g_train'], buffer, lr), c['alphas'], true

  def keep_v(c, out):
    eps = cfg.fd_epsilon / jnp.maximum(optax.global_norm(out['gw']), 1e-30)
    return {**keep_val(c, out), 'v': out['gw'], 'eps': eps.astype(_float_dtype(cfg))}

  def finish_fd(c, out):
    hvp = jax.tree.map(lambda p, m: (p - m) / (2 * c['eps'].astype(m.dtype)), c['hvp'], out['ga'])
    dalpha = jax.tree.map(lambda d, h: d - lr.astype(h.dtype) * h, c['dalpha'], hvp)
    return update_alphas({**c, 'hvp': hvp, 'dalpha': dalpha})

  return [
      Phase(at_w, lambda c, out: {**keep_train(c, out), 'g_train': out['gw']}),
      Phase(unrolled, keep_v),
      Phase(lambda c: (_tree_axpy(c['eps'], c['v'], params), c['alphas'], false),
            lambda c, out: {**c, 'hvp': out['ga']}),
      Phase(lambda c: (_tree_axpy(-c['eps'], c['v'], params), c['alphas'], false), finish_fd),
  ] + weight_phase


def _exact_second_order(cfg: SearchConfig, losses: Losses, params: Any, buffer: Any,
                        alphas: Any, train: tuple, val: tuple, lr: jax.Array) -> tuple[Any, dict]:
  """``d/d_alpha L_val(w'(alpha), alpha)`` by differentiating through the virtual step.

  Returns the gradient and the by-products: the training gradient and loss at ``(w,
  alpha)`` (reusable by the weight step) and the validation loss at ``w'``.
  """

  def unrolled_val_loss(a):
    out = losses.grads(params, a, *train)
    w_prime = virtual_step(cfg, params, out['gw'], buffer, lr)
    val_loss, (val_logits, _) = losses.loss(w_prime, a, *val)
    return val_loss, (out, val_logits)

  (val_loss, (out, val_logits)), dalpha = jax.value_and_grad(
      unrolled_val_loss, has_aux=True)(alphas)
  return dalpha, {'gw': out['gw'], 'g_train': out['gw'], 'batch_stats': out['batch_stats'],
                  'train_loss': out['loss'], 'train_logits': out['logits'],
                  'val_loss': val_loss, 'val_logits': val_logits}


def arch_gradient(cfg: SearchConfig, params: Any, batch_stats: Any, opt_state: Any, alphas: Any,
                  train: tuple[jax.Array, jax.Array], val: tuple[jax.Array, jax.Array],
                  lr: jax.Array) -> Any:
  """The architecture gradient ``d_alpha`` of ``cfg.order`` / ``cfg.hessian`` on
  preprocessed ``(images, labels)`` batches, as :func:`search_step` computes it (same
  phases), without any update. For tests and analysis."""
  losses = Losses(cfg.model(), batch_stats)
  buffer = momentum_buffer(opt_state, params)
  if cfg.order == 2 and cfg.hessian == 'exact':
    return _exact_second_order(cfg, losses, params, buffer, alphas, train, val, lr)[0]
  carry = _initial_carry(cfg, params, alphas, batch_stats, train[1].shape[0])
  phases = _arch_phases(cfg, params, buffer, lr, lambda c: c, with_weight_phase=False)
  return _run_phases(losses, phases, carry, train, val)['dalpha']


# ---------------------------------------------------------------------------
# The compiled steps.


def _preprocess(cfg: SearchConfig, batch: dict, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  images = data_lib.augment(batch['image'], key, crop_padding=cfg.crop_padding, flip=cfg.flip,
                            cutout=cfg.cutout, pad_mode=cfg.pad_mode, mean=cfg.mean, std=cfg.std)
  return images.astype(jnp.dtype(cfg.dtype)), batch['label']


def search_step(state: SearchState, train_batch: dict, val_batch: dict, *, cfg: SearchConfig
                ) -> tuple[SearchState, dict]:
  """One DARTS step on raw uint8 batches: the alpha step (on ``val_batch``), then the
  weight step (on ``train_batch``). Returns the new state and scalar metrics."""
  key = jax.random.fold_in(state.rng, state.step)
  k_train, k_val = jax.random.split(key)
  train = _preprocess(cfg, train_batch, k_train)
  val = _preprocess(cfg, val_batch, k_val)
  lr = learning_rate(cfg, state.step)
  losses = Losses(cfg.model(), state.batch_stats)
  buffer = momentum_buffer(state.opt_state, state.params)
  arch_tx, tx = arch_optimizer(cfg), weight_optimizer(cfg)
  reuse = cfg.order == 2 and cfg.reuse_train_grad

  def update_alphas(c):
    updates, arch_opt_state = arch_tx.update(c['dalpha'], c['arch_opt_state'], c['alphas'])
    return {**c, 'alphas': optax.apply_updates(c['alphas'], updates),
            'arch_opt_state': arch_opt_state}

  carry = _initial_carry(cfg, state.params, state.alphas, state.batch_stats, train[1].shape[0])
  carry['arch_opt_state'] = state.arch_opt_state
  if cfg.order == 2 and cfg.hessian == 'exact':
    dalpha, out = _exact_second_order(cfg, losses, state.params, buffer, state.alphas, train,
                                      val, lr)
    carry = update_alphas({**carry, **out, 'dalpha': dalpha})
    if not reuse:
      fresh = losses.grads(state.params, carry['alphas'], *train)
      carry.update(gw=fresh['gw'], batch_stats=fresh['batch_stats'], train_loss=fresh['loss'],
                   train_logits=fresh['logits'])
  else:
    phases = _arch_phases(cfg, state.params, buffer, lr, update_alphas,
                          with_weight_phase=not reuse)
    carry = _run_phases(losses, phases, carry, train, val)

  updates, opt_state = tx.update(carry['gw'], state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'train_loss': carry['train_loss'], 'train_top1_error': _top1_error(carry['train_logits'],
                                                                         train[1]),
      'search_val_loss': carry['val_loss'],
      'search_val_top1_error': _top1_error(carry['val_logits'], val[1]),
      'learning_rate': lr, 'grad_norm': optax.global_norm(carry['gw']),
      'arch_grad_norm': optax.global_norm(carry['dalpha']),
      'param_norm': optax.global_norm(params), 'alpha_norm': optax.global_norm(carry['alphas'])}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=carry['batch_stats'],
                            opt_state=opt_state, alphas=carry['alphas'],
                            arch_opt_state=carry['arch_opt_state'])
  return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)


def eval_step(state: SearchState, batch: dict, *, cfg: SearchConfig) -> dict:
  """Sums over a (padded, masked) batch in inference mode: loss, top-1 error, count."""
  images = data_lib.normalize(batch['image'], cfg.mean, cfg.std).astype(jnp.dtype(cfg.dtype))
  logits = cfg.model().apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                             state.alphas, train=False)
  mask = batch['mask']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['label'])
  wrong = (jnp.argmax(logits, -1) != batch['label']).astype(jnp.float32)
  return {'loss': jnp.sum(ce * mask), 'top1_error': jnp.sum(wrong * mask), 'count': jnp.sum(mask)}


@functools.lru_cache(maxsize=16)
def compile_search_steps(cfg: SearchConfig, mesh: Mesh) -> tuple[Callable, Callable]:
  """``search_step(state, train_batch, val_batch)`` and ``eval_step(state, batch)`` jitted
  over ``mesh``: state replicated, batches sharded on ``'data'``, the state donated.

  Cached per ``(cfg, mesh)``, so repeated searches in one process compile once.
  """
  replicated = NamedSharding(mesh, P())
  step = jax.jit(functools.partial(search_step, cfg=cfg), out_shardings=(replicated, replicated),
                 donate_argnums=(0,))
  evaluate = jax.jit(functools.partial(eval_step, cfg=cfg), out_shardings=replicated)
  return step, evaluate


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


# ---------------------------------------------------------------------------
# Config.


def _fail(field: str, value: Any, allowed: str) -> None:
  raise validation.ConfigError(f'config.{field}={value!r} is invalid: {allowed}')


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  for part in field.split('.'):
    config = config[part]
  return config


def _check_int(config: ml_collections.ConfigDict, field: str, minimum: int) -> None:
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    _fail(field, value, f'must be an integer >= {minimum}')


def validate_search_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`~distill_jax.validation.ConfigError` (one line) for the first impossible
  value of a search config; runs before any compute."""
  validation.check_choice(config, 'data.name', sorted(data_lib.NUM_CLASSES))
  order = config.order
  if isinstance(order, bool) or order not in ORDERS:
    _fail('order', order, 'allowed: 1, 2')
  validation.check_choice(config, 'hessian', HESSIANS)
  _check_int(config, 'model.layers', 3)
  _check_int(config, 'model.init_channels', 2)
  _check_int(config, 'model.stem_multiplier', 1)
  _check_int(config, 'model.num_classes', 2)
  classes = data_lib.NUM_CLASSES[config.data.name]
  if config.model.num_classes != classes:
    _fail('model.num_classes', config.model.num_classes,
          f'dataset {config.data.name!r} has {classes} classes')
  if config.model.impl not in ('', 'fast', 'lax'):
    _fail('model.impl', config.model.impl, "allowed: '' (the darts_ops default), fast, lax")
  fraction = config.data.validation_fraction
  if not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
    _fail('data.validation_fraction', fraction,
          'must be in (0, 1): the search needs both halves (the paper uses 0.5)')
  validation.check_choice(config, 'data.pad_mode', ('constant', 'reflect'))
  for field in ('num_epochs', 'batch_size', 'eval_batch_size', 'log_every_steps',
                'keep_checkpoints'):
    _check_int(config, field, 1)
  for field in ('checkpoint_every_steps', 'num_devices', 'data.crop_padding', 'data.cutout'):
    _check_int(config, field, 0)
  for field in ('optimizer.learning_rate', 'arch.learning_rate', 'arch.fd_epsilon'):
    validation.check_positive(config, field)
  for field in ('optimizer.final_learning_rate', 'optimizer.momentum', 'optimizer.weight_decay',
                'optimizer.grad_clip_norm', 'arch.weight_decay'):
    validation.check_non_negative(config, field)
  validation.check_choice(config, 'optimizer.schedule', ('constant', 'cosine'))
  if config.optimizer.final_learning_rate > config.optimizer.learning_rate:
    _fail('optimizer.final_learning_rate', config.optimizer.final_learning_rate,
          f'must be <= optimizer.learning_rate={config.optimizer.learning_rate}')
  for field in ('arch.b1', 'arch.b2'):
    value = _get(config, field)
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
      _fail(field, value, 'must be in [0, 1)')
  for field in ('arch.reuse_train_grad', 'plot_every_epoch'):
    value = _get(config, field)
    if not isinstance(value, bool):
      _fail(field, value, 'must be True or False')


def search_config(config: ml_collections.ConfigDict, dataset: data_lib.Dataset,
                  steps_per_epoch: int) -> SearchConfig:
  """The static step settings of a (validated) config."""
  return SearchConfig(
      mean=tuple(dataset.mean), std=tuple(dataset.std), num_classes=config.model.num_classes,
      layers=config.model.layers, init_channels=config.model.init_channels,
      stem_multiplier=config.model.stem_multiplier, impl=config.model.impl or None,
      crop_padding=config.data.crop_padding, flip=config.data.flip, cutout=config.data.cutout,
      pad_mode=config.data.pad_mode, order=config.order, hessian=config.hessian,
      reuse_train_grad=config.arch.reuse_train_grad,
      learning_rate=float(config.optimizer.learning_rate),
      final_learning_rate=float(config.optimizer.final_learning_rate),
      schedule=config.optimizer.schedule, momentum=float(config.optimizer.momentum),
      weight_decay=float(config.optimizer.weight_decay),
      grad_clip_norm=float(config.optimizer.grad_clip_norm),
      arch_learning_rate=float(config.arch.learning_rate), arch_b1=float(config.arch.b1),
      arch_b2=float(config.arch.b2), arch_weight_decay=float(config.arch.weight_decay),
      fd_epsilon=float(config.arch.fd_epsilon), steps_per_epoch=steps_per_epoch,
      num_epochs=config.num_epochs)


# ---------------------------------------------------------------------------
# The search loop.


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def _append_jsonl(path: str, obj: dict) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(obj) + '\n')


def evaluate_val(data: data_lib.DeviceData, evaluate: Callable, state: SearchState,
                 batch_size: int) -> dict[str, float]:
  """Inference-mode loss and top-1 error of the supernet over the whole validation half."""
  return data_lib.mean_over_split(data, 'val', batch_size, lambda batch: evaluate(state, batch))


def _check_finite(pending: list[tuple[int, dict]], last_good: int) -> None:
  if not pending:
    return
  values = jax.device_get([(m['train_loss'], m['param_norm'], m['alpha_norm'])
                           for _, m in pending])
  for (step, _), triple in zip(pending, values):
    for name, value in zip(('loss', 'parameter norm', 'alpha norm'), triple):
      if not math.isfinite(float(value)):
        raise train_lib.NonFiniteLossError(
            f'{name} is {float(value)} at step {step} (steps {pending[0][0]}-{pending[-1][0]} '
            f'checked; last checkpointable state: step {last_good}); lower '
            'optimizer.learning_rate or arch.learning_rate. No checkpoint of the diverged '
            'state was written.')


def _epoch_outputs(workdir: str, state: SearchState, step: int, epoch: float, plots: bool
                   ) -> Genotype:
  """Derives the genotype; writes genotype.json, genotypes.jsonl and (optionally) pictures."""
  alphas = jax.device_get(state.alphas)
  genotype = derive_genotype(alphas)
  if jax.process_index() == 0:
    genotypes_lib.save_genotype(os.path.join(workdir, GENOTYPE_FILE), genotype)
    _append_jsonl(os.path.join(workdir, GENOTYPE_HISTORY_FILE),
                  {'step': step, 'epoch': epoch,
                   'genotype': genotypes_lib.genotype_to_json(genotype)})
    if plots:
      from distill_jax import search_plots  # pylint: disable=g-import-not-at-top
      search_plots.write_search_plots(workdir, alpha_weights(alphas), genotype)
  return genotype


def run_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a DARTS search in ``workdir``; returns the results dict.

  The config is validated before anything is computed. The search resumes from the
  latest complete checkpoint in ``workdir`` and repeats the uninterrupted run exactly
  (batches and augmentation are functions of ``(seed, step)``).
  """
  start_time = time.time()
  validate_search_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = data_lib.make_mesh(config.num_devices)
  validation.check_batch_divides(config.batch_size, mesh.size)
  validation.check_batch_divides(config.eval_batch_size, mesh.size, 'eval_batch_size')
  dataset = data_lib.load_dataset(config.data.name, data_dir=config.data.data_dir or None,
                                  validation_fraction=config.data.validation_fraction)
  num_train, num_val = len(dataset.train_labels), len(dataset.val_labels)
  if config.batch_size > min(num_train, num_val):
    _fail('batch_size', config.batch_size,
          f'the halves have only {num_train} (weights) and {num_val} (alphas) examples')
  steps_per_epoch = num_train // config.batch_size
  num_steps = steps_per_epoch * config.num_epochs
  cfg = search_config(config, dataset, steps_per_epoch)

  state = create_search_state(cfg, config.seed, (1, *dataset.image_shape))
  num_params = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
  state = data_lib.replicate(state, mesh)
  data = data_lib.DeviceData.create(dataset, mesh)
  step_fn, eval_fn = compile_search_steps(cfg, mesh)
  os.makedirs(workdir, exist_ok=True)

  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
  state, restored_step = ckpt_lib.restore_latest(manager, state)
  first_step = int(jax.device_get(state.step))
  if restored_step is not None:
    logging.info('Resumed the search from %s at step %d.', ckpt_lib.checkpoint_dir(workdir),
                 first_step)
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                asynchronous=False)
  jsonl = train_lib.JsonlWriter(os.path.join(workdir, METRICS_FILE))
  logging.info('DARTS search (order %d%s): supernet %d cells, C=%d, %d parameters, on %s, '
               '%d steps over %d devices.', cfg.order,
               f', {cfg.hessian} hessian' if cfg.order == 2 else '', cfg.layers,
               cfg.init_channels, num_params, config.data.name, num_steps, mesh.size)

  pending: list[tuple[int, dict]] = []
  last_saved = first_step
  step_seconds = 0.0
  final = None
  genotype = None
  window = (time.time(), first_step)
  try:
    for step in range(first_step + 1, num_steps + 1):
      t0 = time.time()
      train_idx = data_lib.train_indices(config.seed, step - 1, num_examples=num_train,
                                         batch_size=config.batch_size)
      val_idx = data_lib.train_indices(config.seed + VAL_SEED_OFFSET, step - 1,
                                       num_examples=num_val, batch_size=config.batch_size)
      state, metrics = step_fn(state, data.batch('train', train_idx), data.batch('val', val_idx))
      # One step in flight: bounded memory, no collective rendezvous timeouts (TRAPS.md).
      if pending:
        jax.block_until_ready(pending[-1][1]['train_loss'])
      pending.append((step, metrics))
      step_seconds += time.time() - t0

      is_last = step == num_steps
      save_now = is_last or (config.checkpoint_every_steps
                             and step % config.checkpoint_every_steps == 0)
      log_now = step % config.log_every_steps == 0 or is_last
      if log_now or save_now:
        _check_finite(pending, last_saved)
        if log_now:
          values = train_lib.mean_metrics(pending)
          values['epoch'] = step / steps_per_epoch
          values['steps_per_sec'] = (step - window[1]) / max(time.time() - window[0], 1e-9)
          window = (time.time(), step)
          writer.write_scalars(step, values)
          jsonl.write(step, values)
          pending.clear()
      if step % steps_per_epoch == 0 or is_last:
        values = evaluate_val(data, eval_fn, state, config.eval_batch_size)
        values['epoch'] = step / steps_per_epoch
        genotype = _epoch_outputs(workdir, state, step, values['epoch'],
                                  plots=config.plot_every_epoch)
        writer.write_scalars(step, values)
        jsonl.write(step, values)
        logging.info('Step %d (epoch %.2f): val top-1 error %.4f; genotype %s', step,
                     values['epoch'], values['val_top1_error'], genotype)
        if is_last:
          final = values
      if save_now:
        manager.save(step, args=ckpt_lib.ocp.args.StandardSave(state))
        last_saved = step
  finally:  # a failed search still completes the (finite) saves it began
    manager.wait_until_finished()
  writer.flush()

  if final is None:  # nothing left to search: the workdir already held the last step
    final = evaluate_val(data, eval_fn, state, config.eval_batch_size)
  genotype = derive_genotype(state.alphas)
  weights = alpha_weights(state.alphas)
  if is_main:
    genotypes_lib.save_genotype(os.path.join(workdir, GENOTYPE_FILE), genotype)
    from distill_jax import search_plots  # pylint: disable=g-import-not-at-top
    search_plots.write_search_plots(workdir, weights, genotype)
  results = {
      'genotype': genotypes_lib.genotype_to_json(genotype),
      'val_top1_error': final['val_top1_error'], 'val_loss': final['val_loss'],
      'order': cfg.order, 'hessian': cfg.hessian if cfg.order == 2 else None,
      'reuse_train_grad': cfg.reuse_train_grad if cfg.order == 2 else None,
      'alphas_softmax': {k: v.round(6).tolist() for k, v in weights.items()},
      'num_params': num_params, 'steps': num_steps, 'epochs': config.num_epochs,
      'resumed_from_step': restored_step, 'wall_time_s': time.time() - start_time,
      'search_step_seconds': step_seconds, 'num_devices': mesh.size,
      'num_processes': jax.process_count(), 'versions': train_lib.versions(),
      'config': config.to_dict()}
  if is_main:
    _write_json(os.path.join(workdir, RESULTS_FILE), results)
  manager.close()
  return results
