"""Networks in Flax linen, chosen by name: the built-in CIFAR networks or your own.

Built in: ``'wrn'``, ``'densenet_bc'``, ``'darts'``. Your own network is a
``flax.linen.Module`` class given to :func:`register_model` (``register_model('my_cnn',
MyCNN)`` or ``register_model('my_cnn', 'my_package.nets:MyCNN')``), or named directly in
a config as an import path, ``model.name='my_package.nets:MyCNN'`` (imported on use). A
registered or imported network trains (``job='train'``), distils as student or teacher
(``job='distill'``, ``distill.teacher_model``) and is checked by :func:`check_model` like
a built-in one. Registrations live in the Python process: register in the config file
or script that starts the run.

The network contract:

* ``model.apply(variables, x, train=...)`` with ``x`` NHWC float32 images (normalised
  per channel) of any height, width and channel count returns ``(logits, points)``:
  ``logits`` of shape ``(N, num_classes)`` (float32 is best: losses are taken on them as
  they come) and ``points`` a tuple of NHWC feature maps, usually the outputs of the
  network's stages at decreasing resolutions (the built-ins give three: 32, 16 and 8 px
  on CIFAR). Attention transfer pairs point ``i`` of the student with point ``i`` of
  the teacher (spatial sizes and channel counts may differ within a pair; each map is
  shrunk to the smaller size), so student and teacher need the same number of points;
  KD's loss uses none (AT between networks with different counts is refused before
  any compute). An evaluation against a teacher also reports the attention distance
  when the counts are equal.
* Optionally sow the pooled features the classifier reads, ``self.sow('intermediates',
  'embedding', x)`` with ``x`` of shape ``(N, D)`` (the built-ins do): the methods that
  compare embeddings read them there.
  ``train`` switches batch norm (``'batch_stats'``) and dropout (rng ``'dropout'``).
* Dataclass fields are the config's ``model.*`` fields. ``num_classes`` is required
  (the trainer checks it against the dataset); any field without a default must be
  given in the config; unknown config fields fail in one line. ``dtype`` is optional:
  the trainer passes ``compute_dtype`` ('float32' or 'bfloat16', see
  :func:`compute_dtype`) there when the network has the field; a network without it
  runs with ``compute_dtype='float32'`` only.
* Optionally mark activations with ``self.perturb(name, x, collection='perturbations')``
  (:func:`distill_jax.models.layers.mark` does this and sows the value): per-channel
  Fisher information (:mod:`distill_jax.fisher`) reads gradients there. Unmarked
  networks train and distil; only Fisher needs marks.

``variables['params']`` holds exactly the trainable parameters and
``variables['batch_stats']`` the batch-norm running statistics (empty for a network
without batch norm). :func:`init_variables` and :func:`param_shapes` check the
``(logits, points)`` contract in one line and leave the ``'perturbations'`` collection
out.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax import genotypes

# name -> "module:attribute" of a flax.linen.Module class (imported lazily), or the class.
_BUILTIN: dict[str, str] = {
    'wrn': 'distill_jax.models.wrn:WideResNet',
    'densenet_bc': 'distill_jax.models.densenet:DenseNetBC',
    'darts': 'distill_jax.models.darts:DartsNetwork',
}
_REGISTRY: dict[str, str | type[nn.Module]] = dict(_BUILTIN)

# 'package.module:Class' (the attribute may be dotted: 'package.module:Outer.Inner').
_IMPORT_PATH = re.compile(r'[A-Za-z_][\w.]*:[A-Za-z_][\w.]*')
IMPORT_HINT = "an import path 'package.module:Class' of a flax.linen.Module"


def model_names() -> list[str]:
  """Names accepted by :func:`create_model` (built-in and registered), sorted."""
  return sorted(_REGISTRY)


def _is_module_class(obj: Any) -> bool:
  return isinstance(obj, type) and issubclass(obj, nn.Module)


def register_model(name: str, constructor: type[nn.Module] | str) -> None:
  """Makes ``model.name=name`` build ``constructor``, a ``flax.linen.Module`` class or
  its import path ``'package.module:Class'`` (imported on first use).

  Registering a name again replaces it; the built-in names cannot be replaced. The
  class must follow the contract in this module's docstring.
  """
  if not isinstance(name, str) or not re.fullmatch(r'[A-Za-z0-9_\-.]+', name):
    raise ValueError(f'register_model: name={name!r} is invalid: use letters, digits, _, - '
                     "and . (no ':', which marks an import path)")
  if name in _BUILTIN:
    raise ValueError(f'register_model: name={name!r} is a built-in network; choose another name')
  if isinstance(constructor, str):
    if not _IMPORT_PATH.fullmatch(constructor):
      raise ValueError(f'register_model: constructor={constructor!r} is invalid: give '
                       f'{IMPORT_HINT} or the class itself')
  elif not _is_module_class(constructor):
    raise ValueError(f'register_model: constructor={constructor!r} is invalid: give a '
                     f'flax.linen.Module class or {IMPORT_HINT}')
  _REGISTRY[name] = constructor


def _unknown(name: Any) -> ValueError:
  registered = sorted(set(_REGISTRY) - set(_BUILTIN))
  known = ', '.join(sorted(_BUILTIN)) + (f'; registered: {", ".join(registered)}'
                                         if registered else '')
  return ValueError(f'model.name={name!r} is not a known network; known: {known}; or '
                    f'{IMPORT_HINT}')


def _import_class(name: str, path: str) -> type[nn.Module]:
  """The class at ``path`` ('module:attr'), with a one-line ValueError naming ``name``."""
  module_name, attr = path.split(':')
  try:
    obj = importlib.import_module(module_name)
  except Exception as e:  # ImportError, or whatever the module raises while importing
    first = (str(e).strip().splitlines() or [''])[0]
    raise ValueError(f'model.name={name!r} cannot be imported: module {module_name!r} '
                     f'failed with {type(e).__name__}: {first}') from None
  for part in attr.split('.'):
    if not hasattr(obj, part):
      raise ValueError(f'model.name={name!r} cannot be imported: module {module_name!r} has '
                       f'no attribute {attr!r}')
    obj = getattr(obj, part)
  if not _is_module_class(obj):
    raise ValueError(f'model.name={name!r} is invalid: {path} is {type(obj).__name__} '
                     f'{obj!r:.60}, not a flax.linen.Module class')
  return obj


def model_class(name: str) -> type[nn.Module]:
  """The Flax module class of ``name``: registered, or an import path 'module:Class'."""
  if not isinstance(name, str):
    raise _unknown(name)
  target = _REGISTRY.get(name)
  if target is None:
    if not _IMPORT_PATH.fullmatch(name):
      raise _unknown(name)
    target = name
  return target if _is_module_class(target) else _import_class(name, target)


def model_fields(name: str) -> tuple[str, ...]:
  """The config fields of network ``name`` (its dataclass fields but ``parent``/``name``)."""
  return _field_names(model_class(name))


def _field_names(cls: type[nn.Module]) -> tuple[str, ...]:
  return tuple(f for f in cls.__dataclass_fields__ if f not in ('parent', 'name'))


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds a network, e.g. ``create_model('wrn', depth=16, widen_factor=2)``.

  A model config is this call's keyword arguments including ``name``, so
  ``create_model(**config.model)`` works. Unknown names or fields fail with one line
  naming the allowed values. ``dtype=float32`` is dropped for a network without a
  ``dtype`` field (the trainer always passes its compute dtype); any other dtype fails.
  """
  cls = model_class(name)
  if 'dtype' in kwargs and 'dtype' not in _field_names(cls):
    dtype = kwargs.pop('dtype')
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(jnp.float32):
      raise ValueError(f'model {name!r} has no dtype field, so it computes in float32 only; '
                       f'got dtype={jnp.dtype(dtype).name} (use compute_dtype=float32 or give '
                       'the network a dtype field)')
  _check_known_fields(cls, name, kwargs)
  return cls(**kwargs)


