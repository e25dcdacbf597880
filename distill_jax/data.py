"""Input pipeline: whole datasets in memory, batches gathered and augmented on device.

Each split is loaded once into uint8 arrays (:func:`load_dataset`) and kept on the
devices (:class:`DeviceData`). A training batch is the slice of a permutation that
depends only on ``(seed, epoch)`` (:func:`train_indices`), so a resumed run continues
the exact sequence. Each process passes only its own slice of the global batch's
indices; the gather, the augmentation (:func:`augment`: padded random crop, flip,
cutout) and the per-channel normalisation run inside jitted code.

Datasets (``data.name``), all batched the same way:

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 real images, 10 classes), split
  by a fixed seeded permutation; the offline default for demos and tests.
* ``cifar10``, ``cifar100``: through tensorflow-datasets (:data:`CIFAR_EXTRA`) from
  ``data_dir``, normalised with their published statistics.
* Any other tensorflow-datasets image classification name (``mnist``, ``svhn_cropped``,
  ...): a uint8 ``image`` feature of one fixed shape and a ``label`` ClassLabel (other
  features are ignored); its ``test`` split (else ``validation``) is the test set. The
  per-channel mean/std come from the training split, computed once and cached as JSON
  in :func:`stats_dir` (``~/.cache/distill_jax/stats``, not beside the often read-only
  data), keyed by the prepared dataset's folder and the training split's size.
* Your own: :func:`register_dataset` (a loader returning :func:`from_arrays`'s
  :class:`Dataset` or four arrays); registered names take precedence over tfds names.

tensorflow-datasets never downloads (:data:`PREPARE_HINT`); ArrayRecord data is read
without TensorFlow. :func:`dataset_info` gives any name's classes and image shape
without loading images (a registered loader runs, once).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'

# The built-in datasets; dataset_info() answers for every name.
NUM_CLASSES = {'digits': 10, 'cifar10': 10, 'cifar100': 100}
IMAGE_SHAPES = {'digits': (8, 8, 1), 'cifar10': (32, 32, 3), 'cifar100': (32, 32, 3)}
DIGITS_TEST_SIZE = 360  # 20% of the 1,797 images
DIGITS_SPLIT_SEED = 0

# The built-in datasets read through tensorflow-datasets (the ``cifar`` extra).
TFDS_NAMES = ('cifar10', 'cifar100')
CIFAR_EXTRA = "pip install 'distill_jax[cifar]'"
BUILD_COMMAND = 'tfds build {name} --file_format=array_record --data_dir=DIR'
PREPARE_HINT = (
    'prepare it once on a machine with internet: `' + CIFAR_EXTRA + ' tensorflow-cpu && '
    + BUILD_COMMAND + '` (ArrayRecord: read without TensorFlow), copy DIR here and set '
    '--config.data.data_dir=DIR')
STATS_ENV = 'DISTILL_JAX_STATS_DIR'
UINT8_HINT = 'expected uint8 NHWC images (N, height, width, channels) in 0..255'


class DatasetNotFoundError(RuntimeError):
  """A tensorflow-datasets dataset is not prepared in its data_dir, or cannot be read
  with what is installed."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One dataset as host arrays: uint8 NHWC images and int32 labels.

  ``val_*`` is a held-out part of the training split (empty when
  ``validation_fraction`` is 0); ``mean``/``std`` are per-channel statistics in
  [0, 1] pixel units used for normalisation.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)
PUBLISHED_STATS = {'cifar10': (CIFAR_MEAN, CIFAR_STD), 'cifar100': (CIFAR100_MEAN, CIFAR100_STD)}

_LOADERS: dict[str, Callable[[], Any]] = {}  # register_dataset
_LOADED: dict[str, Dataset] = {}  # what each registered loader returned, checked
_TFDS_INFO: dict[tuple[str, str | None], tuple[int, tuple[int, int, int]]] = {}


# ---------------------------------------------------------------------------
# Your own data: arrays and registered loaders.


