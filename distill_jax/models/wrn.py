"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k for CIFAR-style inputs: a 3x3 stem convolution to 16 channels, then three
groups of n = (d - 4) / 6 pre-activation basic blocks of widths 16k, 32k and 64k at
strides 1, 2 and 2, then BN-ReLU, global average pooling and a linear classifier.
WRN-16-2 has 691,674 parameters and WRN-40-2 2,243,546 (10 classes, batch-norm
scale/bias and classifier bias included), as in the paper and the attention-transfer
release (Zagoruyko & Komodakis, ICLR 2017, github.com/szagoruyko/attention-transfer).

Param tree: ``stem``, ``group{g}_block{b}`` (:func:`names.wrn_block_name`; ``bn0, conv0,
bn1, conv1`` and, where the shape changes, ``shortcut``), ``final_bn``, ``classifier``.

Each block output is marked with :func:`layers.mark` as ``group{g}_block{b}_out``
(:func:`names.wrn_block_output`; collections ``'perturbations'`` / ``'intermediates'``);
the last block's mark in each group is that group's attention point.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import layers, names


class WideBasicBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3 + shortcut.

  The shortcut is the identity, or a bias-free 1x1 convolution applied to the
  pre-activated input when the stride or the channel count changes.
  (N, H, W, C) -> (N, ceil(H / stride), ceil(W / stride), features).
  """
  features: int
  stride: int = 1
  dropout_rate: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    pre = nn.relu(layers.batch_norm(train=train, dtype=self.dtype, name='bn0')(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = layers.conv(self.features, 1, self.stride, dtype=self.dtype, name='shortcut')(pre)
    else:
      shortcut = x
    y = layers.conv(self.features, 3, self.stride, dtype=self.dtype, name='conv0')(pre)
    y = nn.relu(layers.batch_norm(train=train, dtype=self.dtype, name='bn1')(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = layers.conv(self.features, 3, dtype=self.dtype, name='conv1')(y)
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor`` on NHWC images of any size and channel count.

  ``model.apply(variables, x, train=...)`` with x of shape (N, H, W, C) returns
  ``(logits, (a0, a1, a2))``: float32 logits (N, num_classes) and the three group
  outputs, of 16k, 32k and 64k channels at H, ceil(H/2) and ceil(H/4) pixels
  (32, 16, 8 on CIFAR), in ``dtype``. Dropout (rng ``'dropout'``) acts between
  the two convolutions of each block, only when ``train`` and ``dropout_rate > 0``.
  ``dtype`` is the compute dtype; parameters are float32.
  """
  depth: int = 16
  widen_factor: int = 2
  num_classes: int = 10
  dropout_rate: float = 0.0
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self) -> None:
    layers.check_depth('WideResNet', self.depth)
    layers.check_range('WideResNet', 'widen_factor', self.widen_factor, 1, float('inf'),
                       'a positive integer')
    layers.check_range('WideResNet', 'dropout_rate', self.dropout_rate, 0.0, 0.999999,
                       'in [0, 1)')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    blocks_per_group = (self.depth - 4) // 6
    x = layers.conv(16, 3, dtype=self.dtype, name='stem')(x)
    points = []
    for g, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
      for b in range(blocks_per_group):
        x = WideBasicBlock(
            width * self.widen_factor, stride if b == 0 else 1, self.dropout_rate, self.dtype,
            name=names.wrn_block_name(g, b))(x, train=train)
        x = layers.mark(self, names.wrn_block_output(g, b), x)
      points.append(x)
    x = nn.relu(layers.batch_norm(train=train, dtype=self.dtype, name='final_bn')(x))
    x = layers.global_avg_pool(x)
    self.sow(names.INTERMEDIATES, names.EMBEDDING, x)  # (N, D): what RKD/PKT/CC read
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name=names.CLASSIFIER)(x)
    return logits.astype(jnp.float32), tuple(points)
