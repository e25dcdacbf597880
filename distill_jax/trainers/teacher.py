"""Loading a frozen teacher from an earlier run's checkpoint, checked against its config."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from distill_jax import models
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers.loop import RESULTS_FILE


class TeacherError(ValueError):
  """The teacher checkpoint is missing or does not fit the teacher's model config."""


@dataclasses.dataclass
class Teacher:
  """A frozen teacher: its module and ``{'params', 'batch_stats'}``; never trained here."""
  model: nn.Module
  variables: dict
  source: str = ''


def _checkpoint_item(path: str, *, allow_unfinished: bool = False, role: str = 'teacher') -> str:
  """The orbax item folder for a run's workdir or a ``checkpoints/STEP`` folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, 'default')):  # WORKDIR/checkpoints/STEP
    return os.path.join(path, 'default')
  step = ckpt_lib.latest_step(path)
  if role != 'teacher' and (step is None or not os.path.exists(os.path.join(path, RESULTS_FILE))):
    raise TeacherError(f'the {role} run in {path} has not finished (no {RESULTS_FILE}; latest '
                       f'checkpoint: {"none" if step is None else f"step {step}"})')
  if step is not None and not allow_unfinished and not os.path.exists(
      os.path.join(path, RESULTS_FILE)):
    raise TeacherError(
        f'distill.teacher_workdir={path!r} holds an unfinished run (no {RESULTS_FILE}; latest '
        f'checkpoint: step {step}); finish training it, or set '
        'distill.teacher_allow_unfinished=True to distil from its latest checkpoint')
  if step is None:
    raise TeacherError(
        f'distill.teacher_workdir={path!r} holds no checkpoint (looked in '
        f'{ckpt_lib.checkpoint_dir(path)}); train the teacher first, e.g. with configs/train.py '
        'and the same model config')
  return os.path.join(ckpt_lib.checkpoint_dir(path), str(step), 'default')


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(np.shape(x)) for path, x in flat}


def check_variables_match(expected: dict, found: dict, *, source: str) -> None:
  """Raises :class:`TeacherError` naming the first parameter path whose shape differs."""
  want, have = _flat_shapes(expected), _flat_shapes(found)
  # Trainable parameters first: they name the layer a user got wrong.
  for path in sorted(set(want) | set(have), key=lambda p: (not p.startswith('params/'), p)):
    if want.get(path) != have.get(path):
      raise TeacherError(
          f'{source} does not match its model config: {path} has shape '
          f'{have.get(path, "(missing)")} there but {want.get(path, "(missing)")} in the model')


def load_teacher(model_config: dict, path: str, input_shape: tuple[int, ...], *,
                 dtype: Any = None, allow_unfinished: bool = False,
                 role: str = 'teacher') -> Teacher:
  """Restores ``{'params', 'batch_stats'}`` of the run in ``path`` for ``model_config``.

  ``path`` is a finished run's workdir (its last checkpoint; with ``allow_unfinished``,
  the latest checkpoint of a run still training) or one ``WORKDIR/checkpoints/STEP``
  folder; the restored arrays are checked against their recorded checksums. ``input_shape`` is an NHWC shape of the data, e.g. ``(1, 32, 32, 3)``;
  ``dtype`` the teacher's compute dtype (default float32). ``role`` names what the
  checkpoint is in error messages (a trained student, an initialisation stage's weights).
  """
  model = models.create_model(**model_config, **({'dtype': dtype} if dtype is not None else {}))
  item = _checkpoint_item(path, allow_unfinished=allow_unfinished, role=role)
  try:
    restored = ckpt_lib.restore_local(item)
  except Exception as e:  # truncated or deleted files: orbax and tensorstore errors
    raise TeacherError(f'{role} checkpoint {item} cannot be restored: '
                       f'{ckpt_lib.one_line(e)}') from None
  problem = ckpt_lib.verify_item(item, restored)
  if problem:
    raise TeacherError(f'{role} checkpoint {item} is damaged: {problem}')
  variables = {'params': restored['params'], 'batch_stats': restored.get('batch_stats', {})}
  which = ' (distill.teacher_model)' if role == 'teacher' else ''
  check_variables_match(models.param_shapes(model, input_shape), variables,
                        source=f'{role} checkpoint {item}{which}')
  variables = jax.tree.map(np.asarray, variables)
  return Teacher(model=model, variables=variables, source=item)
