"""Orbax checkpoints of a run's state in ``WORKDIR/checkpoints``, verified on restore.

Each save also records a CRC-32 of every array in ``WORKDIR/checksums/STEP.json``;
:func:`restore_latest` restores the newest checkpoint that loads and matches its
checksums, moving the ones it skipped (truncated, deleted or flipped files) to
``WORKDIR/rejected_checkpoints/`` and saying why. Nothing is deleted, and a workdir
whose checkpoints all fail is an error, never a silent start from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any
import zlib

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from distill_jax.trainers import loop

CHECKPOINT_DIR = 'checkpoints'
CHECKSUM_DIR = 'checksums'
REJECTED_DIR = 'rejected_checkpoints'


class CheckpointError(OSError):
  """No checkpoint of a workdir can be restored or written; the message is one line."""


def one_line(e: BaseException) -> str:
  """The first line of an exception, with its type (for one-line errors)."""
  lines = [line for line in str(e).strip().splitlines() if line.strip()]
  return f'{type(e).__name__}: {lines[0][:240]}' if lines else type(e).__name__


def _host_array(x: Any) -> np.ndarray | None:
  """A host copy of one replica of ``x``; ``None`` for an array sharded over hosts."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(x.addressable_shards[0].data) if x.is_fully_replicated else None


def _key(path) -> str:
  """``params/conv/kernel`` for a dataclass field or a dict key alike (a state restored
  without its class is a dict)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def checksums(tree: Any) -> dict[str, int | None]:
  """``{path: crc32}`` of every array of ``tree`` (its bytes as saved)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, x in flat:
    host = _host_array(x)
    out[_key(path)] = None if host is None else zlib.crc32(
        np.ascontiguousarray(host).tobytes())
  return out


def checksum_path(workdir: str, step: int) -> str:
  return os.path.join(os.path.dirname(checkpoint_dir(workdir)), CHECKSUM_DIR, f'{step}.json')


def verify(workdir: str, step: int, tree: Any) -> str | None:
  """Why ``tree`` restored from ``step`` is not what was saved (``None``: it is, or no
  checksums were recorded, as in workdirs written before they were)."""
  path = checksum_path(workdir, step)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    want = json.load(f)
  have = checksums(tree)
  for key in sorted(set(want) | set(have)):
    if want.get(key) is not None and have.get(key) is not None and want[key] != have[key]:
      return f'array {key} does not match its checksum (the file was changed after the save)'
    if (key in want) != (key in have):
      return f'array {key} is missing from the checkpoint or from its checksums'
  return None


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)


def make_manager(workdir: str, *, keep: int = 3) -> ocp.CheckpointManager:
  """A manager that keeps the last ``keep`` complete checkpoints; saves are asynchronous."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def abstract_like(tree: Any) -> Any:
  """Shape/dtype/sharding structs of ``tree``: the target a restore fills in."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


def save(manager: ocp.CheckpointManager, workdir: str, step: int, state: Any) -> None:
  """Starts the (asynchronous) save of ``state`` at ``step`` after recording its checksums;
  a failed write (disk full, read-only) is one line naming the folder."""
  try:
    if jax.process_index() == 0:
      _prune_checksums(manager, workdir)
      loop.write_json(checksum_path(workdir, step), checksums(state))
    manager.save(step, args=ocp.args.StandardSave(state))
  except Exception as e:  # orbax and tensorstore raise many types for one cause
    raise CheckpointError(f'cannot write checkpoints in {checkpoint_dir(workdir)} (the save of '
                          f'step {step} or the one before it failed): {one_line(e)}') from None


def _prune_checksums(manager: ocp.CheckpointManager, workdir: str) -> None:
  """Drops the checksums of checkpoints older than the oldest one kept."""
  folder = os.path.dirname(checksum_path(workdir, 0))
  steps = manager.all_steps()
  if not steps or not os.path.isdir(folder):
    return
  for name in os.listdir(folder):
    stem = name.removesuffix('.json')
    if stem.isdigit() and int(stem) < min(steps):
      os.remove(os.path.join(folder, name))


def wait(manager: ocp.CheckpointManager, workdir: str) -> None:
  """Waits for the saves in flight; a failed one is a one-line :class:`CheckpointError`."""
  try:
    manager.wait_until_finished()
    if jax.process_index() == 0:
      _prune_checksums(manager, workdir)
  except Exception as e:
    raise CheckpointError(f'a checkpoint save in {checkpoint_dir(workdir)} failed: '
                          f'{one_line(e)}') from None


def _reject(workdir: str, step: int) -> str:
  """Moves ``checkpoints/STEP`` (kept, never deleted) to ``rejected_checkpoints/STEP``."""
  root = os.path.dirname(checkpoint_dir(workdir))
  dest = os.path.join(root, REJECTED_DIR, str(step))
  if os.path.exists(dest):
    dest = f'{dest}.{len(os.listdir(os.path.dirname(dest)))}'
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  shutil.move(os.path.join(checkpoint_dir(workdir), str(step)), dest)
  return dest


