"""Distillation training: a frozen teacher in the step, teacher loading, the distill job."""

import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import load_config
from test_reliability import signal_at
from distill_jax import config_lib
from distill_jax import data as data_lib
from distill_jax import jobs
from distill_jax import losses
from distill_jax import models
from distill_jax import validation
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop
from distill_jax.trainers import methods as methods_lib
from distill_jax.trainers import steps as steps_lib
from distill_jax.trainers import teacher as teacher_lib
from distill_jax.trainers import train as train_lib

# Execution-bound: trains for tens of steps (conftest.py)
pytestmark = pytest.mark.optimized

SHAPE = (1, 8, 8, 1)


def tiny_distill_config(method='kd_at', **distill):
  # The demo's weights for this method (a name that is none is left for validation).
  c = load_config('distill', f'demo,{method}' if method in methods_lib.NAMES else 'demo')
  c.model = models_config('wrn', depth=10, widen_factor=1)
  c.distill.teacher_model = models_config('wrn', depth=10, widen_factor=2)
  c.distill.method = method
  c.num_epochs = 2
  c.batch_size = 32
  c.eval_batch_size = 120
  c.log_every_steps = 20
  c.checkpoint_every_steps = 0
  c.num_devices = 1
  for k, v in distill.items():
    c.distill[k] = v
  return c


def models_config(name, **kwargs):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({'name': name, 'num_classes': 10, **kwargs})


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train_lib.train_and_evaluate(train_lib.teacher_config(tiny_distill_config()), workdir)
  return workdir


def test_distilled_student_ends_closer_to_its_teacher(teacher_dir, tmp_path):
  teacher = teacher_lib.load_teacher(tiny_distill_config().distill.teacher_model, teacher_dir, SHAPE)
  scores = {}
  for method in ('none', 'kd_at'):
    config = tiny_distill_config(method, teacher_workdir=teacher_dir)
    workdir = str(tmp_path / method)
    jobs.run(config, workdir)
    # Score both students against the same teacher (the baseline never saw it).
    scored = tiny_distill_config('kd_at', teacher_workdir=teacher_dir)
    scored.allow_resume_changes = 'distill'  # score the baseline against the teacher too
    scores[method] = train_lib.evaluate(scored, workdir, teacher=teacher)
  assert scores['kd_at']['test_at_distance'] < 0.8 * scores['none']['test_at_distance']
  assert scores['kd_at']['test_teacher_agreement'] > scores['none']['test_teacher_agreement']
  assert scores['kd_at']['test_top1_error'] < 0.3


def test_only_the_student_is_checkpointed(teacher_dir, tmp_path):
  config = tiny_distill_config('at', teacher_workdir=teacher_dir)
  config.num_epochs = 1
  config.checkpoint_every_steps = 10
  results = jobs.run(config, str(tmp_path))
  with ocp.CheckpointManager(ckpt_lib.checkpoint_dir(str(tmp_path))) as manager:
    saved = manager.restore(manager.latest_step())
  student = models.param_shapes(models.create_model(**config.model), SHAPE)
  teacher_lib.check_variables_match(student, {'params': saved['params'],
                                              'batch_stats': saved['batch_stats']}, source='student')
  assert results['num_params'] == models.count_params(student['params'])
  assert 0.0 <= results['test_teacher_agreement'] <= 1.0


def test_trainer_loss_is_one_call_of_distillation_loss(teacher_dir):
  """The step's loss equals losses.distillation_loss on the same (unaugmented) batch."""
  config = tiny_distill_config('kd_at', teacher_workdir=teacher_dir, beta=30.0, alpha=0.7,
                               temperature=3.0)
  teacher = teacher_lib.load_teacher(config.distill.teacher_model, teacher_dir, SHAPE)
  dataset = data_lib.load_dataset('digits')
  student = models.create_model(**config.model)
  variables = models.init_variables(student, jax.random.key(1), SHAPE)
  tx = optax.sgd(0.1)
  state = steps_lib.create_train_state(variables, tx, seed=0)
  no_augmentation = ml_collections.ConfigDict(
      {'crop_padding': 0, 'flip': False, 'cutout': 0, 'pad_mode': 'constant'})
  batch = {'image': jnp.asarray(dataset.train_images[:16]),
           'label': jnp.asarray(dataset.train_labels[:16])}
  step = jax.jit(functools.partial(
      steps_lib.train_step, model=student, tx=tx, schedule=optax.constant_schedule(0.1),
      augment=steps_lib.make_augment(no_augmentation, dataset.mean, dataset.std),
      loss_fn=steps_lib.make_loss(config.distill), teacher_model=teacher.model))
  _, metrics = step(state, batch, teacher.variables)
  images = data_lib.normalize(batch['image'], dataset.mean, dataset.std)
  (s_logits, s_points), _ = student.apply(variables, images, train=True, mutable=['batch_stats'])
  t_logits, t_points = teacher.model.apply(teacher.variables, images, train=False)
  expected, terms = losses.distillation_loss(s_logits, batch['label'], s_points, t_logits,
                                             t_points, method='kd_at', alpha=0.7,
                                             temperature=3.0, beta=30.0)
  np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['kd'], terms['kd'], rtol=1e-5)
  np.testing.assert_allclose(metrics['at'], terms['at'], rtol=1e-5)
  assert metrics['kd'] > 0 and metrics['at'] > 0 and 0 <= metrics['teacher_agreement'] <= 1


