"""The DARTS search supernet (Flax linen): every edge a softmax mixture of all operations.

Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search" (ICLR 2019,
arXiv:1806.09055), section 2.2 and appendix A.1; structure as in the authors' public
release (github.com/quark0/darts, ``Network``, ``Cell`` and ``MixedOp`` in
``cnn/model_search.py``), written anew.

Structure. A stem 3x3 conv (``in -> stem_multiplier * C``) + BN; ``layers`` cells with
reductions (stride 2, channels doubled) at ``layers // 3`` and ``2 * layers // 3``; global
average pooling and a linear classifier. Every cell preprocesses its two inputs to ``C``
channels (``FactorizedReduce`` for the older input after a reduction, else ReLU-1x1
conv-BN; ``affine=False``) and builds four intermediate nodes; node ``k`` sums one
*mixed operation* per earlier state (the two cell inputs and nodes ``0..k-1``): 2 + 3 +
4 + 5 = 14 edges. A mixed operation is ``sum_o softmax(alpha_edge)_o * o(x)`` over the
eight :data:`~distill_jax.genotypes.PRIMITIVES`, with batch norm ``affine=False`` and a
BN(affine=False) after each pooling op; ``none`` contributes zeros, so it is not
computed (its weight still enters the softmax). The cell output concatenates the four
nodes (``4 * C`` channels).

Architecture parameters. ``alphas = {'normal': (14, 8), 'reduce': (14, 8)}`` are an
explicit argument of ``__call__``, not Flax variables, so weights and alphas are
differentiated and optimised separately::

  logits, new_vars = model.apply({'params': w, 'batch_stats': bs}, x, alphas, train=True,
                                 mutable=['batch_stats'])
  logits = model.apply({'params': w, 'batch_stats': bs}, x, alphas, train=False)

Edge ``e`` of a cell (row ``e`` of ``alphas[kind]``) is the release's order, node-major:
node 0 <- inputs 0, 1 (edges 0, 1); node 1 <- 0, 1, 2 (edges 2-4); node 2 <- 0..3
(5-8); node 3 <- 0..4 (9-13), where inputs 0 and 1 are the cell inputs and ``2 + j`` is
intermediate node ``j`` (:func:`edge_index`, :data:`EDGES`).

Compile size. XLA's compile time grows faster than linearly with the program, and on CPU
it dominates short searches. So each cell runs its mixed operations as an
``nn.scan`` over edges: a normal cell scans its 14 edges over the stacked states ``[s0,
s1, n0, .., n3]`` (reading ``states[input]``, adding into ``states[node]``), a reduction
cell scans its 8 strided edges from the two inputs, then its 6 edges between nodes. The
program then holds one mixed operation per normal cell and two per reduction cell
(instead of 14): for 5 cells, C=4, batch 32, the forward and backward pass compiled in
~36 s instead of ~112 s with one ``vmap`` per group of same-input edges (shifted-slice
ops, a loaded 2-core CPU), at the same step time. On CPU ``impl='lax'`` compiles another
~2-3x faster but steps ~3x slower at C=8 (``benchmarks/darts_search.py``): right for
tests and demos, not for long searches; ``impl='auto'`` (the default) is 'fast' on CPU
and 'lax' on GPU/TPU (:func:`distill_jax.models.darts_ops.resolve_impl`). Parameters are
stacked on a leading edge axis (``cell{i}/edges`` in alpha-row order; ``input_edges`` and
``node_edges``, rows :data:`INPUT_EDGES` and :data:`NODE_EDGES`, in a reduction cell).

Initialisation (:func:`init_supernet`) builds shapes with ``jax.eval_shape`` and draws
the values with numpy: running ``init`` eagerly took 12 s for 3 cells.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from distill_jax.genotypes import NUM_INPUTS, NUM_NODES, PRIMITIVES
from distill_jax.models import names
from distill_jax.models.darts_ops import (Conv, FactorizedReduce, ReLUConvBN, check_impl,
                                          make_op, torch_default_init)
from distill_jax.models.layers import batch_norm

Dtype = Any

NUM_OPS = len(PRIMITIVES)
# Edge e -> (node, input) in the release's node-major order.
EDGES: tuple[tuple[int, int], ...] = tuple(
    (node, inp) for node in range(NUM_NODES) for inp in range(NUM_INPUTS + node))
NUM_EDGES = len(EDGES)  # 14


def edge_index(node: int, inp: int) -> int:
  """Row of ``alphas[kind]`` of the edge ``inp -> node`` (``inp`` < ``2 + node``)."""
  return EDGES.index((node, inp))


# The edges of a reduction cell that read a cell input (stride 2), and the others, each in
# the release's order (rows of ``alphas['reduce']``).
INPUT_EDGES: tuple[int, ...] = tuple(e for e, (_, inp) in enumerate(EDGES) if inp < NUM_INPUTS)
NODE_EDGES: tuple[int, ...] = tuple(e for e, (_, inp) in enumerate(EDGES) if inp >= NUM_INPUTS)


def init_alphas(rng: jax.Array, scale: float = 1e-3, dtype: Dtype = jnp.float32) -> dict:
  """``{'normal', 'reduce'}`` of shape (14, 8), ``scale * N(0, 1)`` (the release's 1e-3)."""
  k_normal, k_reduce = jax.random.split(rng)
  return {'normal': scale * jax.random.normal(k_normal, (NUM_EDGES, NUM_OPS), dtype),
          'reduce': scale * jax.random.normal(k_reduce, (NUM_EDGES, NUM_OPS), dtype)}


class MixedOp(nn.Module):
  """``sum_o w_o * o(x)`` over the primitives (``none`` skipped: it adds zeros).

  Attributes:
    channels: ``C`` (every op is ``C -> C``).
    stride: 2 for the edges of a reduction cell that read a cell input, else 1.
    train: batch statistics (and their update) in the batch norms.
    dtype: computation dtype.
    impl: darts_ops implementation ('auto', 'fast', 'lax').
  """
  channels: int
  stride: int
  train: bool
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    out = None
    for i, primitive in enumerate(PRIMITIVES):
      if primitive == 'none':
        continue
      op = make_op(primitive, self.channels, self.channels, self.stride, False, None, self.dtype,
                   impl=self.impl, name=primitive)
      h = op(x, train=self.train)
      if 'pool' in primitive:
        h = batch_norm(train=self.train, affine=False, dtype=self.dtype,
                       name=f'{primitive}_bn')(h)
      h = weights[i].astype(h.dtype) * h
      out = h if out is None else out + h
    return out


class EdgeStep(nn.Module):
  """One mixed edge as a scan step: ``states[dst] += MixedOp(source[src], w)``.

  The carry ``states`` stacks the states an edge may write (and, with ``read_carry``,
  read); otherwise edges read the broadcast ``inputs`` stack (the cell inputs of a
  reduction cell, which have a larger spatial size than the nodes).
  """
  channels: int
  stride: int
  train: bool
  read_carry: bool
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, states: jnp.ndarray, edge: tuple[jnp.ndarray, ...],
               inputs: jnp.ndarray | None) -> tuple[jnp.ndarray, None]:
    src, dst, weights = edge
    source = states if self.read_carry else inputs
    x = lax.dynamic_index_in_dim(source, src, keepdims=False)
    out = MixedOp(self.channels, self.stride, self.train, self.dtype, self.impl, name='mixed')(
        x, weights)
    total = lax.dynamic_index_in_dim(states, dst, keepdims=False) + out
    return lax.dynamic_update_index_in_dim(states, total, dst, 0), None