def _check_known_fields(cls: type[nn.Module], name: str, kwargs: dict) -> None:
  fields = _field_names(cls)
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(
        f'model.{unknown[0]} is not a field of model {name!r}; allowed: {", ".join(fields)}')
  for f in fields:
    d = cls.__dataclass_fields__[f]
    if (f not in kwargs and d.default is dataclasses.MISSING
        and d.default_factory is dataclasses.MISSING):
      raise ValueError(f'model.{f} is required: model {name!r} has no default for it')


def _fields(cls: type[nn.Module], kwargs: dict) -> dict:
  """The network's fields: the dataclass defaults overridden by ``kwargs``."""
  out = {f: d.default for f, d in cls.__dataclass_fields__.items()
         if f not in ('parent', 'name') and d.default is not dataclasses.MISSING}
  return {**out, **kwargs}


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ValueError(f'model.{field}={value!r} is invalid: {allowed}')


def _is_int(value: Any, minimum: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_int(f: dict, field: str, minimum: int = 1) -> None:
  _require(_is_int(f[field], minimum), field, f[field], f'must be an integer >= {minimum}')


def _check_fraction(f: dict, field: str, low_open: bool = False, high_closed: bool = False) -> None:
  """A finite number in [0, 1) (``low_open``: (0, ...; ``high_closed``: ..., 1])."""
  v = f[field]
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
      (v > 0 if low_open else v >= 0) and (v <= 1 if high_closed else v < 1))
  _require(ok, field, v, f'must be in {"(" if low_open else "["}0, 1{"]" if high_closed else ")"}')


