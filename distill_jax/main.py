r"""Command line: ``python -m distill_jax.main --config=CONFIG[:VARIANT] --workdir=DIR``.

The config's ``job`` field picks what runs (``train`` for now); ``--mode=evaluate``
scores the latest checkpoint of ``--workdir`` instead of training. A bad config
value exits with one line naming the field before anything is computed.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'], 'Train (resuming) or only evaluate.')
flags.DEFINE_integer(
    'cpu_devices', 0, 'On a CPU: split it into this many XLA devices and shard every batch over '
    'them (XLA runs each convolution on one thread; try the number of cores). 0: JAX default.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from distill_jax import jobs  # pylint: disable=g-import-not-at-top  (after flag parsing)
  try:
    jobs.setup_jax(cpu_devices=FLAGS.cpu_devices)
    jobs.run(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode)
  except jobs.USER_ERRORS as e:
    logging.flush()
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
