"""The teacher × student sweep: run order, skipping finished runs, the report."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, load_config
from distill_jax import jobs
from distill_jax import sweeps
from distill_jax import validation


def grid_config(**overrides):
  c = load_config('teacher_student', 'demo')
  c.teachers = ('wrn_40_2',)
  c.students = ('wrn_16_2', 'densenet_bc_100_12')
  for k, v in overrides.items():
    c[k] = v
  return c


def test_grid_has_teachers_students_and_pairs_in_order(tmp_path):
  c = grid_config(seeds=(0, 1, 2))
  runs = sweeps.grid_runs(c, str(tmp_path))
  # 3 seeds x (1 teacher + 2 lone students) + 3 seeds x 2 pairs.
  assert len(runs) == 9 + 6
  assert all(r.stage == 0 for r in runs[:9]) and all(r.stage == 1 for r in runs[9:])
  pair = runs[9]
  assert pair.config.job == 'distill' and pair.config.distill.method == 'at'
  assert pair.needs == pair.config.distill.teacher_workdir == str(tmp_path / 'teachers' / 'wrn_40_2' / 'seed0')
  assert pair.config.seed == 0 and pair.config.model.name == 'wrn'
  assert pair.teacher == 'WRN-16-2' and pair.student == 'WRN-10-1'  # demo stand-ins
  jobs.validate_runs(runs)


def test_full_grid_names_the_papers_networks(tmp_path):
  c = load_config('teacher_student')
  runs = sweeps.grid_runs(c, str(tmp_path))
  assert len(runs) == 3 * (3 + 3) + 3 * 9
  names = {(r.teacher, r.student) for r in runs if r.stage == 1}
  assert ('WRN-40-2', 'WRN-16-2') in names
  assert ('DenseNet-BC-40-36', 'DenseNet-BC-100-12') in names
  assert ('DARTS_V1-25', 'DARTS_V1-10') in names
  darts = [r for r in runs if r.config.model.name == 'darts']
  assert darts and all(r.config.drop_path_prob == 0.2 for r in darts)


def fake_results(workdir, top1, top5, num_params=100):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'test_top1_error': top1, 'test_top5_error': top5, 'num_params': num_params}, f)


def test_finished_runs_are_skipped_and_shards_split_the_rest(tmp_path):
  runs = sweeps.grid_runs(grid_config(seeds=(0,)), str(tmp_path))
  fake_results(runs[0].workdir, 0.1, 0.01)  # the teacher is done
  calls = []
  trained = sweeps.run_sweep(runs, lambda c, w: (calls.append(w), fake_results(w, 0.2, 0.0)),
                             shard=0, num_shards=1)
  assert runs[0].workdir not in calls and len(calls) == len(runs) - 1
  assert len(trained) == len(runs) - 1
  assert sweeps.run_sweep(runs, lambda c, w: pytest.fail('nothing is left to run')) == []


def test_pair_without_teacher_results_is_an_error_in_one_shard(tmp_path):
  runs = sweeps.grid_runs(grid_config(seeds=(0,)), str(tmp_path))
  with pytest.raises(RuntimeError, match='needs .*teachers/wrn_40_2/seed0'):
    sweeps.run_sweep([r for r in runs if r.stage == 1], lambda c, w: None)


def test_report_means_and_sample_stds(tmp_path):
  c = grid_config(seeds=(0, 1, 2))
  runs = sweeps.grid_runs(c, str(tmp_path))
  top1 = {0: 0.10, 1: 0.12, 2: 0.17}
  for r in runs:
    bump = 0.0 if r.teacher == sweeps.NO_TEACHER else 0.01
    fake_results(r.workdir, top1[r.seed] + bump, 0.01 * r.seed, num_params=7)
  rows = sweeps.report_rows(runs)
  assert len(rows) == 4  # 2 lone students + 1 teacher x 2 students
  lone = [r for r in rows if r['teacher'] == 'N/A'][0]
  # mean(10, 12, 17) = 13, sample std = sqrt(((-3)^2 + (-1)^2 + 4^2) / 2) = sqrt(13).
  assert lone['top1_mean'] == pytest.approx(13.0)
  assert lone['top1_std'] == pytest.approx(np.sqrt(13.0))
  assert lone['top5_mean'] == pytest.approx(1.0) and lone['top5_std'] == pytest.approx(1.0)
  markdown = sweeps.write_report(rows, str(tmp_path), title='grid')
  assert '| Teacher | Student | Top-1 Error | Top-5 Error | Seeds |' in markdown
  assert '| N/A | WRN-10-1 | 13.00 ± 3.61 | 1.00 ± 1.00 | 3 |' in markdown
  assert '| WRN-16-2 | WRN-10-1 | 14.00 ± 3.61 |' in markdown
  with open(tmp_path / 'report.csv') as f:
    table = list(csv.DictReader(f))
  assert len(table) == 4 and float(table[0]['top1_mean']) == pytest.approx(13.0)


def test_unknown_network_in_grid_is_one_line(tmp_path):
  c = grid_config(teachers=('resnet_50',))
  with pytest.raises(validation.ConfigError, match="config.teachers has 'resnet_50'"):
    jobs.teacher_student(c, str(tmp_path))


def test_tiny_sweep_end_to_end_and_rerun_is_a_no_op(tmp_path):
  c = grid_config(seeds=(0,), num_epochs=1, students=('wrn_16_2',))
  c.log_every_steps = 22
  report = jobs.teacher_student(c, str(tmp_path))
  text = open(report).read()
  assert '| N/A | WRN-10-1 |' in text and '| WRN-16-2 | WRN-10-1 |' in text
  runs = sweeps.grid_runs(c, str(tmp_path))
  assert all(sweeps.is_done(r.workdir) for r in runs)
  mtimes = {r.workdir: os.path.getmtime(os.path.join(r.workdir, 'results.json')) for r in runs}
  jobs.teacher_student(c, str(tmp_path))
  assert mtimes == {r.workdir: os.path.getmtime(os.path.join(r.workdir, 'results.json')) for r in runs}


def test_sweep_launcher_names_the_jobs_it_shards(tmp_path):
  out = subprocess.run(
      [sys.executable, 'launch/sweep.py', '--config=configs/train.py:demo', f'--workdir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      "error: config.job='train' is not a sweep; launch/sweep.py runs teacher_student, "
      'darts_fisher configs (use distill_jax.main for the others)')
