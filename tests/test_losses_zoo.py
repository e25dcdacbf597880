"""Tests for the distillation zoo: logits.py, features.py and embeddings.py.

Each loss is compared with a float64 NumPy rendering of its authors' release
(tests/losses_reference.py), written step by step in the release's own layout:
feature maps are NCHW there, so it gets the NHWC test data transposed, which
tests the layout translation too. Then: defaults, jit, gradients, dtypes,
teacher gradients, errors and vmap.
"""

import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest

from distill_jax import losses
from losses_reference import _f64
from losses_reference import _labels
from losses_reference import _randn
from losses_reference import np_cc
from losses_reference import np_dist
from losses_reference import np_dkd
from losses_reference import np_fitnet
from losses_reference import np_fsp
from losses_reference import np_nchw
from losses_reference import np_nst
from losses_reference import np_pkt
from losses_reference import np_rkd
from losses_reference import np_sp


def _maps(seed, shapes):
  return [_randn(seed + i, shape) for i, shape in enumerate(shapes)]


# ----------------------------------------------------------------------------
# Cases: (student, teacher, extra positional args) in NHWC, the loss, and the
# release reference, which takes the release's layout.
# ----------------------------------------------------------------------------


def _sp_case():
  s = _maps(0, [(2, 4, 4, 3), (2, 2, 2, 5)])
  t = _maps(10, [(2, 4, 4, 6), (2, 3, 3, 2)])
  s[1][1] = 0.0  # an all-zero example: its Gram row is zero (normalize's eps)
  return s, t, ()


def _nst_case():
  s = _maps(20, [(2, 8, 8, 3), (2, 4, 4, 2), (2, 3, 3, 4), (2, 8, 2, 3)])
  t = _maps(30, [(2, 4, 4, 5), (2, 6, 6, 3), (2, 3, 3, 2), (2, 4, 4, 2)])
  # Pair 0: student pooled 8 -> 4; pair 1: teacher pooled 6 -> 4 (uneven,
  # overlapping bins); pair 2: equal sizes, a dead channel on each side;
  # pair 3: non-square student pooled to the release's (4, 4) square.
  s[2][..., 1] = 0.0
  t[2][..., 0] = 0.0
  return s, t, ()


def _fsp_case():
  # Consecutive maps: 8 -> 4 (bottom pooled), 4 == 4; teacher 6 -> 4 (uneven)
  # and 4 <- 5 (top pooled, uneven). Student and teacher sizes differ.
  s = _maps(40, [(2, 8, 8, 3), (2, 4, 4, 4), (2, 4, 4, 2)])
  t = _maps(50, [(2, 6, 6, 3), (2, 4, 4, 4), (2, 5, 5, 2)])
  return s, t, ()


def _rkd_case():
  s, t = _randn(60, (5, 4)), _randn(61, (5, 6))
  t[3] = t[1]  # coinciding teacher examples: the squared-distance clamp
  return s, t, ()


def _rkd_maps_case():
  return _randn(62, (3, 2, 2, 3)), _randn(63, (3, 2, 3, 2)), ()


def _pkt_case():
  s, t = _randn(64, (5, 4)), _randn(65, (5, 6))
  s[2] = 0.0  # an all-zero embedding
  return s, t, ()


def _cc_case():
  return _randn(66, (5, 7)), _randn(67, (5, 7)), ()


def _cc_pair_case():
  return _randn(68, (2, 3)), _randn(69, (2, 3)), ()


def _dkd_case():
  return _randn(70, (4, 5), 3.0), _randn(71, (4, 5), 3.0), (_labels(72, 4, 5),)


def _dist_case():
  return _randn(73, (4, 5), 2.0), _randn(74, (4, 5), 2.0), ()


def _fitnet_case():
  return _randn(75, (2, 4, 4, 3)), _randn(76, (2, 4, 4, 3)), ()


def _seq(ref):
  return lambda s, t, *a, **kw: ref([np_nchw(x) for x in s], [np_nchw(x) for x in t], **kw)