def _check_arrays(where: str, field: str, images: Any, labels: Any
                  ) -> tuple[np.ndarray, np.ndarray]:
  """uint8 NHWC images and as many integer labels (as int32), or a one-line ValueError."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or images.dtype != np.uint8 or not len(images):
    raise ValueError(f'{where}: {field}_images are {images.dtype} of shape {images.shape}; '
                     f'{UINT8_HINT} (grey: x[..., None]; floats in [0, 1]: '
                     'np.round(x * 255).astype(np.uint8))')
  if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer) or (
      labels.shape != images.shape[:1]):
    raise ValueError(f'{where}: {field}_labels are {labels.dtype} of shape {labels.shape}; '
                     f'expected integer class indices of shape ({len(images)},)')
  return images, labels.astype(np.int32)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], ...]:
  """Per-channel ``(mean, std)`` of uint8 NHWC ``images`` in [0, 1] pixel units."""
  total, squares = np.zeros(images.shape[-1]), np.zeros(images.shape[-1])
  for start in range(0, len(images), chunk):
    x = images[start:start + chunk].astype(np.float64) / 255.0
    total += x.sum(axis=(0, 1, 2))
    squares += np.square(x).sum(axis=(0, 1, 2))
  count = images.size / images.shape[-1]
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def from_arrays(train_images: Any, train_labels: Any, test_images: Any, test_labels: Any, *,
                name: str = 'arrays', num_classes: int | None = None,
                mean: Any = None, std: Any = None) -> Dataset:
  """A checked :class:`Dataset` from in-memory arrays (for :func:`register_dataset`).

  Images are uint8 NHWC ``(N, height, width, channels)`` in 0..255, train and test of
  one shape; labels integers of shape ``(N,)`` in ``[0, num_classes)``. ``num_classes``
  defaults to the largest label + 1, ``mean``/``std`` (per channel, [0, 1] units) to the
  training images' own. Raises a one-line ValueError naming the array at fault.
  """
  where = f'data.from_arrays(name={name!r})'
  train_images, train_labels = _check_arrays(where, 'train', train_images, train_labels)
  test_images, test_labels = _check_arrays(where, 'test', test_images, test_labels)
  if train_images.shape[1:] != test_images.shape[1:]:
    raise ValueError(f'{where}: train_images are {train_images.shape[1:]} but test_images '
                     f'{test_images.shape[1:]}; both need one (height, width, channels)')
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
      num_classes < 1):
    raise ValueError(f'{where}: num_classes={num_classes!r} is invalid: must be an integer >= 1')
  for field, labels in (('train_labels', train_labels), ('test_labels', test_labels)):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
      raise ValueError(f'{where}: {field} holds {int(bad[0])}, outside [0, num_classes='
                       f'{num_classes})')
  computed = channel_stats(train_images) if mean is None or std is None else ((), ())
  stats = {'mean': computed[0] if mean is None else mean, 'std': computed[1] if std is None else std}
  for field, values in stats.items():
    values = np.asarray(values, dtype=object).ravel().tolist()
    ok = len(values) == train_images.shape[-1] and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)
        and (field == 'mean' or v > 0) for v in values)
    if not ok:
      raise ValueError(f'{where}: {field}={tuple(values)} is invalid: give '
                       f'{train_images.shape[-1]} finite per-channel values in [0, 1] pixel '
                       f'units{" > 0 (a constant channel has std 0)" if field == "std" else ""}')
    stats[field] = tuple(float(v) for v in values)
  empty = np.zeros((0, *train_images.shape[1:]), np.uint8)
  return Dataset(name=name, train_images=train_images, train_labels=train_labels,
                 val_images=empty, val_labels=np.zeros((0,), np.int32), test_images=test_images,
                 test_labels=test_labels, num_classes=int(num_classes), **stats)


def register_dataset(name: str, loader: Callable[[], Any]) -> None:
  """Makes ``data.name=name`` use ``loader()``, which returns a :class:`Dataset` without
  ``val_*`` (see :func:`from_arrays`) or ``(train_images, train_labels, test_images,
  test_labels)``.

  The loader runs once per process, on first use (config validation included); its
  result is checked as :func:`from_arrays` checks arrays, and kept. Registering again
  replaces the loader; built-in names are refused. ``data.validation_fraction`` holds
  out part of its training split as for any dataset.
  """
  if not isinstance(name, str) or not re.fullmatch(r'[A-Za-z0-9_\-.]+', name):
    raise ValueError(f'register_dataset: name={name!r} is invalid: use letters, digits, _, - and .')
  if name in NUM_CLASSES:
    raise ValueError(f'register_dataset: name={name!r} is a built-in dataset; choose another name')
  if not callable(loader):
    raise ValueError(f'register_dataset: loader={loader!r} is invalid: give a callable that '
                     'returns a Dataset or (train_images, train_labels, test_images, test_labels)')
  _LOADERS[name] = loader
  _LOADED.pop(name, None)


def registered_datasets() -> list[str]:
  """The names given to :func:`register_dataset`, sorted."""
  return sorted(_LOADERS)


def _registered(name: str) -> Dataset:
  """What ``name``'s loader returns, checked and kept (the loader runs once)."""
  if name not in _LOADED:
    out = _LOADERS[name]()
    if isinstance(out, Dataset) and not len(out.val_labels):
      out = from_arrays(out.train_images, out.train_labels, out.test_images, out.test_labels,
                        name=name, num_classes=out.num_classes, mean=out.mean, std=out.std)
    elif isinstance(out, (tuple, list)) and len(out) == 4:
      out = from_arrays(*out, name=name)
    else:
      raise ValueError(f'data.name={name!r}: its loader returned {type(out).__name__}; expected a '
                       'Dataset without val_* (data.validation_fraction makes those) or '
                       '(train_images, train_labels, test_images, test_labels)')
    _LOADED[name] = out
  return _LOADED[name]


