"""Reports and figures of the experiments, from fake finished runs (no training).

The table of :func:`distill_jax.experiments.runs.write_report` (the teachers' own error,
``n/a`` for one seed, which epoch, unfinished runs named), its CSVs, the demo names, who
writes the report when the experiment is sharded, and the attention figure.
"""

import csv
import json
import logging
import os

import numpy as np
import pytest

from conftest import load_config
from distill_jax import config_lib
from distill_jax.config_lib import set_fields
from distill_jax.experiments import darts_fisher
from distill_jax.experiments import figures
from distill_jax.experiments import grid
from distill_jax.experiments import runs
from distill_jax.options import JobOptions


def finish(path, top1, top5=0.01, num_params=100, epochs=3, data='digits'):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'results.json'), 'w') as f:
    json.dump({'test_top1_error': top1, 'test_top5_error': top5, 'num_params': num_params,
               'epochs': epochs, 'config': {'data': {'name': data}}}, f)


def task(root, name, *, teacher='', student='', seed=0, row=True):
  return runs.Task(name=name, path=os.path.join(str(root), name.replace(' ', '_')),
                   compute=lambda: None, teacher=teacher, student=student, seed=seed, row=row)


def experiment(root):
  """Teacher T (2 seeds), student S alone and under T (2 seeds), under U (seed 0 only:
  U's seed 1 runs are not finished)."""
  tasks = []
  for seed in (0, 1):
    tasks += [task(root, f'teacher T seed {seed}', teacher='T', seed=seed, row=False),
              task(root, f'teacher U seed {seed}', teacher='U', seed=seed, row=False),
              task(root, f'student S seed {seed}', teacher=runs.NO_TEACHER, student='S', seed=seed),
              task(root, f'T -> S seed {seed}', teacher='T', student='S', seed=seed),
              task(root, f'U -> S seed {seed}', teacher='U', student='S', seed=seed)]
  by_name = {t.name: t for t in tasks}
  for seed, (t, s, ts) in enumerate([(0.05, 0.10, 0.08), (0.07, 0.14, 0.10)]):
    finish(by_name[f'teacher T seed {seed}'].path, t, num_params=19_950)
    finish(by_name[f'student S seed {seed}'].path, s, num_params=700)
    finish(by_name[f'T -> S seed {seed}'].path, ts, num_params=700)
  finish(by_name['teacher U seed 0'].path, 0.04, num_params=40_000)
  finish(by_name['U -> S seed 0'].path, 0.09, num_params=700)
  return tasks


def test_table_has_teacher_error_na_for_one_seed_and_says_which_epoch(tmp_path, caplog):
  tasks = experiment(tmp_path)
  rows = {(r['teacher'], r['student']): r for r in runs.report_rows(tasks)}
  assert set(rows) == {('N/A', 'S'), ('T', 'S'), ('U', 'S')}
  pair = rows[('T', 'S')]
  assert pair['top1_mean'] == pytest.approx(9.0) and pair['top1_std'] == pytest.approx(np.sqrt(2))
  assert pair['teacher_top1_mean'] == pytest.approx(6.0)
  assert pair['teacher_top1_std'] == pytest.approx(np.sqrt(2))
  assert rows[('N/A', 'S')]['teacher_top1_mean'] is None
  assert rows[('U', 'S')]['seeds'] == 1 and rows[('U', 'S')]['top1_std'] is None

  with caplog.at_level(logging.WARNING):
    markdown = runs.write_report(tasks, str(tmp_path), title='t')
  assert ('| Teacher | Student | Top-1 Error | Top-1 95% CI | Top-1 vs alone (95% CI) | '
          'Top-5 Error | Teacher error | Teacher params | Student params | Seeds |') in markdown
  # Alone: 10, 14 -> 12 ± 2.83, t(0.975, 1) = 12.706: 12 ± 12.706 * 2.83 / sqrt(2) = 12 ± 25.41.
  assert ('| N/A | S | 12.00 ± 2.83 | [-13.41, 37.41] | n/a | 1.00 ± 0.00 | n/a | n/a | 700 | 2 |'
          in markdown)
  # Under T: 8, 10; per seed 8 - 10 = -2, 10 - 14 = -4: -3 ± 12.706 * 1.414 / sqrt(2).
  assert ('| T | S | 9.00 ± 1.41 | [-3.71, 21.71] | -3.00 [-15.71, +9.71], not distinguishable '
          'from no teacher | 1.00 ± 0.00 | 6.00 ± 1.41 | 19,950 | 700 | 2 |') in markdown
  assert ('| U | S | 9.00 ± n/a | n/a | -1.00 (one seed, no interval) | 1.00 ± n/a | 4.00 ± n/a | '
          '40,000 | 700 | 1 |') in markdown
  assert runs.STATISTICS_TEXT in markdown
  assert 'after the final epoch (epoch 3), not the best epoch' in markdown
  assert 'digits test split' in markdown and 'over 1-2 seeds of 0, 1' in markdown
  # The unfinished runs are named in the report and in the log, not silently left out.
  assert '**Warning: 2 of 10 runs have not finished' in markdown
  assert '- teacher U seed 1 (teacher_U_seed_1)' in markdown and '- U -> S seed 1 (' in markdown
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any('2 of 10 runs have not finished' in w and 'U -> S seed 1' in w for w in warnings)
  assert open(tmp_path / 'report.md').read() == markdown


