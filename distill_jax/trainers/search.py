r"""DARTS architecture search (Liu, Simonyan & Yang 2019): the job, its loop and its files.

The step itself — the architecture gradient of Algorithm 1 and the weight step, built
once from the config — is :mod:`distill_jax.trainers.search_step`; this module checks the config,
runs the steps (the release's ``cnn/train_search.py``), evaluates the supernet every
epoch and writes what a search leaves.

Files in ``workdir``: ``checkpoints/`` (orbax; the whole :class:`SearchState`, alphas and
their Adam state included), TensorBoard events (the scalars, and the pictures as images in
an ``*.images`` event file), ``metrics.jsonl``, ``genotype.json`` (rewritten every epoch)
and ``genotypes.jsonl`` (one line per epoch: step, epoch, genotype and the softmax of the
alphas, ``alphas_softmax``), and at the end ``alphas.png``, ``alphas_history.png`` (the
softmax weights over the epochs), ``normal_cell.png``, ``reduce_cell.png`` and
``results.json``.

Job interface: :func:`validate` (the config checks, before any compute) and :func:`run`
(``mode='train'`` searches, resuming; ``'evaluate'`` scores the latest checkpoint's
supernet on the validation half and prints its genotype; ``'report'`` rewrites
``genotype.json`` and the pictures from the latest checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from distill_jax import data as data_lib
from distill_jax import genotypes as genotypes_lib
from distill_jax import validation
from distill_jax.genotypes import Genotype
from distill_jax.models import darts_ops
from distill_jax.options import JobOptions
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop
from distill_jax.trainers import search_plots
from distill_jax.trainers import workdir as workdir_lib
from distill_jax.trainers.search_step import (HESSIANS, ORDERS, VAL_SEED_OFFSET, SearchSetup, SearchState,
                                     alpha_weights, compile_search_steps, create_search_state,
                                     derive_genotype)

GENOTYPE_FILE = 'genotype.json'
GENOTYPE_HISTORY_FILE = 'genotypes.jsonl'


# ---------------------------------------------------------------------------
# Config.


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`~distill_jax.validation.ConfigError` (one line) for the first impossible
  value of a search config; runs before any compute."""
  validation.check_dataset(config)
  validation.check_seed(config)
  validation.check_workdir_fields(config)
  validation.check_int(config, 'order', 1)
  validation.check_choice(config, 'order', ORDERS)
  validation.check_choice(config, 'hessian', HESSIANS)
  validation.check_int(config, 'model.layers', 3)
  validation.check_int(config, 'model.init_channels', 2)
  validation.check_int(config, 'model.stem_multiplier', 1)
  validation.check_int(config, 'model.num_classes', 2)
  classes, _ = data_lib.dataset_info(config.data.name, config.data.data_dir or None)
  if config.model.num_classes != classes:
    validation.fail('model.num_classes', config.model.num_classes,
                    f'dataset {config.data.name!r} has {classes} classes')
  validation.check_choice(config, 'model.impl', darts_ops.IMPLS)
  fraction = config.data.validation_fraction
  if not (validation.is_finite_number(fraction) and 0.0 < fraction < 1.0):
    validation.fail('data.validation_fraction', fraction,
                    'must be in (0, 1): the search needs both halves (the paper uses 0.5)')
  validation.check_augmentation(config)
  for field in ('num_epochs', 'batch_size', 'eval_batch_size', 'log_every_steps',
                'keep_checkpoints'):
    validation.check_int(config, field, 1)
  validation.check_int(config, 'checkpoint_every_steps', 0)
  validation.check_devices(config)
  for field in ('optimizer.learning_rate', 'arch.learning_rate', 'arch.fd_epsilon'):
    validation.check_positive(config, field)
  for field in ('optimizer.final_learning_rate', 'optimizer.momentum', 'optimizer.weight_decay',
                'optimizer.grad_clip_norm', 'arch.weight_decay'):
    validation.check_non_negative(config, field)
  validation.check_choice(config, 'optimizer.schedule', ('constant', 'cosine'))
  if config.optimizer.final_learning_rate > config.optimizer.learning_rate:
    validation.fail('optimizer.final_learning_rate', config.optimizer.final_learning_rate,
                    f'must be <= optimizer.learning_rate={config.optimizer.learning_rate}')
  for field in ('arch.b1', 'arch.b2'):
    validation.check_range(config, field, 0, 1, closed='[)')
  for field in ('arch.reuse_train_grad', 'arch.phase_scan', 'plot_every_epoch'):
    validation.check_bool(config, field)