def test_mismatched_teacher_names_first_path_and_both_shapes(teacher_dir):
  wrong = models_config('wrn', depth=10, widen_factor=1)
  with pytest.raises(teacher_lib.TeacherError) as e:
    teacher_lib.load_teacher(wrong, teacher_dir, SHAPE)
  message = str(e.value)
  assert '\n' not in message
  assert 'distill.teacher_model' in message
  assert 'params/classifier/kernel has shape (128, 10) there but (64, 10) in the model' in message


def test_missing_teacher_checkpoint(tmp_path):
  config = tiny_distill_config('at', teacher_workdir=str(tmp_path / 'nowhere'))
  with pytest.raises(teacher_lib.TeacherError, match='holds no checkpoint'):
    jobs.run(config, str(tmp_path / 'student'))
  assert not os.path.exists(tmp_path / 'student' / 'checkpoints')


def test_teacher_from_one_checkpoint_folder(teacher_dir):
  step = ckpt_lib.latest_step(teacher_dir)
  folder = os.path.join(ckpt_lib.checkpoint_dir(teacher_dir), str(step))
  teacher = teacher_lib.load_teacher(tiny_distill_config().distill.teacher_model, folder, SHAPE)
  assert teacher.source.endswith(f'{step}/default')


@pytest.mark.parametrize('field, value, message', [
    ('temperature', 0.0, 'config.distill.temperature=0.0 is invalid: must be > 0'),
    ('alpha', 1.5, 'config.distill.alpha=1.5 is invalid: must be in [0, 1]'),
    ('beta', -1.0, 'config.distill.beta=-1.0 is invalid: must be >= 0'),
    ('method', 'abound', "config.distill.method='abound' is invalid: allowed: none, kd, at, "
                         'kd_at, hard, sp, nst, fsp, rkd, pkt, dkd, dist, fitnet, vid, cc, crd, '
                         'kd_sp, kd_nst, kd_fsp'),
    ('warmup_epochs', 2.0, "config.distill.warmup_epochs=2.0 is invalid: only DKD warms up"),
    ('init_epochs', 2, 'config.distill.init_epochs=2 is invalid: only FSP and FitNets have an '
                       'initialisation stage'),
    ('nce_k', 100, 'config.distill.nce_k=100 is invalid: only CRD reads it'),
    ('nce_m', 1.0, 'config.distill.nce_m=1.0 is invalid: must be in [0, 1)'),
    ('at_form', 'cosine', 'allowed: released, l2'),
])
def test_bad_distill_values(field, value, message):
  config = tiny_distill_config(**{field: value})
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_distill_config(config)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_bad_teacher_model_name():
  config = tiny_distill_config()
  config.distill.teacher_model.name = 'vgg'
  with pytest.raises(validation.ConfigError, match="distill.teacher_model.name='vgg'"):
    validation.validate_distill_config(config)


# ---------------------------------------------------------------------------------------
# The field's other methods by name (distill_jax.trainers.methods).


def _distill_section(method, **fields):
  return ml_collections.ConfigDict({'method': method, 'alpha': 0.9, 'temperature': 4.0,
                                    'beta': None, 'at_form': 'released', 'warmup_epochs': 0.0,
                                    **fields})


@pytest.mark.parametrize('method, published', [('sp', 3000.0), ('kd_nst', 50.0), ('rkd', 1.0),
                                               ('kd_pkt', 3e4), ('dkd', 1.0), ('dist', 1.0),
                                               ('fsp', 50.0)])
