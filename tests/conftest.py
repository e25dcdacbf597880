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
