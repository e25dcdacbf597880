"""The teacher × student grid: run order, skipping finished runs, shards, the report."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, load_config, unread
from distill_jax import config_lib
from distill_jax import jobs
from distill_jax import validation
from distill_jax.experiments import grid
from distill_jax.experiments import runs as runs_lib
from distill_jax.options import JobOptions

# Execution-bound: trains for tens of steps (conftest.py)
pytestmark = pytest.mark.optimized


def grid_config(**overrides):
  c = load_config('teacher_student', 'demo')
  c.teachers = ('wrn_40_2',)
  c.students = ('wrn_16_2', 'densenet_bc_100_12')
  for k, v in overrides.items():
    target = c.run if k in c.run else c
    target[k] = v
  return c





def test_grid_has_teachers_students_and_pairs_in_order(tmp_path):
  c = grid_config(seeds=(0, 1, 2))
  runs = grid.tasks(c, str(tmp_path))
  # 3 seeds x (1 teacher + 2 lone students) + 3 seeds x 2 pairs.
  assert len(runs) == 9 + 6
  assert all(not r.needs for r in runs[:9]) and all(r.needs for r in runs[9:])
  pair = runs[9]
  assert pair.config.job == 'distill' and pair.config.distill.method == 'at'
  assert pair.needs == (pair.config.distill.teacher_workdir,)
  assert pair.config.distill.teacher_workdir == str(tmp_path / 'teachers' / 'wrn_40_2' / 'seed0')
  assert pair.config.seed == 0 and pair.config.model.name == 'wrn'
  assert pair.teacher == 'WRN-16-2' and pair.student == 'WRN-10-2'  # demo stand-ins
  runs_lib.validate_runs(runs)
  lone = runs[1]
  assert lone.config.job == 'train' and 'distill' not in lone.config


def test_full_grid_names_the_papers_networks(tmp_path):
  c = load_config('teacher_student')
  runs = grid.tasks(c, str(tmp_path))
  assert len(runs) == 3 * (3 + 3) + 3 * 9
  names = {(r.teacher, r.student) for r in runs if r.needs}
  assert ('WRN-40-2', 'WRN-16-2') in names
  assert ('DenseNet-BC-40-36', 'DenseNet-BC-100-12') in names
  assert ('DARTS_V1-25', 'DARTS_V1-10') in names
  darts = [r for r in runs if r.config.model.name == 'darts']
  assert darts and all(r.config.drop_path_prob == 0.2 for r in darts)
  assert all(r.config.drop_path_prob == 0.0 for r in runs if r.config.model.name != 'darts')


def fake_results(workdir, top1, top5, num_params=100):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'test_top1_error': top1, 'test_top5_error': top5, 'num_params': num_params}, f)


def faked(runs, calls):
  """The runs with their training replaced by writing fake results."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  return [dataclasses.replace(r, compute=lambda r=r: (calls.append(r.path),
                                                      fake_results(r.path, 0.2, 0.0)))
          for r in runs]


def test_finished_runs_are_skipped_and_shards_split_the_rest(tmp_path):
  runs = grid.tasks(grid_config(seeds=(0,)), str(tmp_path))
  fake_results(runs[0].path, 0.1, 0.01)  # the teacher is done
  calls = []
  trained = runs_lib.run_tasks(faked(runs, calls), shard=0, num_shards=1)
  assert runs[0].path not in calls and len(calls) == len(runs) - 1
  assert len(trained) == len(runs) - 1
  assert runs_lib.run_tasks(faked(runs, calls)) == []
  # Two shards split the runs between them; together they do each run once.
  other = str(tmp_path / 'other')
  runs = grid.tasks(grid_config(seeds=(0,)), other)
  calls = []
  fake_results(runs[0].path, 0.1, 0.01)
  shard0 = runs_lib.run_tasks(faked(runs, calls), shard=0, num_shards=2)
  shard1 = runs_lib.run_tasks(faked(runs, calls), shard=1, num_shards=2)
  assert sorted(shard0 + shard1) == sorted(r.name for r in runs[1:])
  assert not set(shard0) & set(shard1)


def test_pair_without_teacher_results_is_an_error_in_one_shard(tmp_path):
  runs = grid.tasks(grid_config(seeds=(0,)), str(tmp_path))
  with pytest.raises(RuntimeError, match='needs .*teachers/wrn_40_2/seed0'):
    runs_lib.run_tasks([r for r in runs if r.needs])


