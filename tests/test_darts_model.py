"""Tests of the DARTS genotypes, operations and evaluation network.

References: Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search" (ICLR 2019,
arXiv:1806.09055) and the authors' public release github.com/quark0/darts (operations in
``cnn/operations.py``, genotypes in ``cnn/genotypes.py``; its ``train.py`` prints the
3.349342M parameters of DARTS_V2 with C=36 and 20 cells, auxiliary head excluded).
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import genotypes as G
from distill_jax.models import count_params, create_model, init_variables, param_shapes
from distill_jax.models import darts_ops as ops
from distill_jax.models.darts import DartsNetwork, count_params_without_aux

# ---------------------------------------------------------------------------- genotypes


def test_primitives_and_builtins():
  assert G.PRIMITIVES == ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect',
                          'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
  assert G.DARTS_V1.normal[7] == ('skip_connect', 2)
  assert G.DARTS_V2.normal[7] == ('dil_conv_3x3', 2)
  assert G.DARTS_V2.reduce[7] == ('max_pool_3x3', 1)
  assert G.DARTS_V1.reduce[7] == ('avg_pool_3x3', 0)
  for g in (G.DARTS_V1, G.DARTS_V2):
    assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)
    assert G.validate_genotype(g) == g
    hash(g)
  assert G.get_genotype('DARTS_V1') is G.DARTS_V1
  assert G.get_genotype('DARTS') == G.DARTS_V2


def test_genotype_json_round_trip(tmp_path):
  d = G.genotype_to_json(G.DARTS_V2)
  assert d['normal'][0] == ['sep_conv_3x3', 0] and d['reduce_concat'] == [2, 3, 4, 5]
  d = json.loads(json.dumps(d))
  g = G.genotype_from_json(d)
  assert g == G.DARTS_V2 and isinstance(g.normal[0], tuple)
  hash(g)
  assert G.get_genotype(d) == G.DARTS_V2
  path = tmp_path / 'g.json'
  G.save_genotype(path, G.DARTS_V1)
  assert G.load_genotype(path) == G.DARTS_V1
  assert G.get_genotype(str(path)) == G.DARTS_V1
  # A Genotype holding lists (e.g. built by search code) is normalised to tuples.
  listy = G.Genotype([list(p) for p in G.DARTS_V1.normal], range(2, 6),
                     list(G.DARTS_V1.reduce), [2, 3, 4, 5])
  assert G.get_genotype(listy) == G.DARTS_V1
  hash(G.get_genotype(listy))


@pytest.mark.parametrize('change, match', [
    (lambda d: d['normal'].__setitem__(3, ['conv_7x7', 1]), r'conv_7x7.*allowed: none, max_pool'),
    (lambda d: d['normal'].__setitem__(1, ['sep_conv_3x3', 2]), r'normal\[1\] input=2.*0\.\.1'),
    (lambda d: d['reduce'].__setitem__(7, ['skip_connect', 5]), r'reduce\[7\] input=5'),
    (lambda d: d['normal'].pop(), r'7 \(op, input\) pairs.*exactly 8'),
    (lambda d: d.__setitem__('reduce_concat', [2, 9]), r'reduce_concat'),
    (lambda d: d.__setitem__('extra', 1), r"'extra' is unknown"),
])
def test_invalid_genotypes(change, match):
  d = G.genotype_to_json(G.DARTS_V1)
  change(d)
  with pytest.raises(ValueError, match=match):
    G.get_genotype(d)


def test_unknown_genotype_name():
  with pytest.raises(ValueError, match='allowed: DARTS, DARTS_V1, DARTS_V2'):
    G.get_genotype('DARTS_V3')


# ---------------------------------------------------------------------------- operations


def _apply_op(module, x, train=False):
  variables = module.init(jax.random.key(1), x, train=False)
  if train:
    y, _ = module.apply(variables, x, train=True, mutable=['batch_stats'])
    return y
  return module.apply(variables, x, train=False)


@pytest.mark.parametrize('size', [8, 7])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('primitive', G.PRIMITIVES)
def test_op_shapes(primitive, stride, size):
  x = jax.ShapeDtypeStruct((2, size, size, 4), jnp.float32)
  op = ops.make_op(primitive, 4, 4, stride, affine=True)
  y = jax.eval_shape(lambda x: _apply_op(op, x, train=True), x)
  out = -(-size // stride)
  assert y.shape == (2, out, out, 4)


def test_op_registry_and_errors():
  assert tuple(ops.OPS) == G.PRIMITIVES
  with pytest.raises(ValueError, match='allowed: none, max_pool_3x3'):
    ops.make_op('conv_7x7', 4, 4, 1)
  with pytest.raises(ValueError, match='groups=3 must divide C_in=4'):
    ops.make_op('sep_conv_3x3', 4, 4, 1, groups=3)
  # affine=False (the search supernet): no BN parameters, only statistics.
  x = jnp.ones((1, 6, 6, 4))
  v = ops.make_op('sep_conv_3x3', 4, 4, 1, affine=False).init(jax.random.key(0), x, train=False)
  names = {'/'.join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(
      v['params'])[0]}
  assert names == {f'{c}/kernel' for c in ('dw1', 'pw1', 'dw2', 'pw2')}
  assert set(v['batch_stats']) == {'bn1', 'bn2'}


def _check_conv(c_in, c_out, k, stride, dilation, groups, size):
  """The fast Conv equals nn.Conv (feature_group_count) and impl='lax', values and grads."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, c_in))
  pad = dilation * (k // 2)
  fast = ops.Conv(c_out, k, stride, pad, dilation, groups=groups, impl='fast')
  params = fast.init(jax.random.key(1), x)
  assert params['params']['kernel'].shape == (k, k, c_in // groups, c_out)
  ref = nn.Conv(c_out, (k, k), (stride, stride), padding=((pad, pad), (pad, pad)),
                kernel_dilation=(dilation, dilation), feature_group_count=groups,
                use_bias=False)
  y_ref = ref.apply(params, x)
  np.testing.assert_allclose(fast.apply(params, x), y_ref, rtol=1e-5, atol=1e-5)
  lax_conv = ops.Conv(c_out, k, stride, pad, dilation, groups=groups, impl='lax')
  np.testing.assert_allclose(lax_conv.apply(params, x), y_ref, rtol=1e-5, atol=1e-5)

  def loss(module, p, x):
    return jnp.sum(jnp.sin(module.apply(p, x)))
  g_fast = jax.grad(lambda p, x: loss(fast, p, x), argnums=(0, 1))(params, x)
  g_ref = jax.grad(lambda p, x: loss(ref, p, x), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('k, stride, dilation, size', [
    (3, 1, 1, 7), (3, 2, 1, 8), (3, 2, 1, 7), (5, 1, 1, 6), (5, 2, 1, 7), (3, 1, 2, 7),
    (3, 2, 2, 8), (5, 2, 2, 9)])
def test_fast_depthwise_conv_matches_reference(k, stride, dilation, size):
  _check_conv(6, 6, k, stride, dilation, 6, size)


@pytest.mark.parametrize('c_in, c_out, k, stride, dilation, groups, size', [
    (8, 8, 3, 1, 1, 4, 7),   # 2 channels per group (a grown cell)
    (8, 8, 3, 2, 1, 2, 8),   # 4 channels per group
    (8, 8, 5, 2, 2, 4, 9),   # dilated 5x5
    (1, 6, 3, 1, 1, 1, 8),   # one input channel (a 1-channel stem)
    (6, 10, 1, 1, 1, 1, 5),  # pointwise
    (6, 10, 1, 2, 1, 1, 7),  # pointwise, strided, odd size
])
def test_fast_grouped_and_pointwise_conv_match_reference(c_in, c_out, k, stride, dilation,
                                                         groups, size):
  _check_conv(c_in, c_out, k, stride, dilation, groups, size)


@pytest.mark.parametrize('stride, size', [(1, 7), (2, 8), (2, 7), (1, 1)])
def test_fast_pools_match_reduce_window(stride, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  for fn in (ops.max_pool_3x3, ops.avg_pool_3x3):
    np.testing.assert_allclose(fn(x, stride, 'fast'), fn(x, stride, 'lax'), rtol=1e-6, atol=1e-6)
    g_fast = jax.grad(lambda x: jnp.sum(jnp.sin(fn(x, stride, 'fast'))))(x)
    g_lax = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(fn(x, stride, 'lax')))))(x)
    np.testing.assert_allclose(g_fast, g_lax, rtol=1e-5, atol=1e-5)
  ref = nn.max_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)))
  np.testing.assert_allclose(ops.max_pool_3x3(x, stride), ref, rtol=1e-6)
  ref = nn.avg_pool(x, (3, 3), (stride, stride), padding=((1, 1), (1, 1)),
                    count_include_pad=False)
  np.testing.assert_allclose(ops.avg_pool_3x3(x, stride), ref, rtol=1e-6, atol=1e-6)