# ---------------------------------------------------------------------------
# Loading.


def _load_digits() -> tuple[np.ndarray, ...]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  # Pixel values are 0..16; scale to the uint8 range shared with CIFAR.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
  test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
  return images[train], labels[train], images[test], labels[test]


def _import_tfds(name: str):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    other = '' if name in TFDS_NAMES else ' (not built in or registered)'
    raise DatasetNotFoundError(
        f'data.name={name!r}{other} is read through tensorflow-datasets, which is not '
        f'installed: {CIFAR_EXTRA}') from e
  return tfds


def _unknown(name: Any, why: str) -> ValueError:
  known = sorted(NUM_CLASSES) + sorted(_LOADERS)
  close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
  return ValueError(
      f'data.name={name!r} is invalid: allowed: {", ".join(known)}, or a tensorflow-datasets '
      f'image classification dataset ({why}){f"; closest: {close[0]}" if close else ""}')


def _tfds_builder(name: Any, data_dir: str | None):
  """The tfds builder of ``name`` with its image and label features checked."""
  if not isinstance(name, str) or not name or (
      ':' in name and not re.fullmatch(r'[^:]+:\d+(\.\d+)*', name)):
    raise _unknown(name, 'a name, optionally /config and :version, without a namespace')
  tfds = _import_tfds(name)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds' DatasetNotFoundError and its relatives
    raise _unknown(name, f'tensorflow-datasets: {(str(e).strip().splitlines() or [""])[0]}'
                   ) from None
  features = builder.info.features
  keys = list(features.keys()) if hasattr(features, 'keys') else []
  image, label = (features[k] if k in keys else None for k in ('image', 'label'))
  if not (isinstance(image, tfds.features.Image) and isinstance(label, tfds.features.ClassLabel)
          and label.num_classes):
    raise ValueError(f'data.name={name!r} is invalid: its features are {", ".join(keys)}; only '
                     "image classification datasets with an 'image' Image and a 'label' "
                     'ClassLabel feature can be read')
  if None in image.shape or np.dtype(image.np_dtype) != np.uint8:
    raise ValueError(f'data.name={name!r} is invalid: its images are {image.shape} '
                     f'{np.dtype(image.np_dtype).name}; {UINT8_HINT}, of one fixed size')
  return builder