def test_report_means_and_sample_stds(tmp_path):
  c = grid_config(seeds=(0, 1, 2))
  runs = grid.tasks(c, str(tmp_path))
  top1 = {0: 0.10, 1: 0.12, 2: 0.17}
  for r in runs:
    bump = 0.0 if r.teacher == runs_lib.NO_TEACHER else 0.01
    fake_results(r.path, top1[r.seed] + bump, 0.01 * r.seed, num_params=7)
  rows = runs_lib.report_rows(runs)
  assert len(rows) == 4  # 2 lone students + 1 teacher x 2 students
  lone = [r for r in rows if r['teacher'] == 'N/A'][0]
  # mean(10, 12, 17) = 13, sample std = sqrt(((-3)^2 + (-1)^2 + 4^2) / 2) = sqrt(13).
  assert lone['top1_mean'] == pytest.approx(13.0)
  assert lone['top1_std'] == pytest.approx(np.sqrt(13.0))
  assert lone['top5_mean'] == pytest.approx(1.0) and lone['top5_std'] == pytest.approx(1.0)
  assert lone['teacher_top1_mean'] is None
  markdown = runs_lib.write_report(runs, str(tmp_path), title='grid')
  assert ('| Teacher | Student | Top-1 Error | Top-1 95% CI | Top-1 vs alone (95% CI) | '
          'Top-5 Error | Teacher error | Teacher params | Student params | Seeds |') in markdown
  # 13 ± t(0.975, 2) * sqrt(13) / sqrt(3) = 13 ± 4.3027 * 2.0817 = 13 ± 8.96.
  assert ('| N/A | WRN-10-2 | 13.00 ± 3.61 | [4.04, 21.96] | n/a | 1.00 ± 1.00 | n/a | n/a | 7 '
          '| 3 |') in markdown
  # The teacher (WRN-16-2, the demo stand-in of WRN-40-2) has its own error: 11, 13, 18.
  # Every seed is 1 point worse than alone: std 0, the interval is the point +1.
  assert ('| WRN-16-2 | WRN-10-2 | 14.00 ± 3.61 | [5.04, 22.96] | +1.00 [+1.00, +1.00] | '
          '1.00 ± 1.00 | 14.00 ± 3.61 | 7 | 7 | 3 |') in markdown
  assert 'over 3 seeds (0, 1, 2)' in markdown
  with open(tmp_path / 'report_summary.csv') as f:
    table = list(csv.DictReader(f))
  assert len(table) == 4 and float(table[0]['top1_mean']) == pytest.approx(13.0)
  with open(tmp_path / 'report.csv') as f:
    per_run = list(csv.DictReader(f))
  assert len(per_run) == len(runs) == 15
  assert sorted({r['kind'] for r in per_run}) == ['distilled', 'student', 'teacher']


def test_unknown_network_in_grid_is_one_line(tmp_path):
  c = grid_config(teachers=('resnet_50',))
  with pytest.raises(validation.ConfigError, match="config.teachers has 'resnet_50'"):
    jobs.run(c, str(tmp_path))


@pytest.mark.e2e
def test_tiny_sweep_end_to_end_and_rerun_is_a_no_op(tmp_path, unrecorded_validation):
  c = grid_config(seeds=(0,), num_epochs=1, students=('wrn_16_2',))
  c.run.log_every_steps = 22
  results = {}
  never_read = unread(c, lambda c: results.update(jobs.run(c, str(tmp_path))),
                      prefixes=('run.',))
  # Every field of the grid config is read (darts_drop_path_prob only by DARTS runs, which
  # this grid has none of; test_full_grid_names_the_papers_networks checks it reaches them;
  # CRD's fields only by CRD runs, refused for other methods).
  assert never_read == ['darts_drop_path_prob', 'run.distill.nce_k', 'run.distill.nce_m',
                        'run.distill.nce_t']
  report = results['report']
  text = open(report).read()
  assert '| N/A | WRN-10-2 |' in text and '| WRN-16-2 | WRN-10-2 |' in text
  # One seed: no std (n/a), the teacher's own error, which epoch, numeric CSVs.
  assert 'over 1 seed (0)' in text and 'after the final epoch (epoch 1)' in text
  assert ' ± n/a | n/a | n/a |' in text  # the lone student's row
  assert 'Demo stand-ins' in text and 'Warning' not in text
  with open(os.path.join(str(tmp_path), 'report.csv')) as f:
    per_run = list(csv.DictReader(f))
  assert len(per_run) == 3 and all(0 <= float(r['test_top1_error']) <= 100 for r in per_run)
  runs = grid.tasks(c, str(tmp_path))
  assert all(r.done() for r in runs)
  mtimes = {r.path: os.path.getmtime(os.path.join(r.path, 'results.json')) for r in runs}
  jobs.run(c, str(tmp_path))
  assert mtimes == {r.path: os.path.getmtime(os.path.join(r.path, 'results.json')) for r in runs}
  # --mode=report rewrites the same table from the finished runs.
  os.remove(report)
  jobs.run(c, str(tmp_path), JobOptions(mode='report'))
  assert open(report).read() == text


