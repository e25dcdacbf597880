"""What a researcher reads: progress in plain words, one summary line per job and only the
loss terms a method uses (the provenance in results.json: tests/test_train.py)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill_jax import jobs
from distill_jax.options import JobOptions
from distill_jax.trainers import loop
from distill_jax.trainers import steps as steps_lib


@pytest.mark.parametrize('seconds, words', [
    (0, '0 s'), (7.4, '7 s'), (59.6, '1 min 00 s'), (200, '3 min 20 s'), (3725, '1 h 02 min'),
    (-3, '0 s')])
def test_plain_duration(seconds, words):
  assert loop.plain_duration(seconds) == words


def test_counts_are_singular_for_one():
  assert loop.count(1, 'device') == '1 device' and loop.count(8, 'device') == '8 devices'
  assert loop.count(10694, 'parameter') == '10,694 parameters' and loop.count(0, 'step') == '0 steps'


def test_progress_extrapolates_from_the_units_after_the_first_report(monkeypatch):
  clock = iter([100.0, 110.0, 112.0, 130.0])
  monkeypatch.setattr(loop.time, 'monotonic', lambda: next(clock))
  progress = loop.Progress('step', 100)  # created at t=100
  # First report (t=110, 10 steps, compile included): extrapolated from the start.
  assert progress.describe(10) == 'step 10/100 (10%), 10 s elapsed, about 1 min 30 s left'
  # Then from the first report on: 10 steps in 2 s, 80 to go.
  assert progress.describe(20) == 'step 20/100 (20%), 12 s elapsed, about 16 s left'
  assert progress.describe(100) == 'step 100/100 (100%), 30 s elapsed'


def test_resumed_progress_counts_only_the_steps_run_now(monkeypatch):
  clock = iter([0.0, 20.0])
  monkeypatch.setattr(loop.time, 'monotonic', lambda: next(clock))
  progress = loop.Progress('step', 100, done=60)
  assert progress.describe(70) == 'step 70/100 (70%), 20 s elapsed, about 1 min 00 s left'


def _config(job):
  return ml_collections.ConfigDict({'job': job})


def test_summary_lines():
  train = {'test_top1_error': 0.0123, 'test_top5_error': 0.0, 'epochs': 8}
  assert jobs.summary_line(_config('distill'), '/w', JobOptions(), train) == (
      'distill: test top-1 error 1.23 %, top-5 0.00 % after 8 epochs (final epoch); results in '
      '/w/results.json')
  assert jobs.summary_line(_config('train'), '/w', JobOptions(mode='evaluate'),
                           {**train, 'step': 88}) == (
      'train: step 88 evaluated: test top-1 error 1.23 %, top-5 0.00 %; written to '
      '/w/eval_results.json')
  assert jobs.summary_line(_config('teacher_student'), '/w', JobOptions(),
                           {'trained': ['a', 'b'], 'report': '/w/report.md'}) == (
      'teacher_student: 2 tasks computed now; report in /w/report.md')
  shard = jobs.summary_line(_config('darts_fisher'), '/w', JobOptions(shard=1, num_shards=2),
                            {'trained': [], 'report': None})
  assert shard.startswith('Shard 1/2 of darts_fisher done') and '--mode=report' in shard
  search = jobs.summary_line(_config('darts_search'), '/w', JobOptions(),
                             {'genotype': {}, 'val_top1_error': 0.5})
  assert search.startswith('darts_search: validation top-1 error 50.00 %, genotype in /w/genotype.json')


@pytest.mark.parametrize('method, terms', [
    (None, ['ce']), ('none', ['ce']), ('hard', ['ce']), ('kd', ['ce', 'kd']), ('at', ['at', 'ce']),
    ('kd_at', ['at', 'ce', 'kd']), ('sp', ['ce', 'sp']), ('kd_nst', ['ce', 'kd', 'nst']),
    ('dkd', ['ce', 'dkd'])])
def test_only_the_terms_a_method_uses_are_logged(method, terms):
  distill = None if method is None else ml_collections.ConfigDict(
      {'method': method, 'alpha': 0.9, 'temperature': 4.0, 'beta': 1e3, 'at_form': 'released',
       'warmup_epochs': 0.0})
  logits, labels = jnp.asarray(np.eye(4, 10) * 3.0), jnp.arange(4)
  points = [jnp.ones((4, 2, 2, 3))]
  loss, found = steps_lib.make_loss(distill)(logits, labels, points, logits + 1.0, points)
  assert sorted(found) == terms and np.isfinite(float(loss))


def test_no_git_checkout_gives_no_commit(tmp_path):
  assert loop.git_commit(str(tmp_path)) is None
