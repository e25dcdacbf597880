r"""Teachers trained elsewhere: PyTorch state dicts of the field's CIFAR networks.

:func:`from_torch` turns the state dict of a standard PyTorch release into distill_jax
``{'params', 'batch_stats'}``, weight for weight; :func:`to_torch` is its inverse.
:data:`NAMINGS` (detected from the keys, or chosen with ``naming=``):

* wrn ``wrn_py`` (default): ``wrn.py`` of HobbitLong/RepDistiller (WideResNet-pytorch
  lineage): ``conv1``, ``block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``,
  ``fc``; wrn ``attention_transfer``: szagoruyko/attention-transfer ``cifar.py``
  (``model.pt7['params']``): ``conv0``, ``group{0,1,2}.blockN.{bn0,conv0,bn1,conv1,convdim}``,
  ``bn``, ``fc``, its convolutions bare tensors (no ``.weight``).
* densenet_bc ``densenet3`` (default): andreasveit/densenet-pytorch ``DenseNet3``
  (``bottleneck=True``; distill_jax's layers: new features after the input, transitions to
  ``floor(C * reduction)``): ``conv1``, ``block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2}``,
  ``trans{1,2}.{bn1,conv1}``, ``bn1``, ``fc``; densenet_bc ``bamos``: bamos/densenet.pytorch,
  the same as ``dense{1,2,3}.N.*`` (its ``forward`` ends in ``log_softmax``).
* darts ``darts``: quark0/darts ``cnn/model.py`` ``NetworkCIFAR``: ``stem.{0,1}``,
  ``cells.I.preprocess{0,1}.*`` and ``cells.I._ops.J.*`` (``op.K`` of the nn.Sequential,
  or ``conv_1, conv_2, bn``), ``classifier``, ``auxiliary_head.{features.K, classifier}``.

Layouts: conv ``weight`` (O, I / groups, H, W) -> ``kernel`` (H, W, I / groups, O), the
depthwise and grouped DARTS convolutions too (``nn.Conv``'s layout for ``impl='fast'`` and
``'lax'`` alike); linear (out, in) -> (in, out); batch norm ``weight, bias, running_mean,
running_var`` -> ``params`` ``scale, bias``, ``batch_stats`` ``mean, var``;
``num_batches_tracked`` is ignored. Batch-norm constants need no conversion: the networks
here use PyTorch's eps 1e-5, and a teacher in inference mode uses the stored statistics.

``python -m distill_jax.convert --from=torch FILE --model=wrn_40_2 --out=DIR`` writes DIR as
a finished teacher run for ``distill.teacher_workdir=DIR`` (a checkpoint saved as training
saves one, and a ``results.json`` saying where it came from); ``.npz`` needs no PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import models
from distill_jax.models import darts_layout as L
from distill_jax.models import names
from distill_jax.trainers import checkpoint as ckpt_lib
from distill_jax.trainers import loop
from distill_jax.trainers import workdir as workdir_lib

PARAMS, BATCH_STATS = 'params', 'batch_stats'
CONVERTED_STEP = 0  # the checkpoint step of a converted teacher: no step was trained here
AUX_PREFIX = 'auxiliary_head.'
STEM_MODULES = ('stem', L.STEM_CONV)  # the first convolution of each network
IGNORED_SUFFIX = '.num_batches_tracked'
# Where checkpoints keep their state dict (RepDistiller: 'model'; attention-transfer: 'params').
WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'params', 'net', 'weights')
NAMINGS: dict[str, tuple[str, ...]] = {
    'wrn': ('wrn_py', 'attention_transfer'),
    'densenet_bc': ('densenet3', 'bamos'),
    'darts': ('darts',),
}
DESCRIPTIONS = {
    'wrn_py': 'RepDistiller / WideResNet-pytorch wrn.py',
    'attention_transfer': 'attention-transfer cifar.py',
    'densenet3': 'densenet-pytorch DenseNet3',
    'bamos': 'bamos densenet.pytorch',
    'darts': 'DARTS cnn/model.py NetworkCIFAR',
}
_BARE_CONVS = ('attention_transfer',)  # namings whose conv weights have no '.weight'
_BN_KEYS = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


class ConvertError(ValueError):
  """A state dict, file or flag that cannot be converted; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One array: its state-dict key, its place in the variables and its layout."""
  torch_key: str
  collection: str            # 'params' or 'batch_stats'
  path: tuple[str, ...]      # inside the collection
  layout: str                # 'conv' (OIHW <-> HWIO), 'linear' ((out, in) <-> (in, out)), 'vector'
  shape: tuple[int, ...]     # in distill_jax's layout

  @property
  def torch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in _FROM_JAX.get(self.layout, range(len(self.shape))))


# ------------------------------------------------------------------------ the namings


def _indices(name: str, make: Callable[..., str], arity: int) -> tuple[int, ...] | None:
  """The integers ``i`` with ``make(*i) == name`` (``make`` a :mod:`names` function)."""
  nums = tuple(int(n) for n in re.findall(r'\d+', name))
  return nums if len(nums) == arity and make(*nums) == name else None


_WRN_TOP = {'wrn_py': {'stem': 'conv1', 'final_bn': 'bn1', names.CLASSIFIER: 'fc'},
            'attention_transfer': {'stem': 'conv0', 'final_bn': 'bn', names.CLASSIFIER: 'fc'}}
_WRN_BLOCK = {
    'wrn_py': {'bn0': 'bn1', 'conv0': 'conv1', 'bn1': 'bn2', 'conv1': 'conv2',
               'shortcut': 'convShortcut'},
    'attention_transfer': {'bn0': 'bn0', 'conv0': 'conv0', 'bn1': 'bn1', 'conv1': 'conv1',
                           'shortcut': 'convdim'},
}


def _wrn_module(naming: str, path: tuple[str, ...], params: Mapping) -> str | None:
  del params
  if len(path) == 1:
    return _WRN_TOP[naming].get(path[0])
  gb = _indices(path[0], names.wrn_block_name, 2)
  if gb is None or len(path) != 2 or path[1] not in _WRN_BLOCK[naming]:
    return None
  block = f'block{gb[0] + 1}.layer.{gb[1]}' if naming == 'wrn_py' else f'group{gb[0]}.block{gb[1]}'
  return f'{block}.{_WRN_BLOCK[naming][path[1]]}'


_DENSE_TOP = {'stem': 'conv1', 'final_bn': 'bn1', names.CLASSIFIER: 'fc'}
_DENSE_LAYER = {'bn0': 'bn1', 'conv0': 'conv1', 'bn1': 'bn2', 'conv1': 'conv2'}
_TRANSITION = {'bn': 'bn1', 'conv': 'conv1'}


def _densenet_module(naming: str, path: tuple[str, ...], params: Mapping) -> str | None:
  del params
  if len(path) == 1:
    return _DENSE_TOP.get(path[0])
  block = _indices(path[0], names.densenet_block_name, 1)
  layer = _indices(path[1], lambda j: f'layer{j}', 1)
  if block is not None and layer is not None and len(path) == 3 and path[2] in _DENSE_LAYER:
    where = (f'block{block[0] + 1}.layer.{layer[0]}' if naming == 'densenet3'
             else f'dense{block[0] + 1}.{layer[0]}')
    return f'{where}.{_DENSE_LAYER[path[2]]}'
  trans = _indices(path[0], names.densenet_transition_name, 1)
  if trans is not None and len(path) == 2 and path[1] in _TRANSITION:
    return f'trans{trans[0] + 1}.{_TRANSITION[path[1]]}'
  return None


_DARTS_TOP = {L.STEM_CONV: 'stem.0', L.STEM_BN: 'stem.1', names.CLASSIFIER: 'classifier'}
_AUX = {L.AUX_CONV1: 'features.2', L.AUX_BN1: 'features.3', L.AUX_CONV2: 'features.5',
        L.AUX_BN2: 'features.6', L.AUX_CLASSIFIER: 'classifier'}
# The layers of each kind of cell module (SepConv, DilConv, FactorizedReduce, ReLUConvBN)
# under the release's names (nn.Sequential indices); each kind is told by its first layer.
_CELL_MODULES = (
    dict(zip(L.SEP_LAYERS[0] + L.SEP_LAYERS[1], ('op.1', 'op.2', 'op.3', 'op.5', 'op.6', 'op.7'))),
    dict(zip(L.DIL_LAYERS, ('op.1', 'op.2', 'op.3'))),
    {L.FR_CONVS[0]: 'conv_1', L.FR_CONVS[1]: 'conv_2', L.BN: 'bn'},
    {L.CONV: 'op.1', L.BN: 'op.2'},
)


def _darts_module(naming: str, path: tuple[str, ...], params: Mapping) -> str | None:
  del naming
  if len(path) == 1:
    return _DARTS_TOP.get(path[0])
  if path[0] == names.AUX_HEAD:
    return AUX_PREFIX + _AUX[path[1]] if len(path) == 2 and path[1] in _AUX else None
  cell = _indices(path[0], names.cell_name, 1)
  edge = _indices(path[1], L.op_name, 1)
  if cell is None or len(path) != 3:
    return None
  if path[1] not in (L.PREPROCESS0, L.PREPROCESS1) and edge is None:
    return None
  module = f'cells.{cell[0]}.' + (f'_ops.{edge[0]}' if edge is not None else path[1])
  keys = set(params.get(path[0], {}).get(path[1], {}))
  table = next((t for t in _CELL_MODULES if next(iter(t)) in keys), {})
  return f'{module}.{table[path[2]]}' if path[2] in table else None


_MODULE_NAMERS = {'wrn': _wrn_module, 'densenet_bc': _densenet_module, 'darts': _darts_module}


def leaves(variables: Mapping, family: str, naming: str) -> list[Leaf]:
  """Every array of ``variables`` (a ``{'params', 'batch_stats'}`` tree of arrays or shape
  structs of a ``family`` network) with its state-dict key under ``naming``."""
  params = variables.get(PARAMS, {})
  out = []
  for collection in (PARAMS, BATCH_STATS):
    for path, value in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
      leaf, shape = path[-1], tuple(np.shape(value))
      module = _MODULE_NAMERS[family](naming, path[:-1], params)
      where = f'{collection}/{"/".join(path)}'
      if module is None:
        raise ConvertError(f'{where} has no {DESCRIPTIONS[naming]} name; is model.name right?')
      if leaf == L.KERNEL and len(shape) == 4:
        key = module if naming in _BARE_CONVS else f'{module}.weight'
        out.append(Leaf(key, collection, path, 'conv', shape))
      elif leaf == L.KERNEL:
        out.append(Leaf(f'{module}.weight', collection, path, 'linear', shape))
      elif leaf in _BN_KEYS:
        out.append(Leaf(f'{module}.{_BN_KEYS[leaf]}', collection, path, 'vector', shape))
      else:
        raise ConvertError(f'{where} is no conv, linear or batch-norm array: no PyTorch name')
  return out


# Axis orders: torch (O, I, H, W) -> (H, W, I, O) and (out, in) -> (in, out), and back.
_TO_JAX = {'conv': (2, 3, 1, 0), 'linear': (1, 0)}
_FROM_JAX = {'conv': (3, 2, 0, 1), 'linear': (1, 0)}


def _relayout(array: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
  """A writable float32 copy (never a view) of ``array`` transposed to ``axes``."""
  return np.array(array if axes is None else np.transpose(array, axes), np.float32, order='C')


def _as_numpy(key: str, value: Any) -> np.ndarray:
  """A numpy copy of a state-dict value (a torch tensor needs no torch import here)."""
  if hasattr(value, 'detach') and hasattr(value, 'cpu'):  # a torch tensor
    return (value.detach().cpu().float() if value.is_floating_point() else value.cpu()).numpy()
  if not hasattr(value, 'shape'):
    raise ConvertError(f'state dict value of {key!r} is a {type(value).__name__}, not an array')
  return np.asarray(value)


def _config_dict(model_config: Any) -> dict:
  if hasattr(model_config, 'to_dict'):  # an ml_collections.ConfigDict
    model_config = model_config.to_dict()
  if not isinstance(model_config, Mapping):
    raise ConvertError(f'model_config must be a mapping with a "name"; got {model_config!r}')
  return dict(model_config)


def _family(config: Mapping, naming: str | None = None) -> str:
  name = config.get('name')
  if name not in NAMINGS:
    raise ConvertError(f'model.name={name!r} has no PyTorch release to convert from; allowed: '
                       f'{", ".join(NAMINGS)}')
  if naming is not None and naming not in NAMINGS[name]:
    raise ConvertError(f'naming={naming!r} is not a naming of {name}; allowed: '
                       f'{", ".join(NAMINGS[name])}')
  return name


def _clean(state_dict: Mapping) -> tuple[dict[str, np.ndarray], list[str]]:
  """The state dict as numpy arrays, a DataParallel ``module.`` prefix stripped, and the
  ``num_batches_tracked`` keys it leaves out."""
  if not isinstance(state_dict, Mapping) or not state_dict:
    raise ConvertError('the state dict must be a non-empty mapping from names to arrays; got '
                       f'{type(state_dict).__name__}')
  strip = len('module.') if all(str(k).startswith('module.') for k in state_dict) else 0
  arrays, ignored = {}, []
  for key, value in state_dict.items():
    name = str(key)[strip:]
    if name.endswith(IGNORED_SUFFIX):
      ignored.append(name)
    else:
      arrays[name] = _as_numpy(name, value)
  return arrays, ignored


def _missing_error(missing: list[Leaf], family: str, naming: str, arrays: Mapping,
                   table: list[Leaf]) -> ConvertError:
  more = f' (and {len(missing) - 1} more keys)' if len(missing) > 1 else ''
  hint = ''
  if len(missing) == len(table):
    hint = (f'; none of its keys is there (the state dict has e.g. {next(iter(arrays))!r}); '
            f'namings of {family}: ' + ', '.join(f'{n} ({DESCRIPTIONS[n]})'
                                                 for n in NAMINGS[family]))
  return ConvertError(
      f'state dict key {missing[0].torch_key!r} is missing{more}: the {family} model needs it with '
      f'shape {tuple(missing[0].torch_shape)} ({DESCRIPTIONS[naming]} naming){hint}')


def _extra_error(extra: list[str], arrays: Mapping, family: str) -> ConvertError:
  more = f' (and {len(extra) - 1} more unused keys)' if len(extra) > 1 else ''
  if family == 'darts' and extra[0].startswith(AUX_PREFIX):
    hint = ('; it is the DARTS auxiliary head: set model.auxiliary=True to convert it, or '
            'leave it out with drop_auxiliary=True (--drop_auxiliary): a teacher never uses it')
  else:
    hint = '; is the model config (depth, layers, genotype) the one it was trained with?'
  return ConvertError(f'state dict key {extra[0]!r} (shape {tuple(arrays[extra[0]].shape)}) is '
                      f'not used by the {family} model{more}{hint}')


def _shape_error(leaf: Leaf, got: tuple[int, ...]) -> ConvertError:
  want = leaf.torch_shape
  hint = f'; set model.num_classes={got[0]}' if (
      leaf.path[0] == names.CLASSIFIER and got[1:] == want[1:]) else ''
  return ConvertError(f'state dict key {leaf.torch_key!r} has shape {tuple(got)}, the model '
                      f'needs {tuple(want)}{hint}')


# ------------------------------------------------------------------------ from / to torch


@dataclasses.dataclass
class Conversion:
  """What :func:`convert` made: the variables, the naming it read, the keys it left out."""
  variables: dict
  naming: str
  ignored: list[str]   # num_batches_tracked
  dropped: list[str]   # the auxiliary head, with drop_auxiliary


def convert(state_dict: Mapping[str, Any], model_config: Mapping[str, Any], *,
            naming: str | None = None, drop_auxiliary: bool = False,
            input_shape: tuple[int, ...] | None = None) -> Conversion:
  """:func:`from_torch`, also saying which naming it read and which keys it left out."""
  config = _config_dict(model_config)
  family = _family(config, naming)
  model = models.check_model(**config)
  arrays, ignored = _clean(state_dict)
  dropped = []
  if drop_auxiliary and family == 'darts' and not config.get('auxiliary', False):
    dropped = sorted(k for k in arrays if k.startswith(AUX_PREFIX))
    arrays = {k: v for k, v in arrays.items() if not k.startswith(AUX_PREFIX)}
  shapes = models.param_shapes(model, input_shape or (1, 32, 32, 3))
  tables = {n: leaves(shapes, family, n) for n in NAMINGS[family]}
  # Unless given, the naming whose keys the state dict holds most of (ties: the first).
  naming = naming or max(NAMINGS[family],
                         key=lambda n: sum(leaf.torch_key in arrays for leaf in tables[n]))
  table = tables[naming]
  stem = next(leaf for leaf in table if leaf.path[0] in STEM_MODULES)
  found = arrays.get(stem.torch_key)
  if input_shape is None and found is not None and found.ndim == 4 and found.shape[1] != 3:
    table = leaves(models.param_shapes(model, (1, 32, 32, found.shape[1])), family, naming)

  missing = [leaf for leaf in table if leaf.torch_key not in arrays]
  if missing:
    raise _missing_error(missing, family, naming, arrays, table)
  extra = sorted(set(arrays) - {leaf.torch_key for leaf in table})
  if extra:
    raise _extra_error(extra, arrays, family)
  flat = {}
  for leaf in table:
    array = arrays[leaf.torch_key]
    if tuple(array.shape) != leaf.torch_shape:
      raise _shape_error(leaf, tuple(array.shape))
    flat[(leaf.collection,) + leaf.path] = _relayout(array, _TO_JAX.get(leaf.layout))
  variables = {PARAMS: {}, BATCH_STATS: {}, **traverse_util.unflatten_dict(flat)}
  return Conversion(variables, naming, ignored, dropped)


def from_torch(state_dict: Mapping[str, Any], model_config: Mapping[str, Any], *,
               naming: str | None = None, drop_auxiliary: bool = False,
               input_shape: tuple[int, ...] | None = None) -> dict:
  """``{'params', 'batch_stats'}`` (float32 numpy arrays) of ``model_config``'s network
  from a PyTorch ``state_dict`` of its release (see the module docstring).

  Args:
    state_dict: name -> numpy array or torch tensor (torch is not imported here); a
      DataParallel ``module.`` prefix on every key is stripped.
    model_config: a model config (``name`` and the network's fields, as
      ``models.create_model`` takes them; a ``ConfigDict`` too).
    naming: one of ``NAMINGS[name]``; None: the one whose keys the state dict holds.
    drop_auxiliary: leave out a DARTS ``auxiliary_head.*`` that the model does not have.
    input_shape: the NHWC shape the parameters are built for; default: one 32x32 image
      with the channels the state dict's stem convolution reads.

  Every key must be used (``num_batches_tracked`` is ignored) and every variable of the
  model filled with the shape it needs; else a one-line :class:`ConvertError` names the
  first offending key.
  """
  return convert(state_dict, model_config, naming=naming, drop_auxiliary=drop_auxiliary,
                 input_shape=input_shape).variables


def to_torch(variables: Mapping[str, Any], model_config: Mapping[str, Any], *,
             naming: str | None = None) -> dict[str, np.ndarray]:
  """The inverse of :func:`from_torch`: the state dict (float32 numpy arrays under the
  release's keys) of ``{'params', 'batch_stats'}``. The module namings also get
  ``num_batches_tracked`` = 0, as ``nn.BatchNorm2d.state_dict()`` has it, so
  ``module.load_state_dict(to_torch(...))`` takes it whole."""
  family = _family(_config_dict(model_config), naming)
  naming = naming or NAMINGS[family][0]
  variables = {c: dict(variables.get(c, {})) for c in (PARAMS, BATCH_STATS)}
  flat = traverse_util.flatten_dict(variables)
  out = {}
  for leaf in leaves(variables, family, naming):
    array = np.asarray(flat[(leaf.collection,) + leaf.path])
    out[leaf.torch_key] = _relayout(array, _FROM_JAX.get(leaf.layout))
    if leaf.torch_key.endswith('.running_var') and naming not in _BARE_CONVS:
      out[leaf.torch_key[:-len('.running_var')] + IGNORED_SUFFIX] = np.zeros((), np.int64)
  return out


# ------------------------------------------------------------------------ files


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, 'shape') for v in obj.values())


def load_state_dict(path: str, *, trust_pickle: bool = False) -> tuple[dict[str, Any], str]:
  """``(state_dict, format)`` of a ``.npz`` (``'npz'``, no torch needed) or a PyTorch file
  (``'torch'``: ``torch.load(weights_only=True)`` unless ``trust_pickle``), taken out of a
  checkpoint dict (:data:`WRAPPER_KEYS`) or a pickled module."""
  if not os.path.isfile(path):
    raise ConvertError(f'{path!r} is not a file')
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}, 'npz'
    except (OSError, ValueError) as e:
      raise ConvertError(f'cannot read {path} as .npz: {ckpt_lib.one_line(e)}') from None
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConvertError(f'loading {path} needs PyTorch: pip install torch') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except Exception as e:  # pickle, zip and torch errors of many types
    hint = '' if trust_pickle else ' (if you trust the file, --trust_pickle loads any pickle)'
    raise ConvertError(f'torch.load cannot read {path}: {ckpt_lib.one_line(e)}{hint}') from None
  if callable(getattr(obj, 'state_dict', None)):
    obj = obj.state_dict()
  if _is_state_dict(obj):
    return dict(obj), 'torch'
  for key in WRAPPER_KEYS if isinstance(obj, Mapping) else ():
    if _is_state_dict(obj.get(key)):
      return dict(obj[key]), 'torch'
  top = ', '.join(map(repr, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
  raise ConvertError(f'{path} holds no state dict (a mapping from names to tensors, or one under '
                     f'{", ".join(map(repr, WRAPPER_KEYS))}); it holds {top}')


def infer_num_classes(state_dict: Mapping[str, Any], family: str) -> int | None:
  """The classifier's output count in a state dict of ``family`` (None: no classifier)."""
  for naming in NAMINGS[family]:
    bias = f'{_MODULE_NAMERS[family](naming, (names.CLASSIFIER,), {})}.bias'
    for key in (bias, 'module.' + bias):
      shape = np.shape(_as_numpy(key, state_dict[key])) if key in state_dict else ()
      if len(shape) == 1:
        return int(shape[0])
  return None


def model_config_from_flag(value: str, num_classes: int | None = None) -> dict:
  """``--model``: a key of ``config_lib.NETWORKS``, a JSON model config or a ``.json`` file."""
  from distill_jax import config_lib  # pylint: disable=import-outside-toplevel
  is_file = value.endswith('.json') and os.path.isfile(value)
  text = pathlib.Path(value).read_text() if is_file else value
  try:
    config = (dict(config_lib.NETWORKS[value]) if value in config_lib.NETWORKS else
              json.loads(text) if text.lstrip().startswith('{') else None)
  except json.JSONDecodeError as e:
    raise ConvertError(f'--model is not valid JSON ({e})') from None
  if not isinstance(config, dict) or 'name' not in config:
    raise ConvertError(
        f'--model={value!r} is neither a network ({", ".join(config_lib.NETWORKS)}) nor a JSON '
        'model config with a "name", e.g. \'{"name": "wrn", "depth": 40, "widen_factor": 2}\'')
  if num_classes is not None:
    config['num_classes'] = num_classes
  return config


# ------------------------------------------------------------------------ the teacher workdir


def measure_test_error(model_config: Mapping, variables: Mapping, data: str, *,
                       data_dir: str = '', batch_size: int = 500) -> dict[str, float]:
  """Top-1/top-5 test error of ``variables`` on ``data`` with distill_jax's own loading
  and per-channel normalisation (what distillation feeds the teacher)."""
  from distill_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  dataset = data_lib.load_dataset(data, data_dir=data_dir or None)
  images, labels = dataset.test_images, dataset.test_labels
  flat = traverse_util.flatten_dict(dict(variables[PARAMS]))
  reads = next(np.shape(v)[2] for p, v in flat.items() if p[0] in STEM_MODULES)
  if images.shape[-1] != reads:
    raise ConvertError(f'--data={data} has {images.shape[-1]}-channel images; the network '
                       f'reads {reads}')
  model = models.create_model(**model_config)
  apply = jax.jit(lambda v, x: model.apply(v, data_lib.normalize(x, dataset.mean, dataset.std),
                                           train=False)[0])
  batch, wrong1, wrong5 = min(batch_size, len(labels)), 0, 0
  for start in range(0, len(labels), batch):
    x, y = images[start:start + batch], labels[start:start + batch]
    x = np.concatenate([x, np.zeros((batch - len(y),) + x.shape[1:], x.dtype)])  # one shape
    top5 = np.argsort(-np.asarray(apply(variables, x))[:len(y)], axis=-1)[:, :5]
    wrong1 += int(np.sum(top5[:, 0] != y))
    wrong5 += int(np.sum(~np.any(top5 == y[:, None], axis=-1)))
  return {'test_top1_error': wrong1 / len(labels), 'test_top5_error': wrong5 / len(labels),
          'test_examples': int(len(labels))}


def write_teacher_workdir(out: str, variables: Mapping, results: Mapping[str, Any], *,
                          start_time: float | None = None) -> dict:
  """Writes ``out`` as a finished run holding ``variables``: a checkpoint at step
  :data:`CONVERTED_STEP` saved as a training run saves one (with its checksums), then
  ``results.json`` (``results`` plus the provenance and versions a training run records).
  Refuses a folder that holds a run."""
  start_time = time.time() if start_time is None else start_time
  out = workdir_lib.prepare(out)
  ckpt_dir = ckpt_lib.checkpoint_dir(out)
  if os.path.exists(os.path.join(out, loop.RESULTS_FILE)) or (
      os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
    raise ConvertError(f'--out={out} already holds a run (checkpoints/ or {loop.RESULTS_FILE}); '
                       'give a new or empty folder')
  state = jax.tree.map(jnp.asarray, {c: variables[c] for c in (PARAMS, BATCH_STATS)})
  manager = ckpt_lib.make_manager(out, keep=1)
  try:
    ckpt_lib.save(manager, out, CONVERTED_STEP, state)
    ckpt_lib.wait(manager, out)
  finally:
    manager.close()
  return loop.write_results(out, dict(results), start_time=start_time)


def convert_file(path: str, model_config: Mapping[str, Any], out: str, *,
                 naming: str | None = None, drop_auxiliary: bool = False, data: str = '',
                 data_dir: str = '', trust_pickle: bool = False) -> dict:
  """Converts the state dict in ``path`` and writes ``out`` as a finished teacher run
  (:func:`write_teacher_workdir`); returns what ``results.json`` holds. A ``model_config``
  without ``num_classes`` takes the state dict's classifier size."""
  start_time = time.time()
  state_dict, fmt = load_state_dict(path, trust_pickle=trust_pickle)
  with open(path, 'rb') as f:
    sha256 = hashlib.file_digest(f, 'sha256').hexdigest()
  config = _config_dict(model_config)
  family = _family(config, naming)
  if 'num_classes' not in config and infer_num_classes(state_dict, family) is not None:
    config['num_classes'] = infer_num_classes(state_dict, family)
  done = convert(state_dict, config, naming=naming, drop_auxiliary=drop_auxiliary)
  measured = measure_test_error(config, done.variables, data, data_dir=data_dir) if data else {}
  note = (f'converted from a PyTorch state dict ({DESCRIPTIONS[done.naming]} naming) by '
          'distill_jax.convert; ' + (f'test error measured here on {data}' if data else
                                     'no test error was measured here (--data measures it)'))
  return write_teacher_workdir(out, done.variables, {
      'converted': True, 'note': note, 'model': config,
      'source': {'file': os.path.abspath(path), 'format': fmt, 'from': 'torch',
                 'naming': done.naming, 'sha256': sha256,
                 'keys_ignored': len(done.ignored), 'keys_dropped': done.dropped},
      'num_params': models.count_params(done.variables[PARAMS]),
      'test_error_measured': bool(data), **({'data': data} if data else {}), **measured},
      start_time=start_time)


# ------------------------------------------------------------------------ command line


def _flag_error(message: str) -> None:
  """Bad flags exit with one line ``error: ...`` (status 2), not argparse's usage text."""
  print(f'error: {message} (python -m distill_jax.convert --help lists the flags)', file=sys.stderr)
  raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m distill_jax.convert', description='Converts a PyTorch state dict of a '
      'CIFAR WRN, DenseNet-BC or DARTS network into a finished distill_jax teacher run.')
  p.error = _flag_error
  p.add_argument('--from', dest='source_format', required=True, choices=('torch',),
                 help='the framework the file comes from')
  p.add_argument('file', help='.pt / .pth / .pt7 (needs PyTorch) or .npz state dict')
  p.add_argument('--model', required=True,
                 help='a network (wrn_40_2, densenet_bc_40_36, darts_v1_25, ...) or a JSON '
                 'model config, e.g. \'{"name": "wrn", "depth": 40, "widen_factor": 2}\'')
  p.add_argument('--num_classes', type=int, default=None,
                 help="default: the JSON config's, else the state dict classifier's")
  p.add_argument('--out', required=True, help='the teacher workdir to write (new or empty)')
  p.add_argument('--naming', default=None, choices=sorted({n for v in NAMINGS.values() for n in v}),
                 help='the state dict key naming (default: detected from its keys)')
  p.add_argument('--drop_auxiliary', action='store_true',
                 help='leave out a DARTS auxiliary head the model config does not have')
  p.add_argument('--data', default='',
                 help='measure the test error on this dataset, e.g. cifar100 (default: none)')
  p.add_argument('--data_dir', default='', help='tfds data_dir for --data')
  p.add_argument('--trust_pickle', action='store_true',
                 help='torch.load(weights_only=False), for trusted files holding more than tensors')
  return p


def main(argv: list[str] | None = None) -> int:
  """The command; returns the exit status (bad input: one line ``error: ...``, status 2)."""
  args = _parser().parse_args(argv)
  try:
    config = model_config_from_flag(args.model, args.num_classes)
    results = convert_file(args.file, config, args.out, naming=args.naming,
                           drop_auxiliary=args.drop_auxiliary, data=args.data,
                           data_dir=args.data_dir, trust_pickle=args.trust_pickle)
  except (ValueError, OSError) as e:  # ConvertError, model config and workdir errors: one line
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  out = os.path.abspath(args.out)
  measured = (f'; test top-1 error {100 * results["test_top1_error"]:.2f}% on {args.data}'
              if args.data else '; no test error measured (--data measures it)')
  print(f'{out}: {results["model"]["name"]} teacher, {results["num_params"]:,} parameters, from '
        f'{args.file} ({DESCRIPTIONS[results["source"]["naming"]]} naming){measured}')
  print(f'distil from it with --config.distill.teacher_workdir={out} and this '
        f'distill.teacher_model: {json.dumps(results["model"], sort_keys=True)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
