"""Config checks that run before any compute: one clear line per problem.

Every check raises :class:`ConfigError` ``config.FIELD=VALUE is invalid: ALLOWED``. Numbers
must be finite (no ``inf`` or ``nan``) and never booleans; counts must be integers.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from typing import Any

import jax
import ml_collections

from distill_jax import config_lib
from distill_jax import data as data_lib
from distill_jax import losses
from distill_jax import models
from distill_jax.trainers import methods as methods_lib

# Seeds are non-negative integers below this (every PRNG here takes them).
MAX_SEED = 2**31


class ConfigError(ValueError):
  """A config value that cannot work; the message names field, value and what is allowed."""


def fail(field: str, value, allowed: str) -> None:
  """Raises the one-line error for ``config.<field>=<value>`` saying what is allowed."""
  raise ConfigError(f'config.{field}={value!r} is invalid: {allowed}')


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    fail(field, value, allowed)


def is_int(value: Any) -> bool:
  """An integer that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
  """An int or float (not a bool) that is neither infinite nor nan."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def get(config, field: str):
  """The value of a dotted field, e.g. ``get(config, 'optimizer.learning_rate')``."""
  for part in field.split('.'):
    config = config[part]
  return config


def check_int(config: ml_collections.ConfigDict, field: str, minimum: int = 0) -> None:
  """An integer (not a bool) >= ``minimum``."""
  value = get(config, field)
  _check(is_int(value) and value >= minimum, field, value, f'must be an integer >= {minimum}')


def check_bool(config: ml_collections.ConfigDict, field: str) -> None:
  value = get(config, field)
  _check(isinstance(value, bool), field, value, 'must be True or False')


def check_range(config: ml_collections.ConfigDict, field: str, low: float, high: float, *,
                closed: str = '[)') -> None:
  """A finite number in the interval from ``low`` to ``high``; ``closed`` gives the brackets."""
  value = get(config, field)
  ok = is_finite_number(value) and (value >= low if closed[0] == '[' else value > low) and (
      value <= high if closed[1] == ']' else value < high)
  _check(ok, field, value, f'must be {_kind(value)}in {closed[0]}{low}, {high}{closed[1]}')


def _kind(value: Any, integer: bool = False) -> str:
  """'' for a number of the right kind, else what it must be ('a finite number ', ...)."""
  if integer and not is_int(value):
    return 'an integer '
  if not integer and not is_finite_number(value):
    return 'a finite number ' if isinstance(value, float) else 'a number '
  return ''


def check_choice(config: ml_collections.ConfigDict, field: str, choices) -> None:
  """One of ``choices``; a misspelt string also gets the closest choice."""
  value = get(config, field)
  if value in choices and (not isinstance(value, bool) or any(isinstance(c, bool) for c in choices)):
    return
  allowed = 'allowed: ' + ', '.join(map(str, choices))
  if isinstance(value, str):
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
    allowed += f' (closest: {close[0]})' if close else ''
  fail(field, value, allowed)


def check_positive(config: ml_collections.ConfigDict, field: str, *, integer: bool = False) -> None:
  """A finite number > 0 (``integer``: an integer)."""
  value = get(config, field)
  ok = (is_int(value) if integer else is_finite_number(value)) and value > 0
  _check(ok, field, value, f'must be {_kind(value, integer)}> 0')


def check_non_negative(config: ml_collections.ConfigDict, field: str, *,
                       integer: bool = False) -> None:
  """A finite number >= 0 (``integer``: an integer)."""
  value = get(config, field)
  ok = (is_int(value) if integer else is_finite_number(value)) and value >= 0
  _check(ok, field, value, f'must be {_kind(value, integer)}>= 0')


def check_seed(config: ml_collections.ConfigDict, field: str = 'seed') -> None:
  value = get(config, field)
  _check(is_int(value) and 0 <= value < MAX_SEED, field, value,
         'a seed must be a non-negative integer below 2**31')


def check_seeds(config: ml_collections.ConfigDict, field: str = 'seeds') -> None:
  """A non-empty list of distinct seeds (an experiment's ``seeds``)."""
  seeds = get(config, field)
  _check(isinstance(seeds, (tuple, list)), field, seeds, 'must be a tuple of seeds, e.g. (0, 1, 2)')
  _check(len(seeds) > 0, field, tuple(seeds), 'give at least one seed')
  for seed in seeds:
    _check(is_int(seed) and 0 <= seed < MAX_SEED, field, tuple(seeds),
           f'seed {seed!r}: a seed must be a non-negative integer below 2**31')
  _check(len(set(seeds)) == len(seeds), field, tuple(seeds), 'the seeds must be distinct')


def check_model(model_config: ml_collections.ConfigDict, field: str = 'model') -> None:
  """The model's name is built in, registered or an importable 'package.module:Class',
  its fields are the network's own and their values build it (sizes, genotype), checked
  without initialising anything."""
  cfg = dict(model_config)
  name = cfg.pop('name', None)
  try:
    models.check_model(name, **cfg)
  except (TypeError, ValueError) as e:
    msg = str(e)
    raise ConfigError(f'config.{field}.{msg[len("model."):]}' if msg.startswith('model.')
                      else f'config.{field}: {msg}') from None


def check_compute_dtype(config: ml_collections.ConfigDict, field: str = 'model') -> None:
  """``compute_dtype`` is known, and a network without a ``dtype`` field runs in float32."""
  check_choice(config, 'compute_dtype', ('float32', 'bfloat16'))
  name = get(config, field).name
  _check(config.compute_dtype == 'float32' or 'dtype' in models.model_fields(name),
         'compute_dtype', config.compute_dtype,
         f'{field}.name={name!r} has no dtype field, so it computes in float32 only; use '
         'float32 or give the network a dtype field')


def dataset_info(config: ml_collections.ConfigDict) -> tuple[int, tuple[int, int, int]]:
  """``(num_classes, image_shape)`` of ``config.data``, as a ConfigError if unknown."""
  try:
    return data_lib.dataset_info(config.data.name, config.data.data_dir or None)
  except (ValueError, data_lib.DatasetNotFoundError) as e:
    msg = str(e)
    raise ConfigError('config.' + msg if msg.startswith('data.name=') else
                      f'config.data.name={config.data.name!r} is invalid: {msg}') from None


def check_dataset(config: ml_collections.ConfigDict) -> tuple[int, tuple[int, int, int]]:
  """``data.name`` is built in, registered or a tensorflow-datasets image classification
  dataset (and tensorflow-datasets is installed); returns ``(num_classes, image_shape)``."""
  name = config.data.name
  _check(name == 'digits' or name in data_lib.registered_datasets()
         or not isinstance(name, str) or importlib.util.find_spec('tensorflow_datasets') is not None,
         'data.name', name,
         f'it is read through tensorflow-datasets, which is not installed: {data_lib.CIFAR_EXTRA}')
  return dataset_info(config)


def check_augmentation(config: ml_collections.ConfigDict) -> None:
  """Crop padding and cutout fit the image; pad mode and flip are known values."""
  height, width, _ = dataset_info(config)[1]
  size = min(height, width)
  for field in ('data.crop_padding', 'data.cutout'):
    check_non_negative(config, field, integer=True)
    _check(get(config, field) <= size, field, get(config, field),
           f'must be at most the image size: {config.data.name} images are {height}x{width}')
  check_choice(config, 'data.pad_mode', ('constant', 'reflect'))
  check_bool(config, 'data.flip')


def check_devices(config: ml_collections.ConfigDict) -> None:
  """``num_devices`` exist, and both batch sizes divide over them."""
  check_non_negative(config, 'num_devices', integer=True)
  count = jax.device_count()
  _check(config.num_devices <= count, 'num_devices', config.num_devices,
         f'only {count} {jax.default_backend()} device{"s" * (count != 1)} visible; use 0 '
         f'(all) or at most {count}')
  devices = config.num_devices or count
  check_batch_divides(config.batch_size, devices)
  check_batch_divides(config.eval_batch_size, devices, 'eval_batch_size')


def check_batch_divides(batch_size: int, num_devices: int, field: str = 'batch_size') -> None:
  _check(batch_size % num_devices == 0, field, batch_size,
         f'a global batch must divide over the {num_devices} devices; use a multiple of {num_devices}')


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
  check_positive(config, 'optimizer.learning_rate')
  for field in ('optimizer.weight_decay', 'optimizer.grad_clip_norm',
                'optimizer.final_learning_rate'):
    check_non_negative(config, field)
  check_range(config, 'optimizer.momentum', 0, 1, closed='[)')
  check_bool(config, 'optimizer.nesterov')
  check_choice(config, 'optimizer.schedule', ('constant', 'cosine', 'multistep'))
  opt = config.optimizer
  if opt.schedule == 'cosine':
    _check(opt.final_learning_rate <= opt.learning_rate, 'optimizer.final_learning_rate',
           opt.final_learning_rate, f'must be <= optimizer.learning_rate={opt.learning_rate}')
  milestones = opt.milestones
  _check(isinstance(milestones, (tuple, list)) and all(is_int(m) and m > 0 for m in milestones)
         and list(milestones) == sorted(set(milestones)), 'optimizer.milestones', milestones,
         'epochs must be increasing integers > 0, e.g. (60, 120, 160)')
  if opt.schedule == 'multistep':
    check_positive(config, 'optimizer.decay_factor')


def validate_train_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` for the first impossible value of a training config."""
  classes, _ = check_dataset(config)
  check_seed(config)
  check_model(config.model)
  _check(config.model.get('num_classes') == classes, 'model.num_classes',
         config.model.get('num_classes'), f'dataset {config.data.name!r} has {classes} classes')
  check_range(config, 'data.validation_fraction', 0, 1, closed='[)')
  check_augmentation(config)
  for field in ('num_epochs', 'batch_size', 'eval_batch_size', 'log_every_steps',
                'keep_checkpoints'):
    check_positive(config, field, integer=True)
  for field in ('eval_every_steps', 'checkpoint_every_steps'):
    check_non_negative(config, field, integer=True)
  check_devices(config)
  _check_optimizer(config)
  check_compute_dtype(config)
  check_non_negative(config, 'aux_weight')
  check_range(config, 'drop_path_prob', 0, 1, closed='[)')
  if config.aux_weight:
    _check(bool(config.model.get('auxiliary')), 'aux_weight', config.aux_weight,
           'needs a network with an auxiliary head (model.name=darts, model.auxiliary=True)')
  if config.drop_path_prob:
    _check(config.model.name == 'darts', 'drop_path_prob', config.drop_path_prob,
           'drop path exists only in DARTS networks (model.name=darts); use 0')


def validate_distill_config(config: ml_collections.ConfigDict) -> None:
  """The training checks plus the ``distill`` section's: method, weights, teacher model."""
  validate_train_config(config)
  check_choice(config, 'distill.method', methods_lib.NAMES)
  check_choice(config, 'distill.at_form', losses.AT_FORMS)
  check_positive(config, 'distill.temperature')
  check_range(config, 'distill.alpha', 0, 1, closed='[]')
  if config.distill.beta is not None:
    check_non_negative(config, 'distill.beta')
  check_non_negative(config, 'distill.warmup_epochs')
  _check(not config.distill.warmup_epochs or config.distill.method in ('dkd', 'kd_dkd'),
         'distill.warmup_epochs', config.distill.warmup_epochs,
         f'only DKD warms up (method dkd or kd_dkd); distill.method={config.distill.method!r}: '
         'use 0')
  method = config.distill.method
  check_non_negative(config, 'distill.init_epochs', integer=True)
  _check(not config.distill.init_epochs or methods_lib.zoo_method(method) in ('fsp', 'fitnet'),
         'distill.init_epochs', config.distill.init_epochs,
         f'only FSP and FitNets have an initialisation stage (method fsp, fitnet or their kd_ '
         f'forms); distill.method={method!r}: use 0')
  check_positive(config, 'distill.nce_k', integer=True)
  check_positive(config, 'distill.nce_t')
  check_range(config, 'distill.nce_m', 0, 1, closed='[)')
  if not methods_lib.has_memory(method):
    for field, default in methods_lib.CRD_FIELDS.items():
      _check(config.distill[field] == default, f'distill.{field}', config.distill[field],
             f'only CRD reads it (method crd or kd_crd); distill.method={method!r}: leave '
             f'it at {default}')
  teacher_workdir = config.distill.get('teacher_workdir', '')
  _check(isinstance(teacher_workdir, str), 'distill.teacher_workdir', teacher_workdir,
         'must be a directory path or empty')
  if config.distill.method != 'none':
    check_model(config.distill.teacher_model, 'distill.teacher_model')
    check_compute_dtype(config, 'distill.teacher_model')
    classes = config.model.num_classes
    _check(config.distill.teacher_model.get('num_classes') == classes,
           'distill.teacher_model.num_classes', config.distill.teacher_model.get('num_classes'),
           f'must equal model.num_classes={classes}')
  if config.distill.method != 'none' and methods_lib.reads(config.distill.method) != 'logits':
    check_points_pair(config)


def _outputs(model_config: ml_collections.ConfigDict, image_shape: tuple[int, ...]
             ) -> tuple[list[str], list[int], Any]:
  """``'HxW'`` and channels of each attention point of the network and its sown embedding
  (None if it sows none), from shapes alone (no compute)."""
  model = models.create_model(**dict(model_config))
  (_, points), variables = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jax.numpy.zeros((1, *image_shape)), train=False, mutable=True))
  embedding = variables.get('intermediates', {}).get('embedding')
  return ([f'{p.shape[1]}x{p.shape[2]}' for p in points], [int(p.shape[-1]) for p in points],
          embedding)


def check_points_pair(config: ml_collections.ConfigDict) -> None:
  """What the method compares exists in both networks, on ``config.data``'s images:
  attention transfer and NST pair point i of the student with point i of the teacher
  (sizes may differ: the larger map is shrunk), so both have as many points, at least
  one; SP needs a last point in each and FitNets a middle one (of a size its regressor
  maps), FSP as many channels at each point in both; RKD, PKT, CC and CRD an embedding
  sown by each."""
  method = config.distill.method
  image_shape = dataset_info(config)[1]
  student, student_channels, student_embedding = _outputs(config.model, image_shape)
  teacher, teacher_channels, teacher_embedding = _outputs(config.distill.teacher_model,
                                                          image_shape)
  needs = methods_lib.reads(method)
  names = f'model ({config.model.name})', f'distill.teacher_model ({config.distill.teacher_model.name})'
  if needs == 'embedding':
    for name, embedding in zip(names, (student_embedding, teacher_embedding)):
      _check(embedding is not None, 'distill.method', method,
             f'{method} compares the pooled embeddings, but {name} sows none; sow it with '
             "self.sow('intermediates', 'embedding', x) before the classifier, x of shape (N, D)")
    return
  one_each = needs in ('last_point', 'hint_point')
  _check(student and (one_each or len(student) == len(teacher)) and teacher,
         'distill.method', method,
         f'{method} pairs point i of the student with point i of the teacher, but '
         f'{names[0]} has {_listed(student)} and {names[1]} has {_listed(teacher)}; use kd, '
         'or networks with as many points')
  if methods_lib.zoo_method(method) == 'fsp':
    _check(student_channels == teacher_channels and len(student) >= 2, 'distill.method',
           method, f'FSP compares flow matrices between consecutive points, so both networks '
           f'need at least 2 points of the same channels; {names[0]} has channels '
           f'{student_channels} and {names[1]} {teacher_channels} (RepDistiller FSP.py)')
  if needs == 'hint_point':  # FitNets' regressor (RepDistiller ConvReg) maps sizes so
    hint = lambda sizes: sizes[methods_lib.hint_index(len(sizes))]
    (s_h, s_w), (t_h, t_w) = ([int(v) for v in hint(x).split('x')] for x in (student, teacher))
    _check((s_h, s_w) == (2 * t_h, 2 * t_w) or (2 * s_h, 2 * s_w) == (t_h, t_w)
           or (s_h >= t_h and s_w >= t_w), 'distill.method', method,
           f'FitNets regresses the student\'s middle point ({s_h}x{s_w}) onto the teacher\'s '
           f'({t_h}x{t_w}); the student\'s must be twice, half or at least the teacher\'s size')


def _listed(sizes: list[str]) -> str:
  return f'{len(sizes)} point{"" if len(sizes) == 1 else "s"} [{", ".join(sizes)}]'


def check_workdir_fields(config: ml_collections.ConfigDict) -> None:
  """``allow_resume_changes`` names fields or sections of ``config`` (comma-separated);
  ``checkpoint_every_seconds``, where the config has it, is a finite number >= 0."""
  text = config.allow_resume_changes
  _check(isinstance(text, str), 'allow_resume_changes', text,
         "must be a string of comma-separated fields, e.g. 'num_epochs,optimizer.learning_rate'")
  fields = config_lib.leaf_paths(config)
  for name in filter(None, (n.strip() for n in text.split(','))):
    _check(any(f == name or f.startswith(name + '.') for f in fields), 'allow_resume_changes',
           text, f'{name!r} is not a field of this config; give comma-separated dotted names, '
           'e.g. num_epochs,optimizer.learning_rate')
  if 'checkpoint_every_seconds' in config:
    check_non_negative(config, 'checkpoint_every_seconds')