def test_avg_pool_excludes_padding():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  y = ops.avg_pool_3x3(x, 1)
  assert float(y[0, 0, 0, 0]) == pytest.approx((0 + 1 + 4 + 5) / 4)  # corner: 4 valid
  assert float(y[0, 0, 1, 0]) == pytest.approx((0 + 1 + 2 + 4 + 5 + 6) / 6)  # edge: 6 valid
  assert float(y[0, 1, 1, 0]) == pytest.approx(5.0)  # interior: 9 valid
  y2 = ops.avg_pool_3x3(x, 2)
  assert float(y2[0, 0, 0, 0]) == pytest.approx(2.5)
  assert float(y2[0, 1, 1, 0]) == pytest.approx(np.mean([5, 6, 7, 9, 10, 11, 13, 14, 15]))


def test_factorized_reduce_halves_and_odd_sizes():
  for size in (8, 7, 1):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
    y = _apply_op(ops.FactorizedReduce(9), x, train=True)
    assert y.shape == (2, -(-size // 2), -(-size // 2), 9)
  fr = ops.FactorizedReduce(8)
  v = fr.init(jax.random.key(0), jnp.ones((1, 4, 4, 6)), train=False)
  assert v['params']['conv1']['kernel'].shape == (1, 1, 6, 4)
  # The second half reads odd pixels: it sees x[1::2, 1::2].
  x = jnp.zeros((1, 4, 4, 6)).at[:, 1::2, 1::2, :].set(1.0)
  a = ops.Conv(4, 1, 2).apply({'params': v['params']['conv1']}, x)
  assert float(jnp.abs(a).sum()) == 0.0


# ---------------------------------------------------------------------------- network

_TINY = dict(layers=5, init_channels=4, num_classes=3)


def _tiny(**kw):
  return create_model('darts', **{**_TINY, **kw})


@pytest.fixture(scope='module')
def tiny_v1():
  model = _tiny(genotype='DARTS_V1')
  variables = init_variables(model, jax.random.key(0), (2, 8, 8, 1))
  return model, variables


def test_published_parameter_counts():
  # DARTS_V2, C=36, 20 cells, CIFAR-10: the release prints 3.349342M (aux head excluded).
  model = create_model('darts', genotype='DARTS_V2', layers=20, init_channels=36,
                       num_classes=10, auxiliary=True)
  params = param_shapes(model, (1, 32, 32, 3))['params']
  assert count_params_without_aux(params) == 3_349_342
  assert count_params(params) == 3_825_768  # the auxiliary head adds 476,426
  # The paper's student: DARTS_V1, C=16, 10 cells (~0.32M).
  v1 = create_model('darts', genotype='DARTS_V1', layers=10, init_channels=16)
  assert count_params(param_shapes(v1, (1, 32, 32, 3))['params']) == 320_346
  assert count_params(param_shapes(v1, (1, 8, 8, 1))['params']) == 319_482  # 1-channel stem


def test_default_cell_channels_and_validation():
  m = DartsNetwork(genotype='DARTS_V1', layers=10, init_channels=16)
  assert m.reduction_indices() == (3, 6)
  assert m.resolved_cell_channels() == (16, 16, 16, 32, 32, 32, 64, 64, 64, 64)
  with pytest.raises(ValueError, match=r'model.cell_channels has 3 entries.*layers=10'):
    m.clone(cell_channels=(8, 8, 8)).resolved_cell_channels()
  with pytest.raises(ValueError, match=r'model.cell_groups has 2 entries.*layers=10'):
    m.clone(cell_groups=(None, 2)).resolved_cell_groups()
  with pytest.raises(ValueError, match=r'model.cell_groups\[1\]=3 does not divide.*C=16'):
    m.clone(cell_groups=(None, 3) + (None,) * 8).resolved_cell_groups()
  with pytest.raises(ValueError, match='model.layers=2'):
    m.clone(layers=2).resolved_cell_channels()
  with pytest.raises(ValueError, match='model.bogus is not a field'):
    create_model('darts', bogus=1)


@pytest.mark.parametrize('genotype', ['DARTS_V1', 'DARTS_V2'])
def test_forward_and_attention_points(genotype, tiny_v1):
  model = _tiny(genotype=genotype)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  variables = tiny_v1[1] if genotype == 'DARTS_V1' else init_variables(
      model, jax.random.key(1), x.shape)
  assert set(variables) == {'params', 'batch_stats'}
  logits, points = model.apply(variables, x, train=False)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert [p.shape for p in points] == [(2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 64)]  # 4 * C
  (logits_t, _), state = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert bool(jnp.all(jnp.isfinite(logits_t))) and not np.allclose(logits, logits_t)
  assert 'intermediates' not in state
  # CIFAR-sized inputs: points at 32/16/8 px (shapes only).
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  logits, points = jax.eval_shape(
      lambda x: model.apply(model.init(jax.random.key(0), x, train=False), x, train=False), x)
  assert logits.shape == (2, 3)
  assert [p.shape[1:3] for p in points] == [(32, 32), (16, 16), (8, 8)]
  # bfloat16 computation traces (float32 parameters, float32 logits).
  bf16 = model.clone(dtype=jnp.bfloat16, auxiliary=True, drop_path_prob=0.2)
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  (logits, points), state = jax.eval_shape(lambda x: bf16.apply(
      bf16.init(jax.random.key(0), x, train=False), x, train=True,
      rngs={'dropout': jax.random.key(1)}, mutable=['batch_stats', 'intermediates']), x)
  assert logits.dtype == jnp.float32 and points[0].dtype == jnp.bfloat16
  assert state['intermediates']['aux_logits'][0].shape == (2, 3)


def test_fast_ops_match_lax_in_network():
  model = _tiny(genotype='DARTS_V2', impl='fast')
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 2))
  variables = init_variables(model, jax.random.key(1), x.shape)
  (fast, _), _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  lax_model = _tiny(genotype='DARTS_V2', impl='lax')
  assert jax.tree.structure(param_shapes(lax_model, x.shape)) == jax.tree.structure(variables)
  (ref, _), _ = lax_model.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5)
  (auto, _), _ = _tiny(genotype='DARTS_V2').apply(variables, x, train=True,
                                                  mutable=['batch_stats'])
  np.testing.assert_array_equal(auto, fast)  # 'auto' is 'fast' on CPU


