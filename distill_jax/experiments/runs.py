"""Experiments as lists of tasks memoised in a workdir: training runs and artifacts.

The grid (:mod:`distill_jax.experiments.grid`) and the darts_fisher pipeline
(:mod:`distill_jax.experiments.darts_fisher`) are both a list of :class:`Task`: a training run
(done when its ``results.json`` exists) or an artifact file such as a Fisher estimate or
a grown teacher (done when the file exists; written atomically). :func:`run_tasks` does
a shard's share in order and skips what is done; :func:`report_rows`, :func:`run_rows`
and :func:`write_report` read the finished runs (``report.md``, ``report.csv`` per run,
``report_summary.csv`` per table row; only a job that :func:`writes_report`, never one
shard of several, writes them). Each run's config is a copy of the
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
from distill_jax.experiments import statistics
from distill_jax.options import JobOptions
from distill_jax.trainers import loop
from distill_jax.trainers import train
from distill_jax.trainers import workdir as workdir_lib

NO_TEACHER = 'N/A'


@dataclasses.dataclass(frozen=True)
class Task:
  """One memoised step of an experiment.

  ``path``: a training run's workdir (``is_run``) or an artifact's file. ``compute()``
  makes it; ``needs``: paths of tasks that must be done first; tasks of one ``group``
  go to one shard. Runs carry their table labels (``teacher``, ``student``, ``seed``,
  ``method``: the distillation method when an experiment sweeps methods, else empty) and
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
  method: str = ''

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


class _TaskClock:
  """Progress over the tasks a call computes: how many are done, the time so far and, once
  a task of each kind left has run, the time left (training runs and artifacts such as a
  Fisher estimate take very different times, so each kind is timed apart)."""

  def __init__(self, todo: Sequence[Task]):
    self._left = {True: sum(t.is_run for t in todo), False: sum(not t.is_run for t in todo)}
    self._total, self._done = len(todo), 0
    self._seconds: dict[bool, list[float]] = {True: [], False: []}
    self._begin = time.monotonic()
    self._current: tuple[bool, float] | None = None

  def start(self, task: Task) -> None:
    self._current = (task.is_run, time.monotonic())

  def finish(self) -> None:
    kind, began = self._current
    self._seconds[kind].append(time.monotonic() - began)
    self._left[kind] -= 1
    self._done += 1

  def describe(self) -> str:
    text = (f'{self._done} of {self._total} to do done, '
            f'{loop.plain_duration(time.monotonic() - self._begin)} elapsed')
    if self._done and all(self._seconds[k] or not self._left[k] for k in (True, False)):
      left = sum(self._left[k] * float(np.mean(self._seconds[k])) for k in (True, False)
                 if self._left[k])
      text += f', about {loop.plain_duration(left)} left'
    return text


class WaitTimeout(TimeoutError):
  """A shard waited too long for a run another shard was to do."""


def run_tasks(tasks: Sequence[Task], *, shard: int = 0, num_shards: int = 1,
              wait_seconds: float = 30.0, wait_timeout_s: float = 86400.0) -> list[str]:
  """Computes this shard's tasks (``group % num_shards == shard``) that are not done, in
  order; returns their names. A task whose prerequisite belongs to another shard waits
  for it, at most ``wait_timeout_s`` (then :class:`WaitTimeout`, one line)."""
  computed = []
  todo = [t for t in tasks if t.group % num_shards == shard and not t.done()]
  eta = _TaskClock(todo)
  for i, task in enumerate(tasks):
    if task not in todo:
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
    logging.info('Task %d/%d: %s -> %s (%s)', i + 1, len(tasks), task.name, task.path,
                 eta.describe())
    eta.start(task)
    task.compute()
    eta.finish()
    computed.append(task.name)
  if not computed:
    logging.info('Every task of shard %d/%d is done already with this config; nothing to train.',
                 shard, num_shards)
  return computed