def test_one_seed_everywhere_and_no_missing_runs(tmp_path):
  tasks = [t for t in experiment(tmp_path) if t.seed == 0]
  markdown = runs.write_report(tasks, str(tmp_path), title='t')
  assert 'over 1 seed (0)' in markdown and '"± n/a": one seed, no std' in markdown
  assert 'Warning' not in markdown and '± 0.00' not in markdown


def test_per_run_csv_is_tidy_and_numeric_and_the_summary_too(tmp_path):
  tasks = experiment(tmp_path)
  runs.write_report(tasks, str(tmp_path), title='t')
  with open(tmp_path / 'report.csv') as f:
    table = list(csv.DictReader(f))
  assert tuple(table[0]) == runs.RUN_COLUMNS
  assert len(table) == 8  # the finished runs, teachers included
  pair = next(r for r in table if r['kind'] == 'distilled' and r['teacher'] == 'T'
              and r['seed'] == '1')
  assert float(pair['test_top1_error']) == pytest.approx(10.0)
  assert float(pair['teacher_test_top1_error']) == pytest.approx(7.0)
  assert pair['teacher_params'] == '19950' and pair['student_params'] == '700'
  assert pair['epochs'] == '3' and pair['workdir'] == 'T_->_S_seed_1'
  alone = next(r for r in table if r['kind'] == 'student')
  assert alone['teacher_test_top1_error'] == '' and alone['teacher_params'] == ''
  teacher = next(r for r in table if r['kind'] == 'teacher' and r['teacher'] == 'U')
  assert float(teacher['test_top1_error']) == pytest.approx(4.0) and teacher['student'] == ''
  with open(tmp_path / 'report_summary.csv') as f:
    summary = list(csv.DictReader(f))
  assert tuple(summary[0]) == runs.SUMMARY_COLUMNS and len(summary) == 3
  u = next(r for r in summary if r['teacher'] == 'U')
  assert u['top1_std'] == '' and int(u['teacher_params']) == 40_000
  assert float(u['teacher_top1_mean']) == pytest.approx(4.0)
  assert u['top1_ci_low'] == '' and float(u['top1_vs_alone_mean']) == pytest.approx(-1.0)
  assert u['top1_vs_alone_seeds'] == '1' and u['distinguishable_from_alone'] == ''
  t = next(r for r in summary if r['teacher'] == 'T')
  assert float(t['top1_vs_alone_ci_low']) == pytest.approx(-3 - 12.7062047, abs=1e-5)
  assert t['distinguishable_from_alone'] == 'False'


def test_teacher_params_that_differ_by_seed_show_a_range(tmp_path):
  tasks = experiment(tmp_path)
  finish(tasks[0].path, 0.05, num_params=19_000)  # teacher T seed 0
  markdown = runs.write_report(tasks, str(tmp_path), title='t')
  assert '| 1.00 ± 0.00 | 6.00 ± 1.41 | 19,000–19,950 | 700 | 2 |' in markdown