def test_zoo_objective_is_ce_kd_and_the_weighted_method(method, published):
  rng = np.random.default_rng(0)
  logits, teacher_logits = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
  labels = np.arange(6) % 10
  points = [rng.normal(size=(6, 4, 4, 3)), rng.normal(size=(6, 2, 2, 5))]
  teacher_points = [rng.normal(size=(6, 4, 4, 7 if method != 'fsp' else 3)),
                    rng.normal(size=(6, 2, 2, 5))]
  embeddings = (rng.normal(size=(6, 5)), rng.normal(size=(6, 9)))
  loss, terms = steps_lib.make_loss(_distill_section(method))(
      logits, labels, points, teacher_logits, teacher_points, embeddings=embeddings, step=0)
  base = method.removeprefix('kd_')
  own = {'sp': lambda: losses.sp_loss(points[-1:], teacher_points[-1:]),
         'nst': lambda: losses.nst_loss(points, teacher_points),
         'fsp': lambda: losses.fsp_loss(points, teacher_points),
         'rkd': lambda: losses.rkd_loss(*embeddings), 'pkt': lambda: losses.pkt_loss(*embeddings),
         'dkd': lambda: losses.dkd_loss(logits, teacher_logits, labels, temperature=4.0),
         'dist': lambda: losses.dist_loss(logits, teacher_logits)}[base]()
  first = (losses.kd_loss(logits, teacher_logits, labels, alpha=0.9, temperature=4.0)
           if method.startswith('kd_') else losses.cross_entropy(logits, labels))
  np.testing.assert_allclose(terms[base], published * own, rtol=1e-6)
  np.testing.assert_allclose(loss, first + published * own, rtol=1e-6)
  # A given beta replaces the published weight.
  _, terms = steps_lib.make_loss(_distill_section(method, beta=2.0))(
      logits, labels, points, teacher_logits, teacher_points, embeddings=embeddings)
  np.testing.assert_allclose(terms[base], 2.0 * own, rtol=1e-6)


@pytest.mark.parametrize('method', ['fsp', 'kd_fsp'])
def test_an_initialisation_stage_trains_the_method_alone_then_drops_it(method):
  """With distill.init_epochs: stage 1's loss is FSP alone (unweighted, as RepDistiller's
  pretrain.py), the main stage's CE (or KD) without it."""
  rng = np.random.default_rng(2)
  logits, teacher_logits, labels = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)), np.arange(4)
  points = [rng.normal(size=(4, 4, 4, 3)), rng.normal(size=(4, 2, 2, 5))]
  teacher_points = [rng.normal(size=(4, 4, 4, 3)), rng.normal(size=(4, 2, 2, 5))]
  distill = _distill_section(method, init_epochs=1)
  loss, terms = steps_lib.make_loss(distill, stage='init')(logits, labels, points,
                                                           teacher_logits, teacher_points)
  np.testing.assert_allclose(loss, losses.fsp_loss(points, teacher_points), rtol=1e-6)
  assert set(terms) == {'fsp'}
  loss, terms = steps_lib.make_loss(distill)(logits, labels, points, teacher_logits,
                                             teacher_points)
  first = (losses.kd_loss(logits, teacher_logits, labels, alpha=0.9, temperature=4.0)
           if method.startswith('kd_') else losses.cross_entropy(logits, labels))
  np.testing.assert_allclose(loss, first, rtol=1e-6)
  assert 'fsp' not in terms


def test_freeze_modules_leaves_the_classifier_untouched():
  params = {'classifier': {'kernel': jnp.ones((3, 2))}, 'conv': {'kernel': jnp.ones((2, 2))}}
  opt = ml_collections.ConfigDict({'grad_clip_norm': 0.0, 'weight_decay': 0.1,
                                   'momentum': 0.9, 'nesterov': False})
  from distill_jax.trainers import optim  # pylint: disable=g-import-not-at-top
  for tree in (params, {'student': params, 'connector': {'regressor': jnp.ones(2)}}):
    tx = optim.freeze_modules(optim.make_optimizer(opt, optax.constant_schedule(0.5)),
                              methods_lib.INIT_FROZEN)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    student = updates.get('student', updates)
    assert float(jnp.abs(student['classifier']['kernel']).max()) == 0.0
    np.testing.assert_allclose(student['conv']['kernel'], -0.5 * 1.1)  # -lr (g + wd p)
    if 'connector' in updates:
      np.testing.assert_allclose(updates['connector']['regressor'], -0.55)


