"""What ``python -m distill_jax.main`` runs: the config's ``job`` picks one of :data:`JOBS`."""

from __future__ import annotations

import copy
import os

from absl import logging
import jax
import ml_collections

from distill_jax import config_lib
from distill_jax import data as data_lib
from distill_jax import models
from distill_jax import sweeps
from distill_jax import teacher as teacher_lib
from distill_jax import train as train_lib
from distill_jax import validation

USER_ERRORS = (validation.ConfigError, data_lib.DatasetNotFoundError, train_lib.NonFiniteLossError,
               teacher_lib.TeacherError, FileNotFoundError)
TEACHER_SUBDIR = 'teacher'


class _DropLibraryChatter:
  """Keeps orbax's per-save INFO lines out of the run's log (warnings still pass)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


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
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'distill_jax', 'xla')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config that trains ``config``'s teacher: same data and recipe, the teacher's model."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.job = 'train'
    c.model = copy.deepcopy(config.distill.teacher_model)
    del c['distill']
  return c


def distill(config: ml_collections.ConfigDict, workdir: str, *, mode: str = 'train') -> dict:
  """Trains the student in ``workdir`` against a frozen teacher (``config.distill``).

  The teacher comes from ``distill.teacher_workdir``; when that is empty it is first
  trained (or resumed, or found finished) in ``WORKDIR/teacher`` with the same recipe.
  """
  validation.validate_distill_config(config)
  teacher = None
  if config.distill.method != 'none':
    teacher_dir = config.distill.teacher_workdir
    if not teacher_dir:
      teacher_dir = os.path.join(workdir, TEACHER_SUBDIR)
      train_lib.train_and_evaluate(teacher_config(config), teacher_dir)
    shape = (1, *data_lib.IMAGE_SHAPES[config.data.name])
    teacher = teacher_lib.load_teacher(config.distill.teacher_model, teacher_dir, shape,
                                       dtype=models.compute_dtype(config.compute_dtype))
    logging.info('Teacher %s loaded from %s.', config.distill.teacher_model.name, teacher.source)
  if mode == 'evaluate':
    return train_lib.evaluate(config, workdir, teacher=teacher)
  return train_lib.train_and_evaluate(config, workdir, teacher=teacher)


def train(config: ml_collections.ConfigDict, workdir: str, *, mode: str = 'train') -> dict:
  if mode == 'evaluate':
    return train_lib.evaluate(config, workdir)
  return train_lib.train_and_evaluate(config, workdir)


def _execute(config: ml_collections.ConfigDict, workdir: str) -> dict:
  return JOBS[config.job](config, workdir)


def validate_runs(runs: list[sweeps.RunSpec]) -> None:
  """Checks every run's config before the first one computes anything."""
  for spec in runs:
    try:
      if spec.config.job == 'distill':
        validation.validate_distill_config(spec.config)
      else:
        validation.validate_train_config(spec.config)
    except validation.ConfigError as e:
      raise validation.ConfigError(f'{spec.name}: {e}') from None


def teacher_student(config: ml_collections.ConfigDict, workdir: str, *, mode: str = 'train',
                    shard: int = 0, num_shards: int = 1) -> str:
  """The teacher × student grid: trains what is missing, then writes the report."""
  for field in ('teachers', 'students'):
    table = config_lib.DEMO_NETWORKS if config.demo_networks else config_lib.NETWORKS
    for key in config[field]:
      if key not in table:
        raise validation.ConfigError(
            f'config.{field} has {key!r}, not a known network; known: {", ".join(table)}')
  if not config.seeds:
    raise validation.ConfigError('config.seeds=() is invalid: give at least one seed')
  runs = sweeps.grid_runs(config, workdir)
  validate_runs(runs)
  if mode == 'train':
    sweeps.run_sweep(runs, _execute, shard=shard, num_shards=num_shards)
  rows = sweeps.report_rows(runs)
  if jax.process_index() == 0 and rows:
    markdown = sweeps.write_report(
        rows, workdir, title='Teacher × student (attention transfer)',
        extra_columns={'Student params': lambda r: f'{r["student_params"]:,}'})
    logging.info('Report written to %s:\n%s', os.path.join(workdir, 'report.md'), markdown)
  return os.path.join(workdir, 'report.md')


def darts_fisher(config: ml_collections.ConfigDict, workdir: str, *, mode: str = 'train',
                 shard: int = 0, num_shards: int = 1) -> str:
  """The darts_fisher pipeline (see :mod:`distill_jax.pipeline`).

  ``mode='train'`` runs (or resumes) the seeds ``seeds[shard::num_shards]``; ``'report'``
  writes the report and figure of finished seeds; ``'evaluate'`` only the report.
  """
  from distill_jax import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.validate(config)
  validate_runs([sweeps.RunSpec(name='student', workdir='', config=sweeps.run_config(
      config, dict(config.model), config.seeds[0]), stage=0, teacher='', student='', seed=0)])
  runner = pipeline.Pipeline(config, workdir)
  if mode == 'evaluate':
    return runner.report()
  if mode == 'report':
    return runner.finish()
  return runner.run(shard=shard, num_shards=num_shards)


def darts_search(config: ml_collections.ConfigDict, workdir: str, *, mode: str = 'train') -> dict:
  """The DARTS architecture search (see :mod:`distill_jax.search`); resumes from ``workdir``."""
  from distill_jax import search  # pylint: disable=g-import-not-at-top
  if mode == 'evaluate':
    raise validation.ConfigError('--mode=evaluate is not available for config.job=darts_search; '
                                 'the search writes its validation error to results.json')
  return search.run_search(config, workdir)


# Jobs made of independent runs that launch/sweep.py can shard (``shard=i, num_shards=n``).
SHARDABLE_JOBS = {'teacher_student': teacher_student, 'darts_fisher': darts_fisher}
JOBS = {'train': train, 'distill': distill, 'teacher_student': teacher_student,
        'darts_fisher': darts_fisher, 'darts_search': darts_search}


def run(config: ml_collections.ConfigDict, workdir: str, *, mode: str = 'train') -> dict:
  job = config.get('job', 'train')
  if job not in JOBS:
    raise validation.ConfigError(f'config.job={job!r} is invalid: allowed: {", ".join(JOBS)}')
  return JOBS[job](config, workdir, mode=mode)