def dataset_info(name: str, data_dir: str | None = None) -> tuple[int, tuple[int, int, int]]:
  """``(num_classes, (height, width, channels))`` of any ``data.name``, without loading
  the images of a built-in or tfds dataset (a registered loader runs, once)."""
  if name in NUM_CLASSES:
    return NUM_CLASSES[name], IMAGE_SHAPES[name]
  if name in _LOADERS:
    d = _registered(name)
    return d.num_classes, d.image_shape
  data_dir = os.path.expanduser(data_dir) if data_dir else None  # '~/...' as a shell would
  key = (name, data_dir)
  if key not in _TFDS_INFO:
    features = _tfds_builder(name, data_dir or None).info.features
    _TFDS_INFO[key] = (int(features['label'].num_classes), tuple(features['image'].shape))
  return _TFDS_INFO[key]


def _test_split(builder) -> str:
  splits = list(builder.info.splits.keys())
  if not splits or 'test' in splits:  # no recorded splits: not prepared (or mocked)
    return 'test'
  if 'train' in splits and 'validation' in splits:
    return 'validation'
  raise ValueError(f'data.name={builder.info.name!r} is invalid: its splits are '
                   f'{", ".join(splits)}; a train and a test (or validation) split are needed')


def _load_tfds(name: str, data_dir: str | None) -> tuple[np.ndarray, ...]:
  """Loads both splits of a tfds image dataset into memory, never downloading.

  Prepared as ArrayRecord (``tfds build --file_format=array_record``), it is read through
  ``tfds.data_source`` without TensorFlow; prepared as TFRecord (the default of
  ``tfds build``), through ``tfds.load``, which needs TensorFlow.
  """
  tfds = _import_tfds(name)
  builder = _tfds_builder(name, data_dir)
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  arrays = []
  for split in ('train', _test_split(builder)):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError:  # not ArrayRecord: TFRecord, or not prepared at all
      images, labels = _load_tfrecord(tfds, name, split, data_dir, where)
    else:
      rows = [source[i] for i in range(len(source))]
      images = np.stack([r['image'] for r in rows])
      labels = np.asarray([r['label'] for r in rows])
    arrays += [images.astype(np.uint8), labels.astype(np.int32)]
  return tuple(arrays)


def _load_tfrecord(tfds, name: str, split: str, data_dir: str | None,
                   where: str) -> tuple[np.ndarray, np.ndarray]:
  """One split through ``tfds.load`` (TensorFlow), with one-line errors."""
  not_prepared = DatasetNotFoundError(
      f'dataset {name!r} is not prepared in {where}; ' + PREPARE_HINT.format(name=name))
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    if not tfds.builder(name, data_dir=data_dir).is_prepared():
      raise not_prepared from e
    raise DatasetNotFoundError(
        f'dataset {name!r} in {where} is prepared as TFRecord, which needs TensorFlow to read: '
        'pip install tensorflow-cpu, or rebuild it as ArrayRecord: `'
        + BUILD_COMMAND.format(name=name) + '`') from e
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False, batch_size=10_000)
  except AssertionError as e:  # tfds reports "could not find data in ..."
    raise not_prepared from e
  batches = list(tfds.as_numpy(ds))
  return (np.concatenate([b['image'] for b in batches]),
          np.concatenate([b['label'] for b in batches]))


def stats_dir() -> str:
  """Where the per-channel statistics of tfds datasets are cached: ``$DISTILL_JAX_STATS_DIR``
  or ``~/.cache/distill_jax/stats``."""
  return os.environ.get(STATS_ENV) or os.path.join(os.path.expanduser('~'), '.cache',
                                                    'distill_jax', 'stats')