def test_dkd_warms_up_linearly_over_its_epochs():
  rng = np.random.default_rng(1)
  logits, teacher_logits, labels = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)), np.arange(4)
  loss = steps_lib.make_loss(_distill_section('dkd', warmup_epochs=2.0), steps_per_epoch=10)
  full = losses.dkd_loss(logits, teacher_logits, labels)
  for step, ramp in ((0, 0.0), (5, 0.25), (20, 1.0), (35, 1.0)):
    _, terms = loss(logits, labels, None, teacher_logits, None, step=step)
    np.testing.assert_allclose(terms['dkd'], ramp * full, rtol=1e-6, atol=1e-9)


@pytest.mark.e2e
@pytest.mark.parametrize('method', ['kd_sp', 'rkd'])
def test_zoo_methods_train_by_name(teacher_dir, tmp_path, method):
  """A point method with KD and an embedding method: their terms are logged, finite and
  positive, beta is the published one, and the student learns."""
  c = tiny_distill_config(method, teacher_workdir=teacher_dir)
  c.num_epochs = 1
  c.log_every_steps = 10
  results = jobs.run(c, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  term = method.removeprefix('kd_')
  train = [r for r in rows if f'train_{term}' in r]
  assert train and all(np.isfinite(r[f'train_{term}']) and r[f'train_{term}'] > 0 for r in train)
  assert ('train_kd' in train[0]) == method.startswith('kd_')
  assert results['config']['distill']['beta'] is None  # the published weight was used
  assert results['test_top1_error'] < 0.9


# ---------------------------------------------------------------------------------------
# Methods with learned parts: FitNets, VID, CC (distill_jax.trainers.methods.Connector).


@pytest.mark.parametrize('method, published', [('fitnet', 100.0), ('kd_vid', 1.0), ('cc', 0.02)])
def test_learned_objective_is_the_connector_loss_weighted(teacher_dir, method, published):
  """The step's loss: CE (or KD) + beta * the connector's own loss, computed independently
  from the connector's variables (regressor of the middle point / every point / two heads)."""
  from distill_jax import connectors  # pylint: disable=g-import-not-at-top
  config = tiny_distill_config(method, teacher_workdir=teacher_dir)
  teacher = teacher_lib.load_teacher(config.distill.teacher_model, teacher_dir, SHAPE)
  dataset = data_lib.load_dataset('digits')
  run = train_lib.build_run(config, teacher=teacher, dataset=dataset)
  state = jax.device_get(run.state)
  assert run.connector_params == models.count_params(state.connector['params']) > 0
  images = jnp.asarray(dataset.train_images[:8], jnp.float32) / 255.0
  labels = jnp.asarray(dataset.train_labels[:8])
  (logits, points), sown = run.model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, images, train=True,
      mutable=['batch_stats', 'intermediates'])
  (t_logits, t_points), t_sown = teacher.model.apply(teacher.variables, images, train=False,
                                                     mutable=['intermediates'])
  c = state.connector
  base = method.removeprefix('kd_')
  if base == 'fitnet':
    assert sorted(c['params']) == ['regressor'] and c['batch_stats']
    regressed, _ = connectors.ConvRegressor(t_points[1].shape[-1], t_points[1].shape[1:3]).apply(
        {'params': c['params']['regressor'], 'batch_stats': c['batch_stats']['regressor']},
        points[1], train=True, mutable=['batch_stats'])
    own = losses.fitnet_loss(regressed, t_points[1])
  elif base == 'vid':
    assert sorted(c['params']) == [f'vid{i}' for i in range(len(points))]
    own = sum(connectors.vid_loss(*connectors.VIDRegressor(t.shape[-1], t.shape[1:3]).apply(
        {'params': c['params'][f'vid{i}']}, s), t) for i, (s, t) in enumerate(zip(points, t_points)))
  else:
    heads = {k: connectors.LinearEmbed().apply({'params': c['params'][k]}, x) for k, x in (
        ('student_head', sown['intermediates']['embedding'][0]),
        ('teacher_head', t_sown['intermediates']['embedding'][0]))}
    # The release's CC of the two heads' outputs (both heads learn through it).
    delta = np.abs(np.asarray(heads['student_head'], np.float64) - np.asarray(heads['teacher_head']))
    own = np.mean(np.sum(delta[:-1] * delta[1:], axis=1))
  (learned, memory), _ = methods_lib.make_connector(config.distill).apply(
      c, points, t_points, sown['intermediates']['embedding'][0],
      t_sown['intermediates']['embedding'][0], train=True, mutable=['batch_stats'])
  assert memory is None
  np.testing.assert_allclose(learned, own, rtol=2e-5)
  loss, terms = steps_lib.make_loss(config.distill)(logits, labels, points, t_logits, t_points,
                                                      learned=learned)
  first = (losses.kd_loss(logits, t_logits, labels, alpha=config.distill.alpha,
                          temperature=config.distill.temperature)
           if method.startswith('kd_') else losses.cross_entropy(logits, labels))
  np.testing.assert_allclose(terms[base], published * learned, rtol=1e-6)
  np.testing.assert_allclose(loss, first + published * learned, rtol=1e-6)