def test_resolve_impl():
  assert jax.default_backend() == 'cpu'
  assert ops.resolve_impl('auto') == ops.resolve_impl() == 'fast'
  assert ops.resolve_impl('fast') == 'fast' and ops.resolve_impl('lax') == 'lax'
  for bad in ('gpu', None, ''):
    with pytest.raises(ValueError, match=r"impl=.* allowed: 'auto', 'fast', 'lax'$"):
      ops.resolve_impl(bad)
  with pytest.raises(ValueError, match=r"impl='cuda' .* allowed: 'auto', 'fast', 'lax'$"):
    create_model('darts', impl='cuda')
  with pytest.raises(ValueError, match=r"impl='cuda' .* allowed: 'auto', 'fast', 'lax'"):
    ops.SepConv(4, 3, 1, 1, impl='cuda').init(jax.random.key(0), jnp.ones((1, 4, 4, 4)),
                                              train=False)


def test_auxiliary_head(tiny_v1):
  model, base = tiny_v1
  aux_model = model.clone(auxiliary=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  variables = init_variables(aux_model, jax.random.key(0), x.shape)
  assert 'aux_head' in variables['params']
  assert count_params(variables['params']) > count_params(base['params'])
  assert count_params_without_aux(variables['params']) == count_params(base['params'])
  (logits, _), state = aux_model.apply(variables, x, train=True,
                                       mutable=['batch_stats', 'intermediates'])
  aux = state['intermediates']['aux_logits'][0]
  assert aux.shape == logits.shape == (2, 3)
  _, state = aux_model.apply(variables, x, train=False, mutable=['intermediates'])
  assert 'aux_logits' not in state.get('intermediates', {})


def test_drop_path(tiny_v1):
  model, variables = tiny_v1
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  ref, _ = model.apply(variables, x, train=False)
  same, _ = model.clone(drop_path_prob=0.5).apply(variables, x, train=False)
  np.testing.assert_array_equal(ref, same)
  same, _ = model.apply(variables, x, train=False, drop_path_prob=0.5)
  np.testing.assert_array_equal(ref, same)

  @jax.jit
  def train_logits(p, key):
    (logits, _), _ = model.apply(variables, x, train=True, drop_path_prob=p,
                                 rngs={'dropout': key}, mutable=['batch_stats'])
    return logits

  no_drop, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  k1, k2 = jax.random.key(1), jax.random.key(2)
  np.testing.assert_allclose(train_logits(0.0, k1), no_drop[0], rtol=1e-4, atol=1e-5)
  a, b = train_logits(0.5, k1), train_logits(0.5, k2)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, train_logits(0.5, k1))
  # The field alone switches drop path on in train mode (needs the 'dropout' rng).
  c, _ = model.clone(drop_path_prob=0.5).apply(variables, x, train=True, rngs={'dropout': k1},
                                               mutable=['batch_stats'])
  assert not np.allclose(c[0], no_drop[0])


