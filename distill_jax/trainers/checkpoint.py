"""Orbax checkpoints of a run's :class:`~distill_jax.trainers.steps.TrainState` in ``WORKDIR/checkpoints``."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


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


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int | None]:
  """``(state, step)`` from the latest complete checkpoint, or ``(target, None)`` if none.

  ``target`` is a concrete or abstract state giving structure, dtypes and shardings.
  Incomplete (killed mid-save) checkpoints are never listed by orbax.
  """
  step = manager.latest_step()
  if step is None:
    return target, None
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract_like(target)))
  return restored, step


def latest_step(workdir: str) -> int | None:
  """The step of the latest complete checkpoint in ``workdir``, without restoring it."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with ocp.CheckpointManager(checkpoint_dir(workdir)) as manager:
    return manager.latest_step()


def restore_local(item_path: str) -> Any:
  """Restores a saved pytree (a ``StandardSave`` item folder) onto this process's first
  device, whatever mesh or number of hosts it was saved from."""
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(item_path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(item_path, target)


def item_path(workdir: str, step: int | None = None) -> str:
  """The item folder of ``step`` (default: the latest) in a run's workdir."""
  step = latest_step(workdir) if step is None else step
  return os.path.join(checkpoint_dir(workdir), str(step), 'default')
