"""The bookkeeping every training loop shares: cadence, pending metrics, writers, results.

:mod:`distill_jax.trainers.train` and :mod:`distill_jax.trainers.search` keep their own short loops and
call these as one-liners (big_vision ``utils`` style):

* :class:`Cadence` says whether a step logs, evaluates or saves;
* :class:`PendingMetrics` keeps the metrics of the steps not yet logged, at most one
  step in flight, and checks them finite before every log and every save, naming the
  step range (:class:`NonFiniteLossError`);
* :func:`create_writer` is one :class:`MultiWriter` (console, TensorBoard events through
  tensorboardX, and ``metrics.jsonl``) written once per step. clu's metric writers would
  do, but importing them imports TensorFlow, which the core does not install; these
  writers keep clu's method names (``write_scalars``, ``write_hparams``, ``flush``,
  ``close``), so a clu ``MetricWriter`` can stand in for any of them;
* :class:`StopSignals` turns SIGTERM and SIGINT into "save now, then stop"
  (:class:`Stopped`), and asks for time-based saves (``checkpoint_every_seconds``);
* :func:`write_json` and :func:`write_text` write atomically; :func:`write_results` adds
  the versions.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from absl import logging
import flax
import jax
import jaxlib
import numpy as np
import optax
import orbax.checkpoint
import tensorboardX

RESULTS_FILE = 'results.json'
METRICS_FILE = 'metrics.jsonl'


class NonFiniteLossError(FloatingPointError):
  """A loss or norm became NaN or infinite (at ``step``); no checkpoint of the diverged
  state was written."""

  def __init__(self, message: str, *, step: int):
    super().__init__(message)
    self.step = step


class Stopped(Exception):
  """A run stopped by a signal after saving its checkpoint; ``exit_code`` is 128 + the
  signal's number, as a shell reports a process ended by that signal."""

  def __init__(self, signum: int, step: int | None = None, checkpoint_dir: str = ''):
    self.exit_code = 128 + signum
    name = signal.Signals(signum).name
    if step is None:
      where = 'between training steps (every finished checkpoint and result is kept)'
    else:
      where = f'at step {step}: checkpoint saved in {checkpoint_dir}'
    super().__init__(f'stopped by {name} {where}; rerun the same command to resume')


def raise_stopped(signum, frame) -> None:
  """A signal handler for outside the training loops: stop where the program is."""
  del frame
  raise Stopped(signum)