def _emb(ref, maps=False):
  conv = np_nchw if maps else (lambda x: np.asarray(x, np.float64))
  return lambda s, t, *a, **kw: ref(conv(s), conv(t), *a, **kw)


# name -> (case, loss, reference, non-default keywords as (ours, the release's)).
CASES = {
    'sp': (_sp_case, losses.sp_loss, _seq(np_sp), None),
    'nst': (_nst_case, losses.nst_loss, _seq(np_nst), None),
    'fsp': (_fsp_case, losses.fsp_loss, _seq(np_fsp), None),
    'fitnet': (_fitnet_case, losses.fitnet_loss, _emb(np_fitnet, maps=True), None),
    'rkd': (_rkd_case, losses.rkd_loss, _emb(np_rkd),
            (dict(distance_weight=2.0, angle_weight=3.0), dict(w_d=2.0, w_a=3.0))),
    'rkd_maps': (_rkd_maps_case, losses.rkd_loss, _emb(np_rkd, maps=True), None),
    'pkt': (_pkt_case, losses.pkt_loss, _emb(np_pkt), (dict(eps=1e-3), dict(eps=1e-3))),
    'cc': (_cc_case, losses.cc_loss, _emb(np_cc), None),
    'cc_pair': (_cc_pair_case, losses.cc_loss, _emb(np_cc), None),
    'dkd': (_dkd_case, losses.dkd_loss, _emb(np_dkd),
            (dict(alpha=0.5, beta=2.0, temperature=2.0),
             dict(alpha=0.5, beta=2.0, temperature=2.0))),
    'dist': (_dist_case, losses.dist_loss, _emb(np_dist),
             (dict(beta=2.0, gamma=0.5, temperature=3.0), dict(beta=2.0, gamma=0.5, tau=3.0))),
}
NAMES = sorted(CASES)


_JITTED = {}


def _jit(fn):
  """One ``jax.jit`` per loss, so each shape compiles once across the tests."""
  return _JITTED.setdefault(fn, jax.jit(fn))


def _tree_f64(x):
  return jax.tree.map(lambda a: _f64(a) if a.dtype.kind == 'f' else jnp.asarray(a), x)


# ----------------------------------------------------------------------------
# Equal to the releases.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', NAMES)
def test_defaults_match_release_float64(name):
  case, fn, ref, _ = CASES[name]
  s, t, extra = case()
  expected = ref(s, t, *extra)
  with jax.enable_x64(True):
    out = _jit(fn)(*_tree_f64((s, t) + extra))
    assert out.shape == () and out.dtype == jnp.float64
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize('name', NAMES)
def test_defaults_match_release_float32(name):
  case, fn, ref, _ = CASES[name]
  s, t, extra = case()
  out = _jit(fn)(s, t, *extra)
  assert out.shape == () and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(s, t, *extra), rtol=2e-5, atol=1e-7)


