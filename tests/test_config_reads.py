"""Every field of every shipped config is read by the job it configures.

Each config's ``:demo`` (shrunk further) runs its job with every read of the config
recorded (:func:`distill_jax.config_lib.trace_reads`, copies included); the checks of
``validate`` read every field without using it, so their reads are not recorded. A field
that no computation reads would be accepted and ignored: that fails here.
"""

import functools

import pytest

from conftest import load_config
from distill_jax import config_lib
from distill_jax import jobs
from distill_jax import validation
from distill_jax.experiments import darts_fisher
from distill_jax.experiments import grid
from distill_jax.trainers import search
from distill_jax.trainers import train

# Fields read only for some values of another field; the test names which.
CONDITIONAL = {
    # Read by optimizer.schedule='multistep' only (the demos use cosine).
    'optimizer.milestones', 'optimizer.decay_factor',
}


def _unrecorded(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with config_lib.unrecorded_reads():
      return fn(*args, **kwargs)
  return wrapper


@pytest.fixture
def unrecorded_validation(monkeypatch):
  for module, name in [(validation, 'validate_train_config'), (validation, 'validate_distill_config'),
                       (train, 'validate'), (search, 'validate'), (grid, 'validate'),
                       (darts_fisher, 'validate')]:
    monkeypatch.setattr(module, name, _unrecorded(getattr(module, name)))


def unread(config, run_job, prefixes=('',)):
  config.lock()
  config, reads = config_lib.trace_reads(config)
  run_job(config)
  fields = config_lib.leaf_paths(config)
  conditional = {p + f for p in prefixes for f in CONDITIONAL}
  return sorted(fields - reads - conditional)


def shrink_run(run, **fields):
  run.num_epochs = 1
  run.batch_size = 32
  run.eval_batch_size = 120
  run.log_every_steps = 20
  run.checkpoint_every_steps = 40
  run.num_devices = 1
  for key, value in fields.items():
    config_lib.set_fields(run, {key: value})
  return run


@pytest.mark.e2e
def test_train_reads_every_field(tmp_path, unrecorded_validation):
  c = shrink_run(load_config('train', 'demo'), **{'model.depth': 10, 'model.widen_factor': 1})
  assert unread(c, lambda c: jobs.run(c, str(tmp_path))) == []


@pytest.mark.e2e
def test_distill_reads_every_field(tmp_path, unrecorded_validation):
  c = shrink_run(load_config('distill', 'demo'), **{'model.depth': 10, 'model.widen_factor': 1})
  c.distill.teacher_model.depth = 10
  c.distill.teacher_model.widen_factor = 1
  c.distill.method = 'kd_at'  # reads every weight (alpha, temperature, beta, at_form)
  assert unread(c, lambda c: jobs.run(c, str(tmp_path))) == []


@pytest.mark.e2e
def test_darts_eval_reads_every_field(tmp_path, unrecorded_validation):
  c = shrink_run(load_config('darts_eval', 'demo'),
                 **{'model.layers': 3, 'model.init_channels': 4})
  assert unread(c, lambda c: jobs.run(c, str(tmp_path))) == []


@pytest.mark.e2e
def test_teacher_student_reads_every_field(tmp_path, unrecorded_validation):
  c = load_config('teacher_student', 'demo')
  c.teachers = ('darts_v1_25',)      # a DARTS run reads darts_drop_path_prob
  c.students = ('wrn_16_2',)
  c.seeds = (0,)
  c.darts_drop_path_prob = 0.1
  shrink_run(c.run)
  c.run.distill.method = 'kd_at'
  assert unread(c, lambda c: jobs.run(c, str(tmp_path)), prefixes=('run.',)) == []


@pytest.mark.e2e
def test_darts_fisher_reads_every_field(tmp_path, unrecorded_validation):
  c = load_config('darts_fisher', 'demo')
  c.seeds = (0,)
  shrink_run(c.run, **{'model.layers': 3, 'model.init_channels': 4})
  c.run.distill.method = 'kd_at'
  c.run.drop_path_prob = 0.1         # the bug this test exists for: it must reach every run
  c.growth.depth_layers = 4
  c.fisher.num_batches = 1
  c.fisher.batch_size = 32
  c.figure.num_images = 2
  assert unread(c, lambda c: jobs.run(c, str(tmp_path)), prefixes=('run.',)) == []


@pytest.mark.e2e
def test_darts_search_reads_every_field(tmp_path, unrecorded_validation):
  c = load_config('darts_search', 'demo')
  c.model.layers = 3
  c.num_epochs = 1
  c.batch_size = 32
  c.eval_batch_size = 120
  c.log_every_steps = 11
  c.checkpoint_every_steps = 11
  c.num_devices = 1
  c.order = 2                        # reads hessian and the virtual step's settings
  c.hessian = 'finite_difference'    # reads arch.fd_epsilon
  assert unread(c, lambda c: jobs.run(c, str(tmp_path))) == []