def test_display_names_are_the_networks_own_sizes():
  demo, paper = config_lib.DEMO_NETWORKS, config_lib.NETWORKS
  assert runs.display_name(demo['wrn_16_2']) == 'WRN-10-2'
  assert runs.display_name(demo['densenet_bc_100_12']) == 'DenseNet-BC-16-6'
  assert runs.display_name(demo['darts_v1_10']) == 'DARTS_V1-5-C4'
  assert runs.display_name(demo['darts_v1_25']) == 'DARTS_V1-8-C8'
  assert runs.display_name(paper['darts_v1_10']) == 'DARTS_V1-10'
  assert runs.display_name({'name': 'darts', 'genotype': 'DARTS_V2', 'layers': 20}) == (
      'DARTS_V2-20-C36')  # the model's default C


def grid_config(**overrides):
  c = load_config('teacher_student', 'demo')
  c.teachers = ('wrn_40_2',)
  c.students = ('wrn_16_2',)
  c.seeds = (0,)
  return set_fields(c, overrides)


def test_demo_grid_report_names_the_stand_ins(tmp_path):
  c = grid_config()
  for t in grid.tasks(c, str(tmp_path)):
    finish(t.path, 0.1)
  grid.run(c, str(tmp_path), JobOptions(mode='report'))
  text = open(tmp_path / 'report.md').read()
  assert '| WRN-16-2 | WRN-10-2 |' in text and '| N/A | WRN-10-2 |' in text
  assert ('Demo stand-ins (config.demo_networks=True)' in text
          and 'wrn_16_2 → WRN-10-2 (paper: WRN-16-2)' in text)
  assert 'WRN-40-2' not in text.split('|', 1)[1]  # the paper's names only in the note


@pytest.mark.parametrize('options, writes', [
    (JobOptions(shard=0, num_shards=2), False),
    (JobOptions(shard=1, num_shards=2), False),
    (JobOptions(mode='evaluate', shard=1, num_shards=2), False),
    (JobOptions(mode='report', shard=1, num_shards=2), True),
    (JobOptions(), True),
    (JobOptions(mode='evaluate'), True),
])
def test_only_report_mode_or_an_unsharded_grid_writes_the_report(tmp_path, options, writes):
  c = grid_config()
  for t in grid.tasks(c, str(tmp_path)):
    finish(t.path, 0.1)
  out = grid.run(c, str(tmp_path), options)
  assert os.path.exists(tmp_path / 'report.md') == writes
  assert os.path.exists(tmp_path / 'report.csv') == writes
  assert (out['report'] is not None) == writes and out['trained'] == []


def test_only_report_mode_or_an_unsharded_pipeline_writes_the_report(tmp_path, monkeypatch):
  finished = []
  monkeypatch.setattr(darts_fisher.Pipeline, 'finish',
                      lambda self: finished.append(1) or {'report': 'report.md', 'seeds': [0]})
  monkeypatch.setattr(darts_fisher.runs, 'run_tasks', lambda *args, **kwargs: [])
  c = set_fields(load_config('darts_fisher', 'demo'),
                 {'run.model.layers': 3, 'growth.depth_layers': 4, 'seeds': (0, 1)})
  cases = [(JobOptions(shard=0, num_shards=2), False),
           (JobOptions(mode='evaluate', shard=0, num_shards=2), False),
           (JobOptions(mode='report', shard=1, num_shards=2), True), (JobOptions(), True)]
  for options, writes in cases:
    before = len(finished)
    out = darts_fisher.run(c, str(tmp_path), options)
    assert (len(finished) > before) == writes, options
    assert (out['report'] is not None) == writes


def test_pipeline_note_says_the_student_is_the_demo_stand_in():
  demo = darts_fisher.Pipeline(load_config('darts_fisher', 'demo'), '/tmp/unused')
  assert demo.notes() == [
      "The student DARTS_V1-5-C4 is the demo stand-in (config_lib.DEMO_NETWORKS) of the "
      "paper's DARTS_V1-10, and its teachers are grown from it: these are not the paper's "
      'networks.']
  assert darts_fisher.Pipeline(load_config('darts_fisher'), '/tmp/unused').notes() == []
  tiny = set_fields(load_config('darts_fisher', 'demo'), {'run.model.layers': 3})
  assert 'is smaller than the paper' in darts_fisher.Pipeline(tiny, '/tmp/unused').notes()[0]
  deeper = set_fields(load_config('darts_fisher'), {'run.model.layers': 20})
  assert 'is larger than the paper' in darts_fisher.Pipeline(deeper, '/tmp/unused').notes()[0]
  # :release builds the paper's size with the release's default genotype.
  assert darts_fisher.Pipeline(load_config('darts_fisher', 'release'), '/tmp/unused').notes() == [
      "The student DARTS_V2-10 has the size of the paper's DARTS_V1-10 with genotype DARTS_V2 "
      "(the author's release builds DARTS_V2 by default; the paper's table names DARTS_V1)."]
  assert darts_fisher.point_name({'layers': 8}, 0) == 'cell 0 output'
  assert darts_fisher.point_name({'layers': 8}, 2) == 'cell 5 output'