def _tfds_stats(name: str, data_dir: str | None, images: np.ndarray
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The training split's per-channel mean and std, from the JSON cache or computed once."""
  folder = os.path.abspath(os.path.expanduser(str(_tfds_builder(name, data_dir).data_dir)))
  key = {'name': name, 'folder': folder, 'num_examples': len(images)}
  slug = re.sub(r'[^\w.-]', '_', name)
  path = os.path.join(stats_dir(), f'{slug}-{hashlib.sha1(folder.encode()).hexdigest()[:12]}.json')
  try:
    with open(path) as f:
      cached = json.load(f)
    if {k: cached.get(k) for k in key} == key:
      return tuple(cached['mean']), tuple(cached['std'])
  except (OSError, ValueError, KeyError, TypeError):
    pass  # missing, unreadable or stale: compute again
  mean, std = channel_stats(images)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump({**key, 'mean': mean, 'std': std}, f, indent=1)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning('Could not cache the statistics of %s in %s: %s', name, path, e)
  return mean, std


def load_dataset(name: str, *, data_dir: str | None = None, validation_fraction: float = 0.0,
                 split_seed: int = 0) -> Dataset:
  """Loads ``name`` (built in, registered or a tensorflow-datasets name) into host memory.

  With ``validation_fraction > 0`` a seeded random part of the training split becomes
  ``val_*`` (DARTS search uses 0.5: weights on one half, alphas on the other).
  """
  if name in _LOADERS:
    d = _registered(name)
    train_x, train_y, test_x, test_y = d.train_images, d.train_labels, d.test_images, d.test_labels
    num_classes, mean, std = d.num_classes, d.mean, d.std
  elif name == 'digits':
    train_x, train_y, test_x, test_y = _load_digits()
    num_classes = NUM_CLASSES[name]
    mean = (float(train_x.mean() / 255.0),)
    std = (float(train_x.std() / 255.0),)
  else:
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    num_classes, _ = dataset_info(name, data_dir)
    train_x, train_y, test_x, test_y = _load_tfds(name, data_dir or None)
    if name in PUBLISHED_STATS:
      mean, std = PUBLISHED_STATS[name]
    else:
      mean, std = _tfds_stats(name, data_dir or None, train_x)
  num_val = int(round(validation_fraction * len(train_y)))
  order = np.random.default_rng(split_seed).permutation(len(train_y)) if num_val else np.arange(len(train_y))
  val, train = order[len(order) - num_val:], order[:len(order) - num_val]
  return Dataset(name=name, train_images=train_x[train], train_labels=train_y[train],
                 val_images=train_x[val], val_labels=train_y[val], test_images=test_x,
                 test_labels=test_y, num_classes=num_classes, mean=mean, std=std)


# ---------------------------------------------------------------------------
# Batch order: a pure function of (seed, step).


def train_indices(seed: int, step: int, *, num_examples: int, batch_size: int) -> np.ndarray:
  """Global batch ``step``'s example indices (batch_size,), the same on every host.

  Epoch ``e`` visits ``permutation(seed, e)`` in consecutive slices of
  ``batch_size``, dropping the remainder, so the sequence depends only on
  ``(seed, step)``.
  """
  steps_per_epoch = num_examples // batch_size
  epoch, i = divmod(step, steps_per_epoch)
  perm = _epoch_permutation(seed, epoch, num_examples)
  return perm[i * batch_size:(i + 1) * batch_size]


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  key = (seed, epoch, n)
  if key not in _PERM_CACHE:
    _PERM_CACHE.clear()
    _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
  return _PERM_CACHE[key]


def eval_indices(num_examples: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Sequential (indices, mask) batches covering every example once; the last is padded."""
  batches = []
  for start in range(0, num_examples, batch_size):
    idx = np.arange(start, start + batch_size, dtype=np.int32)
    mask = idx < num_examples
    batches.append((np.where(mask, idx, 0).astype(np.int32), mask.astype(np.float32)))
  return batches


def mean_over_split(data: 'DeviceData', split: str, batch_size: int, evaluate) -> dict[str, float]:
  """Means over a whole split of the masked per-batch sums ``evaluate(batch)`` returns.

  ``evaluate`` maps a padded batch (see :func:`eval_indices`) to a dict of summed
  values including ``'count'``; the result is ``{f'{split}_{name}': sum / count}``.
  """
  totals = None
  for idx, mask in eval_indices(data.num_examples(split), batch_size):
    sums = jax.device_get(evaluate(data.batch(split, idx, mask)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  count = float(totals.pop('count'))
  return {f'{split}_{k}': float(v) / count for k, v in totals.items()}


# ---------------------------------------------------------------------------
# Devices.


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ``('data',)`` mesh over all devices of all processes, or the first N."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'num_devices={num_devices} but only {len(devices)} devices are visible')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree fully replicated on the mesh (works across processes)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_global_batch(tree: Any, mesh: Mesh) -> Any:
  """Turns a host pytree holding the *global* batch into arrays sharded on ``'data'``.

  Every process holds the same global batch (it is computed from (seed, step)) and
  contributes only the rows its own devices need.
  """
  sharding = NamedSharding(mesh, P(DATA_AXIS))

  def put(x):
    x = np.asarray(x)
    rows = _process_rows(mesh, x.shape[0])
    return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)

  return jax.tree.map(put, tree)


def _process_rows(mesh: Mesh, global_size: int) -> slice:
  """The contiguous rows of a ``'data'``-sharded batch that this process addresses."""
  devices = list(mesh.devices.flat)
  per_device = global_size // len(devices)
  mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
  return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


@dataclasses.dataclass
class DeviceData:
  """A dataset's splits replicated on every device of ``mesh``, plus its metadata."""
  dataset: Dataset
  mesh: Mesh
  splits: dict[str, tuple[jax.Array, jax.Array]]

  @classmethod
  def create(cls, dataset: Dataset, mesh: Mesh) -> 'DeviceData':
    splits = {}
    for split in ('train', 'val', 'test'):
      images = getattr(dataset, f'{split}_images')
      labels = getattr(dataset, f'{split}_labels')
      if len(labels):
        splits[split] = replicate((images, labels), mesh)
    return cls(dataset=dataset, mesh=mesh, splits=splits)

  def num_examples(self, split: str) -> int:
    return len(getattr(self.dataset, f'{split}_labels'))

  def batch(self, split: str, indices: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """The raw uint8 batch for global ``indices``, sharded over ``'data'``.

    Returns ``{'image': (B, H, W, C) uint8, 'label': (B,) int32, 'index': (B,) int32,
    'mask': (B,) f32}`` (``index``: the examples' indices in the split)."""
    if mask is None:
      mask = np.ones(indices.shape, np.float32)
    idx, mask = shard_global_batch((indices, mask), self.mesh)
    images, labels = self.splits[split]
    image, label = _gather(images, labels, idx)
    return {'image': image, 'label': label, 'index': idx, 'mask': mask}


@jax.jit
def _gather(images: jax.Array, labels: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
  # Replicated table, sharded indices: each device gathers its own rows locally.
  return images[idx], labels[idx]


# ---------------------------------------------------------------------------
# Augmentation and normalisation (pure, jittable).


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  """uint8 or [0, 255] float images -> float32 standardised per channel."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(images: jax.Array, key: jax.Array, *, crop_padding: int = 4, flip: bool = True,
            cutout: int = 0, pad_mode: str = 'constant', mean: tuple[float, ...] = (0.0,),
            std: tuple[float, ...] = (1.0,)) -> jax.Array:
  """The CIFAR training augmentation on a uint8 batch (N, H, W, C) -> normalised float32.

  Random crop of the image padded by ``crop_padding`` pixels (zeros or reflection),
  horizontal flip with probability 1/2 when ``flip``, per-channel normalisation, then
  a ``cutout`` x ``cutout`` square of zeros at a uniformly random centre (DeVries &
  Taylor 2017; the square may extend past the border) when ``cutout > 0``.
  """
  n, h, w, _ = images.shape
  k_crop, k_flip, k_cut = jax.random.split(key, 3)
  x = images.astype(jnp.float32)
  if crop_padding:
    p = crop_padding
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode=pad_mode)
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * p + 1)
    x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))(
        x, offsets)
  if flip:
    do_flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    x = jnp.where(do_flip, x[:, :, ::-1, :], x)
  x = normalize(x, mean, std)
  if cutout:
    centre = jax.random.randint(k_cut, (n, 2), 0, jnp.array([h, w]))
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    cy, cx = centre[:, 0, None, None], centre[:, 1, None, None]
    inside = ((rows >= cy - cutout // 2) & (rows < cy - cutout // 2 + cutout)
              & (cols >= cx - cutout // 2) & (cols < cx - cutout // 2 + cutout))
    x = jnp.where(inside[..., None], 0.0, x)
  return x