def reject_after(manager: ocp.CheckpointManager, workdir: str, step: int) -> list[int]:
  """Moves the checkpoints after ``step`` to ``rejected_checkpoints/`` (process 0) and
  returns their steps: after a divergence, the states saved just before it are finite
  but may already be exploding, and a rerun with a lower learning rate must not resume
  them."""
  manager.wait_until_finished()
  late = [s for s in manager.all_steps() if s > step]
  if jax.process_index() == 0:
    for s in late:
      _reject(workdir, s)
  return sorted(late)


def after_divergence(manager: ocp.CheckpointManager, workdir: str,
                     error: 'loop.NonFiniteLossError', window: int) -> 'loop.NonFiniteLossError':
  """The error to raise for a divergence at ``error.step``, after moving aside the
  checkpoints saved within ``window`` steps (one log interval) before it."""
  late = reject_after(manager, workdir, error.step - window)
  if not late:
    return error
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('distill_jax_after_divergence')
  manager.reload()
  remaining = manager.all_steps()
  start = f'step {max(remaining)}' if remaining else 'scratch'
  return loop.NonFiniteLossError(
      f'{error} The checkpoints of steps {", ".join(map(str, late))} (saved within {window} '
      f'steps before it) were moved to {REJECTED_DIR}/, so a rerun starts from {start}.',
      step=error.step)


def restore_latest(manager: ocp.CheckpointManager, target: Any, workdir: str | None = None, *,
                   move_rejected: bool = True) -> tuple[Any, int | None]:
  """``(state, step)`` from the newest complete checkpoint that restores and verifies, or
  ``(target, None)`` when there is none.

  ``target`` is a concrete or abstract state giving structure, dtypes and shardings.
  Incomplete (killed mid-save) checkpoints are never listed by orbax. A checkpoint that
  fails to restore or to verify is skipped with a warning and (``move_rejected``, for a
  run that trains on) moved aside by process 0, so that training on from an older one
  can save that step again; when every checkpoint fails, a one-line
  :class:`CheckpointError` lists why, and nothing is moved.
  """
  workdir = workdir or os.path.dirname(str(manager.directory))
  skipped = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract_like(target)))
    except Exception as e:  # truncated/deleted files, another tree: many error types
      skipped.append((step, one_line(e)))
      continue
    reason = verify(workdir, step, restored)
    if reason is None:
      break
    skipped.append((step, reason))
  else:
    if skipped:
      raise CheckpointError(
          f'no checkpoint in {checkpoint_dir(workdir)} restores into this run\'s state ('
          + '; '.join(f'step {s}: {why}' for s, why in skipped[:3])
          + '); the workdir may hold another run: use a new --workdir')
    return target, None
  for bad, why in skipped:
    if not move_rejected:
      logging.warning('Skipped checkpoint %d (%s); using step %d.', bad, why, step)
      continue
    dest = _reject(workdir, bad) if jax.process_index() == 0 else '(moved by process 0)'
    logging.warning('Skipped checkpoint %d (%s); moved it to %s. Resuming from step %d.',
                    bad, why, dest, step)
  if skipped and move_rejected:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('distill_jax_rejected_checkpoints')
    manager.reload()
  return restored, step


def latest_step(workdir: str) -> int | None:
  """The step of the latest complete checkpoint in ``workdir``, without restoring it."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with ocp.CheckpointManager(checkpoint_dir(workdir)) as manager:
    return manager.latest_step()


def restore_local(item_path: str) -> Any:
  """Restores a saved pytree onto this process's first device, whatever mesh or number of
  hosts it was saved from.

  ``item_path`` is a run's ``WORKDIR/checkpoints/STEP/default`` (restored through its
  ``CheckpointManager``, which keeps the step's metadata) or a folder written by
  ``ocp.StandardCheckpointer``.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def target(tree):
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)

  step_dir = os.path.dirname(os.path.abspath(item_path))
  if os.path.basename(item_path.rstrip('/')) == 'default' and os.path.basename(step_dir).isdigit():
    step = int(os.path.basename(step_dir))
    with ocp.CheckpointManager(os.path.dirname(step_dir),
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
      tree = manager.item_metadata(step).tree
      return manager.restore(step, args=ocp.args.StandardRestore(target(tree)))
  checkpointer = ocp.StandardCheckpointer()
  return checkpointer.restore(item_path, target(checkpointer.metadata(item_path).item_metadata.tree))


def item_path(workdir: str, step: int | None = None) -> str:
  """The item folder of ``step`` (default: the latest) in a run's workdir."""
  step = latest_step(workdir) if step is None else step
  return os.path.join(checkpoint_dir(workdir), str(step), 'default')


def verify_item(item: str, tree: Any) -> str | None:
  """:func:`verify` for a tree restored from an item folder ``WORKDIR/checkpoints/STEP/default``."""
  step_dir = os.path.dirname(os.path.abspath(item))
  if not os.path.basename(step_dir).isdigit():
    return None
  workdir = os.path.dirname(os.path.dirname(step_dir))
  return verify(workdir, int(os.path.basename(step_dir)), tree)