@pytest.mark.parametrize('method', ['fitnet', 'vid', 'cc', 'crd'])
def test_learned_step_lowers_the_combined_loss(teacher_dir, method):
  """One jitted step lowers the combined loss on its batch (no augmentation): the loss at
  the updated student and connector, with everything else as before the step (CRD's bank
  and negatives included), is below the loss before it; the connector's parameters move."""
  config = tiny_distill_config(method, teacher_workdir=teacher_dir)
  config.data.crop_padding, config.data.flip = 0, False
  teacher = teacher_lib.load_teacher(config.distill.teacher_model, teacher_dir, SHAPE)
  run = train_lib.build_run(config, teacher=teacher, dataset=data_lib.load_dataset('digits'))
  batch = run.data.batch('train', np.arange(32))
  before = jax.device_get((run.state.step, run.state.memory, run.state.connector))
  state, first = run.train_step(run.state, batch, run.teacher_variables)
  step, memory, connector = before
  trained = jax.device_get(state.connector['params'])  # the probe step donates state
  # The updated parameters at the old step (same negatives) and the old bank.
  probe = state.replace(step=jax.device_put(step), memory=jax.device_put(memory),
                        connector={**state.connector, 'batch_stats': jax.device_put(
                            connector['batch_stats'])})
  _, second = run.train_step(probe, batch, run.teacher_variables)
  assert float(second['loss']) < float(first['loss'])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), connector['params'], trained)
  assert min(jax.tree.leaves(moved)) > 0


def test_cc_trains_both_heads():
  """As the release: the teacher-side head learns through CC too (the teacher's embedding
  itself is a constant of the step)."""
  connector = methods_lib.make_connector(config_lib.distill_section('cc'))
  rng = np.random.default_rng(0)
  emb, t_emb = jnp.asarray(rng.normal(size=(6, 32))), jnp.asarray(rng.normal(size=(6, 64)))
  variables = connector.init(jax.random.key(0), [], [], emb, t_emb, train=False)
  grads = jax.grad(lambda p: connector.apply({'params': p}, [], [], emb, t_emb, train=True)[0])(
      variables['params'])
  for head in ('student_head', 'teacher_head'):
    assert float(jnp.abs(grads[head]['linear']['kernel']).sum()) > 0