# ---------------------------------------------------------------------------
# The report of an experiment's finished runs: report.md (the paper's table, with what
# its numbers are), report.csv (one row per finished run) and report_summary.csv (the
# table's numbers).

REPORT_FILE = 'report.md'
RUNS_CSV = 'report.csv'
SUMMARY_CSV = 'report_summary.csv'
NOT_APPLICABLE = 'n/a'
# report.csv: errors in percent, parameter counts as integers, empty where not applicable.
RUN_COLUMNS = ('kind', 'teacher', 'student', 'seed', 'test_top1_error', 'test_top5_error',
               'teacher_test_top1_error', 'student_params', 'teacher_params', 'epochs',
               'workdir')
SUMMARY_COLUMNS = ('teacher', 'student', 'seeds', 'top1_mean', 'top1_std', 'top1_ci_low',
                   'top1_ci_high', 'top1_vs_alone_mean', 'top1_vs_alone_ci_low',
                   'top1_vs_alone_ci_high', 'top1_vs_alone_seeds', 'distinguishable_from_alone',
                   'top5_mean', 'top5_std', 'teacher_top1_mean', 'teacher_top1_std',
                   'teacher_params', 'student_params')
TABLE_HEADER = ('Teacher', 'Student', 'Top-1 Error', 'Top-1 95% CI',
                'Top-1 vs alone (95% CI)', 'Top-5 Error', 'Teacher error', 'Teacher params',
                'Student params', 'Seeds')
NOT_DISTINGUISHABLE = 'not distinguishable from no teacher'
STATISTICS_TEXT = (
    '95% CI: mean ± t(0.975, n−1)·s/√n over the n seeds (Student\'s t). Top-1 vs alone: '
    'the paired difference from the student trained alone with the same seeds (per seed, '
    'this row\'s top-1 error minus the alone run\'s: same initialisation and data order), '
    'its mean and 95% t-interval over the seeds both have; negative: the teacher helps; '
    f'"{NOT_DISTINGUISHABLE}" when that interval contains 0. These intervals are the '
    'uncertainty to quote: another machine gives other per-seed numbers (XLA\'s CPU code '
    'generation differs), within the seeds\' spread.')
# With a sweep over methods (a task has a method): a Method column after Student, in the
# table and both CSV files.
METHOD_COLUMN = 'method'


def _with_method(columns: Sequence[str], method: bool, after: str) -> tuple[str, ...]:
  if not method:
    return tuple(columns)
  i = list(columns).index(after) + 1
  return (*columns[:i], METHOD_COLUMN if after == 'student' else 'Method', *columns[i:])
MAX_LISTED = 40  # unfinished runs named in report.md (the log names all of them)


def writes_report(options: JobOptions) -> bool:
  """Whether a job with ``options`` writes the report: ``--mode=report``, or a job of the
  whole experiment (one shard). A shard of several never does (no two shards write it):
  run ``--mode=report`` once every shard has finished."""
  return options.mode == 'report' or options.num_shards == 1


def run_kind(task: Task) -> str:
  """``'teacher'`` (a teacher trained alone), ``'student'`` (a student alone: the
  table's N/A rows) or ``'distilled'`` (a student under a teacher)."""
  if not task.row:
    return 'teacher'
  return 'student' if task.teacher == NO_TEACHER else 'distilled'


def missing_runs(tasks: Iterable[Task]) -> list[Task]:
  """The training runs of ``tasks`` that have not finished (under their config)."""
  return [t for t in tasks if t.is_run and not t.done()]


def _finished(tasks: Iterable[Task]) -> list[tuple[Task, dict]]:
  return [(t, t.results()) for t in tasks if t.is_run and t.done()]


def _percent(fraction: float | None) -> float | None:
  return None if fraction is None else round(100.0 * float(fraction), 6)


