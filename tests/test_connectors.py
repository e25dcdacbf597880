"""Tests for distill_jax.connectors: FitNets', VID's, CC's and CRD's learned parts.

Values are compared with float64 NumPy renderings of RepDistiller's release
(tests/connectors_reference.py), in its NCHW layout with the parameters moved to
PyTorch's weight layouts, which tests the NHWC translation too. Shapes are tiny.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import connectors as C
from connectors_reference import np_cls_negative
from connectors_reference import np_conv_reg
from connectors_reference import np_crd
from connectors_reference import np_numerical_grad
from connectors_reference import np_vid
from losses_reference import _randn
from losses_reference import np_nchw


# One jit per function, so that each shape compiles once across the tests; eager runs
# (every operation compiled apart) are kept to one comparison per function.
_sample = jax.jit(C.sample_negatives, static_argnums=4, static_argnames='with_replacement')
_crd = jax.jit(C.crd_loss, static_argnames='num_examples')
_update = jax.jit(C.update_crd_memory)


def _f64_tree(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _torch_weight(kernel):
  """A Flax kernel in PyTorch's layout: (kh, kw, in, out) -> OIHW for a conv, and
  the transposed conv's (kh, kw, out, in) -> (in, out, kh, kw): the same transpose."""
  return np.transpose(np.asarray(kernel, np.float64), (3, 2, 0, 1))


def _unit_rows(seed, shape):
  x = _randn(seed, shape).astype(np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------
# ConvRegressor.
# ----------------------------------------------------------------------------

# (student NHWC shape, teacher (H, W), teacher channels, expected kernel shape)
REGRESSOR_CASES = {
    'stride2': ((2, 8, 8, 3), (4, 4), 5, (3, 3, 3, 5)),
    'transposed': ((2, 3, 3, 3), (6, 6), 4, (4, 4, 4, 3)),
    'valid': ((2, 6, 5, 3), (4, 3), 2, (3, 3, 3, 2)),
    'same': ((2, 4, 4, 3), (4, 4), 5, (1, 1, 3, 5)),
}


@pytest.mark.parametrize('name', sorted(REGRESSOR_CASES))
def test_conv_regressor_matches_release(name):
  s_shape, t_hw, t_c, kernel_shape = REGRESSOR_CASES[name]
  x = _randn(1, s_shape)
  module = C.ConvRegressor(t_c, t_hw)
  variables = module.init(jax.random.key(0), x, train=False)
  params = variables['params']
  assert params['conv']['kernel'].shape == kernel_shape
  assert params['conv']['bias'].shape == (t_c,)
  # Random affine batch-norm parameters, so that they are tested too.
  params = {'conv': params['conv'],
            'bn': {'scale': 1.0 + 0.1 * _randn(2, (t_c,)), 'bias': 0.1 * _randn(3, (t_c,))}}
  weight = _torch_weight(params['conv']['kernel'])
  bias, gamma, beta = (np.asarray(a, np.float64) for a in (
      params['conv']['bias'], params['bn']['scale'], params['bn']['bias']))
  expected = np_conv_reg(np_nchw(x), t_hw, weight, bias, gamma, beta)

  full = {'params': params, 'batch_stats': variables['batch_stats']}
  with jax.enable_x64(True):
    out, _ = module.apply(_f64_tree(full), _f64_tree(x), train=True,
                          mutable=['batch_stats'])
    assert out.shape == (s_shape[0],) + tuple(t_hw) + (t_c,)
    np.testing.assert_allclose(np.transpose(out, (0, 3, 1, 2)), expected, rtol=1e-10,
                               atol=1e-12)
  out32, state = module.apply(full, x, train=True, mutable=['batch_stats'])
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(np.transpose(out32, (0, 3, 1, 2)), expected, rtol=1e-4,
                             atol=1e-5)
  # PyTorch's momentum 0.1: the running mean moves a tenth of the way to the batch's.
  pre_bn = module.apply(full, x, train=True, mutable=['batch_stats', 'intermediates'],
                        capture_intermediates=lambda m, _: m.name == 'conv')[1]
  conv_out = np.asarray(pre_bn['intermediates']['conv']['__call__'][0], np.float64)
  np.testing.assert_allclose(state['batch_stats']['bn']['mean'],
                             0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)
  # Eval mode uses the running statistics (here the initial 0 and 1).
  out_eval = module.apply(full, x, train=False)
  expected_eval = np_conv_reg(np_nchw(x), t_hw, weight, bias, gamma, beta, train=False,
                              running=(np.zeros(t_c), np.ones(t_c)))
  np.testing.assert_allclose(np.transpose(out_eval, (0, 3, 1, 2)), expected_eval,
                             rtol=1e-4, atol=1e-5)


def test_conv_regressor_without_relu_and_bf16():
  x = _randn(4, (2, 8, 8, 3))
  module = C.ConvRegressor(4, (4, 4), use_relu=False)
  variables = module.init(jax.random.key(1), x, train=False)
  out, _ = module.apply(variables, x, train=True, mutable=['batch_stats'])
  assert (np.asarray(out) < 0).any()  # no ReLU
  out_bf16, _ = module.apply(variables, jnp.asarray(x, jnp.bfloat16), train=True,
                             mutable=['batch_stats'])
  assert out_bf16.dtype == jnp.float32 and np.isfinite(out_bf16).all()
  module_bf16 = C.ConvRegressor(4, (4, 4), dtype=jnp.bfloat16)
  out_c, _ = module_bf16.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out_c.dtype == jnp.bfloat16
  assert variables['params']['conv']['kernel'].dtype == jnp.float32


@pytest.mark.parametrize('branch, s_shape, t_hw, fan_in', [
    ('stride2', (1, 4, 4, 8), (2, 2), 9 * 8),
    # PyTorch's fan-in of a transposed conv counts its *output* channels: 16 * 16.
    ('transposed', (1, 2, 2, 8), (4, 4), 16 * 16),
])
def test_conv_regressor_init_is_pytorch_default(branch, s_shape, t_hw, fan_in):
  del branch
  params = C.ConvRegressor(16, t_hw).init(
      jax.random.key(2), jnp.zeros(s_shape), train=False)['params']['conv']
  bound = 1.0 / math.sqrt(fan_in)
  kernel, bias = np.asarray(params['kernel']), np.asarray(params['bias'])
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
  # U(-b, b) has standard deviation b / sqrt(3).
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.1)


