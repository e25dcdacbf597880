"""The teacher × student grid (the paper's first table): its runs, their order, the report.

A sweep workdir holds one workdir per run::

  teachers/<teacher>/seed<s>/           the teacher trained alone
  students/<student>/seed<s>/           the student with no teacher (the N/A rows)
  pairs/<teacher>__<student>/seed<s>/   the student distilled from that seed's teacher
  report.md, report.csv                 mean ± std over seeds

Every run resumes from its own checkpoints, and a run whose ``results.json`` exists is
skipped, so re-running a sweep (or one shard of it) only does what is missing.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import time
from typing import Callable, Iterable

from absl import logging
import ml_collections
import numpy as np

from distill_jax import config_lib
from distill_jax import train as train_lib

NO_TEACHER = 'N/A'


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of a sweep: where it lives, what it trains, what it waits for."""
  name: str
  workdir: str
  config: ml_collections.ConfigDict
  stage: int                 # 0: teachers and lone students; 1: distillation pairs
  teacher: str               # display name, or NO_TEACHER
  student: str
  seed: int
  needs: str = ''            # workdir whose results.json must exist first


def display_name(model: dict) -> str:
  """A network's name as the paper's tables print it, from its model config."""
  name = model['name']
  if name == 'wrn':
    return f'WRN-{model["depth"]}-{model["widen_factor"]}'
  if name == 'densenet_bc':
    return f'DenseNet-BC-{model["depth"]}-{model["growth_rate"]}'
  if name == 'darts':
    genotype = model['genotype'] if isinstance(model['genotype'], str) else 'DARTS'
    return f'{genotype}-{model["layers"]}'
  return name


def run_config(base: ml_collections.ConfigDict, model: dict, seed: int, *,
                method: str = 'none', teacher_model: dict | None = None,
                teacher_workdir: str = '') -> ml_collections.ConfigDict:
  c = config_lib.train_config()
  for key in ('data', 'optimizer'):
    c[key] = copy.deepcopy(base[key])
  for key in ('num_epochs', 'batch_size', 'eval_batch_size', 'log_every_steps',
              'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'num_devices',
              'compute_dtype'):
    c[key] = base[key]
  c.seed = seed
  c.model = ml_collections.ConfigDict(model)
  if model['name'] == 'darts':
    c.drop_path_prob = base.darts_drop_path_prob
  if method != 'none':
    config_lib.distill_fields(c, method=method)
    c.distill.update(base.distill.to_dict())
    c.distill.method = method
    c.distill.teacher_model = ml_collections.ConfigDict(teacher_model)
    c.distill.teacher_workdir = teacher_workdir
  c.lock()
  return c


def grid_runs(config: ml_collections.ConfigDict, workdir: str) -> list[RunSpec]:
  """Every run of the teacher × student grid, teachers and lone students first."""
  nets = config_lib.DEMO_NETWORKS if config.demo_networks else config_lib.NETWORKS
  classes = config.num_classes

  def model(key):
    return {**nets[key], 'num_classes': classes}

  runs = []
  for seed in config.seeds:
    for t in config.teachers:
      runs.append(RunSpec(
          name=f'teacher {t} seed {seed}', workdir=os.path.join(workdir, 'teachers', t, f'seed{seed}'),
          config=run_config(config, model(t), seed), stage=0, teacher=display_name(model(t)),
          student='', seed=seed))
    for s in config.students:
      runs.append(RunSpec(
          name=f'student {s} seed {seed}', workdir=os.path.join(workdir, 'students', s, f'seed{seed}'),
          config=run_config(config, model(s), seed), stage=0, teacher=NO_TEACHER,
          student=display_name(model(s)), seed=seed))
  for seed in config.seeds:
    for t in config.teachers:
      teacher_dir = os.path.join(workdir, 'teachers', t, f'seed{seed}')
      for s in config.students:
        runs.append(RunSpec(
            name=f'{t} -> {s} seed {seed}',
            workdir=os.path.join(workdir, 'pairs', f'{t}__{s}', f'seed{seed}'),
            config=run_config(config, model(s), seed, method=config.distill.method,
                               teacher_model=model(t), teacher_workdir=teacher_dir),
            stage=1, teacher=display_name(model(t)), student=display_name(model(s)), seed=seed,
            needs=teacher_dir))
  return runs


def is_done(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, train_lib.RESULTS_FILE))


def run_sweep(runs: list[RunSpec], execute: Callable[[ml_collections.ConfigDict, str], dict], *,
              shard: int = 0, num_shards: int = 1, wait_seconds: float = 30.0) -> list[str]:
  """Runs this shard's share of ``runs`` in order; returns the names it trained.

  Run ``i`` belongs to shard ``i % num_shards``. A run whose prerequisite (its
  teacher) is another shard's waits for that teacher's ``results.json``.
  """
  trained = []
  for i, run in enumerate(runs):
    if i % num_shards != shard or is_done(run.workdir):
      continue
    while run.needs and not is_done(run.needs):
      if num_shards == 1:
        raise RuntimeError(f'{run.name} needs {run.needs}, which has no results')
      logging.info('%s waits for %s', run.name, run.needs)
      time.sleep(wait_seconds)
    logging.info('Sweep run %d/%d: %s -> %s', i + 1, len(runs), run.name, run.workdir)
    execute(run.config, run.workdir)
    trained.append(run.name)
  return trained


def _mean_std(values: Iterable[float]) -> tuple[float, float]:
  values = np.asarray(list(values), np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def report_rows(runs: list[RunSpec]) -> list[dict]:
  """One row per (teacher, student) with finished runs: errors in percent, mean ± std.

  The std is the sample standard deviation over seeds (ddof=1).
  """
  groups: dict[tuple[str, str], list[dict]] = {}
  for run in runs:
    if run.stage == 0 and run.teacher != NO_TEACHER:
      continue  # teachers alone are not rows of the table
    if is_done(run.workdir):
      with open(os.path.join(run.workdir, train_lib.RESULTS_FILE)) as f:
        groups.setdefault((run.teacher, run.student), []).append(json.load(f))
  rows = []
  for (teacher, student), results in groups.items():
    top1 = _mean_std(100 * r['test_top1_error'] for r in results)
    top5 = _mean_std(100 * r['test_top5_error'] for r in results)
    rows.append({'teacher': teacher, 'student': student, 'top1_mean': top1[0], 'top1_std': top1[1],
                 'top5_mean': top5[0], 'top5_std': top5[1], 'seeds': len(results),
                 'student_params': results[0]['num_params']})
  return rows


def write_report(rows: list[dict], workdir: str, *, title: str,
                 extra_columns: dict[str, Callable[[dict], str]] | None = None) -> str:
  """Writes ``report.md`` (the paper's layout) and ``report.csv``; returns the Markdown."""
  extra_columns = extra_columns or {}
  header = ['Teacher', 'Student', 'Top-1 Error', 'Top-5 Error', *extra_columns, 'Seeds']
  lines = [f'# {title}', '', 'Test error in percent, mean ± std over seeds.', '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    cells = [r['teacher'], r['student'], f'{r["top1_mean"]:.2f} ± {r["top1_std"]:.2f}',
             f'{r["top5_mean"]:.2f} ± {r["top5_std"]:.2f}',
             *(fn(r) for fn in extra_columns.values()), str(r['seeds'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  markdown = '\n'.join(lines) + '\n'
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(markdown)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ['teacher'])
  writer.writeheader()
  writer.writerows(rows)
  with open(os.path.join(workdir, 'report.csv'), 'w') as f:
    f.write(buf.getvalue())
  return markdown