def _run_rows(finished: list[tuple[Task, dict]], workdir: str) -> list[dict]:
  teachers = {(t.teacher, t.seed): r for t, r in finished if run_kind(t) == 'teacher'}
  rows = []
  for task, r in finished:
    kind = run_kind(task)
    teacher = r if kind == 'teacher' else teachers.get((task.teacher, task.seed))
    rows.append({
        'kind': kind, 'teacher': task.teacher, 'student': task.student, 'seed': task.seed,
        'method': task.method,
        'test_top1_error': _percent(r['test_top1_error']),
        'test_top5_error': _percent(r.get('test_top5_error')),
        'teacher_test_top1_error': _percent(teacher['test_top1_error']) if teacher else None,
        'student_params': None if kind == 'teacher' else int(r['num_params']),
        'teacher_params': int(teacher['num_params']) if teacher else None,
        'epochs': r.get('epochs'),
        'workdir': os.path.relpath(task.path, workdir) if workdir else task.path})
  return rows


def run_rows(tasks: Iterable[Task], workdir: str = '') -> list[dict]:
  """One row per finished run (:data:`RUN_COLUMNS`), in task order: its test errors in
  percent (after its final epoch), its teacher's (that seed's teacher run; a teacher's
  row names itself) test top-1 error and parameter count, ``None`` where not applicable;
  ``workdir`` relative to ``workdir`` when given."""
  return _run_rows(_finished(tasks), workdir)


def _mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
  """Mean and sample std (ddof=1) of the values given (``None`` values are left out);
  ``None`` for no value (both) and for one (the std)."""
  values = np.asarray([v for v in values if v is not None], np.float64)
  if not len(values):
    return None, None
  mean = round(float(values.mean()), 6)
  return mean, round(float(values.std(ddof=1)), 6) if len(values) > 1 else None


def _by_seed(group: list[dict]) -> dict[int, float]:
  return {r['seed']: r['test_top1_error'] for r in group if r['test_top1_error'] is not None}


def _summary_rows(per_run: list[dict]) -> list[dict]:
  groups: dict[tuple[str, str, str], list[dict]] = {}
  for r in per_run:
    if r['kind'] != 'teacher':
      groups.setdefault((r['teacher'], r['student'], r['method']), []).append(r)
  alone: dict[str, dict[int, float]] = {}
  for (teacher, student, _), group in groups.items():
    if teacher == NO_TEACHER and student not in alone:
      alone[student] = _by_seed(group)
  rows = []
  for (teacher, student, method), group in groups.items():
    top1 = _mean_std(r['test_top1_error'] for r in group)
    ci = statistics.t_interval(_by_seed(group).values())
    if teacher == NO_TEACHER or student not in alone:
      diff = statistics.Interval(None, None, 0, None, None)
    else:
      diff = statistics.paired_difference(_by_seed(group), alone[student])
    top5 = _mean_std(r['test_top5_error'] for r in group)
    teacher_top1 = _mean_std(r['teacher_test_top1_error'] for r in group)
    params = [r['teacher_params'] for r in group if r['teacher_params'] is not None]
    rows.append({
        'teacher': teacher, 'student': student, 'method': method, 'seeds': len(group),
        'seed_list': sorted(r['seed'] for r in group),
        'top1_mean': top1[0], 'top1_std': top1[1],
        'top1_ci_low': _rounded(ci.low), 'top1_ci_high': _rounded(ci.high),
        'top1_vs_alone_mean': _rounded(diff.mean), 'top1_vs_alone_ci_low': _rounded(diff.low),
        'top1_vs_alone_ci_high': _rounded(diff.high), 'top1_vs_alone_seeds': diff.n or None,
        'distinguishable_from_alone': diff.excludes_zero,
        'top5_mean': top5[0], 'top5_std': top5[1],
        'teacher_top1_mean': teacher_top1[0], 'teacher_top1_std': teacher_top1[1],
        'teacher_params': int(round(float(np.mean(params)))) if params else None,
        'teacher_params_range': (min(params), max(params)) if params else None,
        'student_params': group[0]['student_params']})
  return rows