class StopSignals:
  """``with StopSignals(every_seconds) as stop:`` in a training loop.

  While inside, SIGTERM (what SLURM and preemptible VMs send) and SIGINT (Ctrl-C) only
  note the request; the next :meth:`save_due` turns it into the decision
  :attr:`signum` (the loop then saves that step and raises :class:`Stopped`), so a
  signal arriving between the decision and the save waits for the next step.
  :meth:`save_due` is also true once ``every_seconds`` (> 0) passed since the last save.
  With several processes both decisions are all-gathered every ``agree_every`` steps
  (a host sync: not every step, so the step in flight keeps the devices busy): a signal
  to any process stops all of them at the same saved step. Outside the main thread
  signals are left alone.
  """

  agree_every = 10

  def __init__(self, every_seconds: float = 0.0):
    self.every_seconds = float(every_seconds or 0.0)
    self.signum: int | None = None  # the agreed stop (set by save_due)
    self._requested: int | None = None  # set by the handler
    self._previous: dict[int, Any] = {}
    self._last_save = time.monotonic()

  def _handle(self, signum, frame) -> None:
    del frame
    self._requested = self._requested or signum

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def save_due(self, step: int) -> bool:
    """Whether to save at ``step``: a stop was asked for (by any process), or the save
    interval passed (on any process)."""
    if jax.process_count() > 1 and step % self.agree_every:
      return bool(self.signum)
    requested = self._requested
    timed = bool(self.every_seconds) and time.monotonic() - self._last_save >= self.every_seconds
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      gathered = np.asarray(multihost_utils.process_allgather(
          np.asarray([requested or 0, int(timed)], np.int32))).reshape(-1, 2)
      requested = next((int(v) for v in gathered[:, 0] if v), None)
      timed = bool(gathered[:, 1].any())
    self.signum = self.signum or requested
    return bool(self.signum) or timed

  def saved(self) -> None:
    self._last_save = time.monotonic()


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When a loop of ``num_steps`` steps (numbered from 1) logs, evaluates and saves.

  The last step always does all three; ``save_every=0`` saves only there.
  """
  num_steps: int
  log_every: int
  eval_every: int
  save_every: int = 0

  def is_last(self, step: int) -> bool:
    return step == self.num_steps

  def log(self, step: int) -> bool:
    return step % self.log_every == 0 or self.is_last(step)

  def eval(self, step: int) -> bool:
    return step % self.eval_every == 0 or self.is_last(step)

  def save(self, step: int) -> bool:
    return self.is_last(step) or bool(self.save_every and step % self.save_every == 0)


class PendingMetrics:
  """The device metrics of the steps since the last log.

  ``finite_keys`` name the scalars that must stay finite (e.g. the loss and the
  parameter norm), checked by :meth:`check_finite`; ``hint`` says what to change.
  """

  def __init__(self, first_step: int, *, finite_keys: Sequence[str], hint: str):
    self._pending: list[tuple[int, dict]] = []
    self._finite_keys = tuple(finite_keys)
    self._hint = hint
    self._window = (time.time(), first_step)

  def add(self, step: int, metrics: dict) -> None:
    """Records ``step``'s metrics after waiting for the previous step's: one step stays in
    flight (bounded memory, and no collective rendezvous time-outs with many fake CPU
    devices)."""
    if self._pending:
      jax.block_until_ready(self._pending[-1][1][self._finite_keys[0]])
    self._pending.append((step, metrics))

  def check_finite(self, last_good: int) -> None:
    """Raises :class:`NonFiniteLossError` for the first pending step with a non-finite
    ``finite_keys`` value, naming the checked range and the last savable step."""
    if not self._pending:
      return
    values = jax.device_get([[m[k] for k in self._finite_keys] for _, m in self._pending])
    for (step, _), row in zip(self._pending, values):
      for key, value in zip(self._finite_keys, row):
        if not math.isfinite(float(value)):
          raise NonFiniteLossError(
              f'{key} is {float(value)} at step {step} (steps {self._pending[0][0]}-'
              f'{self._pending[-1][0]} checked; last checkpointable state: step {last_good}); '
              f'{self._hint}. No checkpoint of the diverged state was written.', step=step)

  def summary(self, step: int, *, prefix: str = '') -> dict[str, float]:
    """The mean of every pending metric (``prefix`` + name) and ``steps_per_sec`` since the
    last summary; clears the pending steps."""
    host = jax.device_get([m for _, m in self._pending])
    values = {f'{prefix}{k}': float(np.mean([m[k] for m in host])) for k in host[0]}
    now = time.time()
    values['steps_per_sec'] = (step - self._window[1]) / max(now - self._window[0], 1e-9)
    self._window = (now, step)
    self._pending.clear()
    return values


def count(n: int, noun: str) -> str:
  """``n`` with thousands separators and ``noun``, plural unless 1: ``'1 device'``,
  ``'10,694 parameters'``."""
  return f'{n:,} {noun}{"" if n == 1 else "s"}'


def plain_duration(seconds: float) -> str:
  """``3725`` -> ``'1 h 02 min'``, ``200`` -> ``'3 min 20 s'``, ``7.4`` -> ``'7 s'``."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours} h {minutes:02d} min'
  return f'{minutes} min {secs:02d} s' if minutes else f'{secs} s'


class Progress:
  """Where a loop of ``total`` units (steps, runs) stands, in plain words.

  The time left is extrapolated from the units done since the first :meth:`describe`
  (so a first step that includes compiling does not skew it), else since the start.
  """

  def __init__(self, what: str, total: int, done: int = 0):
    self.what, self.total = what, int(total)
    self._start = time.monotonic()
    self._first: tuple[float, int] | None = None
    self._done_at_start = int(done)

  def describe(self, done: int) -> str:
    now = time.monotonic()
    if self._first is None:
      self._first = (now, done)
    pct = 100.0 * done / max(self.total, 1)
    text = f'{self.what} {done}/{self.total} ({pct:.0f}%), {plain_duration(now - self._start)} elapsed'
    since, base = self._first if done > self._first[1] else (self._start, self._done_at_start)
    if 0 < done < self.total and done > base:
      left = (self.total - done) * (now - since) / (done - base)
      text += f', about {plain_duration(left)} left'
    return text


