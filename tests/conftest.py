"""Test set-up: 8 fake CPU devices, the persistent compilation cache, quick compiles.

Fake devices must be requested before JAX is imported; single-device tests still run
on device 0, and sharding tests build meshes over subsets of the 8.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import pytest  # noqa: E402

CACHE_DIR = os.environ.get(
    'DISTILL_JAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'distill_jax', 'xla'))
jax.config.update('jax_compilation_cache_dir', CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
# Tiny test models are compile-bound: trade step speed for shorter compiles.
jax.config.update('jax_disable_most_optimizations', True)


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