# ---------------------------------------------------------------------------- figures


def attention_inputs(n=2):
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(n, 8, 8, 1))
  columns = [(f'net {j}\ncell 0 output, 4×4\ntest error {10 + j:.2f}%',
              rng.uniform(size=(n, 4, 4)) * (j + 1)) for j in range(3)]
  return images, columns


def test_attention_plot_has_one_colour_scale_a_colour_bar_and_plain_labels():
  images, columns = attention_inputs()
  fig = figures.attention_plot(images, columns, title='maps')
  try:
    assert len(fig.axes) == 2 * 4 + 1  # the panels and one colour bar
    bar = fig.axes[-1]
    assert 'one scale for every map' in bar.get_ylabel()
    panels = [im for ax in fig.axes[:-1] for im in ax.get_images()]
    maps = [im for im in panels if im.get_cmap().name == figures.COLOUR_MAP]
    assert len(maps) == 2 * 3 and len({im.get_clim() for im in maps}) == 1
    lo, hi = maps[0].get_clim()
    assert lo == pytest.approx(min(m.min() for _, m in columns))
    assert hi == pytest.approx(max(m.max() for _, m in columns))
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles[0] == 'test image' and titles[1] == columns[0][0]
    assert 'cell 0 output, 4×4' in titles[2] and 'test error 11.00%' in titles[2]
    assert figures.SCALE_NOTE in fig.get_suptitle()
  finally:
    figures.plt.close(fig)


def test_attention_figure_writes_png_pdf_and_a_tensorboard_image(tmp_path):
  images, columns = attention_inputs()
  path = str(tmp_path / 'fig' / 'attention.png')
  assert figures.attention_figure(path, images, columns, title='t',
                                  tensorboard_dir=str(tmp_path / 'tb')) == path
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(tmp_path / 'fig' / 'attention.pdf', 'rb') as f:
    assert f.read(4) == b'%PDF'
  assert sorted(os.listdir(tmp_path / 'fig')) == ['attention.pdf', 'attention.png']  # no tmp
  (event,) = os.listdir(tmp_path / 'tb')
  assert event.endswith('.images')
  assert b'attention' in open(tmp_path / 'tb' / event, 'rb').read()


def test_intervals_equal_scipy_t_tests():
  # The row interval is the one-sample t interval, the paired one the paired t-test's
  # (scipy's own code paths: ttest_1samp / ttest_rel confidence intervals).
  from scipy import stats as scipy_stats
  from distill_jax.experiments import statistics
  rng = np.random.default_rng(0)
  for n in (2, 3, 5, 10):
    a, b = rng.normal(8, 2, n), rng.normal(9, 2, n)
    ci = statistics.t_interval(a)
    ref = scipy_stats.ttest_1samp(a, 0.0).confidence_interval(0.95)
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert ci.mean == pytest.approx(a.mean()) and ci.std == pytest.approx(a.std(ddof=1))
    diff = statistics.paired_difference(dict(enumerate(a)), {**dict(enumerate(b)), 99: 0.0})
    ref = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert diff.n == n and (diff.low, diff.high) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert diff.excludes_zero == (ref.low > 0 or ref.high < 0)
  assert statistics.t_interval([3.0]) == statistics.Interval(3.0, None, 1, None, None)
  assert statistics.t_interval([]).mean is None
  assert statistics.paired_difference({0: 1.0}, {1: 2.0}).n == 0
  far = statistics.paired_difference({0: 5.0, 1: 5.1, 2: 4.9}, {0: 1.0, 1: 1.2, 2: 0.9})
  assert far.excludes_zero and far.low > 3
