"""Tests of growing a student into a teacher (distill_jax.grow).

Tiny DARTS networks (5 cells, C = 4, 8x8x1 inputs): reductions at cells 1 and 3, so
cells 2 and 4 read a FactorizedReduce (their channels move in aligned halves) and cell
4 feeds the classifier. Batch-norm scales, biases and statistics are randomised so that
inference-mode networks are far from the identity-BN regime.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill_jax import fisher as fisher_lib
from distill_jax import grow as G
from distill_jax import losses
from distill_jax.genotypes import Genotype
from distill_jax.models import (count_params, create_model, darts_layout, darts_ops, init_variables,
                                model_class, names, param_shapes)
from distill_jax.models.darts import count_params_without_aux

CFG = dict(name='darts', genotype='DARTS_V1', layers=5, init_channels=4, num_classes=10)
SHAPE = (1, 8, 8, 1)
TOL = G.TOLERANCE


def _randomise_bn(variables: dict, seed: int = 3) -> dict:
  keys = iter(jax.random.split(jax.random.key(seed), 4096))

  def leaf(path, x):
    r = jax.random.normal(next(keys), x.shape)
    return {'scale': 1 + 0.3 * r, 'bias': 0.5 * r, 'mean': 0.1 * r,
            'var': 1 + 0.3 * jnp.abs(r)}.get(path[-1].key, x)

  return {c: jax.tree_util.tree_map_with_path(leaf, variables[c])
          for c in ('params', 'batch_stats')}


def _lax(monkeypatch, **overrides):
  """Overrides selecting the lax convolutions (the same function, faster compiles): the
  model's ``impl`` field where it has one, else the module default of darts_ops."""
  if 'impl' in model_class('darts').__dataclass_fields__:
    return {**overrides, 'impl': 'lax'}
  if hasattr(darts_ops, 'DEFAULT_IMPL'):
    monkeypatch.setattr(darts_ops, 'DEFAULT_IMPL', 'lax')
  return overrides


def _student(**overrides):
  cfg = {**CFG, **overrides}
  variables = init_variables(create_model(**cfg), jax.random.key(0), SHAPE)
  return cfg, _randomise_bn(variables)


@pytest.fixture(scope='module')
def student():
  return _student()


@pytest.fixture(scope='module')
def images():
  return jax.random.normal(jax.random.key(5), (4, 8, 8, 1))


_FORWARD = {}


def _logits(cfg, variables, x):
  model = create_model(**cfg)
  if model not in _FORWARD:
    _FORWARD[model] = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  return np.asarray(_FORWARD[model](variables, x))


def _favouring(cell, calls=None):
  """A fake Fisher estimate: every channel of ``cell`` 10, all others 1."""
  def fisher(config, variables):
    if calls is not None:
      calls.append((config, variables))
    chans = create_model(**config).resolved_cell_channels()
    return {names.cell_output(i): np.full(4 * c, 10.0 if i == cell else 1.0)
            for i, c in enumerate(chans)}
  return fisher


def _n(variables):
  return count_params_without_aux(variables['params'])