def test_crd_connector_is_the_heads_the_bank_and_its_update():
  """CRD's connector: two normalised heads, negatives drawn with the given key, the
  release's loss against the bank (connectors.crd_loss, checked against a NumPy rendering
  of RepDistiller in test_connectors) and the bank's momentum update of the batch's rows;
  both heads learn, the padding rows and the other rows stay."""
  from distill_jax import connectors  # pylint: disable=g-import-not-at-top
  connector = methods_lib.make_connector(_distill_section('crd', nce_k=7, nce_t=0.1, nce_m=0.3))
  rng = np.random.default_rng(3)
  emb, t_emb = jnp.asarray(rng.normal(size=(4, 6))), jnp.asarray(rng.normal(size=(4, 10)))
  classes = np.arange(30) % 3
  memory = methods_lib.init_memory(jax.random.key(1), classes, num_shards=8)
  assert memory['student'].shape == (32, connectors.FEAT_DIM)
  index, key = jnp.asarray([3, 17, 5, 28]), jax.random.key(9)
  labels = jnp.asarray(classes[[3, 17, 5, 28]])
  variables = connector.init(jax.random.key(0), [], [], emb, t_emb, train=False)
  (loss, new), _ = connector.apply(variables, [], [], emb, t_emb, train=True, memory=memory,
                                   labels=labels, index=index, key=key, mutable=['batch_stats'])
  heads = [connectors.NormalizedEmbed().apply({'params': variables['params'][k]}, x)
           for k, x in (('student_head', emb), ('teacher_head', t_emb))]
  contrast = connectors.sample_negatives(key, labels, index, classes, 7)
  assert not np.isin(np.asarray(contrast[:, 1:]), np.arange(30, 32)).any()  # no padding rows
  want, z = connectors.crd_loss(*heads, memory, index, contrast, nce_t=0.1, num_examples=30)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  updated = connectors.update_crd_memory({**memory, **z}, index, *heads, nce_m=0.3)
  for name in ('student', 'teacher', 'z_student', 'z_teacher'):
    np.testing.assert_allclose(new[name], updated[name], rtol=1e-6)
  others = np.setdiff1d(np.arange(32), np.asarray(index))
  np.testing.assert_array_equal(new['student'][others], memory['student'][others])
  assert float(new['z_student']) > 0 and float(memory['z_student']) == connectors.Z_UNSET
  grads = jax.grad(lambda p: connector.apply(
      {'params': p}, [], [], emb, t_emb, train=True, memory=memory, labels=labels, index=index,
      key=key)[0])(variables['params'])
  for head in ('student_head', 'teacher_head'):
    assert float(jnp.abs(grads[head]['linear']['kernel']).sum()) > 0


@pytest.mark.e2e
@pytest.mark.parametrize('method', ['fitnet', 'kd_vid', 'cc', 'crd'])
def test_learned_methods_train_and_resume_exactly(teacher_dir, tmp_path, monkeypatch, method):
  """Stopped at step 25 and resumed, a learned method ends as the uninterrupted run: the
  connector is checkpointed with the student (and not counted in its parameters), it
  learns, and the student's checkpoint tree is the student's alone."""
  config = tiny_distill_config(method, teacher_workdir=teacher_dir)
  config.num_epochs = 1
  config.checkpoint_every_steps = 40
  if method == 'crd':
    config.num_devices = 8  # the bank's rows sharded over 8 devices
  whole = jobs.run(config, str(tmp_path / 'whole'))
  signal_at(monkeypatch, 25, signal.SIGTERM)
  with pytest.raises(loop.Stopped):
    jobs.run(config, str(tmp_path / 'stopped'))
  monkeypatch.undo()
  resumed = jobs.run(config, str(tmp_path / 'stopped'))
  assert resumed['resumed_from_step'] == 25
  for key in ('test_loss', 'test_top1_error', 'test_teacher_agreement'):
    assert resumed[key] == whole[key], key
  student = models.param_shapes(models.create_model(**config.model), SHAPE)
  assert whole['num_params'] == models.count_params(student['params'])
  saved = {}
  for name in ('whole', 'stopped'):
    with ocp.CheckpointManager(ckpt_lib.checkpoint_dir(str(tmp_path / name))) as manager:
      saved[name] = manager.restore(manager.latest_step())
  assert whole['connector_params'] == models.count_params(saved['whole']['connector']['params']) > 0
  jax.tree.map(np.testing.assert_array_equal, saved['whole']['connector'], saved['stopped']['connector'])
  teacher_lib.check_variables_match(student, {'params': saved['whole']['params'],
                                              'batch_stats': saved['whole']['batch_stats']},
                                    source='student')
  # The connector learned: it is not its initialisation.
  teacher = teacher_lib.load_teacher(config.distill.teacher_model, teacher_dir, SHAPE)
  init = jax.device_get(train_lib.build_run(config, teacher=teacher).state.connector['params'])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), init,
                                       saved['whole']['connector']['params']))
  assert min(moved) > 0
  rows = [json.loads(line) for line in open(tmp_path / 'whole' / 'metrics.jsonl')]
  term = method.removeprefix('kd_')
  assert all(np.isfinite(r[f'train_{term}']) for r in rows if f'train_{term}' in r)
  if method != 'crd':
    assert saved['whole'].get('memory') is None
    return
  # CRD's bank: checkpointed, resumed exactly, updated (Z set once), sharded by rows.
  jax.tree.map(np.testing.assert_array_equal, saved['whole']['memory'], saved['stopped']['memory'])
  state = train_lib.build_run(config, teacher=teacher).state
  assert state.memory['student'].sharding.spec == jax.sharding.PartitionSpec('data')
  assert len(state.memory['student'].addressable_shards) == 8
  first = jax.device_get(state.memory)
  memory = saved['whole']['memory']
  assert float(first['z_student']) < 0 < float(memory['z_student'])
  changed = np.any(memory['student'] != first['student'], axis=1)
  steps = whole['steps']
  assert changed[:steps * config.batch_size].sum() >= 0.9 * min(
      steps * config.batch_size, len(memory['class_of_example']))
  assert not changed[len(memory['class_of_example']):].any()  # padding rows never written