# ---------------------------------------------------------------------------
# The search loop.


def _append_jsonl(path: str, obj: dict) -> None:
  """One JSON line appended to ``path`` (``genotypes.jsonl``: not scalars, so not through
  the metric writer)."""
  with open(path, 'a') as f:
    f.write(json.dumps(obj) + '\n')


def evaluate_val(data: data_lib.DeviceData, evaluate: Callable, state: SearchState,
                 batch_size: int) -> dict[str, float]:
  """Inference-mode loss and top-1 error of the supernet over the whole validation half."""
  return data_lib.mean_over_split(data, 'val', batch_size, lambda batch: evaluate(state, batch))


def _write_genotype(workdir: str, alphas: Any, *, plots: bool = True, epoch: float | None = None,
                    step: int | None = None,
                    images: search_plots.TensorBoardImages | None = None) -> Genotype:
  """Derives the genotype of ``alphas``; writes ``genotype.json`` and the pictures
  (process 0), the alphas over the epochs from ``genotypes.jsonl``; with ``images``, the
  pictures also as TensorBoard images at ``step``."""
  alphas = jax.device_get(alphas)
  genotype = derive_genotype(alphas)
  if jax.process_index() == 0:
    genotypes_lib.save_genotype(os.path.join(workdir, GENOTYPE_FILE), genotype)
    if plots:
      history = search_plots.read_alpha_history(os.path.join(workdir, GENOTYPE_HISTORY_FILE))
      thumbnails = search_plots.write_search_plots(
          workdir, alpha_weights(alphas), genotype, epoch=epoch, step=step, history=history,
          thumbnails=images is not None)
      if images is not None:
        images.write_images(step, thumbnails)
  return genotype


def _epoch_outputs(workdir: str, state: SearchState, step: int, epoch: float, plots: bool,
                   images: search_plots.TensorBoardImages | None = None) -> Genotype:
  """The epoch's genotype: a ``genotypes.jsonl`` line (with the softmax of the alphas, for
  the alphas-over-epochs plot), ``genotype.json``, pictures (and images) if asked."""
  alphas = jax.device_get(state.alphas)
  if jax.process_index() == 0:
    _append_jsonl(os.path.join(workdir, GENOTYPE_HISTORY_FILE),
                  {'step': step, 'epoch': epoch,
                   'genotype': genotypes_lib.genotype_to_json(derive_genotype(alphas)),
                   'alphas_softmax': {k: v.round(5).tolist()
                                      for k, v in alpha_weights(alphas).items()}})
  return _write_genotype(workdir, alphas, plots=plots, epoch=epoch, step=step,
                         images=images if plots else None)


@dataclasses.dataclass
class _Search:
  """A search's data, compiled steps and fresh state on its mesh."""
  dataset: data_lib.Dataset
  data: data_lib.DeviceData
  mesh: Mesh
  setup: SearchSetup
  step_fn: Callable
  eval_fn: Callable
  state: SearchState
  num_params: int
  steps_per_epoch: int