def test_cell_channels_and_groups(tiny_v1):
  model, base = tiny_v1
  x = jnp.ones((2, 8, 8, 1))
  # Widen cell 2 (a normal cell between the reductions at 1 and 3) from C=8 to C=12.
  chans = model.resolved_cell_channels()
  assert chans == (4, 8, 8, 16, 16)
  wide = model.clone(cell_channels=(4, 8, 12, 16, 16))
  variables = jax.eval_shape(lambda: wide.init(jax.random.key(0), x, train=False))
  assert variables['perturbations']['cell2']['output'].shape == (2, 4, 4, 48)
  assert variables['params']['cell3']['preprocess1']['conv']['kernel'].shape == (1, 1, 48, 16)
  assert variables['params']['cell4']['preprocess0']['conv1']['kernel'].shape == (1, 1, 48, 8)
  variables = init_variables(wide, jax.random.key(0), x.shape)
  logits, points = wide.apply(variables, x, train=False)
  assert logits.shape == (2, 3) and points[0].shape[-1] == 16
  assert count_params(variables['params']) > count_params(base['params'])
  # Denser separable convs (groups C/2) in cell 0 add parameters.
  dense = model.clone(cell_groups=(2, None, None, None, None))
  shapes = param_shapes(dense, x.shape)['params']
  assert shapes['cell0']['op0']['dw1']['kernel'].shape == (3, 3, 2, 4)
  assert count_params(shapes) > count_params(base['params'])
  variables = init_variables(dense, jax.random.key(0), x.shape)
  logits, _ = dense.apply(variables, x, train=False)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_perturbation_gradients(tiny_v1):
  model, variables = tiny_v1
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  y = jnp.array([0, 2])
  perturbations = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))['perturbations']
  perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), perturbations)
  assert sorted(perturbations) == [f'cell{i}' for i in range(5)]

  def loss(pert):
    (logits, _), _ = model.apply({**variables, 'perturbations': pert}, x, train=True,
                                 mutable=['batch_stats'])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  grads = jax.grad(loss)(perturbations)
  for i in range(5):
    g = grads[f'cell{i}']['output']
    assert g.shape[-1] == 4 * model.resolved_cell_channels()[i]
    assert float(jnp.abs(g).sum()) > 0