def test_conv_regressor_rejects_unsupported_sizes():
  with pytest.raises(ValueError, match='no regressor'):
    C.ConvRegressor(4, (8, 8)).init(jax.random.key(0), jnp.zeros((1, 3, 3, 2)), train=False)
  with pytest.raises(ValueError, match='widths'):  # heights say stride 2, widths do not
    C.ConvRegressor(4, (4, 4)).init(jax.random.key(0), jnp.zeros((1, 8, 6, 2)), train=False)
  with pytest.raises(ValueError, match='NHWC'):
    C.ConvRegressor(4, (4, 4)).init(jax.random.key(0), jnp.zeros((8, 8, 2)), train=False)


# ----------------------------------------------------------------------------
# VID.
# ----------------------------------------------------------------------------


def test_vid_regressor_init():
  module = C.VIDRegressor(6)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
  params = variables['params']
  assert set(params) == {'conv0', 'conv1', 'conv2', 'log_scale'}
  # Three bias-free 1x1 convs 3 -> 6 -> 6 -> 6 (mid = teacher channels).
  assert [params[f'conv{i}']['kernel'].shape for i in range(3)] == [
      (1, 1, 3, 6), (1, 1, 6, 6), (1, 1, 6, 6)]
  assert all(set(params[f'conv{i}']) == {'kernel'} for i in range(3))
  var = jax.nn.softplus(params['log_scale']) + C.VID_EPS
  assert params['log_scale'].shape == (6,)
  np.testing.assert_allclose(var, np.full(6, 5.0), rtol=1e-6)
  np.testing.assert_allclose(np.log(1.0 + np.exp(np.float64(params['log_scale'][0])))
                             + 1e-5, 5.0, rtol=1e-6)  # the release's formula
  mid = C.VIDRegressor(6, mid_channels=4).init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
  assert mid['params']['conv1']['kernel'].shape == (1, 1, 4, 4)


