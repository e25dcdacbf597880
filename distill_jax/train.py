"""The training loop: config -> data -> model -> jitted steps -> metrics, checkpoints, results.

:func:`train_and_evaluate` trains one network (optionally against a frozen teacher)
and resumes automatically from the latest complete checkpoint in ``workdir``; a
killed run repeats the uninterrupted one exactly. :func:`evaluate` scores the latest
checkpoint of a workdir.

Files in ``workdir``: ``checkpoints/`` (orbax), TensorBoard events, ``metrics.jsonl``
(one JSON object per log or eval point) and, at the end, ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from typing import Any

from absl import logging
from clu import metric_writers, periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distill_jax import checkpoint as ckpt_lib
from distill_jax import data as data_lib
from distill_jax import models
from distill_jax import optim
from distill_jax import steps as steps_lib
from distill_jax import teacher as teacher_lib
from distill_jax.teacher import Teacher
from distill_jax import validation

RESULTS_FILE = 'results.json'
METRICS_FILE = 'metrics.jsonl'


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; no checkpoint of the diverged state was written."""


def versions() -> dict[str, str]:
  import flax, optax, orbax.checkpoint  # pylint: disable=g-import-not-at-top,multiple-imports
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__') else jax.__version__,
          'flax': flax.__version__, 'optax': optax.__version__,
          'orbax_checkpoint': orbax.checkpoint.__version__, 'numpy': np.__version__,
          'backend': jax.default_backend(), 'devices': str(jax.devices()[0].device_kind)}


def step_config(config: ml_collections.ConfigDict, dataset: data_lib.Dataset,
                steps_per_epoch: int) -> steps_lib.StepConfig:
  distill = config.get('distill') or {}
  return steps_lib.StepConfig(
      mean=tuple(dataset.mean), std=tuple(dataset.std), crop_padding=config.data.crop_padding,
      flip=config.data.flip, cutout=config.data.cutout, pad_mode=config.data.pad_mode,
      method=distill.get('method', 'none'), alpha=distill.get('alpha', 0.9),
      temperature=distill.get('temperature', 4.0), beta=distill.get('beta', 1e3),
      at_form=distill.get('at_form', 'released'), aux_weight=config.get('aux_weight', 0.0),
      drop_path_prob=config.get('drop_path_prob', 0.0), steps_per_epoch=steps_per_epoch,
      num_epochs=config.num_epochs)


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


def build_run(config: ml_collections.ConfigDict, *, teacher: Teacher | None = None,
              dataset: data_lib.Dataset | None = None,
              initial_variables: dict | None = None) -> Run:
  """Validates the config, loads data, builds the model, state and jitted steps.

  ``initial_variables`` (``{'params', 'batch_stats'}``, e.g. a grown network's) replace
  the random initialisation; their shapes must fit ``config.model``.
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
  model = models.create_model(**config.model,
                              dtype=models.compute_dtype(config.get('compute_dtype', 'float32')))
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
  state = data_lib.replicate(steps_lib.create_train_state(variables, tx, config.seed), mesh)
  train_step, eval_step = steps_lib.compile_steps(
      mesh=mesh, model=model, tx=tx, schedule=schedule,
      cfg=step_config(config, dataset, steps_per_epoch),
      teacher_model=teacher.model if teacher else None)
  return Run(config=config, mesh=mesh, data=data_lib.DeviceData.create(dataset, mesh),
             model=model, state=state, train_step=train_step, eval_step=eval_step,
             teacher_variables=data_lib.replicate(teacher.variables, mesh) if teacher else None,
             steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps,
             num_params=models.count_params(variables['params']))


def evaluate_split(run: Run, state: steps_lib.TrainState, split: str = 'test') -> dict[str, float]:
  """Loss and top-1/top-5 error (fractions) over a whole split."""
  return data_lib.mean_over_split(
      run.data, split, run.config.eval_batch_size,
      lambda batch: run.eval_step(state, batch, run.teacher_variables))


def _check_finite(pending: list[tuple[int, dict]], last_good: int) -> None:
  """Raises if a pending step's loss or updated parameters are not finite, naming the steps."""
  if not pending:
    return
  values = jax.device_get([(m['loss'], m['param_norm']) for _, m in pending])
  for (step, _), (loss, param_norm) in zip(pending, values):
    if not (math.isfinite(float(loss)) and math.isfinite(float(param_norm))):
      what = f'loss is {float(loss)}' if not math.isfinite(float(loss)) else (
          f'parameter norm is {float(param_norm)}')
      raise NonFiniteLossError(
          f'{what} at step {step} (steps {pending[0][0]}-{pending[-1][0]} checked; last '
          f'checkpointable state: step {last_good}); lower optimizer.learning_rate or check '
          'the data. No checkpoint of the diverged state was written.')


