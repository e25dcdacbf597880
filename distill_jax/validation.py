"""Config checks that run before any compute: one clear line per problem."""

from __future__ import annotations

import importlib.util

import ml_collections

from distill_jax import data as data_lib
from distill_jax import losses
from distill_jax import models


class ConfigError(ValueError):
  """A config value that cannot work; the message names field, value and what is allowed."""


def fail(field: str, value, allowed: str) -> None:
  """Raises the one-line error for ``config.<field>=<value>`` saying what is allowed."""
  raise ConfigError(f'config.{field}={value!r} is invalid: {allowed}')


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    fail(field, value, allowed)


def check_int(config: ml_collections.ConfigDict, field: str, minimum: int = 0) -> None:
  """An integer (not a bool) >= ``minimum``."""
  value = get(config, field)
  _check(not isinstance(value, bool) and isinstance(value, int) and value >= minimum, field,
         value, f'must be an integer >= {minimum}')


def check_bool(config: ml_collections.ConfigDict, field: str) -> None:
  value = get(config, field)
  _check(isinstance(value, bool), field, value, 'must be True or False')


def check_range(config: ml_collections.ConfigDict, field: str, low: float, high: float, *,
                closed: str = '[)') -> None:
  """A number in the interval from ``low`` to ``high``; ``closed`` gives the brackets."""
  value = get(config, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    ok = (value >= low if closed[0] == '[' else value > low) and (
        value <= high if closed[1] == ']' else value < high)
  _check(ok, field, value, f'must be in {closed[0]}{low}, {high}{closed[1]}')


def check_choice(config: ml_collections.ConfigDict, field: str, choices) -> None:
  value = get(config, field)
  _check(value in choices, field, value, 'allowed: ' + ', '.join(map(str, choices)))


def check_positive(config: ml_collections.ConfigDict, field: str) -> None:
  value = get(config, field)
  _check(isinstance(value, (int, float)) and value > 0, field, value, 'must be > 0')


def check_non_negative(config: ml_collections.ConfigDict, field: str) -> None:
  value = get(config, field)
  _check(isinstance(value, (int, float)) and value >= 0, field, value, 'must be >= 0')


def get(config, field: str):
  """The value of a dotted field, e.g. ``get(config, 'optimizer.learning_rate')``."""
  for part in field.split('.'):
    config = config[part]
  return config


def check_model(model_config: ml_collections.ConfigDict, field: str = 'model') -> None:
  """The model's name is registered and its fields are the network's own."""
  cfg = dict(model_config)
  name = cfg.pop('name', None)
  if name not in models.model_names():
    raise ConfigError(f'config.{field}.name={name!r} is not a known network; '
                      f'known: {", ".join(models.model_names())}')
  try:
    models.create_model(name, **cfg)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.{field}: {e}') from None


def check_dataset(config: ml_collections.ConfigDict) -> None:
  """``data.name`` is a known dataset, and what reads it is installed."""
  check_choice(config, 'data.name', sorted(data_lib.NUM_CLASSES))
  _check(config.data.name not in data_lib.TFDS_NAMES
         or importlib.util.find_spec('tensorflow_datasets') is not None,
         'data.name', config.data.name,
         f'it is read through tensorflow-datasets, which is not installed: {data_lib.CIFAR_EXTRA}')


def validate_train_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` for the first impossible value of a training config."""
  check_dataset(config)
  check_model(config.model)
  classes = data_lib.NUM_CLASSES[config.data.name]
  _check(config.model.get('num_classes') == classes, 'model.num_classes',
         config.model.get('num_classes'), f'dataset {config.data.name!r} has {classes} classes')
  _check(0.0 <= config.data.validation_fraction < 1.0, 'data.validation_fraction',
         config.data.validation_fraction, 'must be in [0, 1)')
  check_choice(config, 'data.pad_mode', ('constant', 'reflect'))
  check_non_negative(config, 'data.crop_padding')
  check_non_negative(config, 'data.cutout')
  for field in ('num_epochs', 'batch_size', 'eval_batch_size', 'optimizer.learning_rate',
                'log_every_steps', 'keep_checkpoints'):
    check_positive(config, field)
  for field in ('optimizer.weight_decay', 'optimizer.momentum', 'optimizer.grad_clip_norm',
                'optimizer.final_learning_rate', 'eval_every_steps', 'checkpoint_every_steps',
                'num_devices'):
    check_non_negative(config, field)
  check_choice(config, 'compute_dtype', ('float32', 'bfloat16'))
  check_non_negative(config, 'aux_weight')
  _check(0.0 <= config.drop_path_prob < 1.0, 'drop_path_prob', config.drop_path_prob,
         'must be in [0, 1)')
  if config.aux_weight:
    _check(bool(config.model.get('auxiliary')), 'aux_weight', config.aux_weight,
           'needs a network with an auxiliary head (model.name=darts, model.auxiliary=True)')
  if config.drop_path_prob:
    _check(config.model.name == 'darts', 'drop_path_prob', config.drop_path_prob,
           'drop path exists only in DARTS networks (model.name=darts); use 0')
  check_choice(config, 'optimizer.schedule', ('constant', 'cosine', 'multistep'))
  if config.optimizer.schedule == 'multistep':
    _check(all(int(m) > 0 for m in config.optimizer.milestones), 'optimizer.milestones',
           config.optimizer.milestones, 'epochs must be > 0')
    check_positive(config, 'optimizer.decay_factor')


def check_batch_divides(batch_size: int, num_devices: int, field: str = 'batch_size') -> None:
  _check(batch_size % num_devices == 0, field, batch_size,
         f'a global batch must divide over the {num_devices} devices; use a multiple of {num_devices}')


def validate_distill_config(config: ml_collections.ConfigDict) -> None:
  """The training checks plus the ``distill`` section's: method, weights, teacher model."""
  validate_train_config(config)
  check_choice(config, 'distill.method', losses.METHODS)
  check_choice(config, 'distill.at_form', losses.AT_FORMS)
  check_positive(config, 'distill.temperature')
  alpha = config.distill.alpha
  _check(isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0, 'distill.alpha', alpha,
         'must be in [0, 1]')
  check_non_negative(config, 'distill.beta')
  if config.distill.method != 'none':
    check_model(config.distill.teacher_model, 'distill.teacher_model')
    classes = config.model.num_classes
    _check(config.distill.teacher_model.get('num_classes') == classes,
           'distill.teacher_model.num_classes', config.distill.teacher_model.get('num_classes'),
           f'must equal model.num_classes={classes}')
