"""DenseNet-BC (Huang, Liu, van der Maaten & Weinberger, "Densely Connected
Convolutional Networks", CVPR 2017), the CIFAR variant with bottlenecks and
compression.

A 3x3 stem convolution to 2k channels (k = growth rate), three dense blocks of
n = (L - 4) / 6 bottleneck layers each (BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k),
output concatenated to the input), transitions between blocks
(BN-ReLU-conv1x1(floor(C * compression))-avgpool 2x2), then BN-ReLU, global average
pooling and a linear classifier. DenseNet-BC L=100 k=12 has 769,162 parameters
(10 classes, batch-norm scale/bias and classifier bias included).

Param tree: ``stem``, ``block{i}`` (``layer{j}`` with ``bn0, conv0, bn1, conv1``),
``transition{i}`` (``bn, conv``), ``final_bn``, ``classifier``.

Marks (:func:`layers.mark`, ``'perturbations'`` / ``'intermediates'``): each dense
block output (before its transition) as ``block{i}_out`` -- these are the attention
points -- and each transition output as ``transition{i}_out``
(:func:`names.densenet_block_output`, :func:`names.densenet_transition_output`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import layers, names


class Bottleneck(nn.Module):
  """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); (N, H, W, C) -> (N, H, W, k) new features."""
  growth_rate: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = nn.relu(layers.batch_norm(train=train, dtype=self.dtype, name='bn0')(x))
    y = layers.conv(4 * self.growth_rate, 1, dtype=self.dtype, name='conv0')(y)
    y = nn.relu(layers.batch_norm(train=train, dtype=self.dtype, name='bn1')(y))
    return layers.conv(self.growth_rate, 3, dtype=self.dtype, name='conv1')(y)


class DenseBlock(nn.Module):
  """``num_layers`` bottlenecks, each one's output concatenated onto its input.

  (N, H, W, C) -> (N, H, W, C + num_layers * growth_rate).
  """
  num_layers: int
  growth_rate: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for j in range(self.num_layers):
      y = Bottleneck(self.growth_rate, self.dtype, name=f'layer{j}')(x, train=train)
      x = jnp.concatenate([x, y], axis=-1)
    return x


class Transition(nn.Module):
  """BN-ReLU-conv1x1(features)-avgpool 2x2; (N, H, W, C) -> (N, H//2, W//2, features)."""
  features: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.relu(layers.batch_norm(train=train, dtype=self.dtype, name='bn')(x))
    x = layers.conv(self.features, 1, dtype=self.dtype, name='conv')(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNetBC(nn.Module):
  """DenseNet-BC with ``depth`` layers and growth rate ``growth_rate``, NHWC inputs.

  ``model.apply(variables, x, train=...)`` with x of shape (N, H, W, C) returns
  ``(logits, (a0, a1, a2))``: float32 logits (N, num_classes) and the three dense
  block outputs at H, H//2 and H//4 pixels (32, 16, 8 on CIFAR), in ``dtype``.
  ``dtype`` is the compute dtype; parameters are float32.
  """
  depth: int = 100
  growth_rate: int = 12
  num_classes: int = 10
  compression: float = 0.5
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self) -> None:
    layers.check_depth('DenseNetBC', self.depth)
    layers.check_range('DenseNetBC', 'growth_rate', self.growth_rate, 1, float('inf'),
                       'a positive integer')
    layers.check_range('DenseNetBC', 'compression', self.compression, 1e-6, 1.0, 'in (0, 1]')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    layers_per_block = (self.depth - 4) // 6
    x = layers.conv(2 * self.growth_rate, 3, dtype=self.dtype, name='stem')(x)
    points = []
    for i in range(3):
      x = DenseBlock(layers_per_block, self.growth_rate, self.dtype,
                     name=names.densenet_block_name(i))(x, train=train)
      x = layers.mark(self, names.densenet_block_output(i), x)
      points.append(x)
      if i < 2:
        features = math.floor(x.shape[-1] * self.compression)
        x = Transition(features, self.dtype, name=names.densenet_transition_name(i))(
            x, train=train)
        x = layers.mark(self, names.densenet_transition_output(i), x)
    x = nn.relu(layers.batch_norm(train=train, dtype=self.dtype, name='final_bn')(x))
    x = layers.global_avg_pool(x)
    self.sow(names.INTERMEDIATES, names.EMBEDDING, x)  # (N, D): what RKD/PKT/CC read
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name=names.CLASSIFIER)(x)
    return logits.astype(jnp.float32), tuple(points)