# Eager dispatch compiles every operation apart (about a second per loss), so
# only one case per loss runs eagerly.
@pytest.mark.parametrize('name', [n for n in NAMES if n not in ('cc_pair', 'rkd_maps')])
def test_jit_matches_eager(name):
  case, fn, _, _ = CASES[name]
  s, t, extra = case()
  eager = fn(s, t, *extra)
  assert eager.shape == () and eager.dtype == jnp.float32
  np.testing.assert_allclose(_jit(fn)(s, t, *extra), eager, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('name', [n for n in NAMES if CASES[n][3]])
def test_keywords_match_release(name):
  case, fn, ref, (ours, theirs) = CASES[name]
  s, t, extra = case()
  with jax.enable_x64(True):
    out = _jit(fn)(*_tree_f64((s, t) + extra), **ours)
  np.testing.assert_allclose(out, ref(s, t, *extra, **theirs), rtol=1e-10, atol=1e-13)
  # The keywords matter, and traced values are accepted.
  assert not np.isclose(out, ref(s, t, *extra))
  traced = jax.jit(lambda kw: fn(s, t, *extra, **kw))(ours)
  np.testing.assert_allclose(traced, ref(s, t, *extra, **theirs), rtol=2e-5)


def test_zero_for_identical_inputs():
  s4 = _maps(80, [(2, 4, 4, 3), (2, 2, 2, 3)])
  e, z, y = _randn(82, (4, 6)), _randn(83, (4, 5)), _labels(84, 4, 5)
  values = jax.jit(lambda s4, e, z: (
      losses.sp_loss(s4, s4), losses.nst_loss(s4, s4), losses.fsp_loss(s4, s4),
      losses.fitnet_loss(s4[0], s4[0]), losses.rkd_loss(e, e), losses.pkt_loss(e, e),
      losses.cc_loss(e, e), losses.dkd_loss(z, z, y),
      # DIST's correlations reach 1 only up to the release's eps.
      losses.dist_loss(z, z)))(s4, e, z)
  np.testing.assert_allclose(values, 0.0, atol=1e-5)


def test_hand_computed():
  # CC: delta = [[1, 2], [3, 0], [1, 1]] -> rows 0*1 and 1*2 products:
  # (1*3 + 2*0) = 3, (3*1 + 0*1) = 3 -> mean 3.
  s = np.array([[1.0, 2.0], [3.0, 0.0], [1.0, 1.0]], np.float32)
  np.testing.assert_allclose(losses.cc_loss(s, np.zeros_like(s)), 3.0, rtol=1e-6)
  np.testing.assert_allclose(losses.cc_loss(s, -s), 12.0, rtol=1e-6)
  # FitNet: mean of (1, 4, 0, 9) = 3.5.
  np.testing.assert_allclose(
      losses.fitnet_loss(np.array([1.0, 2.0, 0.0, 3.0]), np.zeros(4)), 3.5, rtol=1e-6)
  # DIST, batch of one: the intra-class vectors are constant, correlation 0
  # (the release's eps), so that term is T^2 * 1 whatever the logits.
  z = _randn(85, (1, 4))
  np.testing.assert_allclose(losses.dist_loss(z, z, beta=0.0, temperature=2.0), 4.0, rtol=1e-6)
  np.testing.assert_allclose(losses.dist_loss(z, z, beta=0.0, temperature=2.0),
                             np_dist(z, z, beta=0.0, tau=2.0), rtol=1e-6)


# ----------------------------------------------------------------------------
# Edge cases the releases guard (or do not).
# ----------------------------------------------------------------------------


def test_dead_channels_and_zero_examples_have_finite_gradients():
  def finite(tree):
    return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))

  s, t, _ = _nst_case()
  g = jax.jit(jax.grad(losses.nst_loss))(s, t)
  assert finite(g)
  np.testing.assert_array_equal(g[2][..., 1], 0.0)  # the dead channel
  zeros = [np.zeros((2, 3, 3, 2), np.float32)]
  assert finite(jax.jit(jax.value_and_grad(losses.nst_loss))(zeros, zeros))
  # All-zero student examples/embeddings (SP, PKT).
  s, t, _ = _sp_case()
  assert finite(jax.jit(jax.grad(losses.sp_loss))(s, t))
  s, t, _ = _pkt_case()
  assert finite(jax.jit(jax.grad(losses.pkt_loss))(s, t))
  # RKD with coinciding student examples: clamped distances, zero difference vectors.
  s, t, _ = _rkd_case()
  s[4] = s[0]
  value, g = jax.jit(jax.value_and_grad(losses.rkd_loss))(s, t)
  np.testing.assert_allclose(value, np_rkd(s.astype(np.float64), t), rtol=2e-5)
  assert finite(g)
  # DIST with constant logits (centred vectors of zeros).
  z = np.zeros((3, 4), np.float32)
  assert finite(jax.jit(jax.grad(losses.dist_loss))(z, _randn(86, (3, 4))))


