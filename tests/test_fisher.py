"""Per-channel Fisher information: the vmap path against an example-by-example mask gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import fisher as fisher_lib
from distill_jax import losses
from distill_jax import models


def _network(name):
  if name == 'darts':
    return models.create_model('darts', genotype='DARTS_V1', layers=5, init_channels=4)
  return models.create_model('wrn', depth=10, widen_factor=1)


def _batch(n=5, seed=1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (n, 8, 8, 1)), jax.random.randint(k2, (n,), 0, 10)


def _variables(model, seed=0):
  variables = models.init_variables(model, jax.random.key(seed), (1, 8, 8, 1))
  # Non-trivial batch statistics, so inference-mode BN is not the identity.
  stats = jax.tree.map(lambda x: x + 0.1 * jnp.abs(jax.random.normal(jax.random.key(3), x.shape)),
                       variables['batch_stats'])
  return {'params': variables['params'], 'batch_stats': stats}


@functools.partial(jax.jit, static_argnums=0)
def _mask_gradients_one_example(model, variables, x, y):
  """g_c = dL/dm_c at m = 1 for one example, through a multiplicative channel mask.

  Independent of the library's route: the mask enters as perturbation a·ε (ε = m − 1)
  built from the unperturbed activations, and ε is differentiated directly.
  """
  _, state = model.apply(variables, x[None], train=False, mutable=['intermediates'])
  shapes = fisher_lib.point_shapes(model, variables, x.shape)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  activations = [fisher_lib._lookup(state['intermediates'], path) for path, _ in flat]  # pylint: disable=protected-access

  def loss(eps):
    perturbations = jax.tree_util.tree_unflatten(
        treedef, [a * e for a, e in zip(activations, eps)])
    logits, _ = model.apply({**variables, 'perturbations': perturbations}, x[None], train=False)
    return losses.cross_entropy(logits, y[None])

  eps = [jnp.zeros(a.shape[-1]) for a in activations]
  grads = jax.grad(loss)(eps)
  return {fisher_lib._path_name(path): g for (path, _), g in zip(flat, grads)}  # pylint: disable=protected-access


@pytest.mark.parametrize('name', ['wrn', 'darts'])
def test_vmap_fisher_equals_example_by_example(name):
  model = _network(name)
  variables = _variables(model)
  images, labels = _batch()
  fisher = fisher_lib.channel_fisher(model, variables, images, labels)
  per_example = [_mask_gradients_one_example(model, variables, x, y) for x, y in zip(images, labels)]
  assert set(fisher) == set(per_example[0])
  for point, delta in fisher.items():
    expected = sum(np.square(np.asarray(g[point], np.float64)) for g in per_example) / (2 * len(images))
    np.testing.assert_allclose(delta, expected, rtol=2e-4, atol=1e-12)
    assert delta.shape == (per_example[0][point].shape[0],)


def test_points_are_block_and_cell_outputs():
  wrn = fisher_lib.channel_fisher(_network('wrn'), _variables(_network('wrn')), *_batch(2))
  assert {k: v.shape for k, v in wrn.items()} == {
      'group0_block0_out': (16,), 'group1_block0_out': (32,), 'group2_block0_out': (64,)}
  darts = fisher_lib.channel_fisher(_network('darts'), _variables(_network('darts')), *_batch(2))
  # DARTS_V1, 5 cells, C=4: reductions at cells 1 and 3 double C; each output is 4·C wide.
  assert [darts[f'cell{i}/output'].shape[0] for i in range(5)] == [16, 32, 32, 64, 64]
  totals = fisher_lib.cell_totals(darts)
  assert totals['cell2/output'] == pytest.approx(float(np.sum(darts['cell2/output'])), rel=1e-6)


def test_channel_without_effect_scores_zero():
  model = _network('wrn')
  variables = _variables(model)
  images, labels = _batch()
  before = fisher_lib.channel_fisher(model, variables, images, labels)['group2_block0_out']
  c = int(np.argmax(before))  # the most important channel of the last block
  params = jax.tree.map(lambda x: x, variables['params'])
  # The last block output reaches the logits only through final BN -> ReLU -> pool ->
  # classifier; with channel c's classifier row at zero it has no effect on the loss.
  params['classifier']['kernel'] = params['classifier']['kernel'].at[c].set(0.0)
  fisher = fisher_lib.channel_fisher(model, {**variables, 'params': params}, images, labels)
  last = fisher['group2_block0_out']
  assert before[c] > 0 and last[c] == 0.0
  others = np.delete(np.arange(len(last)), c)
  assert np.array_equal(np.asarray(last)[others] > 0, np.asarray(before)[others] > 0)


def test_accumulated_batches_equal_one_big_batch():
  model = _network('darts')
  variables = _variables(model)
  images, labels = _batch(6)
  whole = fisher_lib.channel_fisher(model, variables, images, labels)
  parts = fisher_lib.accumulate_fisher(
      model, variables, [(images[:3], labels[:3]), (images[3:], labels[3:])])
  for point in whole:
    np.testing.assert_allclose(parts[point], whole[point], rtol=1e-5)


def test_sharded_batch_gives_the_same_fisher():
  from distill_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  model = _network('wrn')
  variables = _variables(model)
  images, labels = _batch(8)
  single = fisher_lib.channel_fisher(model, variables, images, labels)
  mesh = data_lib.make_mesh(8)
  sharded = fisher_lib.channel_fisher(model, data_lib.replicate(variables, mesh),
                                      *data_lib.shard_global_batch((images, labels), mesh))
  for point in single:
    np.testing.assert_allclose(sharded[point], single[point], rtol=1e-4)
