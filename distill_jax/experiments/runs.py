"""Experiments as lists of tasks memoised in a workdir: training runs and artifacts.

The grid (:mod:`distill_jax.experiments.grid`) and the darts_fisher pipeline
(:mod:`distill_jax.experiments.darts_fisher`) are both a list of :class:`Task`: a training run
(done when its ``results.json`` exists) or an artifact file such as a Fisher estimate or
a grown teacher (done when the file exists; written atomically). :func:`run_tasks` does
a shard's share in order and skips what is done; :func:`report_rows` and
:func:`write_report` read the finished runs. Each run's config is a copy of the
experiment's one ``config.run`` with only model, seed and teacher changed
(:func:`run_config`), so a field of ``config.run`` is read by every run.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import os
import time
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import ml_collections
import numpy as np

from distill_jax import config_lib
from distill_jax import validation
from distill_jax.trainers import loop
from distill_jax.trainers import train

NO_TEACHER = 'N/A'


@dataclasses.dataclass(frozen=True)
class Task:
  """One memoised step of an experiment.

  ``path``: a training run's workdir (``is_run``) or an artifact's file. ``compute()``
  makes it; ``needs``: paths of tasks that must be done first; tasks of one ``group``
  go to one shard. Runs carry their table labels (``teacher``, ``student``, ``seed``) and
  ``row``: whether they are a row of the report.
  """
  name: str
  path: str
  compute: Callable[[], Any] = dataclasses.field(compare=False)
  needs: tuple[str, ...] = ()
  group: int = 0
  is_run: bool = True
  config: ml_collections.ConfigDict | None = dataclasses.field(default=None, compare=False)
  teacher: str = ''
  student: str = ''
  seed: int = 0
  row: bool = False

  def done(self) -> bool:
    return is_done(self.path)

  def results(self) -> dict:
    return loop.read_json(os.path.join(self.path, loop.RESULTS_FILE))


def is_done(path: str) -> bool:
  """A run's workdir with ``results.json``, or an existing artifact file."""
  if os.path.isdir(path):
    return os.path.exists(os.path.join(path, loop.RESULTS_FILE))
  return os.path.exists(path)


def run_config(run: ml_collections.ConfigDict, *, model: dict, seed: int,
               teacher_model: dict | None = None, teacher_workdir: str = '',
               drop_path_prob: float | None = None) -> ml_collections.ConfigDict:
  """One run's config: a copy of the experiment's ``config.run`` with ``model`` and
  ``seed``; with ``teacher_model``, a distillation from the teacher in
  ``teacher_workdir`` by ``run.distill``'s method, else training alone (no ``distill``
  section). ``drop_path_prob``, when given, sets the DARTS drop path of this run."""
  c = copy.deepcopy(run)
  with c.unlocked():
    c.seed = seed
    if 'model' in c:  # replaced whole (not merged), whatever the type of the old one
      del c['model']
    c.model = ml_collections.ConfigDict(dict(model))
    if drop_path_prob is not None:
      c.drop_path_prob = drop_path_prob
    if teacher_model is None:
      c.job = 'train'
      if 'distill' in c:
        del c['distill']
    else:
      c.job = 'distill'
      c.distill.teacher_model = ml_collections.ConfigDict(dict(teacher_model))
      c.distill.teacher_workdir = teacher_workdir
  c.lock()
  return c


def validate_runs(tasks: Iterable[Task]) -> None:
  """Checks every run's config before the first task computes anything."""
  for task in tasks:
    if task.config is None:
      continue
    try:
      train.validate(task.config)
    except validation.ConfigError as e:
      raise validation.ConfigError(f'{task.name}: {e}') from None


def run_tasks(tasks: Sequence[Task], *, shard: int = 0, num_shards: int = 1,
              wait_seconds: float = 30.0) -> list[str]:
  """Computes this shard's tasks (``group % num_shards == shard``) that are not done, in
  order; returns their names. A task whose prerequisite belongs to another shard waits
  for it."""
  computed = []
  for i, task in enumerate(tasks):
    if task.group % num_shards != shard or task.done():
      continue
    for need in task.needs:
      while not is_done(need):
        if num_shards == 1:
          raise RuntimeError(f'{task.name} needs {need}, which is not done')
        logging.info('%s waits for %s', task.name, need)
        time.sleep(wait_seconds)
    logging.info('Task %d/%d: %s -> %s', i + 1, len(tasks), task.name, task.path)
    task.compute()
    computed.append(task.name)
  return computed


def _mean_std(values: Iterable[float]) -> tuple[float, float]:
  values = np.asarray(list(values), np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def report_rows(tasks: Iterable[Task]) -> list[dict]:
  """One row per (teacher, student) of the finished row runs: errors in percent, mean and
  sample standard deviation (ddof=1) over seeds."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for task in tasks:
    if task.is_run and task.row and task.done():
      groups.setdefault((task.teacher, task.student), []).append(task.results())
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


def check_seeds(config: ml_collections.ConfigDict) -> None:
  if not config.seeds:
    raise validation.ConfigError('config.seeds=() is invalid: give at least one seed')


def network_table(demo: bool) -> dict:
  return config_lib.DEMO_NETWORKS if demo else config_lib.NETWORKS