def test_cc_gradient_is_zero_where_student_equals_teacher():
  s = _randn(87, (3, 4))
  t = s.copy()
  t[0, 0] += 1.0
  t[2, 1] -= 1.0
  g = np.asarray(jax.jit(jax.grad(losses.cc_loss))(s, t))
  # torch.abs's subgradient at 0 is 0: only entries with a nonzero difference
  # move, and only where a neighbour's difference in that column is nonzero.
  assert np.count_nonzero(g) == 0  # columns 0 and 1 have no neighbouring differences
  t[1, 0] += 2.0
  g = np.asarray(jax.jit(jax.grad(losses.cc_loss))(s, t))
  np.testing.assert_allclose(g[:, 0], [-1.0, -0.5, 0.0])  # d/ds of |d0||d1| / 2
  np.testing.assert_array_equal(g[:, 1:], 0.0)


def test_dkd_is_finite_where_probabilities_underflow():
  # Student puts the target 200 logits below the rest at T = 1: the release's
  # log of the summed target probability is log(0) = -inf; here it is finite.
  s = np.array([[-200.0, 0.0, 0.0], [0.0, 200.0, 0.0]], np.float32)
  t = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]], np.float32)
  y = np.array([0, 1], np.int32)
  value, g = jax.jit(jax.value_and_grad(losses.dkd_loss))(s, t, y, temperature=1.0)
  assert np.isfinite(value) and np.all(np.isfinite(g))
  with jax.enable_x64(True):
    # The target probability of example 0 is about exp(-200): representable
    # in float64, where the release's form is finite and agrees.
    np.testing.assert_allclose(_jit(losses.dkd_loss)(_f64(s), _f64(t), y, temperature=1.0),
                               np_dkd(s, t, y, temperature=1.0), rtol=1e-10)


# ----------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------


def _grad_case(name):
  """Small smooth inputs: no dead channels, no coinciding examples, no ties."""
  if name in ('sp', 'nst'):
    return _maps(90, [(2, 4, 4, 2), (2, 2, 2, 3)]), _maps(92, [(2, 2, 2, 3), (2, 2, 2, 2)]), ()
  if name == 'fsp':
    return _maps(94, [(2, 4, 4, 2), (2, 2, 2, 3)]), _maps(96, [(2, 2, 2, 2), (2, 2, 2, 3)]), ()
  if name == 'rkd':
    return _randn(98, (4, 3)), _randn(99, (4, 2)), ()
  if name == 'pkt':  # x / (|x| + eps) is not differentiable at x = 0
    return _randn(100, (4, 3)), _randn(101, (4, 2)), ()
  case = CASES[name][0]
  return case()


@pytest.mark.parametrize('name', ['sp', 'nst', 'fsp', 'fitnet', 'rkd', 'pkt', 'cc', 'dkd', 'dist'])
def test_check_grads(name):
  fn = CASES[name][1]
  s, t, extra = _grad_case(name)
  with jax.enable_x64(True):
    s, t, extra = _tree_f64((s, t, extra))
    jtu.check_grads(jax.jit(lambda s: fn(s, t, *extra)), (s,), order=1, modes=('fwd', 'rev'))


@pytest.mark.parametrize('name', NAMES)
def test_teacher_gets_zero_gradient(name):
  case, fn, _, _ = CASES[name]
  s, t, extra = case()
  g_t = jax.jit(jax.grad(lambda t: fn(s, t, *extra)))(t)
  for leaf in jax.tree.leaves(g_t):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  g_s = jax.jit(jax.grad(lambda s: fn(s, t, *extra)))(s)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g_s))
  assert max(np.abs(leaf).max() for leaf in jax.tree.leaves(g_s)) > 0
  # Forward mode too: a teacher tangent changes nothing.
  _, tangent = jax.jit(lambda t, dt: jax.jvp(lambda t: fn(s, t, *extra), (t,), (dt,)))(
      t, jax.tree.map(np.ones_like, t))
  assert tangent == 0


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_inputs(name):
  case, fn, _, _ = CASES[name]
  s, t, extra = case()
  bf = lambda x: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), x)  # noqa: E731
  low = _jit(fn)(bf(s), bf(t), *extra)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, _jit(fn)(s, t, *extra), rtol=5e-2, atol=1e-3)
  # Mixed: a float32 student and a bfloat16 teacher.
  assert jax.eval_shape(fn, s, bf(t), *extra).dtype == jnp.float32