def _prepare(config: ml_collections.ConfigDict) -> _Search:
  """Loads the halves and builds the steps and the step-0 state of a validated config."""
  mesh = data_lib.make_mesh(config.num_devices)
  validation.check_batch_divides(config.batch_size, mesh.size)
  validation.check_batch_divides(config.eval_batch_size, mesh.size, 'eval_batch_size')
  dataset = data_lib.load_dataset(config.data.name, data_dir=config.data.data_dir or None,
                                  validation_fraction=config.data.validation_fraction)
  num_train, num_val = len(dataset.train_labels), len(dataset.val_labels)
  if config.batch_size > min(num_train, num_val):
    validation.fail('batch_size', config.batch_size,
                    f'the halves have only {num_train} (weights) and {num_val} (alphas) examples')
  setup, step_fn, eval_fn = compile_search_steps(config, mesh, dataset)
  state = create_search_state(setup, config.seed, (1, *dataset.image_shape))
  num_params = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
  return _Search(dataset=dataset, data=data_lib.DeviceData.create(dataset, mesh), mesh=mesh,
                 setup=setup, step_fn=step_fn, eval_fn=eval_fn,
                 state=data_lib.replicate(state, mesh), num_params=num_params,
                 steps_per_epoch=num_train // config.batch_size)


def run_search(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) a DARTS search in ``workdir``; returns the results dict.

  The config is validated before anything is computed. The search resumes from the
  latest complete checkpoint in ``workdir`` and repeats the uninterrupted run exactly
  (batches and augmentation are functions of ``(seed, step)``).
  """
  start_time = time.time()
  validate(config)
  workdir = workdir_lib.prepare(workdir)
  with workdir_lib.Lock(workdir):
    changes = workdir_lib.check_config(workdir, config)
    results_path = os.path.join(workdir, loop.RESULTS_FILE)
    if changes == [] and os.path.exists(results_path):
      logging.info('%s has finished its search already with this config; nothing to do.',
                   workdir)
      return loop.read_json(results_path)
    return _search(config, workdir, start_time)


def _search(config: ml_collections.ConfigDict, workdir: str, start_time: float) -> dict[str, Any]:
  s = _prepare(config)
  num_train, num_val = len(s.dataset.train_labels), len(s.dataset.val_labels)
  cadence = loop.Cadence(s.steps_per_epoch * config.num_epochs, config.log_every_steps,
                         eval_every=s.steps_per_epoch, save_every=config.checkpoint_every_steps)

  saves = workdir_lib.Saves(workdir, config)
  state, restored_step = saves.restore(s.state)
  first_step = int(jax.device_get(state.step))
  if restored_step is not None:
    logging.info('Resumed the search from %s at step %d.', ckpt_lib.checkpoint_dir(workdir),
                 first_step)
  writer = loop.create_writer(workdir, resume_step=restored_step,
                              progress=loop.Progress('search step', cadence.num_steps, first_step))
  # The pictures as TensorBoard images (process 0), each time they are drawn.
  purge = None if restored_step is None else restored_step + 1
  images = search_plots.TensorBoardImages(workdir, purge) if jax.process_index() == 0 else None
  logging.info('DARTS search (order %d%s): supernet %d cells, C=%d, %s, on %s, %s over %s.',
               config.order, f', {config.hessian} hessian' if config.order == 2 else '',
               config.model.layers, config.model.init_channels,
               loop.count(s.num_params, 'parameter'), config.data.name,
               loop.count(cadence.num_steps, 'step'), loop.count(s.mesh.size, 'device'))

  pending = loop.PendingMetrics(first_step, finite_keys=('train_loss', 'param_norm', 'alpha_norm'),
                                hint='lower optimizer.learning_rate or arch.learning_rate (and '
                                'allow it with --config.allow_resume_changes)')
  step_seconds = 0.0
  final = None
  with saves:
    for step in range(first_step + 1, cadence.num_steps + 1):
      t0 = time.time()
      train_idx = data_lib.train_indices(config.seed, step - 1, num_examples=num_train,
                                         batch_size=config.batch_size)
      val_idx = data_lib.train_indices(config.seed + VAL_SEED_OFFSET, step - 1,
                                       num_examples=num_val, batch_size=config.batch_size)
      state, metrics = s.step_fn(state, s.data.batch('train', train_idx),
                                 s.data.batch('val', val_idx))
      pending.add(step, metrics)
      step_seconds += time.time() - t0

      epoch = step / s.steps_per_epoch
      save = saves.due(cadence, step)
      if cadence.log(step) or save:
        pending.check_finite(saves.last_saved)
      if cadence.log(step) or saves.stopping:
        writer.write_scalars(step, {**pending.summary(step), 'epoch': epoch})
      if cadence.eval(step):  # every epoch
        values = {**evaluate_val(s.data, s.eval_fn, state, config.eval_batch_size),
                  'epoch': epoch}
        genotype = _epoch_outputs(workdir, state, step, epoch, plots=config.plot_every_epoch,
                                  images=images)
        writer.write_scalars(step, values)
        logging.info('Step %d (epoch %.2f): val top-1 error %.4f; genotype %s', step, epoch,
                     values['val_top1_error'], genotype)
        if cadence.is_last(step):
          final = values
      if save:
        saves.save(step, state)
      saves.stop_if_asked(step, writer)
  writer.close()

  if final is None:  # nothing left to search: the workdir already held the last step
    final = evaluate_val(s.data, s.eval_fn, state, config.eval_batch_size)
  workdir_lib.record_config(workdir, config)
  genotype = _write_genotype(workdir, state.alphas, epoch=config.num_epochs, step=cadence.num_steps,
                             images=None if config.plot_every_epoch else images)
  if images is not None:
    images.close()
  results = loop.write_results(workdir, {
      'genotype': genotypes_lib.genotype_to_json(genotype),
      'val_top1_error': final['val_top1_error'], 'val_loss': final['val_loss'],
      'order': config.order, 'hessian': config.hessian if config.order == 2 else None,
      'reuse_train_grad': config.arch.reuse_train_grad if config.order == 2 else None,
      'alphas_softmax': {k: v.round(6).tolist() for k, v in alpha_weights(state.alphas).items()},
      'num_params': s.num_params, 'steps': cadence.num_steps, 'epochs': config.num_epochs,
      'resumed_from_step': restored_step, 'wall_time_s': time.time() - start_time,
      'search_step_seconds': step_seconds, 'num_devices': s.mesh.size,
      'config': config.to_dict()}, start_time=start_time)
  saves.close()
  return results


# ---------------------------------------------------------------------------
# The job interface.


def _no_checkpoint(workdir: str, mode: str) -> FileNotFoundError:
  return FileNotFoundError(f'no search checkpoint in {ckpt_lib.checkpoint_dir(workdir)} to '
                           f'{mode}; run the search first (--mode=train)')


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Scores the latest checkpoint's supernet (inference mode) on the validation half;
  returns ``{'step', 'val_loss', 'val_top1_error', 'genotype'}`` and prints the genotype."""
  workdir = workdir_lib.prepare(workdir)
  workdir_lib.check_config(workdir, config)
  if ckpt_lib.latest_step(workdir) is None:
    raise _no_checkpoint(workdir, 'evaluate')
  s = _prepare(config)
  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
  state, step = ckpt_lib.restore_latest(manager, s.state, workdir, move_rejected=False)
  manager.close()
  genotype = derive_genotype(state.alphas)
  results = {'step': step, **evaluate_val(s.data, s.eval_fn, state, config.eval_batch_size),
             'genotype': genotypes_lib.genotype_to_json(genotype)}
  logging.info('Step %d: val top-1 error %.4f; genotype %s', step, results['val_top1_error'],
               genotype)
  if jax.process_index() == 0:
    print(json.dumps(results['genotype']))
  return results


def report(workdir: str) -> dict[str, Any]:
  """Rewrites ``genotype.json`` and the pictures from the latest checkpoint's alphas;
  returns ``{'step', 'genotype'}``."""
  step = ckpt_lib.latest_step(workdir)
  if step is None:
    raise _no_checkpoint(workdir, 'report')
  alphas = ckpt_lib.restore_local(ckpt_lib.item_path(workdir, step))['alphas']
  genotype = _write_genotype(os.path.abspath(os.path.expanduser(workdir)), alphas, step=step)
  return {'step': step, 'genotype': genotypes_lib.genotype_to_json(genotype)}


def run(config: ml_collections.ConfigDict, workdir: str,
        options: JobOptions = JobOptions()) -> dict[str, Any]:
  """The search job: ``options.mode`` 'train' searches (resuming, :func:`run_search`),
  'evaluate' scores the latest checkpoint (:func:`evaluate`), 'report' rewrites its
  genotype and pictures (:func:`report`)."""
  validate(config)
  if options.num_shards > 1:
    raise validation.ConfigError(
        f'--shard={options.shard}/{options.num_shards} is invalid for '
        f'config.job={config.get("job", "darts_search")!r}: a search is one run')
  if options.mode == 'train':
    return run_search(config, workdir)
  if options.mode == 'evaluate':
    return evaluate(config, workdir)
  return report(workdir)