def _np(tree, *path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


def _halves(c_old, c_new):
  """New positions of a FactorizedReduce-fed cell's channels (aligned halves)."""
  h = c_old // 2
  return np.concatenate([np.arange(h), c_new // 2 + np.arange(h)])


# ------------------------------------------------------------------------------ counting


@pytest.mark.parametrize('overrides', [
    {},
    dict(genotype='DARTS_V2', num_classes=7, auxiliary=True, cell_groups=(2, None, 4, 1, 2)),
])
def test_param_count_formula_matches_shapes(overrides):
  cfg = {**CFG, **overrides}
  shapes = param_shapes(create_model(**cfg), (1, 8, 8, 3))
  layout = G.Layout.from_config(cfg, 3)
  assert layout.count() == count_params_without_aux(shapes['params'])
  assert layout.count(include_aux=True) == count_params(shapes['params'])


# Every primitive with parameters in both cell types, a stride-2 skip_connect (a
# FactorizedReduce operation) in the reduction cell, grouped and depthwise cells.
_ALL_OPS = Genotype(
    normal=(('sep_conv_3x3', 0), ('sep_conv_5x5', 1), ('dil_conv_3x3', 0), ('dil_conv_5x5', 2),
            ('skip_connect', 0), ('max_pool_3x3', 3), ('avg_pool_3x3', 1), ('none', 4)),
    normal_concat=(2, 3, 4, 5),
    reduce=(('skip_connect', 0), ('sep_conv_5x5', 1), ('dil_conv_5x5', 0), ('sep_conv_3x3', 2),
            ('max_pool_3x3', 1), ('dil_conv_3x3', 3), ('avg_pool_3x3', 0), ('skip_connect', 4)),
    reduce_concat=(3, 4, 5))
_LAYOUT_CFGS = [
    dict(CFG, genotype=_ALL_OPS, auxiliary=True, num_classes=7),
    dict(CFG, genotype=_ALL_OPS, auxiliary=True, num_classes=7, cell_channels=(6, 8, 12, 16, 20),
         cell_groups=(2, None, 4, 1, 5)),  # [0] with other widths and groups only
    dict(CFG, genotype='DARTS_V2', layers=7, init_channels=6, stem_multiplier=2),
]


@pytest.fixture(scope='module')
def all_ops_student():
  cfg = _LAYOUT_CFGS[0]
  return cfg, init_variables(create_model(**cfg), jax.random.key(0), (1, 8, 8, 3))


def test_darts_layout_count_matches_real_variables(all_ops_student):
  # A renamed or reshaped layer of models/darts.py or models/darts_ops.py breaks this.
  cfg, variables = all_ops_student
  layout = darts_layout.DartsLayout.from_model(create_model(**cfg), 3)
  assert layout.count() == count_params_without_aux(variables['params'])
  assert layout.count(include_aux=True) == count_params(variables['params'])
  assert darts_layout.STEM_CONV in variables['params'] and names.AUX_HEAD in variables['params']
  for cfg in _LAYOUT_CFGS[1:]:
    shapes = param_shapes(create_model(**cfg), (1, 8, 8, 3))
    layout = darts_layout.DartsLayout.from_model(create_model(**cfg), 3)
    assert layout.count(include_aux=True) == count_params(shapes['params'])
    assert layout.count() == count_params_without_aux(shapes['params'])


def _space_size(layout, space):
  c = layout.chans[space.index] if space.kind != darts_layout.OUTPUT else None
  if space.kind == darts_layout.CELL:
    return c
  if space.kind == darts_layout.HALF:
    return c // 2 if space.half == 0 else c - c // 2
  return layout.out_channels(space.index)


def test_channel_axes_cover_real_variables(all_ops_student):
  # Every leaf of real trees has a rule, its axes have the sizes of their channel spaces,
  # the leaves without channel axes do not change with the widths, and every layer name
  # the rules match occurs in a real tree.
  from flax import traverse_util
  _, real = all_ops_student
  trees = {}
  for cfg in _LAYOUT_CFGS[:2]:
    model = create_model(**cfg)
    trees[darts_layout.DartsLayout.from_model(model, 3)] = param_shapes(model, (1, 8, 8, 3))
  (base, base_tree), (wide, wide_tree) = trees.items()
  assert jax.tree.map(np.shape, param_shapes(create_model(**_LAYOUT_CFGS[0]), (1, 8, 8, 3))) == \
      jax.tree.map(np.shape, real)
  seen = set()
  for layout, tree in trees.items():
    for collection in ('params', 'batch_stats'):
      flat = traverse_util.flatten_dict(tree[collection])
      other = traverse_util.flatten_dict((base_tree if layout is wide else wide_tree)[collection])
      assert set(flat) == set(other)
      for path, leaf in flat.items():
        seen.update(path[:-1])
        rule = darts_layout.channel_axes(path, layout)
        assert rule is not None, path
        shape = leaf.shape
        if rule.grouped:
          i = rule.writes.index
          groups = layout.chans[i] if layout.groups[i] is None else layout.groups[i]
          assert shape[rule.out_axis] == layout.chans[i], path
          assert shape[rule.in_axis] * groups == _space_size(layout, rule.reads), path
          continue
        if rule.reads is not None:
          assert shape[rule.in_axis] == _space_size(layout, rule.reads), path
        if rule.writes is not None:
          assert shape[rule.out_axis] == _space_size(layout, rule.writes), path
        if rule == darts_layout.FIXED:
          assert shape == other[path].shape, path
  assert darts_layout.rule_layer_names() <= seen
  assert {names.cell_name(i) for i in range(5)} <= seen
  assert {darts_layout.op_name(e) for e in (0, 1, 2, 3, 5)} <= seen  # the ops with parameters
  assert darts_layout.channel_axes(('cell9', 'op0', 'pw1', 'kernel'), base) is None
  assert darts_layout.channel_axes(('cell0', 'op0', 'pw9', 'kernel'), base) is None


# ------------------------------------------------------------------------- the strategies


def test_uniform_and_fisher_land_on_target(student):
  cfg, variables = student
  n0 = _n(variables)
  cfg_u, v_u, hist_u = G.grow_with_history(cfg, variables, strategy='uniform', rng=1,
                                           input_shape=SHAPE)
  calls = []
  cfg_f, v_f, hist_f = G.grow_with_history(cfg, variables, strategy='fisher',
                                           fisher=_favouring(4, calls), rng=1,
                                           input_shape=SHAPE)
  for c, v, h in ((cfg_u, v_u, hist_u), (cfg_f, v_f, hist_f)):
    assert type(c) is dict and isinstance(c['cell_channels'], tuple)
    assert isinstance(c['cell_groups'], tuple)
    assert abs(_n(v) - 2 * n0) <= TOL * 2 * n0
    assert h[-1]['num_params'] == _n(v)
    assert all(new >= old for new, old in zip(c['cell_channels'], (4, 8, 8, 16, 16)))
    assert all(ch % 2 == 0 for ch in c['cell_channels'])
  # Uniform scales every cell; Fisher grew cell 4 (plus at most a fallback cell).
  assert all(ch > old for ch, old in zip(cfg_u['cell_channels'], (4, 8, 8, 16, 16)))
  assert cfg_f['cell_channels'] != cfg_u['cell_channels']
  assert cfg_f['cell_channels'][4] > cfg_u['cell_channels'][4]
  assert all(e['cell'] == 4 for e in hist_f if not e['fallback'])
  assert hist_f[0]['cell'] == 4 and hist_f[0]['score'] == 10.0
  assert [e['step'] for e in hist_f] == list(range(1, len(hist_f) + 1))
  # A callable is re-estimated on the grown network before every step.
  assert len(calls) in (len(hist_f), len(hist_f) + 1)  # + 1: the last estimate may stop
  assert calls[0][0]['cell_channels'] == (4, 8, 8, 16, 16)
  for (c, v), e in zip(calls[1:], hist_f):
    assert list(c['cell_channels']) == e['cell_channels']
    assert _n(v) == e['num_params']
  # Steps add 25% of the cell's width (rounded to even) until the last, shorter one.
  widths = [16] + [e['cell_channels'][4] for e in hist_f if e['cell'] == 4]
  assert widths[1] == 20 and widths[2] == 26


def test_paper_rule_first_step_and_release_rule(student):
  cfg, variables = student
  chans = (4, 8, 8, 16, 16)
  fisher = {names.cell_output(i): np.zeros(4 * c) for i, c in enumerate(chans)}
  fisher[names.cell_output(0)] = np.full(16, 0.5)  # the largest sum
  fisher[names.cell_output(4)] = np.zeros(64)
  fisher[names.cell_output(4)][37] = 2.0  # the largest single channel
  _, _, hist = G.grow_with_history(cfg, variables, strategy='fisher', fisher=fisher,
                                   input_shape=SHAPE)
  assert hist[0]['cell'] == 4 and hist[0]['score'] == 2.0
  assert all(e['cell'] == 4 for e in hist if not e['fallback'])  # a dict is not re-estimated
  # The release's denser operator scores a cell by the sum over its channels.
  cfg_d, v_d, hist_d = G.grow_with_history(cfg, variables, strategy='fisher', fisher=fisher,
                                           operator='denser', input_shape=SHAPE)
  assert hist_d[0]['cell'] == 0 and hist_d[0]['score'] == pytest.approx(8.0)
  assert hist_d[0]['cell_groups'][0] == 2
  assert cfg_d['cell_channels'] == chans


def test_fisher_dict_from_channel_fisher(monkeypatch):
  cfg, variables = _student(**_lax(monkeypatch, layers=3))
  model = create_model(**cfg)
  k1, k2 = jax.random.split(jax.random.key(7))
  x, y = jax.random.normal(k1, (6, 8, 8, 1)), jax.random.randint(k2, (6,), 0, 10)
  delta = fisher_lib.channel_fisher(model, variables, x, y)
  best = int(np.argmax([float(np.max(delta[names.cell_output(i)])) for i in range(3)]))
  cfg_f, v_f, hist = G.grow_with_history(cfg, variables, strategy='fisher', fisher=delta,
                                         input_shape=SHAPE)
  assert hist[0]['cell'] == best
  assert abs(_n(v_f) - 2 * _n(variables)) <= TOL * 2 * _n(variables)


# ------------------------------------------------------------------------ weight transfer


def test_student_weights_sit_in_original_slices(student):
  cfg, old = student
  cfg_u, new = G.grow(cfg, old, strategy='uniform', rng=1, input_shape=SHAPE)
  c = cfg_u['cell_channels']
  p_old, p_new = old['params'], new['params']
  s_old, s_new = old['batch_stats'], new['batch_stats']

  # A separable conv's pointwise kernels and BN (cell 0: prefix layout).
  for name in ('pw1', 'pw2'):
    k_new = _np(p_new, 'cell0', 'op0', name, 'kernel')
    np.testing.assert_array_equal(k_new[:, :, :4, :4], _np(p_old, 'cell0', 'op0', name, 'kernel'))
  np.testing.assert_array_equal(_np(p_new, 'cell0', 'op0', 'dw1', 'kernel')[..., :4],
                                _np(p_old, 'cell0', 'op0', 'dw1', 'kernel'))
  for stat in ('mean', 'var'):
    new_stat = _np(s_new, 'cell0', 'op0', 'bn1', stat)
    np.testing.assert_array_equal(new_stat[:4], _np(s_old, 'cell0', 'op0', 'bn1', stat))
    np.testing.assert_array_equal(new_stat[4:], 0.0 if stat == 'mean' else 1.0)  # fresh

  # Cell 4 reads a FactorizedReduce: its channels sit in aligned halves.
  pos4 = _halves(16, c[4])
  for stat in ('mean', 'var'):
    np.testing.assert_array_equal(_np(s_new, 'cell4', 'preprocess1', 'bn', stat)[pos4],
                                  _np(s_old, 'cell4', 'preprocess1', 'bn', stat))
  np.testing.assert_array_equal(_np(p_new, 'cell4', 'op1', 'bn2', 'scale')[pos4],
                                _np(p_old, 'cell4', 'op1', 'bn2', 'scale'))

  # preprocess1 of cell 4 reads cell 3's concat output [node2 | node3 | node4 | node5].
  rows3 = np.concatenate([k * c[3] + np.arange(16) for k in range(4)])
  k_new = _np(p_new, 'cell4', 'preprocess1', 'conv', 'kernel')
  np.testing.assert_array_equal(k_new[0, 0][np.ix_(rows3, pos4)],
                                _np(p_old, 'cell4', 'preprocess1', 'conv', 'kernel')[0, 0])

  # FactorizedReduce preprocess0 of cell 4 reads cell 2's output (halves layout too);
  # conv1 fills the first half of cell 4's channels, conv2 the second.
  rows2 = np.concatenate([k * c[2] + _halves(8, c[2]) for k in range(4)])
  for conv in ('conv1', 'conv2'):
    k_new = _np(p_new, 'cell4', 'preprocess0', conv, 'kernel')
    assert k_new.shape == (1, 1, 4 * c[2], c[4] // 2)
    np.testing.assert_array_equal(k_new[0, 0][rows2, :8],
                                  _np(p_old, 'cell4', 'preprocess0', conv, 'kernel')[0, 0])

  # Classifier rows at the concat positions of the last cell.
  rows4 = np.concatenate([k * c[4] + pos4 for k in range(4)])
  k_new = _np(p_new, 'classifier', 'kernel')
  np.testing.assert_array_equal(k_new[rows4], _np(p_old, 'classifier', 'kernel'))
  fresh_rows = np.setdiff1d(np.arange(4 * c[4]), rows4)
  assert np.all(np.abs(k_new[fresh_rows]).sum(axis=1) > 0)
  np.testing.assert_array_equal(_np(p_new, 'classifier', 'bias'), _np(p_old, 'classifier', 'bias'))
  np.testing.assert_array_equal(_np(p_new, 'stem_conv', 'kernel'),
                                _np(p_old, 'stem_conv', 'kernel'))


def test_function_preserving_widening_keeps_logits(student, images):
  cfg, variables = student
  reference = _logits(cfg, variables, images)
  for kw in (dict(strategy='uniform'), dict(strategy='fisher', fisher=_favouring(2))):
    cfg_g, grown = G.grow(cfg, variables, function_preserving=True, rng=4, input_shape=SHAPE,
                          **kw)
    assert abs(_n(grown) - 2 * _n(variables)) <= TOL * 2 * _n(variables)
    np.testing.assert_allclose(_logits(cfg_g, grown, images), reference, atol=1e-4, rtol=0)
    cfg_r, fresh = G.grow(cfg, variables, function_preserving=False, rng=4, input_shape=SHAPE,
                          **kw)
    assert cfg_r == cfg_g
    assert np.max(np.abs(_logits(cfg_r, fresh, images) - reference)) > 1e-3


def test_function_preserving_grouped_and_denser():
  cfg, variables = _student(genotype='DARTS_V2', cell_groups=(2, None, None, None, 4))
  x = jax.random.normal(jax.random.key(6), (3, 8, 8, 1))
  reference = _logits(cfg, variables, x)
  cfg_u, grown = G.grow(cfg, variables, strategy='uniform', function_preserving=True, rng=2,
                        input_shape=SHAPE)
  assert cfg_u['cell_groups'] == (2, None, None, None, 4)
  assert all(c % g == 0 for c, g in zip(cfg_u["cell_channels"], (2, 2, 2, 2, 4)))
  np.testing.assert_allclose(_logits(cfg_u, grown, x), reference, atol=1e-4, rtol=0)
  with pytest.warns(UserWarning, match='denser growth stopped'):  # coarse last step
    cfg_d, dense = G.grow(cfg, variables, strategy='uniform', operator='denser',
                          function_preserving=True, input_shape=SHAPE)
  assert cfg_d['cell_groups'] != cfg['cell_groups']
  np.testing.assert_allclose(_logits(cfg_d, dense, x), reference, atol=1e-4, rtol=0)


@pytest.mark.optimized
def test_deterministic_for_a_seed(student):
  cfg, variables = student

  def leaves(v):
    return [np.asarray(x) for x in jax.tree.leaves(v)]

  _, a = G.grow(cfg, variables, strategy='uniform', rng=jax.random.key(1), input_shape=SHAPE)
  _, b = G.grow(cfg, variables, strategy='uniform', rng=jax.random.key(1), input_shape=SHAPE)
  c_cfg, c = G.grow(cfg, variables, strategy='uniform', rng=jax.random.key(2),
                    input_shape=SHAPE)
  assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
  k_a, k_c = _np(a['params'], 'classifier', 'kernel'), _np(c['params'], 'classifier', 'kernel')
  pos = np.concatenate([k * c_cfg['cell_channels'][4] + _halves(16, c_cfg['cell_channels'][4])
                        for k in range(4)])
  np.testing.assert_array_equal(k_a[pos], k_c[pos])  # the student's rows
  new = np.setdiff1d(np.arange(k_a.shape[0]), pos)
  assert not np.allclose(k_a[new], k_c[new])  # fresh rows depend on the seed
  # Function-preserving replication: the mapping depends on the seed only.
  fp = dict(strategy='fisher', fisher=_favouring(4), function_preserving=True, input_shape=SHAPE)
  _, d = G.grow(cfg, variables, rng=3, **fp)
  _, e = G.grow(cfg, variables, rng=3, **fp)
  _, f = G.grow(cfg, variables, rng=4, **fp)
  assert all(np.array_equal(x, y) for x, y in zip(leaves(d), leaves(e)))
  assert not all(np.array_equal(x, y) for x, y in zip(leaves(d), leaves(f)))


# ------------------------------------------------------------------ depth and denser


@pytest.mark.optimized
def test_depth_strategy(student):
  cfg, variables = student
  n0 = _n(variables)
  cfg_d, grown, hist = G.grow_with_history(cfg, variables, strategy='depth', rng=1,
                                           input_shape=SHAPE)
  layers = cfg_d['layers']
  assert layers > 5 and hist[0]['layers'] == layers and hist[0]['num_params'] == _n(grown)
  assert cfg_d['cell_channels'] is None and create_model(**cfg_d).layers == layers

  def count(n_layers):
    shapes = param_shapes(create_model(**{**cfg, 'layers': n_layers}), SHAPE)
    return count_params_without_aux(shapes['params'])

  assert count(layers) == _n(grown)
  for other in (layers - 1, layers + 1):
    assert abs(count(other) - 2 * n0) >= abs(_n(grown) - 2 * n0)
  # The paper's 25-layer teacher: config only, counted from shapes.
  cfg_25 = G.grown_depth_config(cfg, variables, layers=25)
  assert cfg_25['layers'] == 25 and cfg_25['genotype'] == 'DARTS_V1'
  assert count_params(param_shapes(create_model(**cfg_25), SHAPE)['params']) > 2 * n0
  with pytest.raises(ValueError, match='function_preserving'):
    G.grow(cfg, variables, strategy='depth', function_preserving=True, input_shape=SHAPE)


def test_denser_halves_groups_cell_by_cell(student):
  cfg, variables = student
  cfg_d, grown, hist = G.grow_with_history(cfg, variables, strategy='uniform',
                                           operator='denser', rng=1, input_shape=SHAPE)
  # DARTS_V1's reduction cells (1, 3) have no separable/dilated convs: skipped.
  assert [e['cell'] for e in hist[:4]] == [0, 2, 4, 0]
  assert hist[0]['cell_groups'] == [2, None, None, None, None]
  assert hist[1]['cell_groups'] == [2, None, 4, None, None]
  assert hist[3]['cell_groups'][0] == 1
  counts = [_n(variables)] + [e['num_params'] for e in hist]
  assert all(b > a for a, b in zip(counts, counts[1:]))
  assert cfg_d['cell_channels'] == (4, 8, 8, 16, 16)
  assert list(cfg_d['cell_groups']) == hist[-1]['cell_groups']
  assert hist[-1]['num_params'] == _n(grown)
  # Densified kernels are re-initialised; the rest is the student's.
  g0 = cfg_d['cell_groups'][0]
  assert _np(grown['params'], 'cell0', 'op0', 'dw1', 'kernel').shape == (3, 3, 4 // g0, 4)
  np.testing.assert_array_equal(_np(grown['params'], 'cell0', 'op0', 'pw1', 'kernel'),
                                _np(variables['params'], 'cell0', 'op0', 'pw1', 'kernel'))
  # Stops once the target is reached (or the last step would end farther from it).
  assert abs(hist[-1]['num_params'] - 2 * _n(variables)) <= abs(counts[-2] - 2 * _n(variables))


# --------------------------------------------------------------------- training step


def _sgd_step(cfg, variables, x):
  model = create_model(**cfg)
  y = jnp.arange(x.shape[0]) % model.num_classes

  def loss(params):
    (logits, _), state = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                     x, train=True, mutable=['batch_stats'])
    return losses.cross_entropy(logits, y), state

  (value, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  new = jax.tree.map(lambda p, g: p - 0.1 * g, variables['params'], grads)
  assert np.isfinite(float(value))
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(new))
  assert jax.tree.structure(grads) == jax.tree.structure(variables['params'])


@pytest.mark.parametrize('kw', [
    dict(strategy='uniform'),
    dict(strategy='fisher', fisher=_favouring(0)),
    dict(strategy='depth'),
    dict(strategy='uniform', operator='denser', target_param_ratio=1.4),
], ids=['uniform', 'fisher', 'depth', 'denser'])
def test_grown_network_trains(kw, monkeypatch):
  # 3 cells and lax convolutions (the same function) keep the gradient compiles short.
  cfg, variables = _student(**_lax(monkeypatch, layers=3))
  cfg_g, grown = G.grow(cfg, variables, rng=1, input_shape=SHAPE, **kw)
  assert _n(grown) > _n(variables)
  x = jax.random.normal(jax.random.key(8), (2, 8, 8, 1))
  logits, _ = create_model(**cfg_g).apply(grown, x, train=False)
  assert logits.shape == (2, 10)
  _sgd_step(cfg_g, grown, x)


# ------------------------------------------------------------------- history and errors


def test_history_json_round_trip(student, tmp_path):
  cfg, variables = student
  # A ConfigDict (as in the pipeline's configs) is accepted; a plain dict comes back.
  cfg_g, _, hist = G.grow_with_history(ml_collections.ConfigDict(cfg), variables,
                                       strategy='fisher', fisher=_favouring(4),
                                       input_shape=SHAPE)
  assert type(cfg_g) is dict and cfg_g['name'] == 'darts'
  path = tmp_path / 'sub' / 'growth.json'
  G.save_history(path, hist)
  loaded = G.load_history(path)
  assert loaded == json.loads(json.dumps(hist))
  assert [e['cell'] for e in loaded] == [e['cell'] for e in hist]
  assert {'step', 'cell', 'score', 'num_params'} <= set(loaded[0])
  assert json.loads(path.read_text())[0]['step'] == 1


def test_wrn_uniform_widen_factor():
  cfg = dict(name='wrn', depth=10, widen_factor=1, num_classes=10)
  variables = init_variables(create_model(**cfg), jax.random.key(0), SHAPE)
  with pytest.warns(UserWarning, match='widen_factor'):
    cfg_g, grown, hist = G.grow_with_history(cfg, variables, strategy='uniform', rng=1,
                                             input_shape=SHAPE)
  assert cfg_g['widen_factor'] == 2 and hist[0]['widen_factor'] == 2
  old, new = variables['params'], grown['params']
  np.testing.assert_array_equal(_np(new, 'stem', 'kernel'), _np(old, 'stem', 'kernel'))
  k_old = _np(old, 'group1_block0', 'conv0', 'kernel')
  np.testing.assert_array_equal(_np(new, 'group1_block0', 'conv0', 'kernel')[:, :, :16, :32], k_old)
  np.testing.assert_array_equal(_np(new, 'classifier', 'kernel')[:64],
                                _np(old, 'classifier', 'kernel'))
  np.testing.assert_array_equal(_np(grown['batch_stats'], 'final_bn', 'var')[:64],
                                _np(variables['batch_stats'], 'final_bn', 'var'))
  x = jax.random.normal(jax.random.key(8), (2, 8, 8, 1))
  _sgd_step(cfg_g, grown, x)
  with pytest.raises(ValueError, match='wrn supports only strategy uniform'):
    G.grow(cfg, variables, strategy='fisher', fisher={}, input_shape=SHAPE)
  with pytest.raises(ValueError, match='wrn supports only'):
    G.grow(cfg, variables, strategy='uniform', function_preserving=True, input_shape=SHAPE)


def test_errors(student):
  cfg, variables = student
  with pytest.raises(ValueError, match="growing model 'densenet_bc' is not supported"):
    G.grow(dict(name='densenet_bc', depth=10, growth_rate=4), variables, strategy='uniform')
  with pytest.raises(ValueError, match='strategy=.*allowed: uniform, fisher, depth'):
    G.grow(cfg, variables, strategy='random', input_shape=SHAPE)
  with pytest.raises(ValueError, match='operator=.*allowed: widen, denser'):
    G.grow(cfg, variables, strategy='uniform', operator='deeper', input_shape=SHAPE)
  with pytest.raises(ValueError, match='needs fisher='):
    G.grow(cfg, variables, strategy='fisher', input_shape=SHAPE)
  with pytest.raises(ValueError, match='must be > 1'):
    G.grow(cfg, variables, strategy='uniform', target_param_ratio=0.5, input_shape=SHAPE)
  with pytest.raises(ValueError, match='model_config describes'):
    G.grow({**cfg, 'init_channels': 6}, variables, strategy='uniform', input_shape=SHAPE)
  with pytest.raises(ValueError, match='lacks .cell1/output'):
    G.grow(cfg, variables, strategy='fisher', fisher={names.cell_output(0): np.ones(16)},
           input_shape=SHAPE)
  # Coarse widths (groups 8 and 16 need multiples of 8 and 16) cannot land within ±3%.
  cfg_g, v_g = _student(genotype='DARTS_V2', cell_groups=(None, None, 8, None, 16))
  with pytest.raises(ValueError, match='cannot land within'):
    G.grow(cfg_g, v_g, strategy='uniform', input_shape=SHAPE)