@pytest.mark.e2e
@pytest.mark.parametrize('method', ['fsp', 'kd_fitnet'])
def test_initialisation_stage_then_main_training(teacher_dir, tmp_path, monkeypatch, method):
  """distill.init_epochs: stage 1 (WORKDIR/init_stage) trains all but the classifier on the
  method's loss (FitNets with its regressor), the main training starts from its weights
  without the method's term (and without the regressor)."""
  config = tiny_distill_config(method, teacher_workdir=teacher_dir, init_epochs=1)
  config.num_epochs = 1
  config.model.widen_factor = 2  # FSP: the teacher's channels at every point
  calls = []
  original = train_lib.train_and_evaluate

  def recording(cfg, workdir, **kwargs):
    calls.append((workdir, kwargs.get('stage', 'main'), kwargs.get('initial_variables')))
    return original(cfg, workdir, **kwargs)
  monkeypatch.setattr(train_lib, 'train_and_evaluate', recording)
  workdir = tmp_path / 'run'
  results = jobs.run(config, str(workdir))
  init_dir = workdir / train_lib.INIT_SUBDIR
  assert [(w, st) for w, st, _ in calls] == [(str(init_dir), 'init'), (str(workdir), 'main')]
  stage = teacher_lib.load_teacher(config.model, str(init_dir), SHAPE).variables
  jax.tree.map(np.testing.assert_array_equal, calls[1][2], stage)  # main starts from stage 1
  teacher = teacher_lib.load_teacher(config.distill.teacher_model, teacher_dir, SHAPE)
  initial = jax.device_get(train_lib.build_run(config, teacher=teacher).state.params)
  np.testing.assert_array_equal(stage['params']['classifier']['kernel'],
                                initial['classifier']['kernel'])  # frozen in stage 1
  assert not np.array_equal(stage['params']['stem']['kernel'], initial['stem']['kernel'])
  term = method.removeprefix('kd_')
  init_rows = [json.loads(line) for line in open(init_dir / 'metrics.jsonl')]
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert any(f'train_{term}' in r for r in init_rows)
  assert not any(f'train_{term}' in r for r in rows)
  assert ('train_kd' in rows[0]) == method.startswith('kd_') and 'train_ce' in rows[0]
  with ocp.CheckpointManager(ckpt_lib.checkpoint_dir(str(workdir))) as manager:
    assert manager.restore(manager.latest_step()).get('connector') is None
  assert 'connector_params' not in results and results['test_top1_error'] < 0.9


@pytest.mark.parametrize('student, teacher, method', [
    ('darts', 'wrn', 'fitnet'), ('densenet_bc', 'darts', 'vid'), ('wrn', 'densenet_bc', 'cc'),
    ('darts', 'densenet_bc', 'crd')])
def test_learned_methods_fit_every_network_family(student, teacher, method):
  """Each family as student and as teacher: the connector is built for their points and
  embeddings and the training step traces (shapes only, no compile)."""
  nets = {'wrn': dict(depth=10, widen_factor=1), 'densenet_bc': dict(depth=10, growth_rate=4),
          'darts': dict(genotype='DARTS_V1', layers=3, init_channels=4)}
  config = tiny_distill_config(method)
  config.model = models_config(student, **nets[student])
  config.distill.teacher_model = models_config(teacher, **nets[teacher])
  validation.validate_distill_config(config)
  teacher_model = models.create_model(**config.distill.teacher_model)
  variables = models.init_variables(teacher_model, jax.random.key(0), SHAPE)
  run = train_lib.build_run(config, teacher=teacher_lib.Teacher(teacher_model, variables),
                            dataset=data_lib.load_dataset('digits'))
  assert run.connector_params > 0
  batch = run.data.batch('train', np.arange(32))
  _, metrics = jax.eval_shape(run.train_step, run.state, batch, run.teacher_variables)
  assert metrics[method].shape == () and metrics['loss'].shape == ()
