"""Input pipeline: whole datasets in memory, batches gathered and augmented on device.

CIFAR fits in memory, so each split is loaded once into uint8 arrays
(:func:`load_dataset`) and kept on the devices (:class:`DeviceData`). A training batch
is the slice of a permutation that depends only on ``(seed, epoch)``
(:func:`train_indices`), so the same seed gives the same batches and a resumed run
continues the exact sequence. Each process passes only its own slice of the global
batch's indices; the gather, the augmentation (:func:`augment`: padded random crop,
horizontal flip, cutout) and the per-channel normalisation all run inside jitted code.

Datasets:

* ``digits``: scikit-learn's bundled 8x8 digit images (1,797 real images, 10 classes,
  shipped inside the package), split into train/test by a fixed seeded permutation.
  The offline default for demos and tests.
* ``cifar10``, ``cifar100``: through tensorflow-datasets from ``data_dir`` (the
  ``cifar`` extra, :data:`CIFAR_EXTRA`); never downloaded at run time (see
  :data:`PREPARE_HINT`). Prepared as ArrayRecord they are read without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'

NUM_CLASSES = {'digits': 10, 'cifar10': 10, 'cifar100': 100}
IMAGE_SHAPES = {'digits': (8, 8, 1), 'cifar10': (32, 32, 3), 'cifar100': (32, 32, 3)}
DIGITS_TEST_SIZE = 360  # 20% of the 1,797 images
DIGITS_SPLIT_SEED = 0

# The datasets read through tensorflow-datasets (the ``cifar`` extra).
TFDS_NAMES = ('cifar10', 'cifar100')
CIFAR_EXTRA = "pip install 'distill_jax[cifar]'"
BUILD_COMMAND = 'tfds build {name} --file_format=array_record --data_dir=DIR'
PREPARE_HINT = (
    'prepare it once on a machine with internet: `' + CIFAR_EXTRA + ' tensorflow-cpu && '
    + BUILD_COMMAND + '` (ArrayRecord: read without TensorFlow), copy DIR here and set '
    '--config.data.data_dir=DIR')


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


def _load_digits() -> tuple[np.ndarray, ...]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  # Pixel values are 0..16; scale to the uint8 range shared with CIFAR.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
  test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
  return images[train], labels[train], images[test], labels[test]


def _load_tfds(name: str, data_dir: str | None) -> tuple[np.ndarray, ...]:
  """Loads both splits of a tfds image dataset into memory, never downloading.

  Prepared as ArrayRecord (``tfds build --file_format=array_record``), it is read through
  ``tfds.data_source`` without TensorFlow; prepared as TFRecord (the default of
  ``tfds build``), through ``tfds.load``, which needs TensorFlow.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetNotFoundError(
        f'data.name={name!r} is read through tensorflow-datasets, which is not installed: '
        f'{CIFAR_EXTRA}') from e
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  arrays = []
  for split in ('train', 'test'):
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
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False, as_supervised=True,
                   batch_size=10_000)
  except AssertionError as e:  # tfds reports "could not find data in ..."
    raise not_prepared from e
  batches = list(tfds.as_numpy(ds))
  return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def load_dataset(name: str, *, data_dir: str | None = None, validation_fraction: float = 0.0,
                 split_seed: int = 0) -> Dataset:
  """Loads ``name`` ('digits', 'cifar10', 'cifar100') into host memory.

  With ``validation_fraction > 0`` a seeded random part of the training split becomes
  ``val_*`` (DARTS search uses 0.5: weights on one half, alphas on the other).
  """
  if name not in NUM_CLASSES:
    raise ValueError(f'data.name={name!r} is not a known dataset; known: {", ".join(NUM_CLASSES)}')
  if name == 'digits':
    train_x, train_y, test_x, test_y = _load_digits()
    mean = (float(train_x.mean() / 255.0),)
    std = (float(train_x.std() / 255.0),)
  else:
    train_x, train_y, test_x, test_y = _load_tfds(name, data_dir or None)
    mean, std = (CIFAR_MEAN, CIFAR_STD) if name == 'cifar10' else (CIFAR100_MEAN, CIFAR100_STD)
  num_val = int(round(validation_fraction * len(train_y)))
  order = np.random.default_rng(split_seed).permutation(len(train_y)) if num_val else np.arange(len(train_y))
  val, train = order[len(order) - num_val:], order[:len(order) - num_val]
  return Dataset(name=name, train_images=train_x[train], train_labels=train_y[train],
                 val_images=train_x[val], val_labels=train_y[val], test_images=test_x,
                 test_labels=test_y, num_classes=NUM_CLASSES[name], mean=mean, std=std)


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

    Returns ``{'image': (B, H, W, C) uint8, 'label': (B,) int32, 'mask': (B,) f32}``.
    """
    if mask is None:
      mask = np.ones(indices.shape, np.float32)
    idx, mask = shard_global_batch((indices, mask), self.mesh)
    images, labels = self.splits[split]
    image, label = _gather(images, labels, idx)
    return {'image': image, 'label': label, 'mask': mask}


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