# (student NHWC, teacher NHWC): student pooled 8 -> 4; teacher pooled 6 -> 4
# (uneven bins); equal sizes.
VID_CASES = {
    'pool_student': ((2, 8, 8, 3), (2, 4, 4, 5)),
    'pool_teacher': ((2, 4, 4, 3), (2, 6, 6, 5)),
    'same': ((2, 3, 3, 4), (2, 3, 3, 2)),
}


def _vid_setup(name):
  s_shape, t_shape = VID_CASES[name]
  s, t = _randn(10, s_shape), _randn(11, t_shape)
  module = C.VIDRegressor(t_shape[-1], teacher_size=t_shape[1:3])
  params = module.init(jax.random.key(3), s)['params']
  params = {**params, 'log_scale': _randn(12, (t_shape[-1],))}  # not only the init
  weights = [_torch_weight(params[f'conv{i}']['kernel']) for i in range(3)]
  expected = np_vid(np_nchw(s), np_nchw(t), weights, np.asarray(params['log_scale']))
  return module, params, s, t, expected


@pytest.mark.parametrize('name', sorted(VID_CASES))
def test_vid_matches_release(name):
  module, params, s, t, expected = _vid_setup(name)

  def loss(params, s, t):
    mean, log_scale = module.apply({'params': params}, s)
    return C.vid_loss(mean, log_scale, t)

  jitted = jax.jit(loss)
  with jax.enable_x64(True):
    out = jitted(_f64_tree(params), _f64_tree(s), _f64_tree(t))
    assert out.shape == () and out.dtype == jnp.float64
    np.testing.assert_allclose(out, expected, rtol=1e-10)
  out32 = jitted(params, s, t)
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(out32, expected, rtol=1e-5)
  if name == 'pool_teacher':
    np.testing.assert_allclose(loss(params, s, t), out32, rtol=1e-6)  # eager == jit


def test_vid_loss_gradients():
  mu, t = _randn(20, (2, 2, 2, 3)), _randn(21, (2, 2, 2, 3))
  alpha = _randn(22, (3,))
  grads = jax.grad(C.vid_loss, argnums=(0, 1, 2))(mu, alpha, t)
  assert not np.asarray(grads[2]).any()  # the teacher gets none

  def ref_mu(m):
    var = np.log1p(np.exp(np.float64(alpha))) + 1e-5
    return np.mean(0.5 * ((m - t)**2 / var + np.log(var)))

  np.testing.assert_allclose(grads[0], np_numerical_grad(ref_mu, mu), rtol=1e-4, atol=1e-9)

  def ref_alpha(a):
    var = np.log1p(np.exp(a)) + 1e-5
    return np.mean(0.5 * ((np.float64(mu) - t)**2 / var + np.log(var)))

  np.testing.assert_allclose(grads[1], np_numerical_grad(ref_alpha, alpha), rtol=1e-4,
                             atol=1e-9)


def test_vid_gradients_reach_regressor_and_bf16():
  module, params, s, t, _ = _vid_setup('pool_student')

  def loss(params, s, t):
    return C.vid_loss(*module.apply({'params': params}, s), t)

  grads = jax.grad(loss)(params, s, t)
  for leaf in jax.tree.leaves(grads):
    assert np.isfinite(leaf).all() and np.asarray(leaf).any()
  out = jax.jit(loss)(params, jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
  assert out.shape == () and out.dtype == jnp.float32 and np.isfinite(out)


def test_vid_loss_rejects():
  alpha = jnp.zeros(3)
  with pytest.raises(ValueError, match='VIDRegressor'):  # taller student: pool it first
    C.vid_loss(jnp.zeros((1, 4, 4, 3)), alpha, jnp.zeros((1, 2, 2, 3)))
  with pytest.raises(ValueError, match='log_scale'):
    C.vid_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros(2), jnp.zeros((1, 2, 2, 3)))
  with pytest.raises(ValueError, match='channels'):
    C.vid_loss(jnp.zeros((1, 2, 2, 3)), alpha, jnp.zeros((1, 2, 2, 4)))


