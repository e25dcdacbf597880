r"""Command line: ``python -m distill_jax.main --config=CONFIG[:VARIANT] --workdir=DIR``.

The config's ``job`` field picks what runs (``train``, ``distill``, ``darts_search``,
``teacher_student``, ``darts_fisher``: see :data:`distill_jax.jobs.JOBS`). ``--mode``:
``train`` runs or resumes the job, ``evaluate`` scores what the workdir holds,
``report`` writes the reports of finished runs; ``--shard=i/n`` does the i-th of n
parts of a job's independent runs (the grid, the pipeline's seeds). A bad flag, config
file, config key or config value exits with one line ``error: ...`` naming it before
anything is computed.
"""

import difflib
import importlib.machinery
import importlib.util
import os
import re
import signal
import sys
import traceback

# TensorFlow (loaded by tensorflow-datasets for CIFAR) reads this once, when it loads.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from distill_jax import config_lib
from distill_jax import jobs
from distill_jax import options as options_lib
from distill_jax import validation
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop

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


class FlagError(Exception):
  """A command line that cannot run; the message is the one line to print."""


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of ``--name=V`` / ``--name V`` in ``argv`` (the last one), else None."""
  value = None
  for i, arg in enumerate(argv):
    match = re.match(rf'^--?{name}(=(.*))?$', arg)
    if match:
      value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
  """``(key, argument)`` of every ``--config.KEY[=VALUE]`` (and ``--noconfig.KEY``)."""
  out = []
  for arg in argv:
    match = re.match(r'^--?(no)?config\.([^=]*)', arg)
    if match:
      out.append((match.group(2), arg))
  return out


def _one_line(text: str) -> str:
  return ' '.join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def _load_config(value: str) -> ml_collections.ConfigDict:
  """``get_config(ARG)`` of ``--config=PATH[:ARG]``; a :class:`FlagError` for a missing file
  or one that fails (its exception and line)."""
  path, *arg = value.split(':', 1)
  if not os.path.isfile(path):
    raise FlagError(f'--config={value}: no such config file {path!r} (from {os.getcwd()})')
  try:
    loader = importlib.machinery.SourceFileLoader('_checked_config', path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    if not hasattr(module, 'get_config'):
      raise FlagError(f'--config={value}: {path} has no get_config() function')
    config = module.get_config(*arg)
  except FlagError:
    raise
  except SyntaxError as e:
    raise FlagError(f'--config={value}: SyntaxError at {path} line {e.lineno}: {e.msg}') from None
  except Exception as e:  # pylint: disable=broad-except  (any failure of the user's file)
    message = _one_line(e)
    if message.startswith(f'{value}: ') or message.startswith(f'{path}:'):
      raise FlagError(f'--config={message}') from None
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(path)]
    where = f' at {path} line {lines[-1]}' if lines else ''
    raise FlagError(f'--config={value}: {type(e).__name__}{where}: {message}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise FlagError(f'--config={value}: get_config() returned {type(config).__name__}, '
                    'not a ConfigDict')
  return config


def closest_field(key: str, leaves: list[str]) -> str | None:
  """The field of ``leaves`` (dotted paths) a misspelt ``key`` most likely means: the same
  name in another section, else a sibling that the name abbreviates (``lr``), starts or
  resembles, else the closest whole path."""
  parent, _, name = key.rpartition('.')
  same_name = [leaf for leaf in leaves if leaf.rpartition('.')[2] == name]
  if same_name:
    return same_name[0]
  siblings = {leaf.rpartition('.')[2]: leaf for leaf in leaves if leaf.rpartition('.')[0] == parent}
  for sibling, leaf in siblings.items():
    initials = ''.join(part[:1] for part in sibling.split('_'))
    if len(name) > 1 and (name == initials or sibling.startswith(name) or name.startswith(sibling)):
      return leaf
  close = difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.6)
  if close:
    return siblings[close[0]]
  close = difflib.get_close_matches(key, leaves, n=1, cutoff=0.6)
  return close[0] if close else None


def _check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
  """Every ``--config.KEY`` is a field of ``config``; else the closest one is named."""
  leaves = sorted(config_lib.leaf_paths(config))
  sections = {leaf.rsplit('.', i)[0] for leaf in leaves for i in range(1, leaf.count('.') + 1)}
  for key, arg in _overrides(argv):
    if key in leaves or key in sections:
      continue
    close = closest_field(key, leaves)
    if close:
      hint = f'closest: {close}'
    else:
      parent = key.rpartition('.')[0] if key.rpartition('.')[0] in sections else ''
      names = sorted({leaf[len(parent) + 1 if parent else 0:].split('.')[0]
                      for leaf in leaves if not parent or leaf.startswith(parent + '.')})
      hint = f'fields{" of " + parent if parent else ""}: {", ".join(names)}'
    raise FlagError(f'{arg} is invalid: the config has no field {key!r}; {hint}')


def _flag_error_line(error: flags.Error, config: ml_collections.ConfigDict | None) -> str:
  """absl's ``flag --NAME=VALUE: MESSAGE`` as ``--NAME=VALUE is invalid: ...`` (for a
  config field, with the type its default has)."""
  message = _one_line(error)
  match = re.match(r'^flag --([^=]+)=(.*?): (.*)$', message)
  if not match:
    return message
  name, value, detail = match.groups()
  if 'must have a value other than None' in detail:
    return f'--{name} is required: {detail}'
  if config is not None and name.startswith('config.'):
    try:
      default = validation.get(config, name[len('config.'):])
    except (KeyError, AttributeError):
      default = None
    if default is not None and not isinstance(default, ml_collections.ConfigDict):
      kind = type(default).__name__
      detail = (f'must be a{"n" * (kind[0] in "aeiou")} {kind} like its default {default!r} '
                f'({detail})')
  return f'--{name}={value} is invalid: {detail}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, every failure of which exits with one line ``error: ...``."""
  config = None
  try:
    value = _flag_value(argv[1:], 'config')
    if value is not None:
      config = _load_config(value)
      _check_overrides(config, argv[1:])
    return FLAGS(argv)
  except FlagError as e:
    message = str(e)
  except flags.Error as e:
    message = _flag_error_line(e, config)
  except Exception as e:  # pylint: disable=broad-except  (a user's flag or config file)
    message = f'{type(e).__name__}: {_one_line(e)}'
  sys.exit(f'error: {message}')


