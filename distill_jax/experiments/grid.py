"""The teacher × student grid (the paper's first table): its runs, their order, the report.

A grid workdir holds one workdir per run::

  teachers/<teacher>/seed<s>/           the teacher trained alone
  students/<student>/seed<s>/           the student with no teacher (the N/A rows)
  pairs/<teacher>__<student>/seed<s>/   the student distilled from that seed's teacher
                                        (pairs/<teacher>__<student>__<method>/ for each
                                        method of config.methods, when it sweeps them)
  report.md                             the table: mean ± std over seeds, teachers' own error
  report.csv, report_summary.csv        one row per finished run; the table's numbers

Every run is a copy of ``config.run`` with its model, seed and teacher
(:func:`distill_jax.experiments.runs.run_config`); DARTS runs also get ``config.darts_drop_path_prob``
(no other family has drop path). Every run resumes from its own checkpoints and a
finished one is skipped, so re-running the grid (or one shard of it) only does what is
missing.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import jax
import ml_collections

from distill_jax import config_lib
from distill_jax import data as data_lib
from distill_jax import validation
from distill_jax.experiments import runs
from distill_jax.options import JobOptions
from distill_jax.trainers import methods as methods_lib
from distill_jax.trainers import train
from distill_jax.trainers import workdir as workdir_lib


def _models(config: ml_collections.ConfigDict) -> dict[str, dict]:
  table = runs.network_table(config.demo_networks)
  classes, _ = data_lib.dataset_info(config.run.data.name, config.run.data.data_dir or None)
  return {key: {**table[key], 'num_classes': classes}
          for key in (*config.teachers, *config.students) if key in table}


def tasks(config: ml_collections.ConfigDict, workdir: str) -> list[runs.Task]:
  """Every run of the grid, teachers and lone students first (stage 0), then the pairs."""
  models = _models(config)

  def run_config(key, seed, **teacher):
    drop = config.darts_drop_path_prob if models[key]['name'] == 'darts' else 0.0
    return runs.run_config(config.run, model=models[key], seed=seed, drop_path_prob=drop,
                           allow_resume_changes=config.allow_resume_changes, **teacher)

  def task(name, path, cfg, **kwargs):
    return runs.Task(name=name, path=path, config=cfg,
                     compute=lambda: train.run(cfg, path), **kwargs)

  out = []
  for seed in config.seeds:
    for t in config.teachers:
      out.append(task(f'teacher {t} seed {seed}', os.path.join(workdir, 'teachers', t, f'seed{seed}'),
                      run_config(t, seed), teacher=runs.display_name(models[t]), seed=seed))
    for s in config.students:
      out.append(task(f'student {s} seed {seed}', os.path.join(workdir, 'students', s, f'seed{seed}'),
                      run_config(s, seed), teacher=runs.NO_TEACHER,
                      student=runs.display_name(models[s]), seed=seed, row=True))
  for seed in config.seeds:
    for t in config.teachers:
      teacher_dir = os.path.join(workdir, 'teachers', t, f'seed{seed}')
      for s in config.students:
        for method in config.methods or ('',):
          cfg = run_config(s, seed, teacher_model=models[t], teacher_workdir=teacher_dir)
          if method:
            config_lib.set_method(cfg.distill, method, demo=config.demo_networks)
          out.append(task(
              f'{t} -> {s}{f" by {method}" if method else ""} seed {seed}',
              os.path.join(workdir, 'pairs', f'{t}__{s}' + (f'__{method}' if method else ''),
                           f'seed{seed}'),
              cfg, needs=(teacher_dir,), teacher=runs.display_name(models[t]),
              student=runs.display_name(models[s]), seed=seed, row=True, method=method))
  # Every run is its own shard group: pairs wait for a teacher another shard trains.
  return [dataclasses.replace(t, group=i) for i, t in enumerate(out)]


def validate(config: ml_collections.ConfigDict) -> None:
  """The grid's own fields, then every run's config, before any compute."""
  validation.check_bool(config, 'demo_networks')
  validation.check_positive(config, 'shard_wait_timeout_s')
  validation.check_workdir_fields(config)
  table = runs.network_table(config.demo_networks)
  for field in ('teachers', 'students'):
    for key in config[field]:
      if key not in table:
        raise validation.ConfigError(
            f'config.{field} has {key!r}, not a known network; known: {", ".join(table)}')
    if len(set(config[field])) != len(config[field]):
      validation.fail(field, tuple(config[field]), 'each network at most once')
  validation.check_seeds(config)
  validation.check_choice(config, 'run.distill.method', methods_lib.NAMES)
  for method in config.methods:
    if method not in methods_lib.NAMES or method == 'none':
      validation.fail('methods', tuple(config.methods),
                      f'{method!r} is not a distillation method; allowed: '
                      f'{", ".join(m for m in methods_lib.NAMES if m != "none")}')
  if len(set(config.methods)) != len(config.methods):
    validation.fail('methods', tuple(config.methods), 'each method at most once')
  validation.check_range(config, 'darts_drop_path_prob', 0, 1)
  runs.validate_runs(tasks(config, '/'))


def notes(config: ml_collections.ConfigDict) -> list[str]:
  """The report's notes: with ``config.demo_networks``, that the networks are the demo
  stand-ins (named by their own sizes), not the paper's."""
  if not config.demo_networks:
    return []
  table = runs.network_table(True)
  named = ', '.join(f'{key} → {runs.display_name(table[key])} (paper: '
                    f'{runs.display_name(runs.network_table(False)[key])})'
                    for key in (*config.teachers, *config.students))
  return [f'Demo stand-ins (config.demo_networks=True): small networks of the paper\'s '
          f'families, named by their own sizes, not the paper\'s networks: {named}.']


_METHOD_TITLES = {'at': 'attention transfer', 'kd': 'knowledge distillation'}


def run(config: ml_collections.ConfigDict, workdir: str,
        options: JobOptions = JobOptions()) -> dict:
  """Trains this shard's missing runs (``mode='train'``), then writes the report of the
  finished runs: every mode of an unsharded job, or ``--mode=report`` (one shard of
  several never writes it: run ``--mode=report`` once every shard has finished)."""
  validate(config)
  workdir = workdir_lib.prepare(workdir)
  all_tasks = tasks(config, workdir)
  trained = []
  if options.mode == 'train':
    with workdir_lib.Lock(workdir, runs.lock_name(options.shard, options.num_shards)):
      runs.check_experiment(config, workdir, all_tasks, record=True)
      trained = runs.run_tasks(all_tasks, shard=options.shard, num_shards=options.num_shards,
                               wait_timeout_s=config.shard_wait_timeout_s)
  else:
    runs.check_experiment(config, workdir, all_tasks, record=False)
  if not runs.writes_report(options):
    logging.info('Shard %d/%d writes no report: run --mode=report once every shard has '
                 'finished.', options.shard, options.num_shards)
    return {'trained': trained, 'report': None, 'rows': []}
  report = os.path.join(workdir, runs.REPORT_FILE)
  if jax.process_index() == 0:
    method = config.run.distill.method
    title = ('Teacher × student × method' if config.methods else
             f'Teacher × student ({_METHOD_TITLES.get(method, method)})')
    markdown = runs.write_report(all_tasks, workdir, title=title,
                                 notes=notes(config))
    logging.info('Report written to %s:\n%s', report, markdown)
  return {'trained': trained, 'report': report, 'rows': runs.report_rows(all_tasks)}