# ----------------------------------------------------------------------------
# Heads.
# ----------------------------------------------------------------------------


def test_embedding_heads():
  x = _randn(30, (3, 2, 2, 4))  # flattened to 16 features
  for cls in (C.LinearEmbed, C.NormalizedEmbed):
    assert cls().features == C.FEAT_DIM == 128
    module = cls(5)
    params = module.init(jax.random.key(4), x)['params']['linear']
    assert params['kernel'].shape == (16, 5)
    bound = 1.0 / math.sqrt(16)
    assert np.abs(params['kernel']).max() <= bound and np.abs(params['bias']).max() <= bound
    out = module.apply({'params': {'linear': params}}, x)
    lin = x.reshape(3, -1).astype(np.float64) @ np.float64(params['kernel']) + np.float64(
        params['bias'])
    if cls is C.NormalizedEmbed:
      lin = lin / np.sqrt((lin**2).sum(axis=1, keepdims=True))  # Normalize(2)
      np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    assert out.shape == (3, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, lin, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='batch axis'):
    C.LinearEmbed(4).init(jax.random.key(0), jnp.zeros(3))


# ----------------------------------------------------------------------------
# CRD.
# ----------------------------------------------------------------------------

N, D, K, B = 20, 8, 5, 4
# Unsorted classes of unequal sizes: 0 has 3 examples, 1 has 5, 2 has 12.
CLASSES = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [3, 5, 12])).astype(
    np.int32)


def test_init_crd_memory():
  memory = C.init_crd_memory(jax.random.key(0), 200, 48)
  assert set(memory) == {'student', 'teacher', 'z_student', 'z_teacher'}
  bound = 1.0 / math.sqrt(48 / 3)
  for name in ('student', 'teacher'):
    bank = np.asarray(memory[name])
    assert bank.shape == (200, 48) and bank.dtype == np.float32
    assert np.abs(bank).max() <= bound and np.abs(bank).max() > 0.95 * bound
    np.testing.assert_allclose((bank**2).sum(axis=1).mean(), 1.0, rtol=0.05)
  assert not np.allclose(memory['student'], memory['teacher'])
  for name in ('z_student', 'z_teacher'):
    assert memory[name].shape == () and float(memory[name]) == C.Z_UNSET == -1.0
  assert (C.NCE_K, C.NCE_T, C.NCE_M, C.FEAT_DIM) == (16384, 0.07, 0.5, 128)