def report_rows(tasks: Iterable[Task]) -> list[dict]:
  """One row per (teacher, student, method) of the finished row runs, in task order: test errors
  in percent, mean and sample std (ddof=1) over seeds (``None`` for one seed); the
  teachers' own test top-1 error over the same seeds (``None`` without a teacher); the
  parameter counts (a teacher's: its mean over seeds, and ``teacher_params_range``: a
  Fisher-grown teacher may differ by seed); ``seeds`` (how many) and ``seed_list``."""
  return _summary_rows(run_rows(tasks))


def _rounded(x: float | None) -> float | None:
  return None if x is None else round(float(x), 6)


def _ci(row: dict) -> str:
  if row['top1_ci_low'] is None:
    return NOT_APPLICABLE
  return f'[{row["top1_ci_low"]:.2f}, {row["top1_ci_high"]:.2f}]'


def _vs_alone(row: dict) -> str:
  if row['top1_vs_alone_mean'] is None:
    return NOT_APPLICABLE
  text = f'{row["top1_vs_alone_mean"]:+.2f}'
  if row['top1_vs_alone_ci_low'] is None:
    return f'{text} (one seed, no interval)'
  text += f' [{row["top1_vs_alone_ci_low"]:+.2f}, {row["top1_vs_alone_ci_high"]:+.2f}]'
  return text if row['distinguishable_from_alone'] else f'{text}, {NOT_DISTINGUISHABLE}'


def _pm(mean: float | None, std: float | None) -> str:
  if mean is None:
    return NOT_APPLICABLE
  return f'{mean:.2f} ± {NOT_APPLICABLE if std is None else f"{std:.2f}"}'


def _teacher_params(row: dict) -> str:
  if row['teacher_params_range'] is None:
    return NOT_APPLICABLE
  lo, hi = row['teacher_params_range']
  return f'{lo:,}' if lo == hi else f'{lo:,}–{hi:,}'


def _plural(n: int, word: str) -> str:
  return f'{n} {word}' + ('' if n == 1 else 's')


def _what_the_numbers_are(per_run: list[dict], rows: list[dict], datasets: list[str]) -> str:
  """The header line: which epoch, over how many seeds, which data."""
  epochs = sorted({r['epochs'] for r in per_run if r['epochs'] is not None})
  if len(epochs) == 1:
    when = f'after the final epoch (epoch {epochs[0]}), not the best epoch'
  else:
    listed = f' (epochs {", ".join(map(str, epochs))})' if epochs else ''
    when = f"after each run's final epoch{listed}, not the best epoch"
  counts = sorted({r['seeds'] for r in rows})
  seeds = sorted({s for r in rows for s in r['seed_list']})
  if not counts:
    over = 'seeds'
  elif len(counts) == 1:
    over = f'{_plural(counts[0], "seed")} ({", ".join(map(str, seeds))})'
  else:
    over = f'{counts[0]}-{counts[-1]} seeds of {", ".join(map(str, seeds))} (column Seeds)'
  data = f' on the {", ".join(datasets)} test split' if datasets else ''
  return (f'Test error in percent{data} {when}: mean ± sample std (ddof=1) over {over}; '
          f'"± {NOT_APPLICABLE}": one seed, no std. Teacher error: the teachers\' own test '
          'top-1 error over the same seeds; Teacher params: min–max when they differ by seed.')


def _missing_text(missing: list[Task], total: int, workdir: str) -> list[str]:
  names = [f'- {t.name} ({os.path.relpath(t.path, workdir)})' for t in missing[:MAX_LISTED]]
  if len(missing) > MAX_LISTED:
    names.append(f'- … and {len(missing) - MAX_LISTED} more (see the log)')
  return [f'**Warning: {len(missing)} of {_plural(total, "run")} have not finished; the '
          'table leaves them out:**', '', *names]


def _csv(rows: list[dict], columns: Sequence[str]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction='ignore',
                          lineterminator='\n')
  writer.writeheader()
  writer.writerows({k: '' if r.get(k) is None else r[k] for k in columns} for r in rows)
  return buf.getvalue()


