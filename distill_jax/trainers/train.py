"""The training loop: config -> data -> model -> jitted steps -> metrics, checkpoints, results.

:func:`train_and_evaluate` trains one network (optionally against a frozen teacher)
and resumes automatically from the latest complete checkpoint in ``workdir``; a
killed run repeats the uninterrupted one exactly. :func:`evaluate` scores the latest
checkpoint of a workdir.

Files in ``workdir``: ``config.json`` (the effective config and code version, written at
the first checkpoint), ``checkpoints/`` (orbax) with ``checksums/``, TensorBoard events,
``metrics.jsonl`` (one JSON object per log or eval point) and, at the end,
``results.json``; ``workdir.lock`` while a process trains there.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from distill_jax import data as data_lib
from distill_jax import models
from distill_jax import validation
from distill_jax.options import JobOptions
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop
from distill_jax.trainers import methods as methods_lib
from distill_jax.trainers import optim
from distill_jax.trainers import steps as steps_lib
from distill_jax.trainers import teacher as teacher_lib
from distill_jax.trainers import workdir as workdir_lib
from distill_jax.trainers.teacher import Teacher

TEACHER_SUBDIR = 'teacher'
INIT_SUBDIR = 'init_stage'  # a distillation's initialisation stage (FSP, FitNets)


@dataclasses.dataclass
class Run:
  """What a training run is built from; shared by training and evaluation."""
  config: ml_collections.ConfigDict
  mesh: Any
  data: data_lib.DeviceData
  model: Any
  state: steps_lib.TrainState
  train_step: Any
  eval_step: Any
  teacher_variables: Any
  steps_per_epoch: int
  num_train_steps: int
  num_params: int
  connector_params: int  # of the method's learned part (0 without one)


def build_run(config: ml_collections.ConfigDict, *, teacher: Teacher | None = None,
              dataset: data_lib.Dataset | None = None,
              initial_variables: dict | None = None, stage: str = 'main') -> Run:
  """Validates the config, loads data, builds the model, state and jitted steps.

  ``initial_variables`` (``{'params', 'batch_stats'}``, e.g. a grown network's) replace
  the random initialisation; their shapes must fit ``config.model``. ``stage='init'``:
  a distillation's initialisation stage (:func:`init_stage_config`): the method's loss
  alone, the classifiers frozen.
  """
  validation.validate_train_config(config)
  mesh = data_lib.make_mesh(config.num_devices)
  validation.check_batch_divides(config.batch_size, mesh.size)
  validation.check_batch_divides(config.eval_batch_size, mesh.size, 'eval_batch_size')
  if dataset is None:
    dataset = data_lib.load_dataset(config.data.name, data_dir=config.data.data_dir or None,
                                    validation_fraction=config.data.validation_fraction)
  num_train = len(dataset.train_labels)
  if config.batch_size > num_train:
    raise validation.ConfigError(
        f'config.batch_size={config.batch_size} is invalid: the training split has only '
        f'{num_train} examples')
  steps_per_epoch = num_train // config.batch_size
  num_train_steps = steps_per_epoch * config.num_epochs

  # Mixed precision: activations in compute_dtype, parameters and optimizer in float32.
  model = models.create_model(**config.model, dtype=models.compute_dtype(config.compute_dtype))
  input_shape = (1, *dataset.image_shape)
  if initial_variables is None:
    variables = models.init_variables(model, jax.random.PRNGKey(config.seed), input_shape)
  else:
    teacher_lib.check_variables_match(models.param_shapes(model, input_shape), initial_variables,
                                      source='initial_variables')
    variables = initial_variables
  schedule = optim.make_schedule(config.optimizer, steps_per_epoch=steps_per_epoch,
                                 num_train_steps=num_train_steps)
  tx = optim.make_optimizer(config.optimizer, schedule)
  if stage == 'init':
    tx = optim.freeze_modules(tx, methods_lib.INIT_FROZEN)
  connector_model = methods_lib.make_connector(config.distill, stage) if teacher else None
  connector = memory = None
  if connector_model is not None:
    connector = methods_lib.init_connector(
        connector_model, jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), model,
        teacher.model, input_shape)
    if methods_lib.has_memory(config.distill.method):
      memory = methods_lib.init_memory(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2),
                                       dataset.train_labels, mesh.size)
  host_state = steps_lib.create_train_state(variables, tx, config.seed, connector=connector,
                                            memory=memory)
  shardings = steps_lib.state_shardings(host_state, mesh)
  state = steps_lib.place_state(host_state, shardings)
  train_step, eval_step = steps_lib.compile_steps(
      mesh=mesh, model=model, tx=tx, schedule=schedule,
      augment=steps_lib.make_augment(config.data, dataset.mean, dataset.std),
      normalize=steps_lib.make_normalize(dataset.mean, dataset.std),
      loss_fn=steps_lib.make_loss(config.get('distill') if teacher else None, steps_per_epoch,
                                  stage),
      drop_path=optim.make_drop_path_schedule(config.drop_path_prob,
                                              steps_per_epoch=steps_per_epoch,
                                              num_epochs=config.num_epochs),
      aux_weight=config.aux_weight, teacher_model=teacher.model if teacher else None,
      embeddings=bool(teacher) and methods_lib.reads(config.distill.method) == 'embedding',
      connector_model=connector_model,
      state_sharding=shardings)
  return Run(config=config, mesh=mesh, data=data_lib.DeviceData.create(dataset, mesh),
             model=model, state=state, train_step=train_step, eval_step=eval_step,
             teacher_variables=data_lib.replicate(teacher.variables, mesh) if teacher else None,
             steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps,
             num_params=models.count_params(variables['params']),
             connector_params=models.count_params(connector['params']) if connector else 0)


def evaluate_split(run: Run, state: steps_lib.TrainState, split: str = 'test') -> dict[str, float]:
  """Loss and top-1/top-5 error (fractions) over a whole split."""
  return data_lib.mean_over_split(
      run.data, split, run.config.eval_batch_size,
      lambda batch: run.eval_step(state, batch, run.teacher_variables))


def evaluate_splits(run: Run, state: steps_lib.TrainState) -> dict[str, float]:
  """:func:`evaluate_split` on the test split and, when there is one, the validation split."""
  values = evaluate_split(run, state, 'test')
  if run.data.num_examples('val'):
    values.update(evaluate_split(run, state, 'val'))
  return values


def _finished(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, loop.RESULTS_FILE)
  return loop.read_json(path) if os.path.exists(path) else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       teacher: Teacher | None = None,
                       initial_variables: dict | None = None,
                       stage: str = 'main') -> dict[str, Any]:
  """Trains ``config.model`` on ``config.data``; resumes from ``workdir``; returns results.

  With ``teacher``, the student learns under ``config.distill`` against the frozen
  teacher, which is not checkpointed (it is loaded again on resume). The workdir is
  locked while training, and its recorded config must match (:mod:`workdir
  <distill_jax.trainers.workdir>`); a finished run with the same config is not redone.
  SIGTERM or SIGINT save a checkpoint after the step in flight and raise
  :class:`~distill_jax.trainers.loop.Stopped`. ``stage``: as :func:`build_run`.
  """
  start_time = time.time()
  workdir = workdir_lib.prepare(workdir)
  with workdir_lib.Lock(workdir):
    changes = workdir_lib.check_config(workdir, config)
    done = _finished(workdir)
    if done is not None and changes == []:
      logging.info('%s has finished already with this config (test top-1 error %.2f%%); '
                   'nothing to do.', workdir, 100 * done.get('test_top1_error', float('nan')))
      return done
    run = build_run(config, teacher=teacher, initial_variables=initial_variables, stage=stage)
    return _train(run, workdir, start_time, finished=done)


def _train(run: Run, workdir: str, start_time: float, *, finished: dict | None) -> dict[str, Any]:
  config = run.config
  saves = workdir_lib.Saves(workdir, config)
  state, restored_step = saves.restore(run.state)
  first_step = int(jax.device_get(state.step))
  if restored_step is not None:
    logging.info('Resumed from %s at step %d.', ckpt_lib.checkpoint_dir(workdir), first_step)
  if finished is not None and first_step >= run.num_train_steps:
    workdir_lib.record_config(workdir, config)
    logging.info('%s has finished its %d steps; the changed fields train nothing more.',
                 workdir, run.num_train_steps)
    saves.close()
    return finished

  writer = loop.create_writer(workdir, resume_step=restored_step,
                              progress=loop.Progress('step', run.num_train_steps, first_step))
  if first_step == 0:
    writer.write_hparams(loop.flatten(config.to_dict()))
  cadence = loop.Cadence(run.num_train_steps, log_every=config.log_every_steps,
                         eval_every=config.eval_every_steps or run.steps_per_epoch,
                         save_every=config.checkpoint_every_steps)
  learned = (f', and {loop.count(run.connector_params, "parameter")} of '
             f'{config.distill.method}\'s learned part' if run.connector_params else '')
  logging.info('Training %s (%s%s) on %s for %s over %s.', config.model.name,
               loop.count(run.num_params, 'parameter'), learned, config.data.name,
               loop.count(run.num_train_steps, 'step'), loop.count(run.mesh.size, 'device'))

  pending = loop.PendingMetrics(first_step, finite_keys=('loss', 'param_norm'),
                                hint='lower optimizer.learning_rate (and allow it with '
                                '--config.allow_resume_changes=optimizer.learning_rate) or '
                                'check the data')
  train_seconds = 0.0
  final = None
  with saves:
    for step in range(first_step + 1, run.num_train_steps + 1):
      t0 = time.time()
      idx = data_lib.train_indices(config.seed, step - 1,
                                   num_examples=run.data.num_examples('train'),
                                   batch_size=config.batch_size)
      state, metrics = run.train_step(state, run.data.batch('train', idx), run.teacher_variables)
      pending.add(step, metrics)
      train_seconds += time.time() - t0

      save = saves.due(cadence, step)
      if cadence.log(step) or save:
        pending.check_finite(saves.last_saved)
      if cadence.log(step) or saves.stopping:
        values = pending.summary(step, prefix='train_')
        writer.write_scalars(step, {**values, 'epoch': step / run.steps_per_epoch})
      if cadence.eval(step):
        values = evaluate_splits(run, state)
        writer.write_scalars(step, values)
        final = values if cadence.is_last(step) else None
      if save:
        saves.save(step, state)
      saves.stop_if_asked(step, writer)
  writer.close()

  if final is None:  # nothing left to train: the workdir already held the last step
    final = evaluate_splits(run, state)
  workdir_lib.record_config(workdir, config)
  results = loop.write_results(workdir, {
      **final, 'num_params': run.num_params,
      **({'connector_params': run.connector_params} if run.connector_params else {}),
      'steps': run.num_train_steps, 'epochs': config.num_epochs, 'resumed_from_step': restored_step,
      'wall_time_s': time.time() - start_time, 'train_step_seconds': train_seconds,
      'num_devices': run.mesh.size, 'config': config.to_dict()}, start_time=start_time)
  saves.close()
  return results


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             teacher: Teacher | None = None) -> dict[str, Any]:
  """Scores the latest checkpoint in ``workdir`` on the test split (and val, if any);
  refuses a workdir recorded under another config."""
  workdir = workdir_lib.prepare(workdir)
  workdir_lib.check_config(workdir, config)
  if ckpt_lib.latest_step(workdir) is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt_lib.checkpoint_dir(workdir)} to evaluate')
  run = build_run(config, teacher=teacher)
  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
  state, step = ckpt_lib.restore_latest(manager, run.state, workdir, move_rejected=False)
  manager.close()
  results = {'step': step, 'num_params': run.num_params, **evaluate_splits(run, state)}
  if jax.process_index() == 0:
    loop.write_json(os.path.join(workdir, 'eval_results.json'), results)
  return results


# ---------------------------------------------------------------------------
# The job interface (config.job = 'train' or 'distill').


def validate(config: ml_collections.ConfigDict) -> None:
  """The checks of a training config (with a ``distill`` section: a distillation config)."""
  if 'distill' in config:
    validation.validate_distill_config(config)
  else:
    validation.validate_train_config(config)
  validation.check_workdir_fields(config)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config that trains ``config``'s teacher: same data and recipe, the teacher's model."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.job = 'train'
    c.model = copy.deepcopy(config.distill.teacher_model)
    del c['distill']
  return c


def init_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of a distillation's initialisation stage (``distill.init_epochs > 0``):
  ``init_epochs`` epochs at the constant ``optimizer.learning_rate`` with a fresh SGD of
  the same momentum and weight decay, as RepDistiller's ``helper/pretrain.py``; the rest
  as ``config``. It trains in ``WORKDIR/init_stage`` with ``stage='init'``."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.num_epochs = config.distill.init_epochs
    c.optimizer.schedule = 'constant'
  return c


def load_run_teacher(config: ml_collections.ConfigDict, workdir: str, *,
                     train_missing: bool = True) -> Teacher | None:
  """The frozen teacher of a distillation config (``None`` for ``method='none'``).

  It comes from ``distill.teacher_workdir``; when that is empty it is first trained (or
  resumed, or found finished) in ``WORKDIR/teacher`` with the same recipe.
  """
  if 'distill' not in config or config.distill.method == 'none':
    return None
  teacher_dir = config.distill.teacher_workdir
  if not teacher_dir:
    teacher_dir = os.path.join(workdir, TEACHER_SUBDIR)
    if train_missing:
      train_and_evaluate(teacher_config(config), teacher_dir)
  shape = (1, *data_lib.dataset_info(config.data.name, config.data.data_dir or None)[1])
  teacher = teacher_lib.load_teacher(config.distill.teacher_model, teacher_dir, shape,
                                     dtype=models.compute_dtype(config.compute_dtype),
                                     allow_unfinished=config.distill.teacher_allow_unfinished)
  logging.info('Teacher %s loaded from %s.', config.distill.teacher_model.name, teacher.source)
  return teacher


def run(config: ml_collections.ConfigDict, workdir: str,
        options: JobOptions = JobOptions()) -> dict[str, Any]:
  """Trains (``mode='train'``, resuming) or scores (``'evaluate'``, ``'report'``) one network,
  against its frozen teacher when the config distils; with ``distill.init_epochs``, its
  initialisation stage first (in ``WORKDIR/init_stage``, resumed or found finished like
  any run), the main training then starting from its weights."""
  validate(config)
  if options.num_shards > 1:
    raise validation.ConfigError(
        f'--shard={options.shard}/{options.num_shards} is invalid for config.job={config.job!r}: '
        'a training run is one run; shard the grid or the pipeline instead')
  teacher = load_run_teacher(config, workdir, train_missing=options.mode == 'train')
  if options.mode != 'train':
    return evaluate(config, workdir, teacher=teacher)
  initial_variables = None
  if teacher is not None and methods_lib.has_init_stage(config.distill):
    init_dir = os.path.join(workdir, INIT_SUBDIR)
    train_and_evaluate(init_stage_config(config), init_dir, teacher=teacher, stage='init')
    shape = (1, *data_lib.dataset_info(config.data.name, config.data.data_dir or None)[1])
    initial_variables = teacher_lib.load_teacher(config.model, init_dir, shape,
                                                 role='initialisation stage').variables
    logging.info('Initialisation stage done in %s; training from its weights.', init_dir)
  return train_and_evaluate(config, workdir, teacher=teacher,
                            initial_variables=initial_variables)
