"""The DARTS candidate operations as Flax linen modules, shared by the evaluation network
and the search supernet.

Operations follow Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search"
(ICLR 2019, arXiv:1806.09055) and the definitions of the authors' public release
(github.com/quark0/darts, ``cnn/operations.py``): separable convolutions applied twice,
dilated separable convolutions applied once, 3x3 pooling with padding 1 (average pooling
does not count the padding, ``count_include_pad=False``), identity / factorized
reduction for ``skip_connect`` and zeros for ``none``. Convolutions have no bias; batch
norm (:func:`distill_jax.models.layers.batch_norm`) uses momentum 0.9 (PyTorch's 0.1)
and epsilon 1e-5, with an ``affine`` switch (the supernet uses ``affine=False``).

Every operation module is called as ``op(x, train=...)`` on NHWC inputs. :data:`OPS`
maps each primitive name to a constructor
``OPS[name](C_in, C_out, stride, affine, groups, dtype) -> nn.Module``.

Implementations. Every module (and pooling function) takes ``impl``: ``'fast'``,
``'lax'`` or ``'auto'`` (the default), which :func:`resolve_impl` turns into ``'fast'``
when ``jax.default_backend() == 'cpu'`` and ``'lax'`` on GPU/TPU, at trace time.

Speed on CPU. XLA's CPU convolutions are slow for depthwise kernels and especially for
their gradients, so ``impl='fast'`` writes
- a depthwise k x k convolution as a sum of k*k shifted (strided, dilated) slices times
  per-channel weights,
- a grouped (denser than depthwise) k x k convolution as per-group patches of the k*k
  shifted slices contracted with a per-group matrix (``einsum``); XLA's grouped
  convolution was ~10-20x slower here (DARTS_V1, 10 cells, C=16, groups C/2 or C/4
  everywhere, 8x8 inputs, batch 64: ~2 s vs ~0.19 s per training step),
- a 1x1 convolution as a matrix product over channels (after strided subsampling),
- 3x3 max / average pooling as a chain of maxima / a sum of shifted slices.
These compute the same function as ``lax.conv_general_dilated`` / ``lax.reduce_window``
(the tests check it numerically) and keep the parameter layout of ``nn.Conv``
(kernel ``(kh, kw, C_in // groups, C_out)``), so ``impl='lax'`` is a drop-in reference
and the form for accelerators, whose library convolutions (``lax.conv_general_dilated``
with ``feature_group_count``, ``lax.reduce_window``) are the fast path there.
Dense k x k convolutions of several input channels (the stem) use ``lax``. During
``init`` (which runs op by op, outside ``jit``) modules use ``lax``: the same function
with fewer eager dispatches.

Initialisation follows PyTorch's defaults as the release does: conv kernels
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; batch norm scale 1, bias 0.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from distill_jax.models import darts_layout as L
from distill_jax.models.layers import batch_norm

Dtype = Any

# The values of every ``impl`` field and argument here.
IMPLS: tuple[str, ...] = ('auto', 'fast', 'lax')

# PyTorch's default conv/linear weight init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def check_impl(impl: str) -> str:
  """Returns ``impl`` if it is one of :data:`IMPLS`, else raises a one-line ValueError."""
  if not isinstance(impl, str) or impl not in IMPLS:
    raise ValueError(f'impl={impl!r} is not a DARTS operation implementation; allowed: '
                     f"{', '.join(repr(i) for i in IMPLS)}")
  return impl


def resolve_impl(impl: str = 'auto') -> str:
  """``'fast'`` or ``'lax'`` for an ``impl`` of :data:`IMPLS`.

  ``'auto'`` is ``'fast'`` (shifted slices and matrix products, see the module docstring)
  when ``jax.default_backend() == 'cpu'`` and ``'lax'`` (library convolutions and
  ``reduce_window``) on GPU/TPU. Call it at trace time, so the backend is the one the
  computation runs on.
  """
  if check_impl(impl) == 'auto':
    return 'fast' if jax.default_backend() == 'cpu' else 'lax'
  return impl


def _module_impl(module: nn.Module, impl: str) -> str:
  """A module's implementation: 'lax' while initialising (the same function, but fewer
  eager dispatches: ``init`` runs op by op outside ``jit``), else ``resolve_impl(impl)``."""
  impl = resolve_impl(impl)
  return 'lax' if module.is_initializing() else impl


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _shifted_slices(x: jnp.ndarray, kernel: int, stride: int, padding: int, dilation: int,
                    pad_value: float) -> list[jnp.ndarray]:
  """The ``kernel**2`` strided window taps of NHWC ``x``, row-major over (i, j).

  Tap ``(i, j)`` holds, at output position ``(h, w)``, the padded input at
  ``(h * stride + i * dilation, w * stride + j * dilation)``.
  """
  n, h, w, c = x.shape
  ho = _out_size(h, kernel, stride, padding, dilation)
  wo = _out_size(w, kernel, stride, padding, dilation)
  if ho <= 0 or wo <= 0:
    raise ValueError(f'input of spatial size {h}x{w} is too small for a {kernel}x{kernel} window')
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=jnp.asarray(pad_value, x.dtype))
  taps = []
  for i in range(kernel):
    for j in range(kernel):
      r, q = i * dilation, j * dilation
      taps.append(lax.slice(x, (0, r, q, 0), (n, r + (ho - 1) * stride + 1,
                                              q + (wo - 1) * stride + 1, c),
                            (1, stride, stride, 1)))
  return taps


def _subsample(x: jnp.ndarray, stride: int) -> jnp.ndarray:
  if stride == 1:
    return x
  n, h, w, c = x.shape
  return lax.slice(x, (0, 0, 0, 0), (n, h, w, c), (1, stride, stride, 1))


class Conv(nn.Module):
  """A bias-free 2-D convolution with ``nn.Conv``'s kernel layout and a fast CPU path.

  Attributes:
    features: output channels.
    kernel_size: square kernel size k.
    stride: stride in both spatial dimensions.
    padding: symmetric zero padding in both spatial dimensions.
    dilation: kernel dilation.
    groups: feature groups (``C_in`` for depthwise); must divide ``C_in`` and ``features``.
    dtype: computation dtype (parameters stay float32).
    impl: 'auto' (default), 'fast' or 'lax'; see :func:`resolve_impl`.
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  def _impl(self) -> str:
    return _module_impl(self, self.impl)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c_in = x.shape[-1]
    g, k = self.groups, self.kernel_size
    if c_in % g or self.features % g:
      raise ValueError(
          f'{self.name}: groups={g} must divide C_in={c_in} and C_out={self.features}')
    kernel = self.param(L.KERNEL, torch_default_init, (k, k, c_in // g, self.features),
                        jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if self._impl() == 'fast':
      if k == 1 and g == 1 and self.padding == 0:
        return jnp.dot(_subsample(x, self.stride), kernel[0, 0])
      cpg_in, cpg_out = c_in // g, self.features // g
      if cpg_in == 1:
        # Depthwise: output channel c reads input channel c // cpg_out.
        if cpg_out > 1:
          x = jnp.repeat(x, cpg_out, axis=-1)
        taps = _shifted_slices(x, k, self.stride, self.padding, self.dilation, 0.0)
        w = kernel.reshape(k * k, self.features)
        y = taps[0] * w[0]
        for t in range(1, k * k):
          y = y + taps[t] * w[t]
        return y
      if g > 1:
        # Grouped: per-group patches (k*k taps x cpg_in channels) times a per-group matrix.
        taps = _shifted_slices(x, k, self.stride, self.padding, self.dilation, 0.0)
        n, ho, wo, _ = taps[0].shape
        patches = jnp.stack([t.reshape(n, ho, wo, g, cpg_in) for t in taps], axis=-1)
        w = kernel.reshape(k * k, cpg_in, g, cpg_out)
        y = jnp.einsum('nhwgit,tigo->nhwgo', patches, w)
        return y.reshape(n, ho, wo, self.features)
    p = self.padding
    return lax.conv_general_dilated(
        x, kernel, window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=g)


def max_pool_3x3(x: jnp.ndarray, stride: int, impl: str = 'auto') -> jnp.ndarray:
  """3x3 max pooling with padding 1 (padding never wins)."""
  if resolve_impl(impl) == 'fast':
    taps = _shifted_slices(x, 3, stride, 1, 1, -jnp.inf)
    y = taps[0]
    for t in taps[1:]:
      y = jnp.maximum(y, t)
    return y
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1),
                           (1, stride, stride, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


def _valid_counts(size: int, kernel: int, stride: int, padding: int) -> np.ndarray:
  """Per output index, how many window elements fall inside the unpadded input."""
  out = _out_size(size, kernel, stride, padding)
  start = np.arange(out) * stride - padding
  lo, hi = np.maximum(start, 0), np.minimum(start + kernel, size)
  return (hi - lo).astype(np.float32)


def avg_pool_3x3(x: jnp.ndarray, stride: int, impl: str = 'auto') -> jnp.ndarray:
  """3x3 average pooling with padding 1, dividing by the number of non-padding elements."""
  _, h, w, _ = x.shape
  if resolve_impl(impl) == 'fast':
    taps = _shifted_slices(x, 3, stride, 1, 1, 0.0)
    y = taps[0]
    for t in taps[1:]:
      y = y + t
  else:
    y = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1),
                          (1, stride, stride, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  counts = np.outer(_valid_counts(h, 3, stride, 1), _valid_counts(w, 3, stride, 1))
  return y / jnp.asarray(counts[:, :, None], y.dtype)


class ReLUConvBN(nn.Module):
  """ReLU -> k x k conv (no bias) -> BN."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  affine: bool = True
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    x = nn.relu(x)
    x = Conv(self.features, self.kernel_size, self.stride, self.padding, dtype=self.dtype,
             impl=self.impl, name=L.CONV)(x)
    return batch_norm(train=train, affine=self.affine, dtype=self.dtype, name=L.BN)(x)


class FactorizedReduce(nn.Module):
  """ReLU -> two 1x1 stride-2 convs (the second on the input shifted by one pixel) ->
  concat -> BN; halves the spatial size (rounding up).

  For odd sizes the shifted half is zero-padded at the bottom/right so both halves have
  ``ceil(H / 2)`` rows and columns. An odd ``features`` gives the extra channel to the
  second half.
  """
  features: int
  affine: bool = True
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    if self.features < 2:
      raise ValueError(f'FactorizedReduce needs features >= 2; got {self.features}')
    x = nn.relu(x)
    _, h, w, _ = x.shape
    shifted = jnp.pad(x[:, 1:, 1:, :], ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    half = self.features // 2
    a = Conv(half, 1, 2, dtype=self.dtype, impl=self.impl, name=L.FR_CONVS[0])(x)
    b = Conv(self.features - half, 1, 2, dtype=self.dtype, impl=self.impl,
             name=L.FR_CONVS[1])(shifted)
    y = jnp.concatenate([a, b], axis=-1)
    return batch_norm(train=train, affine=self.affine, dtype=self.dtype, name=L.BN)(y)


def _groups(groups: int | None, c_in: int, where: str) -> int:
  g = c_in if groups is None else groups
  if g < 1 or c_in % g:
    raise ValueError(f'{where}: groups={groups} must divide C_in={c_in}; allowed: divisors of '
                     f'{c_in} (None = {c_in}, depthwise)')
  return g


def _relu_conv_bn(x: jnp.ndarray, features: int, kernel_size: int, stride: int, padding: int,
                  dilation: int, groups: int, layer_names: tuple[str, str, str], *, affine: bool,
                  dtype: Dtype, impl: str, train: bool) -> jnp.ndarray:
  """ReLU -> (grouped) k x k conv (C_in channels) -> 1x1 conv -> BN, with the three layers
  named ``layer_names`` in the calling module (call it from an ``nn.compact`` method)."""
  c_in = x.shape[-1]
  x = nn.relu(x)
  x = Conv(c_in, kernel_size, stride, padding, dilation, groups, dtype=dtype, impl=impl,
           name=layer_names[0])(x)
  x = Conv(features, dtype=dtype, impl=impl, name=layer_names[1])(x)
  return batch_norm(train=train, affine=affine, dtype=dtype, name=layer_names[2])(x)


class DilConv(nn.Module):
  """ReLU -> (grouped) k x k dilated conv -> 1x1 conv -> BN (the release's ``DilConv``)."""
  features: int
  kernel_size: int
  stride: int
  padding: int
  dilation: int
  affine: bool = True
  groups: int | None = None
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    g = _groups(self.groups, x.shape[-1], 'DilConv')
    return _relu_conv_bn(x, self.features, self.kernel_size, self.stride, self.padding,
                         self.dilation, g, L.DIL_LAYERS, affine=self.affine,
                         dtype=self.dtype, impl=self.impl, train=train)


class SepConv(nn.Module):
  """Two stacked [ReLU -> (grouped) k x k conv -> 1x1 conv -> BN] (the release's ``SepConv``).

  Only the first depthwise conv is strided; the first 1x1 keeps ``C_in`` channels and the
  second maps to ``features``.
  """
  features: int
  kernel_size: int
  stride: int
  padding: int
  affine: bool = True
  groups: int | None = None
  dtype: Dtype = jnp.float32
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    c_in = x.shape[-1]
    g = _groups(self.groups, c_in, 'SepConv')
    common = dict(affine=self.affine, dtype=self.dtype, impl=self.impl, train=train)
    x = _relu_conv_bn(x, c_in, self.kernel_size, self.stride, self.padding, 1, g,
                      L.SEP_LAYERS[0], **common)
    return _relu_conv_bn(x, self.features, self.kernel_size, 1, self.padding, 1, g,
                         L.SEP_LAYERS[1], **common)


class MaxPool3x3(nn.Module):
  """3x3 max pooling, padding 1."""
  stride: int = 1
  impl: str = 'auto'

  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    del train
    return max_pool_3x3(x, self.stride, _module_impl(self, self.impl))


class AvgPool3x3(nn.Module):
  """3x3 average pooling, padding 1, padding not counted."""
  stride: int = 1
  impl: str = 'auto'

  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    del train
    return avg_pool_3x3(x, self.stride, _module_impl(self, self.impl))


class Identity(nn.Module):
  """``skip_connect`` at stride 1. Drop path skips ops of this type."""

  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    del train
    return x


class Zero(nn.Module):
  """``none``: zeros of the (strided) output shape with ``features`` channels."""
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    del train
    n, h, w, _ = x.shape
    s = self.stride
    return jnp.zeros((n, -(-h // s), -(-w // s), self.features), self.dtype)


def _same_width(name: str, c_in: int, c_out: int) -> None:
  if c_in != c_out:
    raise ValueError(f'{name} needs C_in == C_out; got C_in={c_in}, C_out={c_out}')


def _skip(c_in: int, c_out: int, stride: int, affine: bool, groups: int | None,
          dtype: Dtype, **kw: Any) -> nn.Module:
  del groups
  if stride == 1:
    _same_width('skip_connect', c_in, c_out)
    kw.pop('impl', None)
    return Identity(**kw)
  return FactorizedReduce(c_out, affine, dtype, **kw)


def _pool(cls: type[nn.Module], name: str) -> Callable[..., nn.Module]:
  def make(c_in: int, c_out: int, stride: int, affine: bool, groups: int | None,
           dtype: Dtype, **kw: Any) -> nn.Module:
    del affine, groups, dtype
    _same_width(name, c_in, c_out)
    return cls(stride, **kw)
  return make


def _sep(k: int) -> Callable[..., nn.Module]:
  def make(c_in: int, c_out: int, stride: int, affine: bool, groups: int | None,
           dtype: Dtype, **kw: Any) -> nn.Module:
    _groups(groups, c_in, f'sep_conv_{k}x{k}')
    return SepConv(c_out, k, stride, k // 2, affine, groups, dtype, **kw)
  return make


def _dil(k: int) -> Callable[..., nn.Module]:
  def make(c_in: int, c_out: int, stride: int, affine: bool, groups: int | None,
           dtype: Dtype, **kw: Any) -> nn.Module:
    _groups(groups, c_in, f'dil_conv_{k}x{k}')
    return DilConv(c_out, k, stride, 2 * (k // 2), 2, affine, groups, dtype, **kw)
  return make


def _none(c_in: int, c_out: int, stride: int, affine: bool, groups: int | None,
          dtype: Dtype, **kw: Any) -> nn.Module:
  del c_in, affine, groups
  kw.pop('impl', None)
  return Zero(c_out, stride, dtype, **kw)


# Primitive name -> constructor(C_in, C_out, stride, affine, groups, dtype, **module_kwargs)
# (module_kwargs: e.g. name=..., impl=...). ``groups`` only affects the separable and
# dilated convolutions (None = depthwise).
OPS: dict[str, Callable[..., nn.Module]] = {
    'none': _none,
    'max_pool_3x3': _pool(MaxPool3x3, 'max_pool_3x3'),
    'avg_pool_3x3': _pool(AvgPool3x3, 'avg_pool_3x3'),
    'skip_connect': _skip,
    'sep_conv_3x3': _sep(3),
    'sep_conv_5x5': _sep(5),
    'dil_conv_3x3': _dil(3),
    'dil_conv_5x5': _dil(5),
}


def make_op(primitive: str, c_in: int, c_out: int, stride: int, affine: bool = True,
            groups: int | None = None, dtype: Dtype = jnp.float32, **kw: Any) -> nn.Module:
  """Builds ``primitive``; unknown names fail with one line listing the allowed ones.

  ``kw`` goes to the module (e.g. ``name=``, ``impl=``).
  """
  if primitive not in OPS:
    raise ValueError(f'op={primitive!r} is not a DARTS operation; allowed: {", ".join(OPS)}')
  return OPS[primitive](c_in, c_out, stride, affine, groups, dtype, **kw)


def is_identity(op: nn.Module) -> bool:
  """Whether drop path must skip ``op`` (the release drops every op but the identity)."""
  return isinstance(op, Identity)