def test_crd_memory_padding_rows_are_never_read():
  """Banks padded to R > N rows (to shard them evenly): the first N rows are those of the
  unpadded banks, and the loss with ``num_examples=N`` is the unpadded one."""
  memory = C.init_crd_memory(jax.random.key(3), N, D)
  padded = C.init_crd_memory(jax.random.key(3), N, D, rows=N + 4)
  assert padded['student'].shape == (N + 4, D)
  for name in ('student', 'teacher'):
    np.testing.assert_array_equal(padded[name][:N], memory[name])
  idx, con, s, t = _crd_batch(4)
  loss, z = C.crd_loss(s, t, memory, idx, con)
  padded_loss, padded_z = C.crd_loss(s, t, padded, idx, con, num_examples=N)
  np.testing.assert_allclose(padded_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(padded_z['z_student'], z['z_student'], rtol=1e-6)
  with pytest.raises(ValueError, match='rows=3'):
    C.init_crd_memory(jax.random.key(3), N, D, rows=3)


def _crd_batch(seed):
  indices = np.random.default_rng(seed).choice(N, B, replace=False).astype(np.int32)
  contrast = np.asarray(_sample(jax.random.key(seed), CLASSES[indices], indices, CLASSES,
                               K))
  return indices, contrast, _unit_rows(seed + 1, (B, D)), _unit_rows(seed + 2, (B, D))


def test_crd_loss_and_update_match_release():
  memory = jax.tree.map(np.asarray, C.init_crd_memory(jax.random.key(5), N, D))
  bank_s, bank_t = (np.float64(memory[k]) for k in ('student', 'teacher'))
  idx1, con1, s1, t1 = _crd_batch(1)
  loss1, z_s, z_t, ref_s, ref_t = np_crd(bank_s, bank_t, -1.0, -1.0, s1, t1, idx1, con1)
  idx2, con2, s2, t2 = _crd_batch(2)
  loss2, z_s2, z_t2, ref_s2, ref_t2 = np_crd(ref_s, ref_t, z_s, z_t, s2, t2, idx2, con2,
                                             t=0.1, momentum=0.3)
  assert (z_s2, z_t2) == (z_s, z_t)

  with jax.enable_x64(True):
    mem = _f64_tree(memory)
    out1, new_z = _crd(s1, t1, mem, idx1, con1, num_examples=N)
    assert out1.shape == () and out1.dtype == jnp.float64
    np.testing.assert_allclose(out1, loss1, rtol=1e-10)
    # Z is set from the first batch: mean(exp(scores / T)) * N.
    np.testing.assert_allclose(new_z['z_student'], z_s, rtol=1e-10)
    np.testing.assert_allclose(new_z['z_teacher'], z_t, rtol=1e-10)
    mem = _update({**mem, **new_z}, idx1, s1, t1)
    np.testing.assert_allclose(mem['student'], ref_s, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(mem['teacher'], ref_t, rtol=1e-12, atol=1e-14)
    # ... and kept afterwards.
    out2, new_z2 = _crd(s2, t2, mem, idx2, con2, nce_t=0.1)
    np.testing.assert_allclose(out2, loss2, rtol=1e-10)
    assert float(new_z2['z_student']) == float(new_z['z_student'])
    assert float(new_z2['z_teacher']) == float(new_z['z_teacher'])
    mem2 = _update(mem, idx2, s2, t2, nce_m=0.3)
    np.testing.assert_allclose(mem2['student'], ref_s2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(mem2['teacher'], ref_t2, rtol=1e-12, atol=1e-14)

  # float32, jitted and eager.
  out32, z32 = _crd(np.float32(s1), np.float32(t1), memory, idx1, con1)
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(out32, loss1, rtol=1e-5)
  np.testing.assert_allclose(z32['z_student'], z_s, rtol=1e-5)
  eager, _ = C.crd_loss(np.float32(s1), np.float32(t1), memory, idx1, con1)
  np.testing.assert_allclose(eager, out32, rtol=1e-6)
  upd = _update(memory, idx1, np.float32(s1), np.float32(t1))
  np.testing.assert_allclose(upd['student'], ref_s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      C.update_crd_memory(memory, idx1, np.float32(s1), np.float32(t1))['teacher'],
      upd['teacher'], rtol=1e-6, atol=1e-7)


def test_update_crd_memory_touches_only_the_batch():
  memory = C.init_crd_memory(jax.random.key(6), N, D)
  idx, _, s, t = _crd_batch(3)
  new = C.update_crd_memory({**memory, 'z_student': 3.0}, idx, s, t)
  assert float(new['z_student']) == 3.0 and float(new['z_teacher']) == -1.0
  others = np.setdiff1d(np.arange(N), idx)
  for name in ('student', 'teacher'):
    np.testing.assert_array_equal(np.asarray(new[name])[others],
                                  np.asarray(memory[name])[others])
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new[name])[idx], axis=1), 1.0,
                               rtol=1e-6)
  assert float(memory['z_student']) == -1.0  # the input is not changed