def mean_metrics(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """The mean over the pending steps' (device) metric dicts, as Python floats."""
  host = jax.device_get([m for _, m in pending])
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


class JsonlWriter:
  """Appends one JSON object per line; process 0 only."""

  def __init__(self, path: str):
    self._path = path if jax.process_index() == 0 else None

  def write(self, step: int, values: dict[str, float]) -> None:
    if self._path:
      with open(self._path, 'a') as f:
        f.write(json.dumps({'step': step, **values}) + '\n')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       teacher: Teacher | None = None,
                       initial_variables: dict | None = None) -> dict[str, Any]:
  """Trains ``config.model`` on ``config.data``; resumes from ``workdir``; returns results.

  With ``teacher``, the student learns under ``config.distill`` against the frozen
  teacher, which is not checkpointed (it is loaded again on resume).
  """
  start_time = time.time()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  run = build_run(config, teacher=teacher, initial_variables=initial_variables)
  os.makedirs(workdir, exist_ok=True)

  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
  state, restored_step = ckpt_lib.restore_latest(manager, run.state)
  first_step = int(jax.device_get(state.step))
  if restored_step is not None:
    logging.info('Resumed from %s at step %d.', ckpt_lib.checkpoint_dir(workdir), first_step)

  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                asynchronous=False)
  jsonl = JsonlWriter(os.path.join(workdir, METRICS_FILE))
  if first_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  progress = periodic_actions.ReportProgress(num_train_steps=run.num_train_steps, writer=writer,
                                             every_steps=config.log_every_steps)
  eval_every = config.eval_every_steps or run.steps_per_epoch
  logging.info('Training %s (%d parameters) on %s for %d steps over %d devices.',
               config.model.name, run.num_params, config.data.name, run.num_train_steps,
               run.mesh.size)

  pending: list[tuple[int, dict]] = []  # metrics of steps not yet logged
  last_saved = first_step
  train_seconds = 0.0
  final = None
  window = (time.time(), first_step)  # for steps/s between log points
  try:
    for step in range(first_step + 1, run.num_train_steps + 1):
      t0 = time.time()
      idx = data_lib.train_indices(config.seed, step - 1, num_examples=run.data.num_examples('train'),
                                   batch_size=config.batch_size)
      state, metrics = run.train_step(state, run.data.batch('train', idx), run.teacher_variables)
      # Keep at most one step in flight: bounded memory, and no collective rendezvous
      # timeouts with many fake CPU devices.
      if pending:
        jax.block_until_ready(pending[-1][1]['loss'])
      pending.append((step, metrics))
      train_seconds += time.time() - t0
      progress(step)

      is_last = step == run.num_train_steps
      save_now = is_last or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
      if step % config.log_every_steps == 0 or is_last or save_now:
        _check_finite(pending, last_saved)
        if step % config.log_every_steps == 0 or is_last:
          values = {f'train_{k}': v for k, v in mean_metrics(pending).items()}
          values['epoch'] = step / run.steps_per_epoch
          values['steps_per_sec'] = (step - window[1]) / max(time.time() - window[0], 1e-9)
          window = (time.time(), step)
          writer.write_scalars(step, values)
          jsonl.write(step, values)
          pending.clear()
      if step % eval_every == 0 or is_last:
        values = evaluate_split(run, state, 'test')
        if run.data.num_examples('val'):
          values.update(evaluate_split(run, state, 'val'))
        writer.write_scalars(step, values)
        jsonl.write(step, values)
        final = values if is_last else None
      if save_now:
        manager.save(step, args=ckpt_lib.ocp.args.StandardSave(state))
        last_saved = step
  finally:  # a failed run still completes the (finite) saves it began
    manager.wait_until_finished()
  writer.flush()

  if final is None:  # nothing left to train: the workdir already held the last step
    final = evaluate_split(run, state, 'test')
    if run.data.num_examples('val'):
      final.update(evaluate_split(run, state, 'val'))
  results = {
      **final, 'num_params': run.num_params,
      'steps': run.num_train_steps, 'epochs': config.num_epochs, 'resumed_from_step': restored_step,
      'wall_time_s': time.time() - start_time, 'train_step_seconds': train_seconds,
      'num_devices': run.mesh.size, 'num_processes': jax.process_count(),
      'versions': versions(), 'config': config.to_dict()}
  if is_main:
    _write_json(os.path.join(workdir, RESULTS_FILE), results)
  manager.close()
  return results


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             teacher: Teacher | None = None) -> dict[str, Any]:
  """Scores the latest checkpoint in ``workdir`` on the test split (and val, if any)."""
  run = build_run(config, teacher=teacher)
  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
  state, step = ckpt_lib.restore_latest(manager, run.state)
  manager.close()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt_lib.checkpoint_dir(workdir)} to evaluate')
  results = {'step': step, 'num_params': run.num_params, **evaluate_split(run, state, 'test')}
  if run.data.num_examples('val'):
    results.update(evaluate_split(run, state, 'val'))
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'eval_results.json'), results)
  return results


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
