"""The darts_fisher pipeline end to end at tiny size: killed, resumed, finished, re-run.

The resumed run also records every read of its config: each field of the shipped config
must be read by some stage (see tests/test_config_reads.py).
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CACHE_DIR, REPO, load_config, unread
from distill_jax import jobs
from distill_jax import validation
from distill_jax.config_lib import set_fields
from distill_jax.options import JobOptions
from distill_jax.trainers import checkpoint as ckpt_lib

OVERRIDES = {
    'run.model.layers': 3, 'run.model.init_channels': 4, 'seeds': (0,), 'run.num_epochs': 1,
    'growth.depth_layers': 4, 'fisher.num_batches': 1, 'fisher.batch_size': 32,
    'run.checkpoint_every_steps': 5, 'run.log_every_steps': 11, 'run.num_devices': 1,
    # So that every field is read: kd_at reads every loss weight (alpha, temperature, beta,
    # at_form); drop path must reach every run (the bug the read check exists for).
    'run.distill.method': 'kd_at', 'run.drop_path_prob': 0.1, 'figure.num_images': 2,
    # Between them these two read every growth and fisher field; the uniform teacher's
    # growth is tested in tests/test_grow.py.
    'teachers': ('depth', 'fisher'),
}


def tiny_config():
  return set_fields(load_config('darts_fisher', 'demo'), OVERRIDES)


def results_mtimes(workdir):
  found = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      if name in ('results.json', 'grown.json') or root.endswith('fisher'):
        found[os.path.join(root, name)] = os.path.getmtime(os.path.join(root, name))
  return found


@pytest.mark.e2e
def test_pipeline_killed_resumed_finished_and_rerun_does_nothing(tmp_path, unrecorded_validation):
  workdir = str(tmp_path / 'pipeline')
  flags = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
             TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'distill_jax.main', '--config=configs/darts_fisher.py:demo',
       f'--workdir={workdir}', *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  # Kill while the student trains, once it has a checkpoint: the resumed run below then
  # runs every stage, so it reads every field the pipeline uses.
  student = os.path.join(workdir, 'student', 'seed0')
  marker = os.path.join(student, 'checkpoints')
  deadline = time.time() + 400
  while proc.poll() is None and time.time() < deadline and not (
      os.path.isdir(marker) and any(n.isdigit() for n in os.listdir(marker))):
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  assert not os.path.exists(os.path.join(student, 'results.json'))
  assert not os.path.exists(os.path.join(workdir, 'report.md'))
  killed_step = ckpt_lib.latest_step(student)
  assert killed_step > 0

  config = tiny_config()
  box = {}
  def run_job(config):
    box['report'] = jobs.run(config, workdir)['report']
  # CRD's fields are read by CRD runs alone (refused for other methods).
  assert unread(config, run_job, prefixes=('run.',)) == [
      'run.distill.nce_k', 'run.distill.nce_m', 'run.distill.nce_t']
  report = box['report']
  # The killed student resumed from its checkpoint.
  assert json.load(open(os.path.join(student, 'results.json')))['resumed_from_step'] == killed_step

  text = open(report).read()
  # Names of the networks' own sizes (C=4, not the paper's 16); the teachers' own error.
  for row in ('| N/A | DARTS_V1-3-C4 |', '| DARTS_V1-4-C4 | DARTS_V1-3-C4 |',
              '| DARTS_V1-3-C4-f | DARTS_V1-3-C4 |'):
    assert row in text
  assert 'DARTS_V1-3-C4-u' not in text
  assert 'Teacher params' in text and 'Teacher error' in text and 'over 1 seed (0)' in text
  assert 'is smaller than the paper\'s DARTS_V1-10' in text and 'Warning' not in text
  with open(os.path.join(workdir, 'report.csv')) as f:
    per_run = list(csv.DictReader(f))
  assert sorted(r['kind'] for r in per_run) == ['distilled'] * 2 + ['student'] + ['teacher'] * 2
  assert all(int(r['teacher_params']) > int(r['student_params'])
             for r in per_run if r['kind'] == 'distilled')
  assert os.path.exists(os.path.join(workdir, 'report_summary.csv'))
  with open(os.path.join(workdir, 'attention.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(workdir, 'attention.pdf'), 'rb') as f:
    assert f.read(4) == b'%PDF'

  fisher = json.load(open(os.path.join(workdir, 'fisher', 'seed0.json')))
  assert sorted(fisher['cell_totals']) == ['cell0/output', 'cell1/output', 'cell2/output']
  assert all(v > 0 for v in fisher['cell_totals'].values())
  grown = json.load(open(os.path.join(workdir, 'teachers', 'fisher', 'seed0', 'grown.json')))
  assert grown['num_params'] == pytest.approx(2.0 * grown['student_params'], rel=0.03)
  assert grown['history']
  assert not os.path.exists(os.path.join(workdir, 'teachers', 'uniform'))
  depth = json.load(open(os.path.join(workdir, 'teachers', 'depth', 'seed0', 'grown.json')))
  assert depth['model']['layers'] == 4

  # A finished pipeline run again redoes nothing.
  finished = results_mtimes(workdir)
  jobs.run(tiny_config(), workdir)
  assert results_mtimes(workdir) == finished

  # Sharded by seed (--shard=i/n): shard 0/2 of seeds (0, 1) is seed 0 alone, already
  # done, and a shard never writes the report; 'report' mode does.
  # The report covers the finished seeds only.
  report_mtime = os.path.getmtime(report)
  two_seeds = set_fields(tiny_config(), {'seeds': (0, 1)})
  jobs.run(two_seeds, workdir, JobOptions(shard=0, num_shards=2))
  assert results_mtimes(workdir) == finished
  assert not os.path.exists(os.path.join(workdir, 'student', 'seed1'))
  assert os.path.getmtime(report) == report_mtime
  time.sleep(0.01)
  jobs.run(two_seeds, workdir, JobOptions(mode='report'))
  again = open(report).read()
  assert os.path.getmtime(report) > report_mtime
  # The same table, and a warning naming seed 1's runs (not started) instead of silence.
  table = lambda t: [line for line in t.splitlines() if line.startswith('|')]
  assert table(again) == table(text)
  assert 'Seeds left out of the table (not every task has finished): 1.' in again
  assert '**Warning: 5 of 10 runs have not finished' in again
  assert '- student seed 1 (student/seed1)' in again
  with pytest.raises(validation.ConfigError, match=r'no seed of config.seeds=\(5,\) has finished'):
    jobs.run(set_fields(tiny_config(), {'seeds': (5,)}), workdir, JobOptions(mode='report'))


@pytest.mark.parametrize('field, value, message', [
    ('teachers', ('depth', 'wider'), "config.teachers has 'wider'; allowed: depth, uniform, fisher"),
    ('growth.teacher_init', 'pretrained', 'allowed: scratch, grown'),
    ('growth.target_param_ratio', 0.0, 'config.growth.target_param_ratio=0.0 is invalid: must be > 0'),
    ('seeds', (), 'give at least one seed'),
    ('growth.protocol', 'paper', 'allowed: band, release'),
    ('fisher.protocol', 'exact', 'allowed: trained, release'),
    ('fisher.protocol', 'release',
     'config.fisher.protocol=\'release\' is invalid: release needs growth.protocol=release'),
    ('growth.param_goal', 10_000,
     'config.growth.param_goal=10000 is invalid: 0 unless growth.protocol=release'),
    ({'growth.protocol': 'release'}, None,
     "config.growth.operator='widen' is invalid: growth.protocol=release densifies: use denser"),
    ({'growth.protocol': 'release', 'growth.operator': 'denser',
      'growth.function_preserving': True}, None, 'rebuilds densified operations: use False'),
    # The 3-cell tiny student has one grouped cell (cell 0, C = 4, five sep_conv_3x3):
    # densifying its ten depthwise 3x3 kernels adds 10 * 9 * (16 - 4) = 1080 to 2927; the
    # bound 0.975 x goal must stay below 4007, so the goal below 4007 / 0.975 = 4109.7.
    ({'growth.protocol': 'release', 'growth.operator': 'denser'}, None,
     'config.growth.target_param_ratio=2.0 is invalid: densifying every cell of the student '
     "(2927 by the release's measure) reaches 4007: the goal must be below 4110 (1.40x)"),
    ({'growth.protocol': 'release', 'growth.operator': 'denser', 'growth.param_goal': 5000},
     None, 'config.growth.param_goal=5000 is invalid: densifying every cell'),
])
def test_bad_pipeline_values(field, value, message, tmp_path):
  fields = field if isinstance(field, dict) else {field: value}
  config = set_fields(tiny_config(), fields)
  with pytest.raises(validation.ConfigError) as e:
    jobs.run(config, str(tmp_path))
  assert message in str(e.value)
  assert not os.listdir(tmp_path)