def test_crd_gradients():
  memory = C.init_crd_memory(jax.random.key(7), N, D)
  idx, con, s, t = _crd_batch(4)
  _, z = _crd(s, t, memory, idx, con)
  memory = {**memory, **z}

  def loss(s, t, memory):
    return C.crd_loss(s, t, memory, idx, con)[0]

  g_s, g_t, g_mem = jax.grad(loss, argnums=(0, 1, 2))(np.float32(s), np.float32(t), memory)
  assert np.asarray(g_s).any() and np.asarray(g_t).any()  # the teacher head trains
  for leaf in jax.tree.leaves(g_mem):
    assert not np.asarray(leaf).any()  # the memory (and Z) is constant
  # Against central differences of the release with Z held (it is a stored constant).
  bank_s, bank_t = (np.float64(memory[k]) for k in ('student', 'teacher'))
  zs, zt = float(memory['z_student']), float(memory['z_teacher'])

  def ref_s(s_):
    return np_crd(bank_s, bank_t, zs, zt, s_, t, idx, con)[0]

  def ref_t(t_):
    return np_crd(bank_s, bank_t, zs, zt, s, t_, idx, con)[0]

  np.testing.assert_allclose(g_s, np_numerical_grad(ref_s, s), rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(g_t, np_numerical_grad(ref_t, t), rtol=2e-4, atol=1e-5)
  # With Z unset (taken from this very batch, then held constant) the gradient is finite.
  g_first = jax.grad(loss)(np.float32(s), np.float32(t), C.init_crd_memory(
      jax.random.key(7), N, D))
  assert np.isfinite(g_first).all()


def test_crd_loss_bf16():
  memory = C.init_crd_memory(jax.random.key(8), N, D)
  idx, con, s, t = _crd_batch(5)
  out, z = _crd(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16),
                               memory, idx, con)
  assert out.shape == () and out.dtype == jnp.float32 and np.isfinite(out)
  assert z['z_student'].dtype == jnp.float32 and float(z['z_student']) > 0
  upd = C.update_crd_memory(memory, idx, jnp.asarray(s, jnp.bfloat16), t)
  assert upd['student'].dtype == jnp.float32


def test_crd_rejects():
  memory = C.init_crd_memory(jax.random.key(0), N, D)
  idx, con, s, t = _crd_batch(6)
  with pytest.raises(ValueError, match='num_examples'):
    C.crd_loss(s, t, memory, idx, con, num_examples=N + 1)
  with pytest.raises(ValueError, match='width'):
    C.crd_loss(s[:, :3], t[:, :3], memory, idx, con)
  with pytest.raises(ValueError, match='contrast_indices'):
    C.crd_loss(s, t, memory, idx, con[:, :1])
  with pytest.raises(ValueError, match='memory'):
    C.crd_loss(s, t, {'student': memory['student']}, idx, con)
  with pytest.raises(ValueError, match='nce_k'):
    C.sample_negatives(jax.random.key(0), idx, idx, CLASSES, 0)


# ----------------------------------------------------------------------------
# Sampling ('exact' mode).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('with_replacement', [False, True])
def test_sample_negatives(with_replacement):
  cls_negative = np_cls_negative(CLASSES, 3)
  indices = np.arange(N, dtype=np.int32)
  labels = CLASSES[indices]
  for k in (5, 10):  # class 2 has 8 negatives: fewer than 10
    out = np.asarray(_sample(jax.random.key(k), labels, indices, CLASSES, k,
                            with_replacement=with_replacement))
    assert out.shape == (N, k + 1) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, 0], indices)  # the positive first
    for row, label in zip(out, labels):
      assert np.isin(row[1:], cls_negative[label]).all()  # never the same class
      # The release draws without replacement unless K exceeds the negatives.
      if not with_replacement and k <= len(cls_negative[label]):
        assert len(set(row[1:])) == k
  eager = C.sample_negatives(jax.random.key(k), labels, indices, CLASSES, k,
                             with_replacement=with_replacement)
  np.testing.assert_array_equal(eager, out)


@pytest.mark.parametrize('with_replacement', [False, True])
def test_sample_negatives_is_uniform(with_replacement):
  # Class 1 (5 examples) has 15 negatives on both sides of its block once sorted.
  rows = 300
  labels = np.ones(rows, np.int32)
  indices = np.full(rows, int(np.flatnonzero(CLASSES == 1)[0]), np.int32)
  fn = functools.partial(C.sample_negatives, nce_k=5, with_replacement=with_replacement)
  out = np.asarray(jax.jit(fn)(jax.random.key(9), labels, indices, CLASSES))
  counts = np.bincount(out[:, 1:].ravel(), minlength=N)
  negatives = CLASSES != 1
  assert not counts[~negatives].any()
  # 1500 draws over 15 examples: 100 each, standard deviation about 10.
  assert np.abs(counts[negatives] - 100).max() < 45
