"""DARTS search: supernet steps, genotype derivation, second-order gradients, resume, config.

References: Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search" (ICLR 2019,
arXiv:1806.09055), sections 2.3-2.4, and the authors' release (quark0/darts,
``cnn/architect.py``, ``cnn/train_search.py``). Tiny supernets only (on CPU the compile
time dominates): 3 cells with C=4 through ``run_search``; a single normal cell
(``layers=1, reductions=()``) where only the step's arithmetic matters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import load_config
from distill_jax import config_lib
from distill_jax import data as data_lib
from distill_jax import genotypes as G
from distill_jax import jobs
from distill_jax import models
from distill_jax import validation
from distill_jax.models.supernet import EDGES, SuperNetwork, edge_index
from distill_jax.options import JobOptions
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import search
from distill_jax.trainers import search_plots
from distill_jax.trainers import search_step


# The supernet's steps: XLA's optimisations save little compile time here but make every
# step ~15x slower, so this module keeps them (conftest.py).
pytestmark = pytest.mark.optimized


def tiny_search_config(**overrides):
  """configs/darts_search.py:demo shrunk: 3 cells, C=4, lax ops, one epoch of 44 steps."""
  c = load_config('darts_search', 'demo')
  c.model.layers = 3
  c.model.init_channels = 4
  c.model.impl = 'lax'     # compiles ~3x faster than the shifted-slice ops at this size
  c.data.crop_padding = 1
  c.num_epochs = 1
  c.batch_size = 16        # 719 // 16 = 44 steps: enough for the running BN statistics
  c.eval_batch_size = 360
  c.log_every_steps = 20
  c.checkpoint_every_steps = 20
  c.num_devices = 1
  return config_lib.set_fields(c, overrides)


def restore(workdir: str) -> dict:
  with ocp.CheckpointManager(ckpt_lib.checkpoint_dir(workdir)) as manager:
    return manager.restore(manager.latest_step())


SEARCH_READS: set[str] = set()  # the fixture's config reads


@pytest.fixture(scope='module')
def searched(tmp_path_factory):
  """One uninterrupted first-order search shared by several tests.

  The config's reads are recorded (outside its validation, which reads every field)
  for :func:`test_search_reads_every_config_field`.
  """
  workdir = str(tmp_path_factory.mktemp('search'))
  config = tiny_search_config()
  config.lock()
  config, reads = config_lib.trace_reads(config)
  with pytest.MonkeyPatch.context() as patch:
    validate = search.validate

    def unrecorded_validate(c):
      with config_lib.unrecorded_reads():
        validate(c)

    patch.setattr(search, 'validate', unrecorded_validate)
    results = jobs.run(config, workdir)  # config.job -> search.run -> search.run_search
  SEARCH_READS.update(reads)
  return config, workdir, results


# ---------------------------------------------------------------------------- end to end


def test_search_reads_every_config_field(searched):
  """No field of configs/darts_search.py is accepted and ignored (see
  tests/test_config_reads.py for the other jobs). This first-order search leaves unread
  only what the second order alone uses."""
  config, _, _ = searched
  second_order_only = {'hessian', 'arch.fd_epsilon', 'arch.reuse_train_grad'}
  unread = config_lib.leaf_paths(config) - SEARCH_READS
  assert unread <= second_order_only, sorted(unread - second_order_only)


def test_search_workdir_refuses_another_config_and_skips_a_finished_search(searched, monkeypatch):
  config, workdir, results = searched
  monkeypatch.setattr(search, '_prepare', lambda c: pytest.fail('compiled a search'))
  again = search.run_search(tiny_search_config(), workdir)
  assert again['wall_time_s'] == results['wall_time_s']  # finished: nothing to do
  with pytest.raises(validation.ConfigError, match='arch.learning_rate'):
    search.run_search(tiny_search_config(**{'arch.learning_rate': 0.1}), workdir)
  with pytest.raises(validation.ConfigError, match='arch.learning_rate'):
    search.evaluate(tiny_search_config(**{'arch.learning_rate': 0.1}), workdir)


def test_search_changes_alphas_and_writes_a_buildable_genotype(searched):
  config, workdir, results = searched
  final = restore(workdir)
  assert int(final['step']) == 44
  start = search_step.initial_alphas(config.seed)
  for kind in ('normal', 'reduce'):
    assert final['alphas'][kind].shape == (14, 8)
    assert np.abs(final['alphas'][kind] - start[kind]).max() > 1e-3
  assert final['arch_opt_state']  # Adam's state is checkpointed with the alphas

  loaded = G.load_genotype(os.path.join(workdir, 'genotype.json'))
  assert loaded == search_step.derive_genotype(final['alphas'])
  assert G.genotype_to_json(loaded) == results['genotype']
  for cell in (loaded.normal, loaded.reduce):
    assert len(cell) == 8 and all(op != 'none' for op, _ in cell)
    for e, (_, inp) in enumerate(cell):
      assert 0 <= inp < 2 + e // 2
    for node in range(4):  # two distinct inputs per node
      assert cell[2 * node][1] != cell[2 * node + 1][1]
  assert loaded.normal_concat == loaded.reduce_concat == (2, 3, 4, 5)
  model = models.create_model('darts', genotype=loaded, layers=5, init_channels=4, num_classes=10)
  shapes = models.param_shapes(model, (1, 8, 8, 1))
  assert models.count_params(shapes['params']) > 0

  assert results['order'] == 1 and results['hessian'] is None
  assert 0.0 <= results['val_top1_error'] < 0.8  # chance is 0.9
  on_disk = json.load(open(os.path.join(workdir, 'results.json')))
  assert on_disk['genotype'] == results['genotype']
  assert on_disk['val_top1_error'] == results['val_top1_error']
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_rows = [r for r in rows if 'train_loss' in r]
  assert {'search_val_loss', 'search_val_top1_error', 'train_top1_error', 'grad_norm',
          'arch_grad_norm', 'learning_rate', 'param_norm'} <= set(train_rows[0])
  assert train_rows[-1]['train_loss'] < train_rows[0]['train_loss']
  assert any('val_top1_error' in r for r in rows)
  history = [json.loads(line) for line in open(os.path.join(workdir, 'genotypes.jsonl'))]
  assert len(history) == 1 and history[0]['genotype'] == results['genotype']
  # The epoch's alphas (softmax) are kept for the alphas-over-epochs plot.
  np.testing.assert_allclose(history[0]['alphas_softmax']['normal'],
                             results['alphas_softmax']['normal'], atol=1e-5)
  for name in ('alphas.png', 'alphas_history.png', 'normal_cell.png', 'reduce_cell.png'):
    with open(os.path.join(workdir, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  (images,) = [f for f in os.listdir(workdir) if f.endswith('.images')]  # the pictures
  assert b'alphas_history' in open(os.path.join(workdir, images), 'rb').read()


class Interrupted(Exception):
  pass


def test_resumed_search_equals_uninterrupted(searched, tmp_path, monkeypatch):
  config, uninterrupted, results = searched
  workdir = str(tmp_path / 'resumed')
  real = search_step.compile_search_steps

  def stops_after_step_25(*args):
    setup, step, evaluate = real(*args)

    def guarded(state, train_batch, val_batch):
      if int(jax.device_get(state.step)) == 25:
        raise Interrupted()
      return step(state, train_batch, val_batch)

    return setup, guarded, evaluate

  monkeypatch.setattr(search, 'compile_search_steps', stops_after_step_25)
  with pytest.raises(Interrupted):
    search.run_search(config, workdir)
  assert ckpt_lib.latest_step(workdir) == 20
  monkeypatch.undo()

  resumed = search.run_search(config, workdir)
  assert resumed['resumed_from_step'] == 20
  a, b = restore(uninterrupted), restore(workdir)
  assert int(a['step']) == int(b['step']) == 44
  jax.tree.map(np.testing.assert_array_equal, a, b)  # weights, alphas, both optimisers, rng
  assert resumed['genotype'] == results['genotype']
  assert resumed['val_top1_error'] == results['val_top1_error']


# ---------------------------------------------------------------------------- job modes


def test_evaluate_mode_scores_the_latest_checkpoint(searched, capsys):
  config, workdir, results = searched
  evaluated = search.run(config, workdir, JobOptions(mode='evaluate'))
  assert evaluated['step'] == 44
  assert evaluated['genotype'] == results['genotype']
  assert evaluated['val_top1_error'] == results['val_top1_error']
  assert evaluated['val_loss'] == results['val_loss']
  assert json.dumps(results['genotype']) in capsys.readouterr().out


def test_report_mode_rewrites_the_genotype_and_pictures(searched, tmp_path):
  config, workdir, results = searched
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  pictures = ('alphas.png', 'alphas_history.png', 'normal_cell.png', 'reduce_cell.png')
  for name in ('genotype.json', *pictures):
    os.remove(os.path.join(copy, name))
  before = sorted(os.listdir(copy))
  reported = search.run(config, copy, JobOptions(mode='report'))
  assert reported == {'step': 44, 'genotype': results['genotype']}
  assert G.genotype_to_json(G.load_genotype(os.path.join(copy, 'genotype.json'))) == (
      results['genotype'])
  for name in pictures:
    with open(os.path.join(copy, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert sorted(os.listdir(copy)) == sorted(before + ['genotype.json', *pictures])


@pytest.mark.parametrize('mode', ['evaluate', 'report'])
def test_evaluate_and_report_need_a_checkpoint(mode, tmp_path):
  with pytest.raises(FileNotFoundError, match='no search checkpoint in .* run the search first'
                     ) as e:
    search.run(tiny_search_config(), str(tmp_path), JobOptions(mode=mode))
  assert '\n' not in str(e.value)
  assert not os.listdir(tmp_path)


def test_a_search_is_one_run(tmp_path):
  with pytest.raises(validation.ConfigError,
                     match=r'^--shard=1/2 is invalid for .*: a search is one run$'):
    search.run(tiny_search_config(), str(tmp_path / 'w'), JobOptions(shard=1, num_shards=2))
  assert not os.path.exists(tmp_path / 'w')


# ---------------------------------------------------------------------------- genotype


def test_derivation_keeps_two_strongest_non_none_edges_per_node():
  idx = {p: i for i, p in enumerate(G.PRIMITIVES)}
  alphas = {k: np.zeros((14, 8)) for k in ('normal', 'reduce')}
  a = alphas['normal']
  # Node 0: input 1 via sep_conv_3x3 beats input 0 via skip_connect; both are kept.
  a[edge_index(0, 0), idx['skip_connect']] = 2.0
  a[edge_index(0, 1), idx['sep_conv_3x3']] = 3.0
  # Node 1: 'none' dominates the edge from input 2, so after the softmax its best real op
  # is weak; the edges from inputs 0 and 1 win (input 1 first: larger weight).
  a[edge_index(1, 2), idx['none']] = 6.0
  a[edge_index(1, 2), idx['dil_conv_5x5']] = 3.0
  a[edge_index(1, 0), idx['max_pool_3x3']] = 1.0
  a[edge_index(1, 1), idx['avg_pool_3x3']] = 1.5
  # Node 2: all edges uniform except the one from node 1 (input 3); the tie between the
  # other edges goes to the earliest input, and the op tie to the first non-none primitive.
  a[edge_index(2, 3), idx['dil_conv_3x3']] = 1.0
  # Node 3: input 4 and input 2.
  a[edge_index(3, 4), idx['sep_conv_5x5']] = 4.0
  a[edge_index(3, 2), idx['skip_connect']] = 2.5
  a[edge_index(3, 0), idx['none']] = 9.0
  r = alphas['reduce']
  for e, (node, inp) in enumerate(EDGES):
    r[e, idx['max_pool_3x3']] = 1.0 + 0.1 * inp  # later inputs stronger
  g = search_step.derive_genotype(alphas)
  assert g.normal == (
      ('sep_conv_3x3', 1), ('skip_connect', 0),
      ('avg_pool_3x3', 1), ('max_pool_3x3', 0),
      ('dil_conv_3x3', 3), ('max_pool_3x3', 0),
      ('sep_conv_5x5', 4), ('skip_connect', 2))
  assert g.reduce == (
      ('max_pool_3x3', 1), ('max_pool_3x3', 0),
      ('max_pool_3x3', 2), ('max_pool_3x3', 1),
      ('max_pool_3x3', 3), ('max_pool_3x3', 2),
      ('max_pool_3x3', 4), ('max_pool_3x3', 3))
  assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)
  # Uniform alphas (the start of a search): first non-none op, inputs 0 and 1.
  g0 = search_step.derive_genotype({k: np.zeros((14, 8)) for k in ('normal', 'reduce')})
  assert g0.normal[:2] == (('max_pool_3x3', 0), ('max_pool_3x3', 1))
  assert G.validate_genotype(g0) == g0


# ---------------------------------------------------------------------------- gradients


def single_cell(*, dtype: str = 'float32', init_channels: int = 4, **fields
                ) -> search_step.SearchSetup:
  """The step pieces of the tiny config with ``fields`` (dotted names) set, on a supernet
  of one normal cell: the search arithmetic at the least compile time."""
  config = tiny_search_config(**{'model.init_channels': init_channels, 'data.crop_padding': 0,
                                 'data.flip': False, **fields})
  search.validate(config)
  setup = search_step.build_setup(config, mean=(0.3,), std=(0.3,), steps_per_epoch=1)
  model = SuperNetwork(layers=1, reductions=(), init_channels=init_channels, impl='lax',
                       dtype=jnp.dtype(dtype))
  return dataclasses.replace(setup, model=model)


def test_exact_second_order_gradient_agrees_with_finite_differences():
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)  # one call: compile time matters
  try:
    with jax.enable_x64(True):
      base = dict(init_channels=2, dtype='float64', order=2)
      setup = single_cell(hessian='exact', **base)
      state = search_step.create_search_state(setup, 0, (1, 8, 8, 1))
      rng = np.random.default_rng(0)
      params = jax.tree.map(jnp.asarray, state.params)
      # A non-zero momentum buffer (one SGD update with random gradients), peaked alphas.
      noise = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
      _, opt_state = setup.tx.update(noise, state.opt_state, params)
      alphas = jax.tree.map(lambda a: jnp.asarray(a) * 300.0, state.alphas)
      train = (jnp.asarray(rng.normal(size=(8, 8, 8, 1))), jnp.asarray(rng.integers(0, 10, 8)))
      val = (jnp.asarray(rng.normal(size=(8, 8, 8, 1))), jnp.asarray(rng.integers(0, 10, 8)))
      # eps * ||v|| = 1e-7: small enough that no ReLU changes sign between w- and w+ (the
      # training gradient is only piecewise smooth in w), large enough for float64.
      fd_setup = single_cell(hessian='finite_difference', **{'arch.fd_epsilon': 1e-7}, **base)

      @jax.jit
      def gradients(params, batch_stats, opt_state, alphas, xi):
        return {k: search_step.arch_gradient(c, params, batch_stats, opt_state, alphas, train, val, xi)
                for k, c in (('exact', setup), ('fd', fd_setup))}

      args = (params, state.batch_stats, opt_state, alphas)
      g = gradients(*args, jnp.asarray(0.5))
      # xi = 0: no virtual step, both are the first-order gradient grad_alpha L_val(w, alpha).
      g0 = gradients(*args, jnp.asarray(0.0))
  finally:
    jax.config.update('jax_disable_most_optimizations', before)

  def flat(tree):
    return np.concatenate([np.ravel(tree['normal']), np.ravel(tree['reduce'])])

  exact, fd, first = flat(g['exact']), flat(g['fd']), flat(g0['exact'])
  assert exact.dtype == np.float64 and np.abs(exact).max() > 0
  np.testing.assert_allclose(fd, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
  np.testing.assert_allclose(flat(g0['fd']), first, rtol=1e-9, atol=1e-12)
  # The second-order terms matter here: the first-order gradient is far from the exact one.
  assert np.linalg.norm(first - exact) > 0.1 * np.linalg.norm(exact)


@pytest.fixture(scope='module')
def fixed_batch():
  dataset = data_lib.load_dataset('digits')
  n = 32
  return {'image': jnp.asarray(dataset.train_images[:n]),
          'label': jnp.asarray(dataset.train_labels[:n]), 'mask': jnp.ones((n,), jnp.float32)}


@pytest.fixture(scope='module')
def single_cell_loss(fixed_batch):
  """``L(w, alpha)`` (train-mode BN) of the single-cell supernet on the fixed batch."""
  setup = single_cell()
  images = setup.normalize(fixed_batch['image'])
  return jax.jit(lambda s, alphas: search_step.Losses(setup.model, s.batch_stats).loss(
      s.params, alphas, images, fixed_batch['label'])[0])


@pytest.mark.parametrize('order, hessian', [(1, 'exact'), (2, 'exact'), (2, 'finite_difference')])
def test_search_steps_reduce_the_validation_loss(fixed_batch, single_cell_loss, order, hessian):
  setup = single_cell(order=order, hessian=hessian, **{
      'optimizer.learning_rate': 0.1, 'optimizer.schedule': 'constant',
      'arch.learning_rate': 0.03})
  mesh = data_lib.make_mesh(1)
  state = data_lib.replicate(search_step.create_search_state(setup, 0, (1, 8, 8, 1)), mesh)
  alphas0 = jax.device_get(state.alphas)
  before = float(single_cell_loss(state, state.alphas))
  step, _ = search_step.jit_search_steps(setup, mesh)
  for _ in range(10):  # the training batch is the validation batch
    state, metrics = step(state, fixed_batch, fixed_batch)
    assert np.isfinite(float(metrics['train_loss']))
  after = float(single_cell_loss(state, state.alphas))
  assert after < 0.75 * before, (before, after)
  # The architecture steps help too: the final weights prefer the final alphas.
  assert after < float(single_cell_loss(state, alphas0)) - 0.05


@pytest.mark.parametrize('order, hessian, reuse', [
    (1, 'exact', True), (2, 'finite_difference', True), (2, 'finite_difference', False)])
def test_phase_scan_equals_the_straight_line_step(fixed_batch, order, hessian, reuse):
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)  # two steps: compile time matters
  try:
    mesh = data_lib.make_mesh(1)
    val_batch = jax.tree.map(lambda x: x[::-1], fixed_batch)
    finals = {}
    for scan in (False, True):
      setup = single_cell(order=order, hessian=hessian, **{
          'arch.reuse_train_grad': reuse, 'arch.phase_scan': scan, 'arch.learning_rate': 0.03})
      state = data_lib.replicate(search_step.create_search_state(setup, 0, (1, 8, 8, 1)), mesh)
      step, _ = search_step.jit_search_steps(setup, mesh)
      for _ in range(2):  # the second step has a momentum buffer
        state, metrics = step(state, fixed_batch, val_batch)
      finals[scan] = jax.device_get((state, metrics))
  finally:
    jax.config.update('jax_disable_most_optimizations', before)
  (straight, m_straight), (scanned, m_scanned) = finals[False], finals[True]
  assert np.abs(straight.alphas['normal'] - search_step.initial_alphas(0)['normal']).max() > 1e-2
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, scanned, straight)  # weights, alphas, both optimisers, BN statistics
  jax.tree.map(close, m_scanned, m_straight)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize('field, value, message', [
    ('order', 3, 'config.order=3 is invalid: allowed: 1, 2'),
    ('order', 0, 'config.order=0 is invalid'),
    ('hessian', 'newton', "config.hessian='newton' is invalid: allowed: exact, finite_difference"),
    ('optimizer.learning_rate', 0.0, 'config.optimizer.learning_rate=0.0 is invalid: must be > 0'),
    ('arch.learning_rate', -3e-4, 'config.arch.learning_rate=-0.0003 is invalid: must be > 0'),
    ('arch.weight_decay', -1.0, 'must be >= 0'),
    ('arch.b1', 1.0, 'config.arch.b1=1.0 is invalid: must be in [0, 1)'),
    ('arch.fd_epsilon', 0.0, 'config.arch.fd_epsilon=0.0 is invalid: must be > 0'),
    ('model.layers', 2, 'config.model.layers=2 is invalid: must be an integer >= 3'),
    ('model.init_channels', 1, 'must be an integer >= 2'),
    ('model.num_classes', 100, "dataset 'digits' has 10 classes"),
    ('model.impl', 'cuda', "config.model.impl='cuda' is invalid: allowed: auto, fast, lax"),
    ('model.impl', '', "config.model.impl='' is invalid: allowed: auto, fast, lax"),
    ('data.validation_fraction', 0.0, 'must be in (0, 1)'),
    ('data.name', 'no_such_dataset', 'allowed: cifar10, cifar100, digits'),
    ('optimizer.schedule', 'multistep', 'allowed: constant, cosine'),
    ('batch_size', 0, 'config.batch_size=0 is invalid'),
])
def test_bad_values_fail_with_one_line(field, value, message, tmp_path):
  config = tiny_search_config(**{field: value})
  with pytest.raises(validation.ConfigError) as e:
    search.run_search(config, str(tmp_path / 'w'))
  assert message in str(e.value) and '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'w')  # nothing computed or written


def test_batch_larger_than_a_half_is_a_config_error(tmp_path):
  config = tiny_search_config(batch_size=720)
  with pytest.raises(validation.ConfigError, match=r'config.batch_size=720 is invalid: the halves '
                     r'have only 719 \(weights\) and 718 \(alphas\) examples'):
    search.run_search(config, str(tmp_path))


def test_configs_file_defaults_and_variants():
  full = load_config('darts_search')
  assert full.job == 'darts_search' and full.order == 2 and full.hessian == 'exact'
  assert (full.model.layers, full.model.init_channels) == (8, 16)
  assert (full.batch_size, full.num_epochs) == (64, 50)
  assert full.data.name == 'cifar10' and full.data.validation_fraction == 0.5
  assert (full.optimizer.learning_rate, full.optimizer.final_learning_rate) == (0.025, 0.001)
  assert (full.arch.learning_rate, full.arch.b1, full.arch.b2, full.arch.weight_decay) == (
      3e-4, 0.5, 0.999, 1e-3)
  assert full.model.impl == 'auto'
  search.validate(full)
  demo = load_config('darts_search', 'demo')
  assert demo.order == 1 and demo.data.name == 'digits' and demo.model.impl == 'lax'
  search.validate(demo)
  assert load_config('darts_search', 'demo,second_order').order == 2
  assert load_config('darts_search', 'first_order').order == 1


# ---------------------------------------------------------------------------- pictures


def _distance_to_path(points: np.ndarray, path: np.ndarray) -> np.ndarray:
  """Each point's distance to the polyline ``path``."""
  a, b = path[:-1], path[1:]
  d = b - a
  t = np.clip(np.einsum('psk,sk->ps', points[:, None] - a[None], d)
              / np.maximum((d ** 2).sum(-1), 1e-12), 0.0, 1.0)
  nearest = a[None] + t[..., None] * d[None]
  return np.linalg.norm(points[:, None] - nearest, axis=-1).min(axis=1)