def test_bad_shard_is_one_line_before_any_compute(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'distill_jax.main', '--config=configs/teacher_student.py:demo',
       f'--workdir={tmp_path}', '--shard=abc'], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      "error: --shard='abc' is invalid: use i/n, e.g. --shard=0/4")
  assert not os.listdir(tmp_path)


def test_a_single_run_job_refuses_shards(tmp_path):
  c = load_config('train', 'demo')
  with pytest.raises(validation.ConfigError, match=r'--shard=1/2 is invalid for config.job'):
    jobs.run(c, str(tmp_path), JobOptions(shard=1, num_shards=2))
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------
# Sweeping methods: teacher × student × method.


def test_methods_demo_is_every_method_alone_for_one_pair(tmp_path):
  c = load_config('teacher_student', 'methods_demo')
  grid.validate(c)
  tasks = grid.tasks(c, str(tmp_path))
  pairs = [t for t in tasks if t.needs]
  assert set(c.methods) == {'kd', 'at', 'kd_at', 'hard', 'sp', 'nst', 'fsp', 'rkd', 'pkt',
                            'dkd', 'dist', 'fitnet', 'vid', 'cc', 'crd'}
  assert len(tasks) == 2 * 2 + len(pairs) and len(pairs) == 2 * len(c.methods)
  recipes = {'dkd': ('warmup_epochs', 1.0), 'fsp': ('init_epochs', 1), 'crd': ('nce_k', 512)}
  for t in pairs:
    assert t.config.distill.method == t.method and t.config.distill.beta is None
    for method, (field, value) in recipes.items():  # each method's recipe, demo-sized
      default = config_lib.distill_section()[field]
      assert t.config.distill[field] == (value if t.method == method else default)
    assert t.path == str(tmp_path / 'pairs' / f'wrn_40_2__wrn_16_2__{t.method}' / f'seed{t.seed}')
  # Without a sweep, the pairs' paths and names are the grid's of old.
  plain = [t for t in grid.tasks(grid_config(), str(tmp_path)) if t.needs]
  assert all(t.method == '' and t.path.endswith('wrn_40_2__wrn_16_2/seed0') for t in plain[:1])


@pytest.mark.parametrize('methods, message', [
    (('kd', 'sgd'), "config.methods=('kd', 'sgd') is invalid: 'sgd' is not a distillation "
                    'method; allowed: kd, at'),
    (('none',), "'none' is not a distillation method"),
    (('kd', 'kd'), 'each method at most once')])
def test_bad_methods_are_one_line(tmp_path, methods, message):
  with pytest.raises(validation.ConfigError) as e:
    jobs.run(grid_config(methods=methods), str(tmp_path))
  assert message in str(e.value) and '\n' not in str(e.value)
  assert not os.listdir(tmp_path)


@pytest.mark.e2e
def test_a_methods_sweep_reports_a_method_column(tmp_path):
  c = grid_config(seeds=(0,), num_epochs=1, students=('wrn_16_2',), methods=('kd', 'fitnet'))
  text = open(jobs.run(c, str(tmp_path))['report']).read()
  assert '# Teacher × student × method' in text
  assert '| Teacher | Student | Method | Top-1 Error |' in text
  for row in ('| N/A | WRN-10-2 | n/a |', '| WRN-16-2 | WRN-10-2 | kd |',
              '| WRN-16-2 | WRN-10-2 | fitnet |'):
    assert row in text
  with open(tmp_path / 'report_summary.csv') as f:
    summary = list(csv.DictReader(f))
  assert [r['method'] for r in summary] == ['', 'kd', 'fitnet']
  with open(tmp_path / 'report.csv') as f:
    per_run = list(csv.DictReader(f))
  assert sorted(r['method'] for r in per_run) == ['', '', 'fitnet', 'kd']
  results = json.load(open(tmp_path / 'pairs' / 'wrn_40_2__wrn_16_2__fitnet' / 'seed0' /
                           'results.json'))
  assert results['config']['distill']['method'] == 'fitnet' and results['connector_params'] > 0