def _validate(config: ml_collections.ConfigDict) -> None:
  """:func:`jobs.validate`; a config without a field its job needs (``--config.job`` set
  to another job than its file's) is one line."""
  try:
    jobs.validate(config)
  except (KeyError, AttributeError) as e:
    while isinstance(e, Exception) and e.args:  # ml_collections: AttributeError(KeyError("'x'"))
      e = e.args[0]
    missing = _one_line(e).strip('"\'').split("'")[0]
    job = config.get('job', 'train')
    raise validation.ConfigError(
        f'config.job={job!r} is invalid for this config: it has no field {missing!r}, which '
        f'job {job!r} needs; use the config file of that job') from None


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {" ".join(argv[1:])!r}: give every option as '
             '--name=value')
  if not FLAGS.workdir.strip():
    sys.exit(f'error: --workdir={FLAGS.workdir!r} is invalid: give the directory for '
             'checkpoints, metrics and results (created if missing)')
  try:
    shard, num_shards = options_lib.parse_shard(FLAGS.shard)
    options = options_lib.JobOptions(mode=FLAGS.mode, shard=shard, num_shards=num_shards)
  except ValueError as e:
    sys.exit(f'error: {e}')
  # SIGTERM / SIGINT outside a training loop stop at once (inside one, after a save).
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, loop.raise_stopped)
  try:
    jobs.setup_jax(cpu_devices=FLAGS.cpu_devices)
    _validate(FLAGS.config)
    results = jobs.run(FLAGS.config, FLAGS.workdir, options)
    logging.flush()
    if jax.process_index() == 0:
      print(jobs.summary_line(FLAGS.config, FLAGS.workdir, options, results), flush=True)
  except loop.Stopped as e:  # exit status 128 + signal, as a shell reports a killed process
    logging.flush()
    print(f'error: {e}', file=sys.stderr)
    sys.exit(e.exit_code)
  except jobs.USER_ERRORS as e:
    logging.flush()
    if isinstance(e, ckpt_lib.CheckpointError):
      # A failed save leaves orbax's writer threads with errors that Python would print at
      # exit, after this line; the run has nothing left to save.
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(1)  # pylint: disable=protected-access
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