# Edges into one node from its two predecessors, arcs of every span, one node fed twice
# by the same state, and the published cells.
CROWDED = G.Genotype(
    normal=(('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 2), ('sep_conv_5x5', 1),
            ('dil_conv_3x3', 2), ('max_pool_3x3', 3), ('avg_pool_3x3', 2), ('skip_connect', 4)),
    normal_concat=(2, 3, 4, 5),
    reduce=(('max_pool_3x3', 0), ('avg_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2),
            ('dil_conv_5x5', 3), ('sep_conv_3x3', 0), ('sep_conv_3x3', 4), ('dil_conv_3x3', 3)),
    reduce_concat=(2, 3, 4, 5))


@pytest.mark.parametrize('genotype', [CROWDED, *G.GENOTYPES.values()])
def test_cell_edges_do_not_lie_on_top_of_each_other(genotype):
  for kind in ('normal', 'reduce'):
    paths = search_plots.cell_edge_paths(getattr(genotype, kind),
                                         getattr(genotype, f'{kind}_concat'))
    assert len(paths) == 8 + 4
    for i, p in enumerate(paths):
      for q in paths[i + 1:]:
        near = _distance_to_path(p['points'], q['points']) < 0.04
        assert near.mean() < 0.1, (kind, p['op'], p['src'], p['dst'], q['src'], q['dst'])
    # A node's two incoming edges end apart (they fan in).
    for node in range(G.NUM_NODES):
      a, b = paths[2 * node]['points'][-1], paths[2 * node + 1]['points'][-1]
      assert np.linalg.norm(a - b) > 0.15


@pytest.mark.parametrize('genotype', [CROWDED, *G.GENOTYPES.values()])
def test_cell_operation_labels_do_not_overlap(genotype):
  # Edges may cross; the labels naming their operations must stay apart (their boxes as
  # matplotlib draws them, in pixels).
  for kind in ('normal', 'reduce'):
    fig = search_plots.cell_figure(getattr(genotype, kind), getattr(genotype, f'{kind}_concat'),
                                   kind)
    try:
      fig.canvas.draw()
      renderer = fig.canvas.get_renderer()
      ops = {op for op, _ in getattr(genotype, kind)}
      boxes = [t.get_bbox_patch().get_window_extent(renderer)
               for t in fig.axes[0].texts if t.get_text() in ops]
      assert len(boxes) == 8
      for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
          assert not a.overlaps(b), (kind, a, b)
    finally:
      search_plots.plt.close(fig)


def test_alpha_history_keeps_the_last_line_of_a_step_and_skips_bad_lines(tmp_path):
  path = tmp_path / 'genotypes.jsonl'
  w = lambda v: {k: np.full((14, 8), v).tolist() for k in ('normal', 'reduce')}
  lines = [{'step': 10, 'epoch': 1.0, 'alphas_softmax': w(0.1)},
           {'step': 20, 'epoch': 2.0, 'alphas_softmax': w(0.2)},
           {'step': 20, 'epoch': 2.0, 'alphas_softmax': w(0.3)},  # the resumed run's
           {'step': 30, 'epoch': 3.0}]  # an older search's line: no alphas
  path.write_text(''.join(json.dumps(x) + '\n' for x in lines) + '{"step": 40, "ep')
  history = search_plots.read_alpha_history(str(path))
  assert [e for e, _ in history] == [1.0, 2.0]
  assert history[1][1]['reduce'][0, 0] == 0.3
  assert search_plots.read_alpha_history(str(tmp_path / 'absent.jsonl')) == []


def test_search_plots_have_titles_history_and_small_tensorboard_images(tmp_path, monkeypatch):
  titles = []
  cell_figure = search_plots.cell_figure
  monkeypatch.setattr(search_plots, 'cell_figure',
                      lambda pairs, concat, title: titles.append(title) or cell_figure(
                          pairs, concat, title))
  rng = np.random.default_rng(0)

  def weights():
    return {k: search_step.alpha_weights({'normal': rng.normal(size=(14, 8)),
                                          'reduce': rng.normal(size=(14, 8))})[k]
            for k in ('normal', 'reduce')}

  history = [(1.0, weights()), (2.0, weights())]
  fig = search_plots.alpha_history_figure(history)
  try:
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 28 and all(len(ax.get_lines()) == 8 for ax in panels)
    np.testing.assert_allclose(panels[0].get_lines()[3].get_ydata(),
                               [h['normal'][0, 3] for _, h in history])
    assert panels[14].get_title().startswith('reduce: 0')
  finally:
    search_plots.plt.close(fig)
  genotype = G.GENOTYPES['DARTS_V2']
  images = search_plots.write_search_plots(str(tmp_path), history[-1][1], genotype, epoch=2.0,
                                           history=history, thumbnails=True)
  assert sorted(images) == ['alphas', 'alphas_history', 'normal_cell', 'reduce_cell']
  for image in images.values():
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert max(image.shape[:2]) <= 800
  for name in ('alphas.png', 'alphas_history.png', 'normal_cell.png', 'reduce_cell.png'):
    with open(tmp_path / name, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert titles == ['DARTS_V2: normal cell, epoch 2', 'DARTS_V2: reduce cell, epoch 2']
  assert search_plots.genotype_name(genotype, str(tmp_path)) == 'DARTS_V2'
  searched = genotype._replace(normal=(('skip_connect', 0),) * 8)
  assert search_plots.genotype_name(searched, '/runs/s1') == 'genotype searched in s1'
  with search_plots.TensorBoardImages(str(tmp_path / 'tb')) as tb:
    tb.write_images(3, images)
  (event,) = os.listdir(tmp_path / 'tb')
  data = open(tmp_path / 'tb' / event, 'rb').read()
  assert event.endswith('.images') and b'alphas_history' in data and b'reduce_cell' in data
