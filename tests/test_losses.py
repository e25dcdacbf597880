"""Tests for distill_jax.losses against independent NumPy references."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest

from distill_jax import losses

# ----------------------------------------------------------------------------
# NumPy references (float64, written independently of the implementation).
# ----------------------------------------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_ce(logits, labels):
  lsm = np_log_softmax(logits)
  return -np.mean(lsm[np.arange(len(labels)), labels])


def np_soft_kl(s, t, temperature):
  log_q = np_log_softmax(np.asarray(s, np.float64) / temperature)
  log_p = np_log_softmax(np.asarray(t, np.float64) / temperature)
  return np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))


def np_kd(s, t, labels, alpha, temperature):
  return ((1 - alpha) * np_ce(s, labels)
          + alpha * temperature**2 * np_soft_kl(s, t, temperature))


def np_attention_map(a, p=2):
  a = np.asarray(a, np.float64)
  v = (np.abs(a)**p).mean(axis=-1).reshape(a.shape[0], -1)
  norm = np.sqrt((v**2).sum(axis=-1, keepdims=True))
  return v / np.maximum(norm, 1e-12)


def np_avg_pool(a, height, width):
  n, h, w, c = a.shape
  return a.reshape(n, height, h // height, width, w // width, c).mean(axis=(2, 4))


def np_at_layers(student, teacher, form='released', p=2):
  out = []
  for s, t in zip(student, teacher):
    d = np_attention_map(s, p) - np_attention_map(t, p)
    if form == 'released':
      out.append(np.mean(d**2))
    else:
      out.append(np.mean(np.sqrt((d**2).sum(axis=-1))))
  return out


def _randn(seed, shape, scale=1.0):
  return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _labels(seed, n, k):
  return np.random.default_rng(seed).integers(0, k, size=n).astype(np.int32)


# ----------------------------------------------------------------------------
# Cross-entropy and KD.
# ----------------------------------------------------------------------------


def test_cross_entropy_hand_computed():
  # logits [0, ln 3] -> softmax [1/4, 3/4].
  # label 0: -ln(1/4) = ln 4 = 1.3862944; label 1: -ln(3/4) = 0.2876821.
  # Mean over the two examples: (1.3862944 + 0.2876821) / 2 = 0.8369882.
  logits = jnp.array([[0.0, math.log(3)], [0.0, math.log(3)]])
  labels = jnp.array([0, 1])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), 0.8369882, rtol=1e-6)


def test_cross_entropy_matches_numpy():
  logits = _randn(0, (16, 10), 3.0)
  labels = _labels(1, 16, 10)
  out = losses.cross_entropy(logits, labels)
  assert out.shape == () and out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_ce(logits, labels), rtol=1e-5)


def test_cross_entropy_label_checks():
  with pytest.raises(ValueError, match='labels shape'):
    losses.cross_entropy(jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32))
  with pytest.raises(TypeError, match='integer'):
    losses.cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.float32))


def test_soft_kl_hand_computed_and_t_squared():
  # T = 2, teacher logits [0, 2 ln 3] -> t / T = [0, ln 3] -> p = [1/4, 3/4];
  # student logits [0, 0] -> q = [1/2, 1/2].
  # KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732868 + 0.3040988 = 0.1308120.
  # kd_loss with alpha = 1: T^2 * KL = 4 * 0.1308120 = 0.5232481.
  s = jnp.array([[0.0, 0.0]])
  t = jnp.array([[0.0, 2 * math.log(3)]])
  y = jnp.array([0])
  np.testing.assert_allclose(losses.soft_kl(s, t, temperature=2.0), 0.1308120, rtol=1e-5)
  np.testing.assert_allclose(
      losses.kd_loss(s, t, y, alpha=1.0, temperature=2.0), 0.5232481, rtol=1e-5)


def test_alpha_zero_is_plain_ce():
  s, t = _randn(0, (8, 5), 2.0), _randn(1, (8, 5), 2.0)
  y = _labels(2, 8, 5)
  np.testing.assert_array_equal(
      losses.kd_loss(s, t, y, alpha=0.0, temperature=4.0), losses.cross_entropy(s, y))


@pytest.mark.parametrize('temperature', [1.0, 4.0, 20.0])
def test_kd_term_zero_for_equal_logits(temperature):
  s = _randn(3, (8, 5), 5.0)
  y = _labels(4, 8, 5)
  assert abs(float(losses.soft_kl(s, s, temperature=temperature))) < 1e-6
  np.testing.assert_allclose(
      losses.kd_loss(s, s, y, alpha=0.9, temperature=temperature),
      0.1 * losses.cross_entropy(s, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 8.0])
def test_soft_term_scales_by_t_squared(temperature):
  s, t = _randn(5, (8, 6), 2.0), _randn(6, (8, 6), 2.0)
  y = _labels(7, 8, 6)
  alpha = 0.7
  kl = losses.soft_kl(s, t, temperature=temperature)
  soft = (losses.kd_loss(s, t, y, alpha=alpha, temperature=temperature)
          - (1 - alpha) * losses.cross_entropy(s, y))
  np.testing.assert_allclose(soft, alpha * temperature**2 * kl, rtol=1e-4)
  _, terms = losses.distillation_loss(
      s, y, teacher_logits=t, method='kd', alpha=alpha, temperature=temperature)
  np.testing.assert_allclose(terms['kd'], alpha * temperature**2 * kl, rtol=1e-6)


def test_kd_loss_matches_numpy():
  s, t = _randn(8, (12, 10), 3.0), _randn(9, (12, 10), 3.0)
  y = _labels(10, 12, 10)
  for alpha in (0.0, 0.3, 0.9, 1.0):
    for temperature in (1.0, 4.0, 10.0):
      out = losses.kd_loss(s, t, y, alpha=alpha, temperature=temperature)
      assert out.dtype == jnp.float32
      np.testing.assert_allclose(out, np_kd(s, t, y, alpha, temperature), rtol=1e-5,
                                 atol=1e-6, err_msg=f'alpha={alpha}, T={temperature}')
  for temperature in (1.0, 4.0, 10.0):
    np.testing.assert_allclose(
        losses.soft_kl(s, t, temperature=temperature), np_soft_kl(s, t, temperature),
        rtol=1e-5, atol=1e-7)


def test_kd_shape_mismatch():
  with pytest.raises(ValueError, match='teacher_logits shape'):
    losses.soft_kl(jnp.zeros((4, 3)), jnp.zeros((4, 5)), temperature=1.0)


# ----------------------------------------------------------------------------
# Teacher gradients.
# ----------------------------------------------------------------------------


def test_teacher_gets_no_gradient():
  s, t = _randn(11, (6, 5), 2.0), _randn(12, (6, 5), 2.0)
  y = _labels(13, 6, 5)
  sp = [_randn(14, (6, 8, 8, 3)), _randn(15, (6, 4, 4, 4))]
  tp = [_randn(16, (6, 8, 8, 5)), _randn(17, (6, 4, 4, 2))]

  g = jax.grad(lambda t: losses.kd_loss(s, t, y))(t)
  np.testing.assert_array_equal(g, np.zeros_like(t))
  g = jax.grad(lambda t: losses.soft_kl(s, t, temperature=3.0))(t)
  np.testing.assert_array_equal(g, np.zeros_like(t))
  assert np.abs(jax.grad(lambda s: losses.kd_loss(s, t, y))(s)).max() > 0

  for form in losses.AT_FORMS:
    g = jax.jit(jax.grad(lambda tp: losses.at_loss(sp, tp, form=form)))(tp)
    for gi, ti in zip(g, tp):
      np.testing.assert_array_equal(gi, np.zeros_like(ti))
    gs = jax.jit(jax.grad(lambda sp: losses.at_loss(sp, tp, form=form)))(sp)
    assert all(np.abs(gi).max() > 0 for gi in gs)

  for method in ('kd', 'kd_at', 'hard'):
    g = jax.jit(jax.grad(lambda t, tp: losses.distillation_loss(
        s, y, sp, t, tp, method=method)[0], argnums=(0, 1)))(t, tp)
    for leaf in jax.tree.leaves(g):
      np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


# ----------------------------------------------------------------------------
# Attention maps and attention transfer.
# ----------------------------------------------------------------------------

# One example, H = 1, W = 2, C = 2. Student: position 0 = [1, 1], position 1 =
# [2, 0]; channel means of squares v = [1, 2], |v| = sqrt 5, so
# Q_s = [1/sqrt 5, 2/sqrt 5] = [0.4472136, 0.8944272]. Teacher: position 0 =
# [1, 1], position 1 = [0, 0] -> Q_t = [1, 0].
# Released: ((1 - 0.4472136)^2 + 0.8944272^2) / 2 = (0.3055728 + 0.8) / 2
#   = 0.5527864 (= 1 - 1/sqrt 5).
# l2: sqrt(0.3055728 + 0.8) = sqrt(1.1055728) = 1.0514622.
_HAND_S = np.array([[[[1.0, 1.0], [2.0, 0.0]]]], np.float32)
_HAND_T = np.array([[[[1.0, 1.0], [0.0, 0.0]]]], np.float32)


def test_attention_map_hand_computed():
  np.testing.assert_allclose(
      losses.attention_map(_HAND_S), [[0.4472136, 0.8944272]], rtol=1e-6)
  np.testing.assert_allclose(
      losses.at_layer_losses([_HAND_S], [_HAND_T])[0], 0.5527864, rtol=1e-6)
  np.testing.assert_allclose(
      losses.at_layer_losses([_HAND_S], [_HAND_T], form='l2')[0], 1.0514622, rtol=1e-6)
  np.testing.assert_allclose(
      losses.at_loss([_HAND_S], [_HAND_T], beta=1000.0), 552.7864, rtol=1e-6)


@pytest.mark.parametrize('p', [1, 2, 3])
def test_attention_map_matches_numpy(p):
  a = _randn(20, (4, 5, 6, 7))
  q = losses.attention_map(a, p=p)
  assert q.shape == (4, 30) and q.dtype == jnp.float32
  np.testing.assert_allclose(q, np_attention_map(a, p), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(q), axis=-1), 1.0, rtol=1e-6)


def test_attention_map_zero_activation():
  z = jnp.zeros((2, 3, 3, 4))
  np.testing.assert_array_equal(losses.attention_map(z), np.zeros((2, 9)))
  g = jax.grad(lambda a: losses.attention_map(a).sum())(z)
  assert np.all(np.isfinite(g))
  with pytest.raises(ValueError, match='NHWC'):
    losses.attention_map(jnp.zeros((3, 3, 4)))


@pytest.mark.parametrize('form', losses.AT_FORMS)
def test_at_zero_for_equal_maps(form):
  s = _randn(21, (3, 8, 8, 4))
  # Same map: a rescaled copy with the channels duplicated (C differs).
  t = 3.0 * np.concatenate([s, -s], axis=-1)
  layers = losses.at_layer_losses([s, s[:, ::2, ::2]], [t, t[:, ::2, ::2]], form=form)
  # Only float32 rounding remains (the l2 form takes its square root).
  np.testing.assert_allclose(layers, [0.0, 0.0], atol=1e-12 if form == 'released' else 1e-5)
  g = jax.grad(lambda s: losses.at_loss([s], [s], form=form))(jnp.asarray(s))
  assert np.all(np.isfinite(g)) and np.abs(g).max() == 0


def test_released_term_bounded_by_two_over_positions():
  h, w = 4, 6
  bound = 2.0 / (h * w)
  rng = np.random.default_rng(22)
  for trial in range(10):
    s = rng.standard_normal((5, h, w, 3)).astype(np.float32) * rng.uniform(0.1, 10)
    t = rng.standard_normal((5, h, w, 2)).astype(np.float32) ** (trial % 3 + 1)
    (term,) = losses.at_layer_losses([s], [t])
    assert float(term) <= bound * (1 + 1e-6)
  # Adversarial: disjoint supports (student on the left half, teacher on the
  # right) make the maps orthogonal, |Q_s - Q_t|^2 = 2: the bound is attained.
  s = np.zeros((5, h, w, 3), np.float32)
  t = np.zeros((5, h, w, 3), np.float32)
  s[:, :, : w // 2] = rng.uniform(0.5, 2, (5, h, w // 2, 3))
  t[:, :, w // 2:] = rng.uniform(0.5, 2, (5, h, w - w // 2, 3))
  (term,) = losses.at_layer_losses([s], [t])
  np.testing.assert_allclose(term, bound, rtol=1e-6)
  # One-hot peaks at different positions: also orthogonal.
  s = np.zeros((2, h, w, 1), np.float32)
  t = np.zeros((2, h, w, 1), np.float32)
  s[:, 0, 0] = 100.0
  t[:, h - 1, w - 1] = 1e-3
  np.testing.assert_allclose(losses.at_layer_losses([s], [t])[0], bound, rtol=1e-6)
  # An all-zero teacher map: |Q_s|^2 = 1, half the bound.
  np.testing.assert_allclose(
      losses.at_layer_losses([s], [np.zeros_like(t)])[0], bound / 2, rtol=1e-6)


@pytest.mark.parametrize('form', losses.AT_FORMS)
def test_at_matches_numpy(form):
  sp = [_randn(23, (4, 8, 8, 3)), _randn(24, (4, 4, 4, 6)), _randn(25, (4, 2, 2, 5))]
  tp = [_randn(26, (4, 8, 8, 5)), _randn(27, (4, 4, 4, 2)), _randn(28, (4, 2, 2, 5))]
  ref = np_at_layers(sp, tp, form)
  layers = losses.at_layer_losses(sp, tp, form=form)
  assert isinstance(layers, tuple) and len(layers) == 3
  np.testing.assert_allclose(layers, ref, rtol=1e-5)
  out = losses.at_loss(sp, tp, beta=250.0, form=form)
  assert out.shape == () and out.dtype == jnp.float32
  np.testing.assert_allclose(out, 250.0 * sum(ref), rtol=1e-5)


def test_at_mismatched_spatial_sizes():
  s = _randn(30, (3, 8, 8, 4))
  t = _randn(31, (3, 4, 4, 6))
  # The larger (student) activation is average-pooled 2x2 before its map.
  ref = np_at_layers([np_avg_pool(s, 4, 4)], [t])[0]
  np.testing.assert_allclose(losses.at_loss([s], [t], beta=1.0), ref, rtol=1e-5)
  np.testing.assert_allclose(
      losses.at_loss([s], [t]), losses.at_loss([np_avg_pool(s, 4, 4)], [t]), rtol=1e-6)
  # Teacher larger, and each side larger along a different axis.
  np.testing.assert_allclose(
      losses.at_loss([t], [s]), losses.at_loss([t], [np_avg_pool(s, 4, 4)]), rtol=1e-6)
  a, b = _randn(32, (3, 8, 2, 4)), _randn(33, (3, 4, 6, 4))
  np.testing.assert_allclose(
      losses.at_loss([a], [b], form='l2'),
      losses.at_loss([np_avg_pool(a, 4, 2)], [np_avg_pool(b, 4, 2)], form='l2'), rtol=1e-6)
  # Non-divisible sizes fall back to a bilinear resize of the activation.
  c = _randn(34, (3, 6, 6, 4))
  resized = jax.image.resize(jnp.asarray(c), (3, 4, 4, 4), method='bilinear')
  np.testing.assert_allclose(
      losses.at_loss([c], [t]), losses.at_loss([resized], [t]), rtol=1e-6)


def test_at_errors():
  a = jnp.ones((2, 4, 4, 3))
  with pytest.raises(ValueError, match=r'student_points has 3 .*teacher_points has 2'):
    losses.at_loss([a, a, a], [a, a])
  with pytest.raises(ValueError, match=r'student batch size 2 .*teacher batch size 5'):
    losses.at_loss([a], [jnp.ones((5, 4, 4, 3))])
  with pytest.raises(ValueError, match=r"form must be one of \('released', 'l2'\), got 'l1'"):
    losses.at_loss([a], [a], form='l1')
  with pytest.raises(ValueError, match='at least one'):
    losses.at_loss([], [])
  with pytest.raises(ValueError, match='4 dimensions'):
    losses.at_loss([jnp.ones((2, 4, 4))], [jnp.ones((2, 4, 4))])
  with pytest.raises(TypeError, match='sequence'):
    losses.at_loss(a, a)
  b = jnp.ones((3, 4, 4, 3))
  for fn in (losses.at_distance_per_example, losses.at_loss_per_example):
    with pytest.raises(ValueError, match=r'attention point 1: batch size 3 differs .* size 2'):
      fn([a, b], [a, b])
  # The batch means still accept pairs with different batch sizes.
  assert len(losses.at_layer_losses_per_example([a, b], [a, b])) == 2
  np.testing.assert_allclose(losses.at_loss([a, b], [a, b]), 0.0, atol=1e-9)
  for fn in (losses.at_layer_losses_per_example, losses.at_distance_per_example,
             losses.at_loss_per_example):
    with pytest.raises(ValueError, match=r'student batch size 2 .*teacher batch size 5'):
      fn([a], [jnp.ones((5, 4, 4, 3))])
    with pytest.raises(ValueError, match=r"form must be one of \('released', 'l2'\)"):
      fn([a], [a], form='l1')


# ----------------------------------------------------------------------------
# Numerical gradients (float64).
# ----------------------------------------------------------------------------


def _f64(x):
  return jnp.asarray(x, jnp.float64)


def test_check_grads_classification():
  with jax.enable_x64(True):
    s, t = _f64(_randn(40, (4, 5), 2.0)), _f64(_randn(41, (4, 5), 2.0))
    y = jnp.asarray(_labels(42, 4, 5))
    assert losses.cross_entropy(s, y).dtype == jnp.float64
    jtu.check_grads(jax.jit(lambda s: losses.cross_entropy(s, y)), (s,), order=2,
                    modes=('fwd', 'rev'))
    jtu.check_grads(jax.jit(lambda s: losses.kd_loss(s, t, y, alpha=0.7, temperature=3.0)),
                    (s,), order=2, modes=('fwd', 'rev'))


@pytest.mark.parametrize('form', losses.AT_FORMS)
def test_check_grads_at(form):
  # Random points: the maps differ, so the l2 form is differentiable here.
  with jax.enable_x64(True):
    sp = (_f64(_randn(43, (2, 4, 4, 3))), _f64(_randn(44, (2, 2, 2, 2))))
    tp = (_f64(_randn(45, (2, 4, 4, 5))), _f64(_randn(46, (2, 4, 4, 2))))
    jtu.check_grads(jax.jit(lambda *sp: losses.at_loss(sp, tp, beta=10.0, form=form)),
                    sp, order=2, modes=('fwd', 'rev'))


@pytest.mark.parametrize('form', losses.AT_FORMS)
def test_at_gradient_matches_numpy_finite_differences(form):
  # Independent check of the float32 gradient against central differences of
  # the float64 NumPy reference.
  s = _randn(47, (2, 3, 3, 2))
  t = _randn(48, (2, 3, 3, 2))
  g = np.asarray(jax.grad(lambda s: losses.at_loss([s], [t], beta=1.0, form=form))(s))
  eps = 1e-5
  for idx in [(0, 0, 0, 0), (0, 1, 2, 1), (1, 2, 0, 0), (1, 1, 1, 1)]:
    sp, sm = s.astype(np.float64), s.astype(np.float64)
    sp[idx] += eps
    sm[idx] -= eps
    fd = (np_at_layers([sp], [t], form)[0] - np_at_layers([sm], [t], form)[0]) / (2 * eps)
    np.testing.assert_allclose(g[idx], fd, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------
# jit, vmap, dtypes.
# ----------------------------------------------------------------------------


def test_jit_matches_eager():
  s, t = _randn(50, (8, 10), 2.0), _randn(51, (8, 10), 2.0)
  y = _labels(52, 8, 10)
  sp, tp = [_randn(53, (8, 8, 8, 3))], [_randn(54, (8, 4, 4, 6))]
  fns = {
      'ce': lambda: losses.cross_entropy(s, y),
      'kl': lambda: losses.soft_kl(s, t, temperature=4.0),
      'kd': lambda: losses.kd_loss(s, t, y),
      'map': lambda: losses.attention_map(sp[0]),
      'at': lambda: losses.at_loss(sp, tp),
      'at_l2': lambda: losses.at_loss(sp, tp, form='l2'),
      'dl': lambda: losses.distillation_loss(s, y, sp, t, tp, method='kd_at'),
  }
  for name, fn in fns.items():
    eager = fn()
    jitted = jax.jit(fn)()
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_allclose(j, e, rtol=1e-6, atol=1e-7, err_msg=name)


def test_jit_with_traced_hyperparameters():
  s, t = _randn(55, (4, 5)), _randn(56, (4, 5))
  y = _labels(57, 4, 5)
  f = jax.jit(lambda a, temp: losses.kd_loss(s, t, y, alpha=a, temperature=temp))
  np.testing.assert_allclose(f(0.5, 2.0), np_kd(s, t, y, 0.5, 2.0), rtol=1e-5)


def test_vmap_per_example():
  s, t = _randn(60, (6, 7), 2.0), _randn(61, (6, 7), 2.0)
  y = _labels(62, 6, 7)
  per_ce = jax.vmap(losses.cross_entropy)(s, y)
  np.testing.assert_allclose(per_ce, -np_log_softmax(s)[np.arange(6), y], rtol=1e-5)
  per_kd = jax.vmap(lambda s, t, y: losses.kd_loss(s, t, y, alpha=0.5, temperature=2.0))(s, t, y)
  ref = [np_kd(s[i:i + 1], t[i:i + 1], y[i:i + 1], 0.5, 2.0) for i in range(6)]
  np.testing.assert_allclose(per_kd, ref, rtol=1e-5)
  np.testing.assert_allclose(per_kd.mean(), losses.kd_loss(s, t, y, alpha=0.5, temperature=2.0),
                             rtol=1e-5)
  # Per-example AT, and AT against a stack of candidate teachers.
  a, b = _randn(63, (6, 4, 4, 3)), _randn(64, (6, 4, 4, 2))
  per_at = jax.jit(jax.vmap(lambda a, b: losses.at_loss([a[None]], [b[None]], beta=1.0)))(a, b)
  np.testing.assert_allclose(per_at.mean(), losses.at_loss([a], [b], beta=1.0), rtol=1e-5)
  teachers = np.stack([b, 2 * b, _randn(65, (6, 4, 4, 2))])
  per_teacher = jax.jit(jax.vmap(lambda tb: losses.at_loss([a], [tb], form='l2')))(teachers)
  np.testing.assert_allclose(
      per_teacher, [losses.at_loss([a], [tb], form='l2') for tb in teachers], rtol=1e-5)


def test_bfloat16_inputs():
  s, t = _randn(70, (16, 10), 2.0), _randn(71, (16, 10), 2.0)
  y = _labels(72, 16, 10)
  sp = [_randn(73, (4, 8, 8, 3)), _randn(74, (4, 4, 4, 4))]
  tp = [_randn(75, (4, 8, 8, 6)), _randn(76, (4, 4, 4, 2))]
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  pairs = [
      (losses.cross_entropy(bf(s), y), losses.cross_entropy(s, y)),
      (losses.kd_loss(bf(s), bf(t), y), losses.kd_loss(s, t, y)),
      (losses.at_loss([bf(x) for x in sp], [bf(x) for x in tp]), losses.at_loss(sp, tp)),
      (losses.at_loss([bf(x) for x in sp], [bf(x) for x in tp], form='l2'),
       losses.at_loss(sp, tp, form='l2')),
      (losses.distillation_loss(bf(s), y, [bf(x) for x in sp], bf(t),
                                [bf(x) for x in tp], method='kd_at')[0],
       losses.distillation_loss(s, y, sp, t, tp, method='kd_at')[0]),
  ]
  for low, full in pairs:
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, full, rtol=3e-2)
  assert losses.attention_map(bf(sp[0])).dtype == jnp.float32
  g = jax.grad(lambda s: losses.kd_loss(s, bf(t), y))(bf(s))
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


# ----------------------------------------------------------------------------
# distillation_loss.
# ----------------------------------------------------------------------------


def _setup():
  s, t = _randn(80, (8, 10), 2.0), _randn(81, (8, 10), 2.0)
  y = _labels(82, 8, 10)
  sp = [_randn(83, (8, 8, 8, 3)), _randn(84, (8, 4, 4, 4))]
  tp = [_randn(85, (8, 8, 8, 6)), _randn(86, (8, 4, 4, 2))]
  return s, t, y, sp, tp


@pytest.mark.parametrize('method', losses.METHODS)
@pytest.mark.parametrize('at_form', losses.AT_FORMS)
def test_distillation_loss_composition(method, at_form):
  s, t, y, sp, tp = _setup()
  kw = dict(alpha=0.8, temperature=3.0, beta=500.0)
  loss, terms = losses.distillation_loss(s, y, sp, t, tp, method=method, at_form=at_form, **kw)
  assert set(terms) == {'ce', 'kd', 'at', 'loss'}
  assert all(v.shape == () and v.dtype == jnp.float32 for v in terms.values())
  ce = losses.cross_entropy(s, y)
  kd = 0.8 * 9.0 * losses.soft_kl(s, t, temperature=3.0)
  at = losses.at_loss(sp, tp, beta=500.0, form=at_form)
  expected = {
      'none': (ce, 0.0, 0.0),
      'kd': (losses.kd_loss(s, t, y, alpha=0.8, temperature=3.0), kd, 0.0),
      'at': (ce + at, 0.0, at),
      'kd_at': (losses.kd_loss(s, t, y, alpha=0.8, temperature=3.0) + at, kd, at),
      'hard': (losses.cross_entropy(s, np.argmax(t, axis=-1)), 0.0, 0.0),
  }[method]
  np.testing.assert_allclose(loss, expected[0], rtol=1e-6)
  np.testing.assert_allclose(terms['loss'], loss, rtol=0)
  np.testing.assert_allclose(terms['ce'], ce, rtol=1e-6)
  np.testing.assert_allclose(terms['kd'], expected[1], rtol=1e-6)
  np.testing.assert_allclose(terms['at'], expected[2], rtol=1e-6)
  # And against the NumPy references.
  np_at = 500.0 * sum(np_at_layers(sp, tp, at_form))
  np_expected = {
      'none': np_ce(s, y),
      'kd': np_kd(s, t, y, 0.8, 3.0),
      'at': np_ce(s, y) + np_at,
      'kd_at': np_kd(s, t, y, 0.8, 3.0) + np_at,
      'hard': np_ce(s, np.argmax(t, axis=-1)),
  }[method]
  np.testing.assert_allclose(loss, np_expected, rtol=1e-5)


def test_hard_uses_teacher_argmax():
  # Teacher predicts class 2 for every example; the true labels are 0.
  s = _randn(90, (4, 3))
  t = np.tile(np.array([[0.0, 1.0, 5.0]], np.float32), (4, 1))
  y = np.zeros(4, np.int32)
  loss, terms = losses.distillation_loss(s, y, teacher_logits=t, method='hard')
  np.testing.assert_allclose(loss, np_ce(s, np.full(4, 2)), rtol=1e-6)
  np.testing.assert_allclose(terms['ce'], np_ce(s, y), rtol=1e-6)
  assert not np.isclose(float(loss), float(terms['ce']))


@pytest.mark.parametrize('kwargs, message', [
    (dict(method='fitnet'), r"method must be one of \('none', 'kd', 'at', 'kd_at', 'hard'\), "
                            r"got 'fitnet'"),
    (dict(method='at', at_form='l1'), r"at_form must be one of \('released', 'l2'\)"),
])
def test_distillation_loss_validation(kwargs, message):
  s, t, y, sp, tp = _setup()
  with pytest.raises(ValueError, match=message):
    losses.distillation_loss(s, y, sp, t, tp, **kwargs)
  with pytest.raises(ValueError, match=message):
    losses.distillation_loss_per_example(s, y, sp, t, tp, **kwargs)


def test_distillation_loss_missing_inputs():
  s, t, y, sp, tp = _setup()
  for method in ('kd', 'kd_at', 'hard'):
    with pytest.raises(ValueError, match=f"method '{method}' needs teacher_logits"):
      losses.distillation_loss(s, y, sp, None, tp, method=method)
  with pytest.raises(ValueError, match="method 'at' needs teacher_points"):
    losses.distillation_loss(s, y, sp, t, None, method='at')
  with pytest.raises(ValueError, match="method 'kd_at' needs student_points and teacher_points"):
    losses.distillation_loss(s, y, None, t, None, method='kd_at')
  # 'none' needs no teacher at all.
  loss, _ = losses.distillation_loss(s, y, method='none')
  np.testing.assert_allclose(loss, np_ce(s, y), rtol=1e-5)


def test_import_pulls_in_no_flax_or_tensorflow():
  code = ('import sys, distill_jax.losses; '
          'bad = [m for m in ("flax", "tensorflow", "ml_collections", "clu") if m in sys.modules]; '
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=60)


def test_extreme_logits_are_finite():
  s = np.array([[1e4, -1e4, 0.0], [0.0, 3e4, -3e4]], np.float32)
  t = np.array([[-1e4, 1e4, 0.0], [0.0, 3e4, -3e4]], np.float32)
  y = np.array([1, 2], np.int32)
  out, g = jax.value_and_grad(lambda s: losses.kd_loss(s, t, y, alpha=0.5, temperature=4.0))(s)
  assert np.isfinite(float(out)) and np.all(np.isfinite(g))
  np.testing.assert_allclose(out, np_kd(s, t, y, 0.5, 4.0), rtol=1e-5)


# ----------------------------------------------------------------------------
# Per-example cores: NumPy float64 references, batch means, jit, gradients.
# ----------------------------------------------------------------------------


def np_ce_per_example(logits, labels):
  lsm = np_log_softmax(logits)
  return -lsm[np.arange(len(labels)), labels]


def np_soft_kl_per_example(s, t, temperature):
  log_q = np_log_softmax(np.asarray(s, np.float64) / temperature)
  log_p = np_log_softmax(np.asarray(t, np.float64) / temperature)
  return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def np_kd_per_example(s, t, labels, alpha, temperature):
  return ((1 - alpha) * np_ce_per_example(s, labels)
          + alpha * temperature**2 * np_soft_kl_per_example(s, t, temperature))


def np_at_layers_per_example(student, teacher, form='released', p=2):
  """One (N,) array per layer; the larger activation is average-pooled first."""
  out = []
  for s, t in zip(student, teacher):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    h, w = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
    d = np_attention_map(np_avg_pool(s, h, w), p) - np_attention_map(np_avg_pool(t, h, w), p)
    if form == 'released':
      out.append((d**2).mean(axis=-1))
    else:
      out.append(np.sqrt((d**2).sum(axis=-1)))
  return out


def _points(seed, n=5):
  sp = [_randn(seed, (n, 8, 8, 3)), _randn(seed + 1, (n, 4, 4, 6)), _randn(seed + 2, (n, 2, 2, 5))]
  tp = [_randn(seed + 3, (n, 4, 4, 5)), _randn(seed + 4, (n, 4, 4, 2)),
        _randn(seed + 5, (n, 2, 2, 5))]
  return sp, tp


def test_cross_entropy_per_example():
  logits, labels = _randn(100, (7, 6), 3.0), _labels(101, 7, 6)
  per = losses.cross_entropy_per_example(logits, labels)
  assert per.shape == (7,) and per.dtype == jnp.float32
  np.testing.assert_allclose(per, np_ce_per_example(logits, labels), rtol=1e-5)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), np.mean(per), rtol=1e-6)
  np.testing.assert_allclose(
      jax.jit(losses.cross_entropy_per_example)(logits, labels), per, rtol=1e-6)
  # Leading batch shapes are kept.
  assert losses.cross_entropy_per_example(logits.reshape(7, 1, 6), labels[:, None]).shape == (7, 1)
  with pytest.raises(ValueError, match='labels shape'):
    losses.cross_entropy_per_example(jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32))


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_soft_kl_per_example(temperature):
  s, t = _randn(102, (7, 6), 3.0), _randn(103, (7, 6), 3.0)
  per = losses.soft_kl_per_example(s, t, temperature=temperature)
  assert per.shape == (7,) and per.dtype == jnp.float32
  np.testing.assert_allclose(per, np_soft_kl_per_example(s, t, temperature), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses.soft_kl(s, t, temperature=temperature), np.mean(per),
                             rtol=1e-6)
  jitted = jax.jit(lambda s, t: losses.soft_kl_per_example(s, t, temperature=temperature))
  np.testing.assert_allclose(jitted(s, t), per, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match='teacher_logits shape'):
    losses.soft_kl_per_example(jnp.zeros((4, 3)), jnp.zeros((4, 5)), temperature=1.0)


def test_kd_loss_per_example():
  s, t = _randn(104, (9, 5), 2.0), _randn(105, (9, 5), 2.0)
  y = _labels(106, 9, 5)
  for alpha, temperature in [(0.0, 4.0), (0.5, 2.0), (0.9, 4.0), (1.0, 10.0)]:
    per = losses.kd_loss_per_example(s, t, y, alpha=alpha, temperature=temperature)
    assert per.shape == (9,) and per.dtype == jnp.float32
    np.testing.assert_allclose(per, np_kd_per_example(s, t, y, alpha, temperature), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(losses.kd_loss(s, t, y, alpha=alpha, temperature=temperature),
                               np.mean(per), rtol=1e-6)
  # Defaults match kd_loss's (alpha = 0.9, T = 4).
  np.testing.assert_allclose(losses.kd_loss_per_example(s, t, y),
                             np_kd_per_example(s, t, y, 0.9, 4.0), rtol=1e-5)
  # jit, with traced hyper-parameters too.
  f = jax.jit(lambda a, temp: losses.kd_loss_per_example(s, t, y, alpha=a, temperature=temp))
  np.testing.assert_allclose(
      f(0.5, 2.0), losses.kd_loss_per_example(s, t, y, alpha=0.5, temperature=2.0), rtol=1e-6)
  # Teacher gets no gradient.
  g = jax.grad(lambda t: losses.kd_loss_per_example(s, t, y).sum())(t)
  np.testing.assert_array_equal(g, np.zeros_like(t))


@pytest.mark.parametrize('form', losses.AT_FORMS)
@pytest.mark.parametrize('p', [2, 3])
def test_at_per_example_matches_numpy(form, p):
  sp, tp = _points(110)
  ref = np_at_layers_per_example(sp, tp, form, p)
  layers = losses.at_layer_losses_per_example(sp, tp, p=p, form=form)
  assert isinstance(layers, tuple) and len(layers) == 3
  for layer, r in zip(layers, ref):
    assert layer.shape == (5,) and layer.dtype == jnp.float32
    np.testing.assert_allclose(layer, r, rtol=1e-5, atol=1e-9)
  dist = losses.at_distance_per_example(sp, tp, p=p, form=form)
  assert dist.shape == (5,)
  np.testing.assert_allclose(dist, sum(ref), rtol=1e-5)
  per_loss = losses.at_loss_per_example(sp, tp, beta=250.0, p=p, form=form)
  np.testing.assert_allclose(per_loss, 250.0 * sum(ref), rtol=1e-5)
  # Batch means: each layer term, the distance and at_loss.
  batch_layers = losses.at_layer_losses(sp, tp, p=p, form=form)
  np.testing.assert_allclose(batch_layers, [np.mean(layer) for layer in layers], rtol=1e-6)
  np.testing.assert_allclose(batch_layers, [np.mean(r) for r in ref], rtol=1e-5)
  np.testing.assert_allclose(sum(batch_layers), np.mean(dist), rtol=1e-6)
  np.testing.assert_allclose(losses.at_loss(sp, tp, beta=250.0, p=p, form=form),
                             np.mean(per_loss), rtol=1e-6)
  # jit vs eager.
  jitted = jax.jit(lambda sp, tp: losses.at_distance_per_example(sp, tp, p=p, form=form))
  np.testing.assert_allclose(jitted(sp, tp), dist, rtol=1e-6, atol=1e-9)


def test_released_per_example_averages_to_batch_value_exactly():
  # The released batch term is one mean over N * P squared differences; the
  # per-example terms are means over P, whose mean over N is the same number.
  sp, tp = _points(120, n=6)
  with jax.enable_x64(True):
    sp64, tp64 = [_f64(x) for x in sp], [_f64(x) for x in tp]
    for (s, t), per in zip(zip(sp64, tp64), losses.at_layer_losses_per_example(sp64, tp64)):
      h, w = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
      d = np_attention_map(np_avg_pool(np.asarray(s), h, w)) - np_attention_map(
          np_avg_pool(np.asarray(t), h, w))
      np.testing.assert_allclose(np.mean(per), np.mean(d**2), rtol=1e-13)
    np.testing.assert_allclose(np.mean(losses.at_distance_per_example(sp64, tp64)),
                               sum(losses.at_layer_losses(sp64, tp64)), rtol=1e-13)


@pytest.mark.parametrize('form', losses.AT_FORMS)
def test_at_distance_equals_vmapped_batches_of_one(form):
  # What the evaluation step computes: sum(at_layer_losses) on batches of one.
  sp, tp = _points(130)
  # A bilinear (non-divisible) pair too.
  sp.append(_randn(136, (5, 6, 6, 2)))
  tp.append(_randn(137, (5, 4, 4, 3)))
  vmapped = jax.jit(jax.vmap(lambda s, t: sum(losses.at_layer_losses(
      [x[None] for x in s], [x[None] for x in t], form=form))))(sp, tp)
  np.testing.assert_allclose(losses.at_distance_per_example(sp, tp, form=form), vmapped,
                             rtol=1e-5, atol=1e-9)
  loop = [sum(losses.at_layer_losses([x[i:i + 1] for x in sp], [x[i:i + 1] for x in tp],
                                     form=form)) for i in range(5)]
  np.testing.assert_allclose(losses.at_distance_per_example(sp, tp, form=form), loop,
                             rtol=1e-5, atol=1e-9)


def test_at_per_example_hand_computed():
  # See _HAND_S / _HAND_T: one example, so the per-example value is the batch value.
  np.testing.assert_allclose(
      losses.at_distance_per_example([_HAND_S], [_HAND_T]), [0.5527864], rtol=1e-6)
  np.testing.assert_allclose(
      losses.at_distance_per_example([_HAND_S], [_HAND_T], form='l2'), [1.0514622], rtol=1e-6)
  # Two examples: the hand pair and an identical pair (distance 0); the mean halves.
  s2, t2 = np.concatenate([_HAND_S, _HAND_S]), np.concatenate([_HAND_T, _HAND_S])
  np.testing.assert_allclose(losses.at_distance_per_example([s2], [t2]), [0.5527864, 0.0],
                             rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(losses.at_layer_losses([s2], [t2])[0], 0.5527864 / 2, rtol=1e-6)


def test_check_grads_per_example_kd():
  with jax.enable_x64(True):
    s, t = _f64(_randn(140, (4, 5), 2.0)), _f64(_randn(141, (4, 5), 2.0))
    y = jnp.asarray(_labels(142, 4, 5))
    assert losses.kd_loss_per_example(s, t, y).dtype == jnp.float64
    jtu.check_grads(
        jax.jit(lambda s: losses.kd_loss_per_example(s, t, y, alpha=0.7, temperature=3.0)),
        (s,), order=2, modes=('fwd', 'rev'))
    jtu.check_grads(jax.jit(lambda s: losses.cross_entropy_per_example(s, y)), (s,), order=2,
                    modes=('fwd', 'rev'))
    jtu.check_grads(jax.jit(lambda s: losses.soft_kl_per_example(s, t, temperature=2.0)), (s,),
                    order=2, modes=('fwd', 'rev'))


@pytest.mark.parametrize('form', losses.AT_FORMS)
def test_check_grads_per_example_at(form):
  with jax.enable_x64(True):
    sp = (_f64(_randn(143, (2, 4, 4, 3))), _f64(_randn(144, (2, 2, 2, 2))))
    tp = (_f64(_randn(145, (2, 4, 4, 5))), _f64(_randn(146, (2, 4, 4, 2))))
    jtu.check_grads(jax.jit(lambda *sp: losses.at_distance_per_example(sp, tp, form=form)),
                    sp, order=2, modes=('fwd', 'rev'))
    jtu.check_grads(
        jax.jit(lambda *sp: losses.at_layer_losses_per_example(sp, tp, form=form)[1]),
        sp, order=2, modes=('fwd', 'rev'))
    # Teacher gets no gradient.
    g = jax.grad(lambda *tp: losses.at_loss_per_example(sp, tp, form=form).sum(),
                 argnums=(0, 1))(*tp)
    for gi in g:
      np.testing.assert_array_equal(gi, np.zeros_like(gi))


@pytest.mark.parametrize('method', losses.METHODS)
@pytest.mark.parametrize('at_form', losses.AT_FORMS)
def test_distillation_loss_per_example(method, at_form):
  s, t, y, sp, tp = _setup()
  kw = dict(method=method, alpha=0.8, temperature=3.0, beta=500.0, at_form=at_form)
  per_loss, per_terms = losses.distillation_loss_per_example(s, y, sp, t, tp, **kw)
  assert set(per_terms) == {'ce', 'kd', 'at', 'loss'}
  assert all(v.shape == (8,) and v.dtype == jnp.float32 for v in per_terms.values())
  np.testing.assert_array_equal(per_terms['loss'], per_loss)
  # NumPy per-example references.
  np_ce = np_ce_per_example(s, y)
  np_kd_term = 0.8 * 9.0 * np_soft_kl_per_example(s, t, 3.0)
  np_at = 500.0 * sum(np_at_layers_per_example(sp, tp, at_form))
  zeros = np.zeros(8)
  expected = {
      'none': (np_ce, zeros, zeros),
      'kd': (np_kd_per_example(s, t, y, 0.8, 3.0), np_kd_term, zeros),
      'at': (np_ce + np_at, zeros, np_at),
      'kd_at': (np_kd_per_example(s, t, y, 0.8, 3.0) + np_at, np_kd_term, np_at),
      'hard': (np_ce_per_example(s, np.argmax(t, axis=-1)), zeros, zeros),
  }[method]
  np.testing.assert_allclose(per_loss, expected[0], rtol=1e-5)
  np.testing.assert_allclose(per_terms['ce'], np_ce, rtol=1e-5)
  np.testing.assert_allclose(per_terms['kd'], expected[1], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(per_terms['at'], expected[2], rtol=1e-5, atol=1e-7)
  # The batch wrapper is the mean of every per-example term.
  loss, terms = losses.distillation_loss(s, y, sp, t, tp, **kw)
  np.testing.assert_array_equal(terms['loss'], loss)
  for name, value in per_terms.items():
    np.testing.assert_allclose(terms[name], np.mean(value), rtol=1e-6, atol=1e-9, err_msg=name)
  # jit vs eager.
  jitted = jax.jit(lambda s, sp, t, tp: losses.distillation_loss_per_example(
      s, y, sp, t, tp, **kw))(s, sp, t, tp)
  for e, j in zip(jax.tree.leaves((per_loss, per_terms)), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(j, e, rtol=1e-6, atol=1e-7)


def test_distillation_loss_per_example_shape_errors():
  s, t, y, sp, tp = _setup()
  with pytest.raises(ValueError, match=r'batch shape \(8,\) does not match .* \(4,\)'):
    losses.distillation_loss_per_example(s, y, [x[:4] for x in sp], t, [x[:4] for x in tp],
                                         method='at')
  with pytest.raises(ValueError, match='teacher_logits shape'):
    losses.distillation_loss_per_example(s, y, teacher_logits=t[:, :5], method='hard')
  with pytest.raises(ValueError, match='labels shape'):
    losses.distillation_loss_per_example(s, y[:4], method='none')


def test_traced_hyperparameters_need_no_concrete_values():
  # No value checks inspect alpha / temperature / beta: all may be traced.
  s, t, y, sp, tp = _setup()
  f = jax.jit(lambda a, temp, b: losses.distillation_loss(
      s, y, sp, t, tp, method='kd_at', alpha=a, temperature=temp, beta=b))
  loss, _ = f(0.8, 3.0, 500.0)
  np.testing.assert_allclose(
      loss, losses.distillation_loss(s, y, sp, t, tp, method='kd_at', alpha=0.8,
                                     temperature=3.0, beta=500.0)[0], rtol=1e-6)
  g = jax.jit(lambda b: losses.at_loss_per_example(sp, tp, beta=b))(2.0)
  np.testing.assert_allclose(g, 2.0 * losses.at_distance_per_example(sp, tp), rtol=1e-6)


def test_public_names():
  for name in ('cross_entropy_per_example', 'soft_kl_per_example', 'kd_loss_per_example',
               'at_layer_losses_per_example', 'at_distance_per_example', 'at_loss_per_example',
               'distillation_loss_per_example', 'cross_entropy', 'soft_kl', 'kd_loss',
               'attention_map', 'at_layer_losses', 'at_loss', 'distillation_loss', 'METHODS',
               'AT_FORMS'):
    assert name in losses.__all__ and hasattr(losses, name), name
  assert losses.AT_FORMS == ('released', 'l2')
  assert losses.METHODS == ('none', 'kd', 'at', 'kd_at', 'hard')