# ----------------------------------------------------------------------------
# vmap over a leading axis (e.g. several batches, or candidate teachers).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', NAMES)
def test_vmap_over_leading_axis(name):
  case, fn, _, _ = CASES[name]
  s0, t0, extra = case()
  # Three stacked variants of the case: scaled students, shifted teachers.
  scales = (1.0, 0.5, 2.0)
  s = jax.tree.map(lambda a: np.stack([k * a for k in scales]), s0)
  t = jax.tree.map(lambda a: np.stack([a + k for k in scales]), t0)
  extra_b = jax.tree.map(lambda a: np.stack([a] * 3), extra)
  out = jax.jit(jax.vmap(fn))(s, t, *extra_b)
  loop = [_jit(fn)(jax.tree.map(lambda a: a[i], s), jax.tree.map(lambda a: a[i], t), *extra)
          for i in range(3)]
  assert out.shape == (3,)
  np.testing.assert_allclose(out, loop, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# Errors: one line, naming the argument and the shapes.
# ----------------------------------------------------------------------------

_A = np.ones((2, 4, 4, 3), np.float32)
_E = np.ones((4, 5), np.float32)
_Y = np.zeros((4,), np.int32)

ERRORS = [
    (lambda: losses.sp_loss([_A, _A], [_A]),
     r'sp_loss: student_feats has 2 feature maps but teacher_feats has 1'),
    (lambda: losses.sp_loss([], []), r'sp_loss needs at least 1 pair'),
    (lambda: losses.sp_loss([_A], [np.ones((3, 4, 4, 3))]),
     r'sp_loss feature map 0: student batch size 2 does not match teacher batch size 3 '
     r'\(shapes \(2, 4, 4, 3\) and \(3, 4, 4, 3\)\)'),
    (lambda: losses.nst_loss([_A[0]], [_A[0]]),
     r'nst_loss feature map 0: maps must be NHWC with 4 dimensions, got student \(4, 4, 3\)'),
    (lambda: losses.nst_loss([np.ones((2, 8, 8, 3))], [np.ones((2, 4, 2, 3))]),
     r'nst_loss feature map 0: student \(2, 8, 8, 3\) and teacher \(2, 4, 2, 3\) are '
     r'\(4, 4\) and \(4, 2\) after pooling'),
    (lambda: losses.fsp_loss([_A, np.ones((2, 4, 4, 5))], [_A, _A]),
     r'fsp_loss feature map 1: student has 5 channels but teacher has 3 '
     r'\(shapes \(2, 4, 4, 5\) and \(2, 4, 4, 3\)\)'),
    (lambda: losses.fsp_loss([_A], [_A]), r'fsp_loss needs at least 2 pair'),
    (lambda: losses.fsp_loss([np.ones((2, 8, 8, 3)), np.ones((2, 4, 2, 3))],
                             [np.ones((2, 8, 8, 3)), np.ones((2, 4, 2, 3))]),
     r'fsp_loss: student maps 0 \(2, 8, 8, 3\) and 1 \(2, 4, 2, 3\) are \(4, 4\) and \(4, 2\)'),
    (lambda: losses.fitnet_loss(_A, _A[..., :2]),
     r'fitnet_loss: student_regressed shape \(2, 4, 4, 3\) does not match teacher_feat '
     r'shape \(2, 4, 4, 2\)'),
    (lambda: losses.rkd_loss(_E, _E[:3]),
     r'rkd_loss: student_emb batch size 4 does not match teacher_emb batch size 3'),
    (lambda: losses.rkd_loss(_E[:1], _E[:1]),
     r'rkd_loss needs at least 2 examples, got student_emb \(1, 5\)'),
    (lambda: losses.rkd_loss(_E[0], _E[0]), r'rkd_loss: embeddings need a batch axis'),
    (lambda: losses.pkt_loss(_A, _A),
     r'pkt_loss: embeddings must be 2-D \(N, D\), got student_emb \(2, 4, 4, 3\)'),
    (lambda: losses.pkt_loss(_E, _E[:2]),
     r'pkt_loss: student_emb batch size 4 does not match teacher_emb batch size 2'),
    (lambda: losses.cc_loss(_E, _E[:, :3]),
     r'cc_loss: student_emb shape \(4, 5\) does not match teacher_emb shape \(4, 3\)'),
    (lambda: losses.cc_loss(_E[:1], _E[:1]), r'cc_loss needs at least 2 examples'),
    (lambda: losses.dkd_loss(_E, _E[:, :3], _Y),
     r'student_logits shape \(4, 5\) does not match teacher_logits shape \(4, 3\)'),
    (lambda: losses.dkd_loss(_E, _E, _Y[:3]),
     r'labels shape \(3,\) does not match logits shape \(4, 5\)'),
    (lambda: losses.dkd_loss(_E[:, :1], _E[:, :1], _Y),
     r'dkd_loss needs at least 2 classes, got student_logits \(4, 1\)'),
    (lambda: losses.dist_loss(_E, _E[:3]),
     r'student_logits shape \(4, 5\) does not match teacher_logits shape \(3, 5\)'),
    (lambda: losses.dist_loss(_E[0], _E[0]),
     r'dist_loss: logits must be 2-D \(N, K\), got student_logits \(5,\)'),
]


@pytest.mark.parametrize('index', range(len(ERRORS)))
def test_errors_are_one_line(index):
  call, message = ERRORS[index]
  with pytest.raises(ValueError, match=message) as info:
    call()
  assert '\n' not in str(info.value)


def test_type_errors():
  with pytest.raises(TypeError, match='student_feats must be a sequence'):
    losses.nst_loss(_A, [_A])
  with pytest.raises(TypeError, match='teacher_feats must be a sequence'):
    losses.sp_loss([_A], _A)
  with pytest.raises(TypeError, match='integer'):
    losses.dkd_loss(_E, _E, _Y.astype(np.float32))


def test_public_names():
  names = ('sp_loss', 'rkd_loss', 'pkt_loss', 'nst_loss', 'cc_loss', 'fsp_loss', 'dkd_loss',
           'dist_loss', 'fitnet_loss')
  for name in names:
    assert name in losses.__all__ and hasattr(losses, name), name
    assert f':func:`{name}`' in losses.__doc__, name
  assert list(losses.__all__) == sorted(losses.__all__)


def test_signatures():
  # Other code calls these by keyword; the defaults are the releases'.
  import inspect  # pylint: disable=g-import-not-at-top
  expected = {
      'sp_loss': ('student_feats', 'teacher_feats'),
      'nst_loss': ('student_feats', 'teacher_feats'),
      'fsp_loss': ('student_feats', 'teacher_feats'),
      'fitnet_loss': ('student_regressed', 'teacher_feat'),
      'rkd_loss': ('student_emb', 'teacher_emb', ('distance_weight', 25.0),
                   ('angle_weight', 50.0)),
      'pkt_loss': ('student_emb', 'teacher_emb', ('eps', 1e-7)),
      'cc_loss': ('student_emb', 'teacher_emb'),
      'dkd_loss': ('student_logits', 'teacher_logits', 'labels', ('alpha', 1.0), ('beta', 8.0),
                   ('temperature', 4.0)),
      'dist_loss': ('student_logits', 'teacher_logits', ('beta', 1.0), ('gamma', 1.0),
                    ('temperature', 1.0)),
  }
  for name, params in expected.items():
    got = []
    for p in inspect.signature(getattr(losses, name)).parameters.values():
      if p.kind is p.KEYWORD_ONLY:
        got.append((p.name, p.default))
      else:
        assert p.default is p.empty, (name, p.name)
        got.append(p.name)
    assert tuple(got) == params, name
