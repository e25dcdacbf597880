"""What a workdir defends: its path, one writer at a time, and one config per run.

* :func:`prepare` turns an unusable path (empty, a file, under a file, read-only) into
  one line naming it, before anything is computed;
* :class:`Lock` (``WORKDIR/workdir.lock``: host, pid, start time) lets one process at a
  time work in a workdir; a lock whose process is gone (same host) is taken over;
* :func:`check_config` records the effective config and the code version in
  ``WORKDIR/config.json`` at the start and refuses, in one line naming the first
  differing fields, to resume or evaluate a workdir under another config, unless
  ``config.allow_resume_changes`` names the fields that may change.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
from typing import Any, Iterable

from absl import logging
import jax
import ml_collections

import distill_jax
from distill_jax import validation
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop

CONFIG_FILE = 'config.json'
LOCK_FILE = 'workdir.lock'

# Fields that never change what a run computes (bookkeeping, devices, paths): a resume
# may change them freely.
BOOKKEEPING_FIELDS = (
    'allow_resume_changes', 'log_every_steps', 'eval_every_steps', 'eval_batch_size',
    'checkpoint_every_steps', 'checkpoint_every_seconds', 'keep_checkpoints', 'num_devices',
    'data.data_dir', 'plot_every_epoch', 'shard_wait_timeout_s',
    'distill.teacher_allow_unfinished')


class WorkdirError(OSError):
  """The workdir cannot be used as asked; the message is one line naming the path."""


def prepare(workdir: str) -> str:
  """The absolute path of ``workdir``, created and checked writable (one line if not)."""
  if not workdir or not str(workdir).strip():
    raise WorkdirError('--workdir is empty: give the directory for checkpoints and results')
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'workdir {path} is a file, not a directory; use another --workdir')
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write_probe{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'workdir {path} is not writable ({e.strerror or ckpt_lib.one_line(e)}); '
                       'use another --workdir') from None
  return path


# ---------------------------------------------------------------------------
# One process at a time.


def _process_start(pid: int) -> str | None:
  """The kernel's start time of ``pid`` (Linux), telling a live pid from a reused one."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return start is None or _process_start(pid) in (None, start)


class Lock:
  """``with Lock(workdir):`` holds ``WORKDIR/workdir.lock`` (``name`` for a shard's own
  lock) on process 0; a second process gets a one-line :class:`WorkdirError`.

  A lock left by a process that is gone (same host: its pid no longer runs) is taken
  over with a warning; a lock from another host is only reported (its process cannot
  be checked from here): delete the file if that run is dead.
  """

  def __init__(self, workdir: str, name: str = LOCK_FILE):
    self.path = os.path.join(workdir, name)
    self._held = False

  def _owner(self) -> dict:
    pid = os.getpid()
    return {'host': socket.gethostname(), 'pid': pid, 'pid_start': _process_start(pid),
            'started': datetime.datetime.now().isoformat(timespec='seconds')}

  def _try_create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      json.dump(self._owner(), f)
    return True

  def acquire(self) -> None:
    if jax.process_index() != 0:
      return
    for _ in range(3):
      if self._try_create():
        self._held = True
        return
      try:
        with open(self.path) as f:
          owner = json.load(f)
      except (OSError, ValueError):
        owner = {}  # being written, or damaged: look again
      host, pid = owner.get('host'), owner.get('pid')
      if host == socket.gethostname() and isinstance(pid, int) and not _alive(
          pid, owner.get('pid_start')):
        logging.warning('Taking over %s: its process %d on %s is gone.', self.path, pid, host)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      if owner:
        raise WorkdirError(
            f'{os.path.dirname(self.path)} is in use by process {pid} on {host} (since '
            f'{owner.get("started")}); wait for it, or delete {self.path} if that run is dead')
    raise WorkdirError(f'cannot take the lock {self.path}; delete it if no run uses the workdir')

  def release(self) -> None:
    if self._held:
      self._held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self) -> 'Lock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# ---------------------------------------------------------------------------
# One config per workdir.


def git_commit() -> str | None:
  """The commit of the checkout this package runs from (``None`` outside a git one)."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True,
                         text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
  return {'distill_jax': distill_jax.__version__, 'git_commit': git_commit()}


def _flat(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def effective(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as JSON values (tuples as lists), as ``config.json`` holds it."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def allowed_changes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``config.allow_resume_changes`` ('num_epochs,optimizer') as a tuple of names."""
  text = config['allow_resume_changes'] if 'allow_resume_changes' in config else ''
  return tuple(name.strip() for name in text.split(',') if name.strip())


def _covered(field: str, names: Iterable[str]) -> bool:
  return any(field == n or field.startswith(n + '.') for n in names)


def differences(old: dict, new: dict, free: Iterable[str]) -> list[str]:
  """The dotted fields whose values differ between two effective configs, except those
  under ``free``; sorted."""
  a, b = _flat(old), _flat(new)
  free = tuple(free)
  return sorted(f for f in set(a) | set(b)
                if a.get(f, '(absent)') != b.get(f, '(absent)') and not _covered(f, free))


