"""Tests for distill_jax.losses.attention: attention maps and attention transfer."""

import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest

from distill_jax import losses
from losses_reference import _f64
from losses_reference import _randn
from losses_reference import np_at_layers
from losses_reference import np_at_layers_per_example
from losses_reference import np_attention_map
from losses_reference import np_avg_pool

# One example, H = 1, W = 2, C = 2. Student: position 0 = [1, 1], position 1 =
# [2, 0]; channel means of squares v = [1, 2], |v| = sqrt 5, so
# Q_s = [1/sqrt 5, 2/sqrt 5] = [0.4472136, 0.8944272]. Teacher: position 0 =
# [1, 1], position 1 = [0, 0] -> Q_t = [1, 0].
# Released: ((1 - 0.4472136)^2 + 0.8944272^2) / 2 = (0.3055728 + 0.8) / 2
#   = 0.5527864 (= 1 - 1/sqrt 5).
# l2: sqrt(0.3055728 + 0.8) = sqrt(1.1055728) = 1.0514622.
_HAND_S = np.array([[[[1.0, 1.0], [2.0, 0.0]]]], np.float32)
_HAND_T = np.array([[[[1.0, 1.0], [0.0, 0.0]]]], np.float32)


def _points(seed, n=5):
  sp = [_randn(seed, (n, 8, 8, 3)), _randn(seed + 1, (n, 4, 4, 6)), _randn(seed + 2, (n, 2, 2, 5))]
  tp = [_randn(seed + 3, (n, 4, 4, 5)), _randn(seed + 4, (n, 4, 4, 2)),
        _randn(seed + 5, (n, 2, 2, 5))]
  return sp, tp


# ----------------------------------------------------------------------------
# Attention maps and attention transfer.
# ----------------------------------------------------------------------------


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
# Per-example cores: NumPy float64 references, batch means, jit, gradients.
# ----------------------------------------------------------------------------


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