def write_report(tasks: Sequence[Task], workdir: str, *, title: str, notes: Sequence[str] = (),
                 missing_from: Sequence[Task] | None = None) -> str:
  """Writes the report of the finished runs of ``tasks``; returns the Markdown.

  ``report.md``: a header saying what the numbers are (:func:`report_rows`), ``notes``
  (e.g. that the networks are demo stand-ins), a warning naming the runs of
  ``missing_from`` (default ``tasks``) that have not finished (also logged), and the
  table (:data:`TABLE_HEADER`, with a Method column when a task has a method).
  ``report.csv``: one row per finished run
  (:func:`run_rows`); ``report_summary.csv``: the table's numbers
  (:data:`SUMMARY_COLUMNS`). Every file is written atomically.
  """
  finished = _finished(tasks)
  per_run = _run_rows(finished, workdir)
  rows = _summary_rows(per_run)
  datasets = sorted({(r.get('config') or {}).get('data', {}).get('name') or ''
                     for _, r in finished} - {''})
  lines = [f'# {title}', '', _what_the_numbers_are(per_run, rows, datasets), '',
           STATISTICS_TEXT, '']
  for note in notes:
    lines += [note, '']
  candidates = [t for t in (tasks if missing_from is None else missing_from) if t.is_run]
  missing = missing_runs(candidates)
  if missing:
    lines += [*_missing_text(missing, len(candidates), workdir), '']
    logging.warning('%d of %d runs have not finished; the report in %s leaves them out: %s',
                    len(missing), len(candidates), workdir, ', '.join(t.name for t in missing))
  method = any(t.method for t in tasks)
  header = _with_method(TABLE_HEADER, method, 'Student')
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    cells = [r['teacher'], r['student'], *([r['method'] or NOT_APPLICABLE] if method else []),
             _pm(r['top1_mean'], r['top1_std']), _ci(r), _vs_alone(r),
             _pm(r['top5_mean'], r['top5_std']),
             _pm(r['teacher_top1_mean'], r['teacher_top1_std']), _teacher_params(r),
             f'{r["student_params"]:,}', str(r['seeds'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  markdown = '\n'.join(lines) + '\n'
  loop.write_text(os.path.join(workdir, REPORT_FILE), markdown)
  loop.write_text(os.path.join(workdir, RUNS_CSV),
                  _csv(per_run, _with_method(RUN_COLUMNS, method, 'student')))
  loop.write_text(os.path.join(workdir, SUMMARY_CSV),
                  _csv(rows, _with_method(SUMMARY_COLUMNS, method, 'student')))
  return markdown


# models.darts.DartsNetwork's C when a config leaves it out, and the paper's C (16): a
# DARTS network of another C has it in its name (the demo stand-ins are narrower).
DARTS_DEFAULT_CHANNELS = 36
PAPER_DARTS_CHANNELS = 16


def display_name(model: dict) -> str:
  """A network's name from its own model config (its real size, so a demo stand-in is
  never named as the paper's network): ``WRN-16-2``, ``DenseNet-BC-100-12``,
  ``DARTS_V1-10`` (C=16, the paper's) or ``DARTS_V1-5-C4`` (another C)."""
  name = model['name']
  if name == 'wrn':
    return f'WRN-{model["depth"]}-{model["widen_factor"]}'
  if name == 'densenet_bc':
    return f'DenseNet-BC-{model["depth"]}-{model["growth_rate"]}'
  if name == 'darts':
    genotype = model['genotype'] if isinstance(model['genotype'], str) else 'DARTS'
    channels = model.get('init_channels', DARTS_DEFAULT_CHANNELS)
    width = '' if channels == PAPER_DARTS_CHANNELS else f'-C{channels}'
    return f'{genotype}-{model["layers"]}{width}'
  return name


def network_table(demo: bool) -> dict:
  return config_lib.DEMO_NETWORKS if demo else config_lib.NETWORKS