def _holds_state(workdir: str) -> bool:
  """Whether ``workdir`` holds a checkpoint or results (something a change would mix)."""
  return (os.path.exists(os.path.join(workdir, loop.RESULTS_FILE))
          or ckpt_lib.latest_step(workdir) is not None)


def check_config(workdir: str, config: ml_collections.ConfigDict, *,
                 extendable: Iterable[str] = (), holds_state: bool | None = None
                 ) -> list[str] | None:
  """Compares ``config`` with the one recorded in ``workdir``, before any compute.

  Returns ``None`` when there is nothing to compare with (no ``config.json``, or a
  workdir without checkpoints or results: ``holds_state``, by default read from
  ``workdir``), else the fields that changed (beyond the bookkeeping ones): ``[]`` for
  the same run. Raises a one-line :class:`~distill_jax.validation.ConfigError` naming
  the first differing fields unless each is under ``extendable`` (e.g. an experiment's
  ``seeds``) or named by ``config.allow_resume_changes``.
  """
  allowed = allowed_changes(config)
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path) or not (_holds_state(workdir) if holds_state is None
                                       else holds_state):
    return None
  old, new = loop.read_json(path)['config'], effective(config)
  diff = differences(old, new, (*BOOKKEEPING_FIELDS, *extendable, *allowed))
  if diff:
    a, b = _flat(old), _flat(new)
    shown = '; '.join(f'{f}: {a.get(f, "(absent)")!r} -> {b.get(f, "(absent)")!r}'
                      for f in diff[:3])
    more = f' and {len(diff) - 3} more' if len(diff) > 3 else ''
    raise validation.ConfigError(
        f'{workdir} holds a run of another config ({shown}{more}); use a new --workdir, or '
        f'allow the change with --config.allow_resume_changes={",".join(diff)}')
  return differences(old, new, BOOKKEEPING_FIELDS)


def record_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``WORKDIR/config.json`` (process 0): the config, the code version, the first
  start and every change since (old and new values)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  new = effective(config)
  old = loop.read_json(path) if os.path.exists(path) else None
  now = datetime.datetime.now().isoformat(timespec='seconds')
  history = list(old.get('changes', [])) if old else []
  if old is not None:
    changed = differences(old['config'], new, ('allow_resume_changes',))
    if not changed:
      return
    a, b = _flat(old['config']), _flat(new)
    history.append({'time': now, 'fields': {f: [a.get(f), b.get(f)] for f in changed}})
  loop.write_json(path, {'config': new, 'code': code_version(),
                         'started': old['started'] if old else now, 'changes': history})


# ---------------------------------------------------------------------------
# The saves of one training loop.


class Saves:
  """``with Saves(workdir, config) as saves:`` around a training loop's steps.

  Holds the loop's checkpoint manager and its :class:`~distill_jax.trainers.loop.StopSignals`:
  :meth:`restore` resumes (with fallback, :func:`~distill_jax.trainers.checkpoint.restore_latest`)
  and records the config (``config.json``),
  :meth:`due` says whether a step saves (its cadence, the save interval or a stop signal),
  :meth:`save` saves, :meth:`stop_if_asked`
  raises :class:`~distill_jax.trainers.loop.Stopped` after a signal. Leaving the block
  waits for the saves in flight; a divergence leaves with the checkpoints saved within
  one log interval before it moved aside
  (:func:`~distill_jax.trainers.checkpoint.after_divergence`).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = workdir
    self.config = config
    self.manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
    self.signals = loop.StopSignals(config.checkpoint_every_seconds)
    self.last_saved = 0

  def restore(self, target: Any) -> tuple[Any, int | None]:
    state, step = ckpt_lib.restore_latest(self.manager, target, self.workdir)
    self.last_saved = step or 0
    record_config(self.workdir, self.config)  # at the start: what this run computes under
    return state, step

  def due(self, cadence: loop.Cadence, step: int) -> bool:
    return cadence.save(step) or self.signals.save_due(step)

  @property
  def stopping(self) -> bool:
    return self.signals.signum is not None

  def save(self, step: int, state: Any) -> None:
    ckpt_lib.save(self.manager, self.workdir, step, state)
    self.last_saved = step
    self.signals.saved()

  def stop_if_asked(self, step: int, writer: Any) -> None:
    if self.signals.signum is not None:
      ckpt_lib.wait(self.manager, self.workdir)
      writer.close()
      raise loop.Stopped(self.signals.signum, step, ckpt_lib.checkpoint_dir(self.workdir))

  def __enter__(self) -> 'Saves':
    self.signals.__enter__()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      ckpt_lib.wait(self.manager, self.workdir)  # a failed run completes its (finite) saves
      if isinstance(exc, loop.NonFiniteLossError):
        raise ckpt_lib.after_divergence(self.manager, self.workdir, exc,
                                        self.config.log_every_steps) from None
    finally:
      self.signals.__exit__(exc_type, exc, tb)

  def close(self) -> None:
    self.manager.close()
