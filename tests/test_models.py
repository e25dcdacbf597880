"""Tests for the WRN and DenseNet-BC networks (distill_jax.models.wrn / .densenet)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import models
from distill_jax.models.densenet import DenseNetBC
from distill_jax.models.wrn import WideResNet

CIFAR = (2, 32, 32, 3)
DIGITS = (2, 8, 8, 1)
# Tiny configurations for forward passes: (registry name, fields, channels of the points).
TINY = {
    'wrn': ('wrn', dict(depth=10, widen_factor=1), (16, 32, 64)),
    # stem 8 -> block0 12 -> transition 6 -> block1 10 -> transition 5 -> block2 9
    'densenet_bc': ('densenet_bc', dict(depth=10, growth_rate=4), (12, 10, 9)),
}


def _bn(c: int) -> int:
  return 2 * c


def wrn_count(depth: int, k: int, classes: int, in_ch: int = 3) -> int:
  """Hand count of WRN-depth-k parameters (shortcut 1x1 conv where the shape changes)."""
  n = (depth - 4) // 6
  total, c = 9 * in_ch * 16, 16
  for width in (16 * k, 32 * k, 64 * k):
    for b in range(n):
      total += _bn(c) + 9 * c * width + _bn(width) + 9 * width * width
      if c != width or (b == 0 and width != 16 * k):
        total += c * width
      c = width
  return total + _bn(c) + c * classes + classes


def densenet_count(depth: int, k: int, classes: int, in_ch: int = 3) -> int:
  """Hand count of DenseNet-BC parameters (compression 0.5)."""
  n = (depth - 4) // 6
  total, c = 9 * in_ch * 2 * k, 2 * k
  for i in range(3):
    for _ in range(n):
      total += _bn(c) + c * 4 * k + _bn(4 * k) + 9 * 4 * k * k
      c += k
    if i < 2:
      total += _bn(c) + c * (c // 2)
      c //= 2
  return total + _bn(c) + c * classes + classes


@pytest.mark.parametrize('name, fields, expected, hand', [
    ('wrn', dict(depth=16, widen_factor=2), 691_674, wrn_count(16, 2, 10)),
    ('wrn', dict(depth=40, widen_factor=2), 2_243_546, wrn_count(40, 2, 10)),
    ('wrn', dict(depth=40, widen_factor=2, num_classes=100), 2_255_156, wrn_count(40, 2, 100)),
    ('densenet_bc', dict(depth=100, growth_rate=12), 769_162, densenet_count(100, 12, 10)),
    ('densenet_bc', dict(depth=40, growth_rate=36), 1_542_682, densenet_count(40, 36, 10)),
])
def test_parameter_counts(name, fields, expected, hand):
  assert hand == expected
  shapes = models.param_shapes(models.create_model(name, **fields), (1, 32, 32, 3))
  assert models.count_params(shapes['params']) == expected
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))


def test_wrn_param_tree():
  shapes = models.param_shapes(WideResNet(depth=10, widen_factor=1), DIGITS)
  params = shapes['params']
  assert set(params) == {'stem', 'group0_block0', 'group1_block0', 'group2_block0', 'final_bn',
                         'classifier'}
  assert set(params['group0_block0']) == {'bn0', 'conv0', 'bn1', 'conv1'}  # 16 -> 16: identity
  assert set(params['group1_block0']) == {'bn0', 'conv0', 'bn1', 'conv1', 'shortcut'}
  assert params['group1_block0']['shortcut']['kernel'].shape == (1, 1, 16, 32)
  assert set(params['classifier']) == {'kernel', 'bias'}
  assert 'bias' not in params['stem']


def test_densenet_param_tree():
  params = models.param_shapes(DenseNetBC(depth=16, growth_rate=4), DIGITS)['params']
  assert set(params) == {'stem', 'block0', 'transition0', 'block1', 'transition1', 'block2',
                         'final_bn', 'classifier'}
  assert set(params['block0']) == {'layer0', 'layer1'}
  assert params['block0']['layer1']['conv0']['kernel'].shape == (1, 1, 12, 16)
  assert params['transition0']['conv']['kernel'].shape == (1, 1, 16, 8)


@pytest.mark.parametrize('input_shape', [CIFAR, DIGITS], ids=['cifar', 'digits'])
@pytest.mark.parametrize('key', sorted(TINY))
def test_output_shapes(key, input_shape, rng):
  name, fields, channels = TINY[key]
  model = models.create_model(name, **fields)
  variables = models.init_variables(model, rng, input_shape)
  assert set(variables) == {'params', 'batch_stats'}
  for path, _ in jax.tree_util.tree_leaves_with_path(variables['params']):
    assert not any(str(getattr(p, 'key', '')) in ('mean', 'var') for p in path)
  n, size = input_shape[0], input_shape[1]
  x = jax.random.normal(rng, input_shape)
  logits, points = model.apply(variables, x, train=False)
  assert logits.shape == (n, 10) and logits.dtype == jnp.float32
  assert isinstance(points, tuple) and len(points) == 3
  for p, s, c in zip(points, (size, size // 2, size // 4), channels):
    assert p.shape == (n, s, s, c)
  assert np.all(np.isfinite(logits))


@pytest.mark.parametrize('name, fields', [
    *[TINY[k][:2] for k in sorted(TINY)],
    ('darts', dict(layers=3, init_channels=4, genotype='DARTS_V1', auxiliary=True))])
def test_embedding_is_what_the_classifier_reads(name, fields, rng):
  model = models.create_model(name, **fields)
  variables = models.init_variables(model, rng, DIGITS)
  x = jax.random.normal(rng, DIGITS)
  (logits, _), state = model.apply(variables, x, train=False, mutable=['intermediates'])
  (embedding,) = state['intermediates']['embedding']
  classifier = variables['params']['classifier']
  assert embedding.shape == (DIGITS[0], classifier['kernel'].shape[0])
  np.testing.assert_allclose(embedding @ classifier['kernel'] + classifier['bias'], logits,
                             rtol=1e-5, atol=1e-5)


def test_registry():
  assert isinstance(models.create_model('wrn', depth=10, widen_factor=1), WideResNet)
  assert isinstance(models.create_model('densenet_bc', depth=10, growth_rate=4), DenseNetBC)
  with pytest.raises(ValueError, match='known: .*densenet_bc.*wrn'):
    models.create_model('resnet')
  with pytest.raises(ValueError, match='model.growth_rate .*allowed: depth, widen_factor'):
    models.create_model('wrn', growth_rate=12)


@pytest.mark.parametrize('name, fields', [
    ('wrn', dict(depth=15)), ('densenet_bc', dict(depth=99)), ('wrn', dict(depth=4)),
])
def test_bad_depth(name, fields):
  with pytest.raises(ValueError, match=r'model\.depth=\d+ is not allowed .*6n\+4') as err:
    models.create_model(name, **fields)
  assert '\n' not in str(err.value)


def test_bad_fields():
  with pytest.raises(ValueError, match='model.compression=0.0'):
    DenseNetBC(depth=10, compression=0.0)
  with pytest.raises(ValueError, match='model.dropout_rate=1.0'):
    WideResNet(depth=10, dropout_rate=1.0)


@pytest.mark.parametrize('key', sorted(TINY))
def test_batch_stats_update(key, rng):
  name, fields, _ = TINY[key]
  model = models.create_model(name, **fields)
  variables = models.init_variables(model, rng, DIGITS)
  x = jax.random.normal(rng, DIGITS) * 3.0 + 1.0
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert set(updates) == {'batch_stats'}
  old, new = variables['batch_stats'], updates['batch_stats']
  assert jax.tree.structure(old) == jax.tree.structure(new)
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
  # Evaluation reads the running averages and needs nothing mutable.
  logits, _ = model.apply(variables, x, train=False)
  assert logits.shape == (2, 10)


def test_dropout(rng):
  model = WideResNet(depth=10, widen_factor=1, dropout_rate=0.5)
  variables = models.init_variables(model, rng, DIGITS)
  x = jax.random.normal(rng, DIGITS)

  def run(train, seed=None):
    rngs = {} if seed is None else {'dropout': jax.random.key(seed)}
    out, _ = model.apply(variables, x, train=train, rngs=rngs, mutable=['batch_stats'])
    return out[0]

  np.testing.assert_array_equal(run(False), run(False, seed=1))
  np.testing.assert_array_equal(run(True, seed=1), run(True, seed=1))
  assert not np.allclose(run(True, seed=1), run(True, seed=2))
  no_dropout = WideResNet(depth=10, widen_factor=1)
  no_dropout.apply(variables, x, train=True, mutable=['batch_stats'])  # no rng needed


@pytest.mark.parametrize('key', sorted(TINY))
def test_bfloat16(key, rng):
  name, fields, _ = TINY[key]
  model = models.create_model(name, dtype=jnp.bfloat16, **fields)
  variables = models.init_variables(model, rng, DIGITS)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  logits, points = model.apply(variables, jax.random.normal(rng, DIGITS), train=False)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  assert all(p.dtype == jnp.bfloat16 for p in points)


@pytest.mark.parametrize('key, names', [
    ('wrn', ['group0_block0_out', 'group1_block0_out', 'group2_block0_out']),
    ('densenet_bc', ['block0_out', 'transition0_out', 'block1_out', 'transition1_out',
                     'block2_out']),
])
def test_perturbations(key, names, rng):
  name, fields, _ = TINY[key]
  model = models.create_model(name, **fields)
  x = jax.random.normal(rng, DIGITS)
  full = model.init(rng, x, train=False)
  perturbations = full['perturbations']
  assert sorted(perturbations) == sorted(names)
  assert all(not np.any(v) for v in jax.tree.leaves(perturbations))
  variables = models.init_variables(model, rng, DIGITS)

  def apply(perturbations):
    return model.apply({**variables, 'perturbations': perturbations}, x, train=False)

  logits, points = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(apply(perturbations)[0], logits)

  # The gradient of a function of the last attention point alone, read through its
  # perturbation, is that function's gradient wrt the activation.
  last = [n for n in names if n.startswith(('group2', 'block2'))][-1]
  weights = jax.random.normal(jax.random.key(1), points[2].shape)
  grads = jax.grad(lambda p: jnp.sum(apply(p)[1][2] * weights))(perturbations)
  np.testing.assert_allclose(grads[last], weights, rtol=1e-6)

  # Through the logits, every marked activation gets a non-zero gradient.
  grads = jax.grad(lambda p: jnp.sum(jax.nn.log_softmax(apply(p)[0])[:, 0]))(perturbations)
  assert all(np.any(grads[n]) and grads[n].shape == perturbations[n].shape for n in names)

  # The same names are sown into 'intermediates' with the activations' values, beside the
  # pooled embedding (test_embedding_is_what_the_classifier_reads).
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  sown = state['intermediates']
  assert sorted(sown) == sorted([*names, 'embedding'])
  np.testing.assert_array_equal(sown[last][0], points[2])


def test_batch_norm_helper_train_and_affine():
  from distill_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 3.0 + 1.0
  v = layers.batch_norm(train=False, dtype=jnp.float32, name='bn').init(jax.random.key(0), x)
  assert set(v['params']) == {'scale', 'bias'} and set(v['batch_stats']) == {'mean', 'var'}
  bn = layers.batch_norm(train=True, affine=False, dtype=jnp.float32, name='bn')
  v = bn.init(jax.random.key(0), x)
  assert 'params' not in v and set(v['batch_stats']) == {'mean', 'var'}
  y, state = bn.apply(v, x, mutable=['batch_stats'])
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
  # PyTorch's momentum 0.1: the running mean moves a tenth of the way to the batch mean.
  np.testing.assert_allclose(state['batch_stats']['mean'], 0.1 * jnp.mean(x, axis=(0, 1, 2)),
                             rtol=1e-5)


def test_point_names_come_from_names_module(rng):
  from distill_jax.models import names  # pylint: disable=g-import-not-at-top
  assert names.wrn_block_output(2, 0) == 'group2_block0_out'
  assert names.densenet_block_output(1) == 'block1_out'
  assert names.densenet_transition_output(0) == 'transition0_out'
  assert names.cell_output(3) == 'cell3/output'
  name, fields, _ = TINY['wrn']
  shapes = jax.eval_shape(lambda: models.create_model(name, **fields).init(
      rng, jnp.zeros(DIGITS), train=False))
  assert sorted(shapes[names.PERTURBATIONS]) == [names.wrn_block_output(g, 0) for g in range(3)]
  assert names.CLASSIFIER in shapes['params'] and names.wrn_block_name(0, 0) in shapes['params']
