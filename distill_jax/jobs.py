"""What ``python -m distill_jax.main`` runs: the config's ``job`` picks one of these."""

from __future__ import annotations

import os

from absl import logging
import jax
import ml_collections

from distill_jax import data as data_lib
from distill_jax import train as train_lib
from distill_jax import validation

JOBS = ('train',)
USER_ERRORS = (validation.ConfigError, data_lib.DatasetNotFoundError, train_lib.NonFiniteLossError,
               FileNotFoundError)


class _DropLibraryChatter:
  """Keeps orbax's per-save INFO lines out of the run's log (warnings still pass)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def setup_jax() -> None:
  """Multi-process start-up and the persistent compilation cache.

  ``jax.distributed.initialize()`` runs when launched under SLURM, on a TPU pod or
  with ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` set; it
  must precede every other JAX call.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  elif os.environ.get('SLURM_NTASKS', '1') != '1' or os.environ.get('TPU_WORKER_HOSTNAMES'):
    jax.distributed.initialize()
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'distill_jax', 'xla')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def run(config: ml_collections.ConfigDict, workdir: str, *, mode: str = 'train') -> None:
  job = config.get('job', 'train')
  if job not in JOBS:
    raise validation.ConfigError(f'config.job={job!r} is invalid: allowed: {", ".join(JOBS)}')
  if mode == 'evaluate':
    train_lib.evaluate(config, workdir)
  else:
    train_lib.train_and_evaluate(config, workdir)
