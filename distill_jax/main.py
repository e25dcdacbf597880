r"""Command line: ``python -m distill_jax.main --config=CONFIG[:VARIANT] --workdir=DIR``.

The config's ``job`` field picks what runs (``train``, ``distill``, ``darts_search``,
``teacher_student``, ``darts_fisher``: see :data:`distill_jax.jobs.JOBS`). ``--mode``:
``train`` runs or resumes the job, ``evaluate`` scores what the workdir holds,
``report`` writes the reports of finished runs; ``--shard=i/n`` does the i-th of n
parts of a job's independent runs (the grid, the pipeline's seeds). A bad config value
exits with one line naming the field before anything is computed.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from distill_jax import jobs
from distill_jax import options as options_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_enum('mode', 'train', list(options_lib.MODES),
                  'train (run or resume), evaluate (score what is saved) or report (reports of '
                  'finished runs only).')
flags.DEFINE_string('shard', '0/1', 'i/n: run the i-th of n parts of the independent runs.')
flags.DEFINE_integer(
    'cpu_devices', 0, 'On a CPU: split it into this many XLA devices and shard every batch over '
    'them (XLA runs each convolution on one thread; try the number of cores). 0: JAX default.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    shard, num_shards = options_lib.parse_shard(FLAGS.shard)
    options = options_lib.JobOptions(mode=FLAGS.mode, shard=shard, num_shards=num_shards)
  except ValueError as e:
    sys.exit(f'error: {e}')
  try:
    jobs.setup_jax(cpu_devices=FLAGS.cpu_devices)
    jobs.run(FLAGS.config, FLAGS.workdir, options)
  except jobs.USER_ERRORS as e:
    logging.flush()
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
