"""Tests for distill_jax.losses.distillation, and for the package as a whole.

distillation_loss(_per_example) against its parts and NumPy references; then
properties that span every loss (teacher gradients, jit, vmap, bfloat16), the
import footprint and the public names.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses
from losses_reference import _labels
from losses_reference import _randn
from losses_reference import np_at_layers
from losses_reference import np_at_layers_per_example
from losses_reference import np_ce
from losses_reference import np_ce_per_example
from losses_reference import np_kd
from losses_reference import np_kd_per_example
from losses_reference import np_log_softmax
from losses_reference import np_soft_kl_per_example


def _setup():
  s, t = _randn(80, (8, 10), 2.0), _randn(81, (8, 10), 2.0)
  y = _labels(82, 8, 10)
  sp = [_randn(83, (8, 8, 8, 3)), _randn(84, (8, 4, 4, 4))]
  tp = [_randn(85, (8, 8, 8, 6)), _randn(86, (8, 4, 4, 2))]
  return s, t, y, sp, tp


# ----------------------------------------------------------------------------
# distillation_loss.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# distillation_loss_per_example.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Every loss: teacher gradients, jit, vmap, dtypes.
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
# The package: import footprint and public names.
# ----------------------------------------------------------------------------


def test_import_pulls_in_no_flax_or_tensorflow():
  code = ('import sys, distill_jax.losses; '
          'bad = [m for m in ("flax", "tensorflow", "ml_collections", "clu") if m in sys.modules]; '
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=60)


def test_public_names():
  for name in ('cross_entropy_per_example', 'soft_kl_per_example', 'kd_loss_per_example',
               'at_layer_losses_per_example', 'at_distance_per_example', 'at_loss_per_example',
               'distillation_loss_per_example', 'cross_entropy', 'soft_kl', 'kd_loss',
               'attention_map', 'at_layer_losses', 'at_loss', 'distillation_loss', 'METHODS',
               'AT_FORMS'):
    assert name in losses.__all__ and hasattr(losses, name), name
  assert losses.AT_FORMS == ('released', 'l2')
  assert losses.METHODS == ('none', 'kd', 'at', 'kd_at', 'hard')
