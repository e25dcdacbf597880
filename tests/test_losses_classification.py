"""Tests for distill_jax.losses.classification: cross-entropy, soft KL and KD."""

import math

import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest

from distill_jax import losses
from losses_reference import _f64
from losses_reference import _labels
from losses_reference import _randn
from losses_reference import np_ce
from losses_reference import np_ce_per_example
from losses_reference import np_kd
from losses_reference import np_kd_per_example
from losses_reference import np_soft_kl
from losses_reference import np_soft_kl_per_example


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


def test_extreme_logits_are_finite():
  s = np.array([[1e4, -1e4, 0.0], [0.0, 3e4, -3e4]], np.float32)
  t = np.array([[-1e4, 1e4, 0.0], [0.0, 3e4, -3e4]], np.float32)
  y = np.array([1, 2], np.int32)
  out, g = jax.value_and_grad(lambda s: losses.kd_loss(s, t, y, alpha=0.5, temperature=4.0))(s)
  assert np.isfinite(float(out)) and np.all(np.isfinite(g))
  np.testing.assert_allclose(out, np_kd(s, t, y, 0.5, 4.0), rtol=1e-5)


# ----------------------------------------------------------------------------
# Numerical gradients (float64), jit.
# ----------------------------------------------------------------------------


def test_check_grads_classification():
  with jax.enable_x64(True):
    s, t = _f64(_randn(40, (4, 5), 2.0)), _f64(_randn(41, (4, 5), 2.0))
    y = jnp.asarray(_labels(42, 4, 5))
    assert losses.cross_entropy(s, y).dtype == jnp.float64
    jtu.check_grads(jax.jit(lambda s: losses.cross_entropy(s, y)), (s,), order=2,
                    modes=('fwd', 'rev'))
    jtu.check_grads(jax.jit(lambda s: losses.kd_loss(s, t, y, alpha=0.7, temperature=3.0)),
                    (s,), order=2, modes=('fwd', 'rev'))


def test_jit_with_traced_hyperparameters():
  s, t = _randn(55, (4, 5)), _randn(56, (4, 5))
  y = _labels(57, 4, 5)
  f = jax.jit(lambda a, temp: losses.kd_loss(s, t, y, alpha=a, temperature=temp))
  np.testing.assert_allclose(f(0.5, 2.0), np_kd(s, t, y, 0.5, 2.0), rtol=1e-5)


# ----------------------------------------------------------------------------
# Per-example cores: NumPy float64 references, batch means, jit, gradients.
# ----------------------------------------------------------------------------


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