class LoggingWriter:
  """Writes each call's scalars as one absl log line, after ``progress``'s words (else
  ``[step]``)."""

  def __init__(self, progress: Progress | None = None):
    self._progress = progress

  def write_scalars(self, step: int, scalars) -> None:
    where = self._progress.describe(step) if self._progress else f'[{step}]'
    logging.info('%s: %s', where, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))

  def write_hparams(self, hparams) -> None:
    del hparams  # the config is logged by the job and saved in results.json

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """TensorBoard event files in ``logdir`` (tensorboardX: no TensorFlow needed).

  ``purge_step``: on a resume, the first step trained again; TensorBoard then drops the
  events of the killed run from that step on, so no step appears twice.
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    self._writer = tensorboardX.SummaryWriter(logdir, purge_step=purge_step)

  def write_scalars(self, step: int, scalars) -> None:
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def write_hparams(self, hparams) -> None:
    rows = ''.join(f'| {k} | {v} |\n' for k, v in sorted(hparams.items()))
    self._writer.add_text('hparams', '| field | value |\n|---|---|\n' + rows, global_step=0)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class JsonlWriter:
  """Appends one JSON object (``step`` and the scalars) per ``write_scalars`` call.

  ``resume_step``: the checkpoint a run resumes from; rows after it (written by the
  killed run after its last checkpoint, and about to be written again) are dropped.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self._path = path
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        lines = f.readlines()
      kept = [line for line in lines if _row_step(line) is not None
              and _row_step(line) <= resume_step]
      if len(kept) != len(lines):
        write_text(path, ''.join(kept))

  def write_scalars(self, step: int, scalars) -> None:
    row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self._path, 'a') as f:
      f.write(json.dumps(row) + '\n')

  def write_hparams(self, hparams) -> None:
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class MultiWriter:
  """Passes every call on to each of ``writers``."""

  def __init__(self, writers: Sequence[Any]):
    self._writers = tuple(writers)

  def write_scalars(self, step: int, scalars) -> None:
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams) -> None:
    for w in self._writers:
      w.write_hparams(hparams)

  def flush(self) -> None:
    for w in self._writers:
      w.flush()

  def close(self) -> None:
    for w in self._writers:
      w.close()


def _row_step(line: str) -> int | None:
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None  # a line cut by a kill


def create_writer(workdir: str, resume_step: int | None = None,
                  progress: Progress | None = None) -> MultiWriter:
  """Console + TensorBoard events + ``metrics.jsonl`` on process 0; console elsewhere.

  ``resume_step``: the step a resumed run restarts from (its rows after that step go);
  ``progress``: the console lines start with its words.
  """
  if jax.process_index() != 0:
    return MultiWriter([LoggingWriter(progress)])
  purge = None if resume_step is None else resume_step + 1
  return MultiWriter([LoggingWriter(progress), TensorBoardWriter(workdir, purge_step=purge),
                      JsonlWriter(os.path.join(workdir, METRICS_FILE), resume_step)])


def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    return x.item()
  return str(x)


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` to ``path`` atomically (a reader sees the old file or the whole new
  one); arrays become lists."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def versions() -> dict[str, str]:
  """The versions and backend a result was computed with."""
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__,
          'flax': flax.__version__, 'optax': optax.__version__,
          'orbax_checkpoint': orbax.checkpoint.__version__, 'numpy': np.__version__,
          'backend': jax.default_backend(), 'devices': str(jax.devices()[0].device_kind)}


def git_commit(path: str = os.path.dirname(os.path.abspath(__file__))) -> str | None:
  """The commit of the git checkout holding ``path`` (the package by default), with
  ``-dirty`` when it has uncommitted changes; ``None`` outside a checkout or without git."""
  try:
    commit = subprocess.run(['git', '-C', path, 'rev-parse', 'HEAD'], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', path, 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('-dirty' if dirty else '') if commit else None


def provenance(start_time: float) -> dict[str, Any]:
  """Where a result came from: the start time (UTC, ISO 8601), the command line and the
  package's git commit."""
  return {'started_at': datetime.datetime.fromtimestamp(start_time, datetime.timezone.utc)
                        .isoformat(timespec='seconds'),
          'command': command_line(),
          'git_commit': git_commit()}


def command_line() -> str:
  """The command that started this process, as typed: ``python -m distill_jax.main ...``."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  program = ['-m', spec.name] if spec is not None and spec.name else sys.argv[:1]
  return shlex.join(['python', *program, *sys.argv[1:]])


def write_results(workdir: str, results: dict[str, Any], *, start_time: float) -> dict[str, Any]:
  """``results`` plus :func:`provenance`, ``versions`` and the process/device counts,
  written atomically to ``WORKDIR/results.json`` by process 0; returns what was written."""
  results = {**results, **provenance(start_time), 'num_processes': jax.process_count(),
             'versions': versions()}
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, RESULTS_FILE), results)
  return results


def flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``; non-scalar leaves as strings (for hparams)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
