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
from distill_jax.trainers import workdir as workdir_lib

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
    """Finished; for a run with a known config, finished under that config (a run whose
    allowed fields changed, e.g. ``num_epochs``, is not done: it resumes)."""
    if not is_done(self.path):
      return False
    if self.is_run and self.config is not None:
      return workdir_lib.check_config(self.path, self.config) in (None, [])
    return True

  def results(self) -> dict:
    return loop.read_json(os.path.join(self.path, loop.RESULTS_FILE))


def is_done(path: str) -> bool:
  """A run's workdir with ``results.json``, or an existing artifact file."""
  if os.path.isdir(path):
    return os.path.exists(os.path.join(path, loop.RESULTS_FILE))
  return os.path.exists(path)


def run_config(run: ml_collections.ConfigDict, *, model: dict, seed: int,
               teacher_model: dict | None = None, teacher_workdir: str = '',
               drop_path_prob: float | None = None,
               allow_resume_changes: str = '') -> ml_collections.ConfigDict:
  """One run's config: a copy of the experiment's ``config.run`` with ``model`` and
  ``seed``; with ``teacher_model``, a distillation from the teacher in
  ``teacher_workdir`` by ``run.distill``'s method, else training alone (no ``distill``
  section). ``drop_path_prob``, when given, sets the DARTS drop path of this run;
  ``allow_resume_changes`` is the experiment's (names under ``run.`` apply to the run)."""
  c = copy.deepcopy(run)
  with c.unlocked():
    c.seed = seed
    c.allow_resume_changes = run_changes(allow_resume_changes)
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
      c.distill.teacher_allow_unfinished = False  # an experiment's teachers always finish
  c.lock()
  return c


def run_changes(allow_resume_changes: str) -> str:
  """The part of an experiment's ``allow_resume_changes`` that names ``run.`` fields, as
  the runs' own (``'run.num_epochs,seeds'`` -> ``'num_epochs'``)."""
  names = [n.strip() for n in (allow_resume_changes or '').split(',')]
  return ','.join(n[len('run.'):] for n in names if n.startswith('run.'))


# What an experiment may always change on a rerun: more seeds, teachers or students.
EXTENDABLE = ('seeds', 'teachers', 'students')


def holds_runs(tasks: Iterable[Task]) -> bool:
  return any(os.path.exists(os.path.join(t.path, workdir_lib.CONFIG_FILE)) or t.done()
             for t in tasks if t.is_run)


def check_experiment(config: ml_collections.ConfigDict, workdir: str, tasks: Sequence[Task], *,
                     record: bool) -> None:
  """The experiment's config against the one its workdir recorded (seeds, teachers and
  students may be added; other fields only if ``allow_resume_changes`` names them);
  ``record`` writes it."""
  workdir_lib.check_config(workdir, config, extendable=EXTENDABLE, holds_state=holds_runs(tasks))
  if record:
    workdir_lib.record_config(workdir, config)


def lock_name(shard: int, num_shards: int) -> str:
  """One lock per shard: shards share the experiment's workdir, each run has its own."""
  return workdir_lib.LOCK_FILE if num_shards == 1 else f'shard{shard}of{num_shards}.lock'


def validate_runs(tasks: Iterable[Task]) -> None:
  """Checks every run's config before the first task computes anything."""
  for task in tasks:
    if task.config is None:
      continue
    try:
      train.validate(task.config)
    except validation.ConfigError as e:
      raise validation.ConfigError(f'{task.name}: {e}') from None


class WaitTimeout(TimeoutError):
  """A shard waited too long for a run another shard was to do."""


def run_tasks(tasks: Sequence[Task], *, shard: int = 0, num_shards: int = 1,
              wait_seconds: float = 30.0, wait_timeout_s: float = 86400.0) -> list[str]:
  """Computes this shard's tasks (``group % num_shards == shard``) that are not done, in
  order; returns their names. A task whose prerequisite belongs to another shard waits
  for it, at most ``wait_timeout_s`` (then :class:`WaitTimeout`, one line)."""
  computed = []
  for i, task in enumerate(tasks):
    if task.group % num_shards != shard or task.done():
      continue
    for need in task.needs:
      deadline = time.monotonic() + wait_timeout_s
      while not is_done(need):
        if num_shards == 1:
          raise RuntimeError(f'{task.name} needs {need}, which is not done')
        if time.monotonic() >= deadline:
          raise WaitTimeout(
              f'{task.name} waited {wait_timeout_s:g} s for {need}, which another shard trains '
              'and has not finished; check that shard (rerun it if it died), or raise '
              'config.shard_wait_timeout_s')
        logging.info('%s waits for %s', task.name, need)
        time.sleep(max(min(wait_seconds, deadline - time.monotonic()), 0.0))
    logging.info('Task %d/%d: %s -> %s', i + 1, len(tasks), task.name, task.path)
    task.compute()
    computed.append(task.name)
  if not computed:
    logging.info('Every task of shard %d/%d is done already with this config; nothing to train.',
                 shard, num_shards)
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
  loop.write_text(os.path.join(workdir, 'report.md'), markdown)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ['teacher'])
  writer.writeheader()
  writer.writerows(rows)
  loop.write_text(os.path.join(workdir, 'report.csv'), buf.getvalue())
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


def network_table(demo: bool) -> dict:
  return config_lib.DEMO_NETWORKS if demo else config_lib.NETWORKS
