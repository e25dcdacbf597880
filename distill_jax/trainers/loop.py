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
* :func:`write_json` writes atomically; :func:`write_results` adds the versions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
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
  """A loss or norm became NaN or infinite; no checkpoint of the diverged state was written."""


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
              f'{self._hint}. No checkpoint of the diverged state was written.')

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


class LoggingWriter:
  """Writes each call's scalars as one absl log line."""

  def write_scalars(self, step: int, scalars) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))

  def write_hparams(self, hparams) -> None:
    del hparams  # the config is logged by the job and saved in results.json

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """TensorBoard event files in ``logdir`` (tensorboardX: no TensorFlow needed)."""

  def __init__(self, logdir: str):
    self._writer = tensorboardX.SummaryWriter(logdir)

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
  """Appends one JSON object (``step`` and the scalars) per ``write_scalars`` call."""

  def __init__(self, path: str):
    self._path = path

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


def create_writer(workdir: str) -> MultiWriter:
  """Console + TensorBoard events + ``metrics.jsonl`` on process 0; console elsewhere."""
  if jax.process_index() != 0:
    return MultiWriter([LoggingWriter()])
  return MultiWriter([LoggingWriter(), TensorBoardWriter(workdir),
                      JsonlWriter(os.path.join(workdir, METRICS_FILE))])


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


def write_results(workdir: str, results: dict[str, Any]) -> dict[str, Any]:
  """``results`` plus ``versions`` and the process/device counts, written atomically to
  ``WORKDIR/results.json`` by process 0; returns what was written."""
  results = {**results, 'num_processes': jax.process_count(), 'versions': versions()}
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
