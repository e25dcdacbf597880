"""What ``python -m distill_jax.main`` runs: the config's ``job`` picks one of :data:`JOBS`,
after :func:`setup_jax` has prepared devices, hosts and the compilation cache."""

from __future__ import annotations

import logging as std_logging
import os
import time

from absl import logging
import jax
import ml_collections

from distill_jax import data as data_lib
from distill_jax import validation
from distill_jax.experiments import darts_fisher
from distill_jax.experiments import grid
from distill_jax.experiments import runs
from distill_jax.options import JobOptions
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop
from distill_jax.trainers import search
from distill_jax.trainers import teacher as teacher_lib
from distill_jax.trainers import train as train_lib
from distill_jax.trainers import workdir as workdir_lib

USER_ERRORS = (validation.ConfigError, data_lib.DatasetNotFoundError, loop.NonFiniteLossError,
               teacher_lib.TeacherError, FileNotFoundError, workdir_lib.WorkdirError,
               ckpt_lib.CheckpointError, runs.WaitTimeout)


class _DropLibraryChatter:
  """Keeps orbax's per-save INFO lines out of the run's log (warnings still pass), and
  the tracebacks of its background threads: a failed save is reported once, in one line,
  by :mod:`distill_jax.trainers.checkpoint`."""

  def filter(self, record) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if record.exc_info:
      record.exc_info, record.exc_text = None, None
      record.msg, record.args = str(record.getMessage()).split('\n', 1)[0], ()
    return record.levelno >= 30


def setup_jax(*, cpu_devices: int = 0) -> None:
  """CPU devices, multi-process start-up and the persistent compilation cache.

  ``cpu_devices > 0`` splits a CPU into that many XLA devices (``jax_num_cpu_devices``):
  XLA:CPU runs each convolution on one thread, so sharding the batch over one device
  per core uses every core (README "Benchmarks"); it does nothing on GPUs and TPUs. It must
  precede the first use of a device.

  ``jax.distributed.initialize()`` runs with ``JAX_COORDINATOR_ADDRESS`` /
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` set (explicit), under SLURM with several
  tasks, or with ``DISTILL_JAX_DISTRIBUTED=1`` (TPU pods: every worker runs the same
  command and JAX finds its peers); it must precede every other JAX call.
  """
  if isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or cpu_devices < 0:
    raise validation.ConfigError(
        f'cpu_devices={cpu_devices!r} is not allowed; use 0 (JAX default) or a positive number '
        f'of CPU devices, e.g. the number of cores ({os.cpu_count()})')
  if cpu_devices:
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  elif os.environ.get('SLURM_NTASKS', '1') != '1' or os.environ.get('DISTILL_JAX_DISTRIBUTED') == '1':
    jax.distributed.initialize()
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  # "Unable to initialize backend 'tpu'" and the like on every start: JAX's own INFO lines.
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)
  cache = compilation_cache_dir()
  if cache:
    use_compilation_cache(cache)


def use_compilation_cache(cache: str, min_compile_time_secs: float = 1.0) -> None:
  """Keeps compiled programs in ``cache``, at most :data:`CACHE_MAX_BYTES` (oldest evicted).

  JAX's bounded cache keeps an access time beside each entry and fails to write (a warning
  per compile, nothing cached) when an entry lacks one, as entries written by an unbounded
  cache (JAX's default) do: those get one first.
  """
  add_missing_access_times(cache)
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time_secs)
  jax.config.update('jax_compilation_cache_max_size', CACHE_MAX_BYTES)


def add_missing_access_times(cache: str) -> int:
  """Writes the access-time file JAX's bounded cache expects beside every entry of
  ``cache`` without one (now, as 8 little-endian bytes of ns); returns how many."""
  if not os.path.isdir(cache):
    return 0
  names = set(os.listdir(cache))
  missing = [n[:-len('-cache')] for n in names
             if n.endswith('-cache') and n[:-len('-cache')] + '-atime' not in names]
  now = time.time_ns().to_bytes(8, 'little')
  for key in missing:
    try:
      with open(os.path.join(cache, key + '-atime'), 'xb') as f:
        f.write(now)
    except OSError:  # another process wrote it, or the folder is read-only: JAX says so
      pass
  return len(missing)


DEFAULT_CACHE = os.path.join('~', '.cache', 'distill_jax', 'xla')
CACHE_MAX_BYTES = 4 * 2**30


def compilation_cache_dir() -> str | None:
  """Where compiled programs are kept between runs (``None``: nowhere).

  ``DISTILL_JAX_COMPILATION_CACHE`` is a folder or ``off``; else JAX's own
  ``JAX_COMPILATION_CACHE_DIR``; else ``~/.cache/distill_jax/xla``. Later runs load and
  execute what is there, so it must be a folder only you can write.
  """
  chosen = os.environ.get('DISTILL_JAX_COMPILATION_CACHE', '').strip()
  if chosen.lower() in ('off', 'none', '0'):
    return None
  return os.path.expanduser(chosen or os.environ.get('JAX_COMPILATION_CACHE_DIR')
                            or DEFAULT_CACHE)


# config.job -> the module that runs it; each has validate(config) and
# run(config, workdir, options).
JOBS = {'train': train_lib, 'distill': train_lib, 'darts_search': search,
        'teacher_student': grid, 'darts_fisher': darts_fisher}


def job_module(config: ml_collections.ConfigDict):
  job = config.get('job', 'train')
  if job not in JOBS:
    raise validation.ConfigError(f'config.job={job!r} is invalid: allowed: {", ".join(JOBS)}')
  return JOBS[job]


def validate(config: ml_collections.ConfigDict) -> None:
  """The config checks of ``config.job``, before any compute."""
  job_module(config).validate(config)


def run(config: ml_collections.ConfigDict, workdir: str,
        options: JobOptions = JobOptions()):
  """Runs ``config.job`` in ``workdir``; returns its results (a dict: a run's results, or
  an experiment's ``report`` path with what it trained)."""
  return job_module(config).run(config, workdir, options)


def _percent(results: dict, key: str) -> str:
  value = results.get(key)
  return 'n/a' if value is None else f'{100.0 * float(value):.2f} %'


def summary_line(config: ml_collections.ConfigDict, workdir: str, options: JobOptions,
                 results: dict) -> str:
  """The one line a finished job ends with: its error in percent and where its results are."""
  job = config.get('job', 'train')
  if 'report' in results:  # an experiment (the grid, the pipeline)
    trained = len(results.get('trained') or [])
    if results['report'] is None:
      return (f'Shard {options.shard}/{options.num_shards} of {job} done ({trained} tasks '
              f'computed now); when every shard is done: --mode=report --workdir={workdir}')
    return f'{job}: {trained} tasks computed now; report in {results["report"]}'
  if 'genotype' in results and 'val_top1_error' in results:  # a search
    where = 'results.json' if options.mode == 'train' else 'its checkpoint'
    return (f'{job}: validation top-1 error {_percent(results, "val_top1_error")}, genotype in '
            f'{os.path.join(workdir, "genotype.json")} ({where})')
  if 'genotype' in results:
    return f'{job}: genotype and pictures rewritten in {workdir}'
  errors = (f'test top-1 error {_percent(results, "test_top1_error")}, '
            f'top-5 {_percent(results, "test_top5_error")}')
  if options.mode == 'evaluate':
    return (f'{job}: step {results.get("step")} evaluated: {errors}; written to '
            f'{os.path.join(workdir, "eval_results.json")}')
  return (f'{job}: {errors} after {results.get("epochs")} epochs (final epoch); results in '
          f'{os.path.join(workdir, loop.RESULTS_FILE)}')
