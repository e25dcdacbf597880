"""Test set-up: 8 fake CPU devices, the persistent compilation cache, quick compiles.

Fake devices must be requested before JAX is imported; single-device tests still run
on device 0, and sharding tests build meshes over subsets of the 8.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import pytest  # noqa: E402

from distill_jax import jobs  # noqa: E402

CACHE_DIR = os.environ.get(
    'DISTILL_JAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'distill_jax', 'xla'))
# Bounded as the job's own cache is, so that the jobs the tests start in subprocesses
# (JAX_COMPILATION_CACHE_DIR=CACHE_DIR) can write to it too.
jobs.use_compilation_cache(CACHE_DIR, min_compile_time_secs=0.5)
# Every JAX process a test starts is bounded from its first compile, the benchmarks too (an
# unbounded writer leaves entries without the access time the bounded ones then fail on).
os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(jobs.CACHE_MAX_BYTES)


# Most test models are compile-bound: XLA's optimisation passes are off (compiles are
# shorter). Tests that run tens of steps are execution-bound (unoptimised CPU code runs a
# WRN step ~15 times slower) and are marked `optimized`: see pytest_runtest_setup.
# Subprocesses inherit the setting through the environment.
def _optimize(on: bool) -> None:
  if jax.config.read('jax_disable_most_optimizations') == on:
    # JAX's in-memory caches do not key on the flag: without this, a computation compiled
    # for an earlier test under the other setting would be reused.
    jax.clear_caches()
  os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '0' if on else '1'
  jax.config.update('jax_disable_most_optimizations', not on)


_optimize(False)


@pytest.fixture
def rng():
  return jax.random.key(0)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = ''):
  """``configs/NAME.py``'s ``get_config(arg)``, unlocked so tests can shrink it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f'configs_{name}', os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
  return config


def tiny_train_config(**overrides):
  """A WRN-10-1 on digits: a few seconds of compile and steps."""
  c = load_config('train', 'demo')
  c.model.depth = 10
  c.model.widen_factor = 1
  c.num_epochs = 2
  c.batch_size = 32
  c.eval_batch_size = 120
  c.log_every_steps = 10
  c.checkpoint_every_steps = 20
  c.num_devices = 1
  from distill_jax.config_lib import set_fields  # pylint: disable=g-import-not-at-top
  return set_fields(c, overrides)


# ---------------------------------------------------------------------------------------
# Recording which config fields a job reads (tests/test_config_reads.py and the
# end-to-end tests of the grid and the search).

# Fields read only for some values of another field; the test names which.
CONDITIONAL = {
    # Read by optimizer.schedule='multistep' only (the demos use cosine).
    'optimizer.milestones', 'optimizer.decay_factor',
}


def _unrecorded(fn):
  import functools  # pylint: disable=g-import-not-at-top
  from distill_jax import config_lib  # pylint: disable=g-import-not-at-top

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with config_lib.unrecorded_reads():
      return fn(*args, **kwargs)
  return wrapper


@pytest.fixture
def unrecorded_validation(monkeypatch):
  """The validators' reads (every field, none used) are not recorded."""
  from distill_jax import validation  # pylint: disable=g-import-not-at-top
  from distill_jax.experiments import darts_fisher, grid  # pylint: disable=g-import-not-at-top
  from distill_jax.trainers import train  # pylint: disable=g-import-not-at-top
  for module, name in [(validation, 'validate_train_config'), (validation, 'validate_distill_config'),
                       (train, 'validate'), (grid, 'validate'), (darts_fisher, 'validate')]:
    monkeypatch.setattr(module, name, _unrecorded(getattr(module, name)))


def unread(config, run_job, prefixes=('',)):
  """The sorted fields of ``config`` that ``run_job(config)`` never reads (beyond
  :data:`CONDITIONAL` under each of ``prefixes``)."""
  from distill_jax import config_lib  # pylint: disable=g-import-not-at-top
  config.lock()
  config, reads = config_lib.trace_reads(config)
  run_job(config)
  fields = config_lib.leaf_paths(config)
  conditional = {p + f for p in prefixes for f in CONDITIONAL}
  return sorted(fields - reads - conditional)




def pytest_collection_modifyitems(items):
  """Files with end-to-end tests first: with ``--dist loadfile`` the long files start at
  once and the short ones fill in at the end, instead of one worker finishing alone."""
  heavy = {item.path for item in items if item.get_closest_marker('e2e')}
  items.sort(key=lambda item: item.path not in heavy)


def pytest_runtest_setup(item):
  """XLA's optimisations for tests marked ``optimized`` (set before their fixtures, so a
  module's shared fixtures are built as its tests run); ``optimized(False)`` on a test
  overrides its module's mark."""
  mark = item.get_closest_marker('optimized')
  _optimize(mark is not None and (not mark.args or bool(mark.args[0])))
