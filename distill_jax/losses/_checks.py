"""Private shape, dtype and container checks shared by the loss modules.

Only shapes, dtypes and static containers are checked here, never values, so
every numeric argument of the losses may be a tracer.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _as_float(x: jax.typing.ArrayLike) -> jax.Array:
  """Casts to a floating dtype of at least float32 (bf16/f16/ints -> f32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
  if logits.ndim < 1:
    raise ValueError(
        f'logits must have a class axis, got shape {logits.shape}.')
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f'labels shape {labels.shape} does not match logits shape '
        f'{logits.shape}: expected labels of shape {logits.shape[:-1]}.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
        f'labels must be integer class indices, got dtype {labels.dtype}.')


def _check_same_shape(student_logits, teacher_logits) -> None:
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f'student_logits shape {student_logits.shape} does not match '
        f'teacher_logits shape {teacher_logits.shape}.')


def _as_points(points, name: str) -> tuple:
  if isinstance(points, (jax.Array, np.ndarray)) or not isinstance(
      points, Sequence):
    raise TypeError(
        f'{name} must be a sequence (tuple or list) of NHWC arrays, got '
        f'{type(points).__name__}.')
  return tuple(points)