def _check_depth(f: dict, family: str, why: str) -> None:
  d = f['depth']
  _require(_is_int(d, 10) and (d - 4) % 6 == 0, 'depth', d,
           f'{family} depth must be 6n+4 with n >= 1 ({why}): 10, 16, 22, 28, 40, 100, ...')


def _check_wrn(f: dict) -> None:
  _check_depth(f, 'WRN', 'n basic blocks of 2 convolutions per group')
  _check_int(f, 'widen_factor')
  _check_fraction(f, 'dropout_rate')


def _check_densenet(f: dict) -> None:
  _check_depth(f, 'DenseNet-BC', 'n bottleneck layers of 2 convolutions per block')
  _check_int(f, 'growth_rate')
  _check_fraction(f, 'compression', low_open=True, high_closed=True)
  n, k, channels = (f['depth'] - 4) // 6, f['growth_rate'], 2 * f['growth_rate']
  for i in range(2):  # each transition keeps floor(channels * compression) >= 1 of them
    channels = math.floor((channels + n * k) * f['compression'])
    _require(channels >= 1, 'compression', f['compression'],
             f'transition {i} would keep {channels} channels; use a larger compression')


def _check_darts(f: dict) -> None:
  _check_int(f, 'layers', 3)
  _check_int(f, 'init_channels')
  _check_int(f, 'stem_multiplier')
  _check_fraction(f, 'drop_path_prob')
  _require(isinstance(f['auxiliary'], bool), 'auxiliary', f['auxiliary'], 'must be True or False')
  from distill_jax.models import darts_ops  # pylint: disable=g-import-not-at-top
  _require(f['impl'] in darts_ops.IMPLS, 'impl', f['impl'], 'allowed: ' + ', '.join(darts_ops.IMPLS))
  genotype = f['genotype']
  if not isinstance(genotype, genotypes.Genotype):
    try:
      genotypes.get_genotype(genotype)
    except ValueError as e:
      msg = str(e)
      prefix = f'genotype={genotype!r} '
      raise ValueError('model.' + msg if msg.startswith(prefix) else
                       f'model.genotype={genotype!r} is invalid: {msg}') from None


# name -> the checks of its fields (see check_model).
_FIELD_CHECKS = {'wrn': _check_wrn, 'densenet_bc': _check_densenet, 'darts': _check_darts}


