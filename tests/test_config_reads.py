"""Every field of every shipped config is read by the job it configures.

Each config's ``:demo`` (shrunk further) runs its job with every read of the config
recorded (:func:`distill_jax.config_lib.trace_reads`, copies included); the checks of
``validate`` read every field without using it, so their reads are not recorded. A field
that no computation reads would be accepted and ignored: that fails here. The grid's
check is in tests/test_grid.py, the search's in tests/test_darts_search.py and the
darts_fisher pipeline's in tests/test_darts_fisher.py, on runs those files make anyway.
"""

import pytest

from conftest import load_config, unread
from distill_jax import config_lib
from distill_jax import jobs

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


@pytest.mark.optimized
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
  # CRD's fields are read by CRD runs alone (tests/test_distill.py trains one); for any
  # other method validation refuses a value other than the default (test_bad_distill_values).
  assert unread(c, lambda c: jobs.run(c, str(tmp_path))) == [
      'distill.nce_k', 'distill.nce_m', 'distill.nce_t']


@pytest.mark.e2e
def test_darts_eval_reads_every_field(tmp_path, unrecorded_validation):
  c = shrink_run(load_config('darts_eval', 'demo'),
                 **{'model.layers': 3, 'model.init_channels': 4})
  assert unread(c, lambda c: jobs.run(c, str(tmp_path))) == []