class SearchCell(nn.Module):
  """One cell of the supernet: 14 mixed edges, run as ``nn.scan`` over edges.

  A normal cell scans all 14 edges over the stacked states ``[s0, s1, n0, .., n3]``
  (one copy of the mixed operation in the compiled program); a reduction cell scans its
  8 strided edges from the cell inputs, then its 6 edges between nodes. Parameters are
  stacked on a leading edge axis: ``edges`` (normal: rows of ``alphas['normal']`` in
  order), ``input_edges`` and ``node_edges`` (reduce: :data:`INPUT_EDGES`,
  :data:`NODE_EDGES`).

  Attributes:
    channels: ``C`` of this cell.
    reduction: reduction cell (edges from the cell inputs use stride 2).
    reduction_prev: the previous cell reduced (``s0`` has twice ``s1``'s spatial size).
    train: batch statistics in the batch norms.
    dtype: computation dtype.
    impl: darts_ops implementation ('auto', 'fast', 'lax').
  """
  channels: int
  reduction: bool
  reduction_prev: bool
  train: bool
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  def _scan(self, states: jnp.ndarray, rows: tuple[int, ...], weights: jnp.ndarray,
            inputs: jnp.ndarray | None, *, stride: int, read_carry: bool, src_offset: int,
            dst_offset: int, name: str) -> jnp.ndarray:
    """Runs the edges ``rows`` (in order): edge ``(node, inp)`` reads
    ``(states if read_carry else inputs)[inp - src_offset]`` and adds to
    ``states[node + dst_offset]``."""
    src = np.asarray([EDGES[e][1] - src_offset for e in rows], np.int32)
    dst = np.asarray([EDGES[e][0] + dst_offset for e in rows], np.int32)
    scan = nn.scan(EdgeStep, variable_axes={'params': 0, 'batch_stats': 0},
                   split_rngs={'params': True}, in_axes=(0, nn.broadcast), length=len(rows))
    step = scan(self.channels, stride, self.train, read_carry, self.dtype, self.impl, name=name)
    states, _ = step(states, (jnp.asarray(src), jnp.asarray(dst), weights[np.asarray(rows)]),
                     inputs)
    return states

  @nn.compact
  def __call__(self, s0: jnp.ndarray, s1: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """``weights``: (14, 8) softmax of this cell type's alphas."""
    c, train = self.channels, self.train
    if self.reduction_prev:
      s0 = FactorizedReduce(c, False, self.dtype, impl=self.impl, name='preprocess0')(
          s0, train=train)
    else:
      s0 = ReLUConvBN(c, affine=False, dtype=self.dtype, impl=self.impl,
                      name='preprocess0')(s0, train=train)
    s1 = ReLUConvBN(c, affine=False, dtype=self.dtype, impl=self.impl,
                    name='preprocess1')(s1, train=train)
    if not self.reduction:
      zeros = jnp.zeros((NUM_NODES, *s1.shape), s1.dtype)
      states = jnp.concatenate([s0[None], s1[None], zeros])
      states = self._scan(states, tuple(range(NUM_EDGES)), weights, None, stride=1,
                          read_carry=True, src_offset=0, dst_offset=NUM_INPUTS, name='edges')
      nodes = states[NUM_INPUTS:]
    else:
      n, h, w, _ = s1.shape
      nodes = jnp.zeros((NUM_NODES, n, -(-h // 2), -(-w // 2), c), s1.dtype)
      nodes = self._scan(nodes, INPUT_EDGES, weights, jnp.stack([s0, s1]), stride=2,
                         read_carry=False, src_offset=0, dst_offset=0, name='input_edges')
      nodes = self._scan(nodes, NODE_EDGES, weights, None, stride=1, read_carry=True,
                         src_offset=NUM_INPUTS, dst_offset=0, name='node_edges')
    return jnp.concatenate(list(nodes), axis=-1)


def _bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jnp.ndarray:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class SuperNetwork(nn.Module):
  """The DARTS search network for NHWC images of any size and channel count.

  Attributes:
    layers: cells (>= 3; the paper's search uses 8), reductions at ``layers // 3`` and
      ``2 * layers // 3``.
    init_channels: ``C`` of the first cells (the paper's search uses 16).
    num_classes: classifier outputs.
    stem_multiplier: stem width ``stem_multiplier * C`` (3 in the release).
    dtype: computation dtype (parameters are created float32; cast them for float64).
    impl: darts_ops implementation: 'auto' (default: 'fast' on CPU, 'lax' on GPU/TPU,
      resolved at trace time), 'fast' or 'lax'. None and '' are read as 'auto' for now
      (``distill_jax.trainers.search`` passes an unset config value as None).
    reductions: indices of the reduction cells; None = the paper's ``layers // 3`` and
      ``2 * layers // 3`` (then ``layers >= 3``). Other values serve small test networks
      (e.g. ``layers=2, reductions=(1,)``: one normal and one reduction cell).
  """
  layers: int = 8
  init_channels: int = 16
  num_classes: int = 10
  stem_multiplier: int = 3
  dtype: Dtype = jnp.float32
  impl: str | None = 'auto'
  reductions: tuple[int, ...] | None = None

  def __post_init__(self) -> None:
    check_impl(self._impl())
    super().__post_init__()

  def _impl(self) -> str:
    """``impl`` with None / '' read as 'auto' (transitional, for ``distill_jax.trainers.search``)."""
    return self.impl or 'auto'

  def reduction_indices(self) -> tuple[int, ...]:
    if self.reductions is None:
      return self.layers // 3, 2 * self.layers // 3
    return tuple(self.reductions)

  @nn.compact
  def __call__(self, x: jnp.ndarray, alphas: dict, *, train: bool) -> jnp.ndarray:
    """Logits of NHWC ``x`` under ``alphas`` ({'normal', 'reduce'}, raw, before softmax);
    float32 (float64 when ``dtype`` is float64)."""
    minimum = 3 if self.reductions is None else 1
    layers = self.layers
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < minimum:
      raise ValueError(f'model.layers={layers!r} is too small; allowed: integers >= {minimum}')
    if any(not 0 <= r < layers for r in self.reduction_indices()):
      raise ValueError(f'reductions={self.reductions!r}; allowed: cell indices 0..{layers - 1}')
    if self.init_channels < 2:
      raise ValueError(f'model.init_channels={self.init_channels!r}; allowed: integers >= 2')
    for kind in ('normal', 'reduce'):
      if tuple(alphas[kind].shape) != (NUM_EDGES, NUM_OPS):
        raise ValueError(f'alphas[{kind!r}] has shape {tuple(alphas[kind].shape)}; '
                         f'expected ({NUM_EDGES}, {NUM_OPS})')
    weights = {k: jax.nn.softmax(alphas[k].astype(self.dtype), axis=-1)
               for k in ('normal', 'reduce')}
    c = self.init_channels
    impl = self._impl()
    s = Conv(self.stem_multiplier * c, 3, 1, 1, dtype=self.dtype, impl=impl, name='stem_conv')(x)
    s = batch_norm(train=train, dtype=self.dtype, name='stem_bn')(s)
    s0 = s1 = s
    reductions = self.reduction_indices()
    reduction_prev = False
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c *= 2
      cell = SearchCell(c, reduction, reduction_prev, train, self.dtype, impl,
                        name=names.cell_name(i))
      s0, s1 = s1, cell(s0, s1, weights['reduce' if reduction else 'normal'])
      reduction_prev = reduction
    out = jnp.mean(s1, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_default_init,
                      bias_init=_bias_init(out.shape[-1]), name=names.CLASSIFIER)(out)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


def _leaf_init(path: tuple[str, ...], shape: tuple[int, ...], dtype: Any,
               rng: np.random.Generator, fan_in_of: dict[tuple[str, ...], int]) -> np.ndarray:
  """PyTorch's defaults, as the release: conv/linear weights and the linear bias
  ``U(+-1/sqrt(fan_in))``; batch-norm scale 1, bias 0; running mean 0, variance 1."""
  name, parent = path[-1], path[-2] if len(path) > 1 else ''
  if name in ('mean', 'bias') and parent != names.CLASSIFIER:
    return np.zeros(shape, dtype)
  if name in ('var', 'scale'):
    return np.ones(shape, dtype)
  if name == 'kernel':
    # Conv kernels are (..., k, k, C_in / groups, C_out) with leading edge axes; the
    # classifier's is (C_in, classes).
    fan_in = shape[-2] if parent == names.CLASSIFIER else math.prod(shape[-4:-1])
  elif name == 'bias':
    fan_in = fan_in_of[path[:-1]]
  else:
    raise ValueError(f'no initialiser for supernet variable {"/".join(path)}')
  bound = 1.0 / math.sqrt(fan_in)
  return rng.uniform(-bound, bound, shape).astype(dtype)


def init_supernet(model: SuperNetwork, seed: int, input_shape: tuple[int, ...]) -> dict:
  """``{'params', 'batch_stats'}`` (host numpy arrays) for NHWC ``input_shape``, without
  compiling or running the network: shapes from ``jax.eval_shape``, values from PyTorch's
  default initialisers (:func:`_leaf_init`) drawn by numpy, one generator
  ``default_rng([seed, i])`` per variable ``i`` in path order.
  """
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros(input_shape, jnp.float32), init_alphas(jax.random.key(0)),
      train=False))
  variables = {k: shapes[k] for k in ('params', 'batch_stats')}
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  paths = [tuple(str(getattr(k, 'key', k)) for k in path) for path, _ in flat]
  fan_in_of = {p[:-1]: s.shape[-2] for p, (_, s) in zip(paths, flat)
               if p[-1] == 'kernel' and p[-2] == names.CLASSIFIER}
  leaves = [_leaf_init(p, s.shape, s.dtype, np.random.default_rng([seed, i]), fan_in_of)
            for i, (p, (_, s)) in enumerate(zip(paths, flat))]
  return jax.tree_util.tree_unflatten(treedef, leaves)