def check_model(name: str, **kwargs: Any) -> nn.Module:
  """:func:`create_model` after checking what the network's ``init`` would fail on later
  (sizes, types, the DARTS genotype and per-cell channels/groups); computes nothing.

  Every network needs a ``num_classes`` field (an integer >= 1); the built-in ones also
  get their own field checks. Raises a one-line ValueError starting ``model.FIELD=VALUE``
  (or ``model.name=...`` for a network that cannot be found or imported).
  """
  cls = model_class(name)
  if 'num_classes' not in _field_names(cls):
    raise ValueError(f'model.name={name!r} is invalid: {cls.__module__}.{cls.__qualname__} has '
                     'no num_classes field; every network needs one (the trainer checks it '
                     'against the dataset)')
  _check_known_fields(cls, name, kwargs)
  f = _fields(cls, kwargs)
  _check_int(f, 'num_classes')
  _FIELD_CHECKS.get(name, lambda f: None)(f)
  model = cls(**kwargs)
  if name == 'darts':
    model.resolved_cell_groups()  # cell_channels, cell_groups: one-line ValueErrors
  return model


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  """``'float32'`` or ``'bfloat16'`` -> the dtype a model's ``dtype`` field takes."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'compute_dtype={name!r}; allowed: {", ".join(COMPUTE_DTYPES)}')
  return COMPUTE_DTYPES[name]


def _describe(x: Any) -> str:
  if hasattr(x, 'shape'):
    return f'an array of shape {tuple(x.shape)}'
  if isinstance(x, (tuple, list)):
    return f'a {type(x).__name__} of {len(x)}'
  return type(x).__name__


def check_outputs(model: nn.Module, outputs: Any, batch: int) -> None:
  """Raises a one-line ValueError unless ``outputs`` (of ``model.apply`` on ``batch``
  images) are ``(logits (batch, num_classes), points: a tuple of NHWC maps)``."""
  where = f'{type(model).__name__}.__call__'
  if not (isinstance(outputs, tuple) and len(outputs) == 2):
    raise ValueError(f'{where} must return (logits, points); it returned {_describe(outputs)}')
  logits, points = outputs
  want = (batch, getattr(model, 'num_classes', None))
  if getattr(logits, 'shape', None) is None or tuple(logits.shape) != want:
    raise ValueError(f'{where} returned logits as {_describe(logits)}; expected shape '
                     f'(batch, num_classes) = {want}')
  if not isinstance(points, (tuple, list)):
    raise ValueError(f'{where} returned points as {_describe(points)}; expected a tuple of '
                     'NHWC feature maps (may be empty)')
  for i, p in enumerate(points):
    if getattr(p, 'ndim', None) != 4 or p.shape[0] != batch:
      raise ValueError(f'{where} returned point {i} as {_describe(p)}; expected an NHWC '
                       f'feature map (batch={batch}, height, width, channels)')


def init_variables(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
  """Initialises ``{'params', 'batch_stats'}`` for NHWC inputs of ``input_shape``.

  Runs eagerly (not under ``jit``): compiling ``init`` of a deep network costs far
  more than running it once. ``input_shape`` is ``(batch, height, width, channels)``.
  The outputs are checked against the network contract (:func:`check_outputs`).
  """
  x = jnp.zeros(input_shape, jnp.float32)
  outputs, variables = model.init_with_output(rng, x, train=False)
  check_outputs(model, outputs, input_shape[0])
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (or in its shape structs)."""
  return int(sum(math.prod(x.shape) if hasattr(x, 'shape') else 0 for x in jax.tree.leaves(params)))


def param_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
  """``{'params', 'batch_stats'}`` as ``jax.ShapeDtypeStruct`` trees, without compute;
  the outputs are checked against the network contract (:func:`check_outputs`)."""
  outputs, variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros(input_shape, jnp.float32),
                                     train=False))
  check_outputs(model, outputs, input_shape[0])
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
