"""Input pipeline: datasets, batch order, augmentation, tfds under mock data, arrays."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import data as data_lib


def test_digits_split_is_fixed_and_real():
  a = data_lib.load_dataset('digits')
  b = data_lib.load_dataset('digits')
  assert a.train_images.shape == (1797 - 360, 8, 8, 1) and a.train_images.dtype == np.uint8
  assert a.test_images.shape == (360, 8, 8, 1)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  assert set(np.unique(a.train_labels)) == set(range(10))
  assert a.train_images.max() == 255 and a.num_classes == 10
  # No image is both in train and test (digits has no exact duplicates across this split).
  train = {x.tobytes() for x in a.train_images}
  assert sum(x.tobytes() in train for x in a.test_images) < 5


def test_validation_fraction_splits_training_set():
  d = data_lib.load_dataset('digits', validation_fraction=0.5)
  assert len(d.val_labels) == round(0.5 * (1797 - 360))
  assert len(d.train_labels) + len(d.val_labels) == 1797 - 360
  assert len(data_lib.load_dataset('digits').val_labels) == 0


def test_train_indices_depend_only_on_seed_and_step():
  n, b = 100, 16
  steps_per_epoch = n // b
  epoch0 = np.concatenate([data_lib.train_indices(3, s, num_examples=n, batch_size=b)
                           for s in range(steps_per_epoch)])
  assert len(set(epoch0.tolist())) == steps_per_epoch * b  # no repeats within an epoch
  again = data_lib.train_indices(3, 2, num_examples=n, batch_size=b)
  np.testing.assert_array_equal(again, epoch0[2 * b:3 * b])
  other_seed = data_lib.train_indices(4, 2, num_examples=n, batch_size=b)
  assert not np.array_equal(again, other_seed)
  next_epoch = data_lib.train_indices(3, steps_per_epoch, num_examples=n, batch_size=b)
  assert not np.array_equal(next_epoch, epoch0[:b])


def test_eval_indices_cover_each_example_once():
  batches = data_lib.eval_indices(10, 4)
  covered = np.concatenate([idx[mask > 0] for idx, mask in batches])
  np.testing.assert_array_equal(covered, np.arange(10))
  assert all(len(idx) == 4 for idx, _ in batches)


def test_normalize_and_identity_augment():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3)), jnp.uint8)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  out = data_lib.augment(images, jax.random.key(0), crop_padding=0, flip=False, mean=mean, std=std)
  expected = (np.asarray(images) / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_crop_is_a_shifted_window_and_flip_mirrors():
  images = jnp.arange(2 * 5 * 5, dtype=jnp.float32).reshape(2, 5, 5, 1) + 1
  out = np.asarray(data_lib.augment(images, jax.random.key(1), crop_padding=2, flip=True,
                                    mean=(0.0,), std=(1 / 255.0,)))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for n in range(2):
    windows = [padded[n, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
    windows += [w[:, ::-1] for w in windows]
    assert any(np.array_equal(out[n], w) for w in windows)


def test_cutout_zeroes_a_square():
  images = jnp.full((8, 16, 16, 1), 200, jnp.uint8)
  out = np.asarray(data_lib.augment(images, jax.random.key(2), crop_padding=0, flip=False,
                                    cutout=4, mean=(0.0,), std=(1.0,)))
  zeros = (out == 0).sum(axis=(1, 2, 3))
  assert np.all(zeros <= 16) and np.all(zeros >= 4)  # a 4x4 square, clipped at borders
  assert np.all(out[out != 0] == pytest.approx(200 / 255.0))


def test_augment_is_deterministic_per_key():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)), jnp.uint8)
  a = data_lib.augment(images, jax.random.key(5), cutout=3)
  b = data_lib.augment(images, jax.random.key(5), cutout=3)
  c = data_lib.augment(images, jax.random.key(6), cutout=3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_device_batches_shard_over_data_axis():
  mesh = data_lib.make_mesh(8)
  d = data_lib.DeviceData.create(data_lib.load_dataset('digits'), mesh)
  idx = data_lib.train_indices(0, 0, num_examples=d.num_examples('train'), batch_size=16)
  batch = d.batch('train', idx)
  assert batch['image'].shape == (16, 8, 8, 1)
  assert len(batch['image'].sharding.device_set) == 8
  np.testing.assert_array_equal(batch['image'], d.dataset.train_images[idx])
  np.testing.assert_array_equal(batch['label'], d.dataset.train_labels[idx])


def test_cifar10_through_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=24):
    d = data_lib.load_dataset('cifar10', data_dir=str(tmp_path))
  assert d.train_images.shape == (24, 32, 32, 3) and d.train_images.dtype == np.uint8
  assert d.test_images.shape == (24, 32, 32, 3)
  assert d.num_classes == 10 and d.mean == data_lib.CIFAR_MEAN
  assert d.train_labels.min() >= 0 and d.train_labels.max() < 10
  out = data_lib.augment(jnp.asarray(d.train_images[:8]), jax.random.key(0), cutout=16,
                         mean=d.mean, std=d.std)
  assert out.shape == (8, 32, 32, 3) and out.dtype == jnp.float32


def test_cifar100_through_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    d = data_lib.load_dataset('cifar100', data_dir=str(tmp_path), validation_fraction=0.5)
  assert d.num_classes == 100 and len(d.val_labels) == 6 and len(d.train_labels) == 6


def test_missing_cifar_gives_one_line_with_the_fix(tmp_path):
  with pytest.raises(data_lib.DatasetNotFoundError) as e:
    data_lib.load_dataset('cifar10', data_dir=str(tmp_path))
  message = str(e.value)
  assert '\n' not in message and str(tmp_path) in message
  assert 'tfds build cifar10' in message and 'data_dir' in message


def test_unknown_dataset_names_the_known_ones():
  with pytest.raises(ValueError) as e:
    data_lib.load_dataset('no_such_dataset_xyz')
  message = str(e.value)
  assert '\n' not in message
  assert "data.name='no_such_dataset_xyz' is invalid: allowed: cifar10, cifar100, digits" in message
  assert 'tensorflow-datasets' in message
  with pytest.raises(ValueError, match='closest: digits'):
    data_lib.dataset_info('digitz')
  with pytest.raises(ValueError, match='without a namespace'):
    data_lib.dataset_info('huggingface:mnist')


def test_other_tfds_dataset_with_cached_statistics(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  stats = tmp_path / 'stats'
  monkeypatch.setenv(data_lib.STATS_ENV, str(stats))
  assert data_lib.stats_dir() == str(stats)
  # Classes and shape from the builder's info: no data needed.
  assert data_lib.dataset_info('mnist', str(tmp_path)) == (10, (28, 28, 1))
  with tfds.testing.mock_data(num_examples=16):
    d = data_lib.load_dataset('mnist', data_dir=str(tmp_path))
  assert d.train_images.shape == (16, 28, 28, 1) and d.train_images.dtype == np.uint8
  assert d.test_images.shape == (16, 28, 28, 1) and d.num_classes == 10
  pixels = d.train_images.astype(np.float64) / 255.0
  assert d.mean == pytest.approx((pixels.mean(),)) and d.std == pytest.approx((pixels.std(),))
  (name,) = os.listdir(stats)  # written once, as JSON
  cached = json.loads((stats / name).read_text())
  assert cached['mean'] == list(d.mean) and cached['num_examples'] == 16

  # The next load reads the file instead of computing: edited values come back.
  (stats / name).write_text(json.dumps({**cached, 'mean': [0.125]}))
  original = data_lib.channel_stats
  monkeypatch.setattr(data_lib, 'channel_stats', lambda *a: pytest.fail('recomputed'))
  with tfds.testing.mock_data(num_examples=16):
    again = data_lib.load_dataset('mnist', data_dir=str(tmp_path))
  assert again.mean == (0.125,) and again.std == d.std

  # Another training-split size makes the cache stale: computed again and rewritten.
  monkeypatch.setattr(data_lib, 'channel_stats', original)
  with tfds.testing.mock_data(num_examples=8):
    smaller = data_lib.load_dataset('mnist', data_dir=str(tmp_path))
  assert smaller.mean == pytest.approx(original(smaller.train_images)[0])
  assert json.loads((stats / name).read_text())['num_examples'] == 8
  assert os.listdir(stats) == [name]


@pytest.mark.parametrize('name, parts', [
    ('imdb_reviews', ["data.name='imdb_reviews' is invalid: its features are text, label",
                      "'image' Image and a 'label' ClassLabel"]),
    ('tf_flowers', ["data.name='tf_flowers' is invalid: its images are (None, None, 3) uint8",
                    'of one fixed size']),
])
def test_tfds_datasets_that_are_not_fixed_size_image_classification(name, parts):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(ValueError) as e:
    data_lib.dataset_info(name)
  assert '\n' not in str(e.value) and all(p in str(e.value) for p in parts), str(e.value)


def test_from_arrays_keeps_the_arrays_and_computes_statistics():
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (20, 4, 5, 3)).astype(np.uint8)
  test = rng.integers(0, 256, (6, 4, 5, 3)).astype(np.uint8)
  labels, test_labels = np.arange(20) % 4, np.arange(6) % 3
  d = data_lib.from_arrays(train, labels, test, test_labels, name='mine')
  np.testing.assert_array_equal(d.train_images, train)
  np.testing.assert_array_equal(d.test_labels, test_labels)
  assert d.train_labels.dtype == np.int32 and d.num_classes == 4 and d.image_shape == (4, 5, 3)
  assert len(d.val_labels) == 0 and d.val_images.shape == (0, 4, 5, 3)
  np.testing.assert_allclose(d.mean, (train / 255.0).mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(d.std, (train / 255.0).std(axis=(0, 1, 2)), rtol=1e-9)
  given = data_lib.from_arrays(train, labels, test, test_labels, num_classes=10,
                               mean=(0.5, 0.5, 0.5), std=np.array([0.2, 0.3, 0.4]))
  assert given.num_classes == 10 and given.mean == (0.5,) * 3 and given.std == (0.2, 0.3, 0.4)


GOOD = (np.arange(4 * 64).reshape(4, 8, 8, 1).astype(np.uint8), np.array([0, 1, 0, 1]),
        np.zeros((2, 8, 8, 1), np.uint8), np.array([1, 0]))


@pytest.mark.parametrize('change, parts', [
    ({0: np.zeros((4, 8, 8, 1), np.float32)}, ['train_images are float32 of shape (4, 8, 8, 1)',
                                               'expected uint8 NHWC', 'np.round(x * 255)']),
    ({2: np.zeros((2, 8, 8), np.uint8)}, ['test_images are uint8 of shape (2, 8, 8)', 'x[..., None]']),
    ({2: np.zeros((2, 8, 8, 3), np.uint8)}, ['train_images are (8, 8, 1) but test_images (8, 8, 3)']),
    ({1: np.array([0, 1, 0])}, ['train_labels are int64 of shape (3,)', 'shape (4,)']),
    ({1: np.array([0.0, 1.0, 0.0, 1.0])}, ['train_labels are float64']),
    ({3: np.array([1, -1])}, ['test_labels holds -1, outside [0, num_classes=2)']),
    ({'num_classes': 1}, ['train_labels holds 1, outside [0, num_classes=1)']),
    ({'num_classes': 2.0}, ['num_classes=2.0 is invalid: must be an integer >= 1']),
    ({'mean': (0.5, 0.5)}, ['mean=(0.5, 0.5) is invalid: give 1 finite per-channel values']),
    ({'std': (0.0,)}, ['std=(0.0,) is invalid', 'a constant channel has std 0']),
    ({0: np.zeros((4, 8, 8, 1), np.uint8)}, ['std=(0.0,) is invalid']),  # their own std is 0
])
def test_from_arrays_rejects_bad_arrays_in_one_line(change, parts):
  arrays = [change.get(i, a) for i, a in enumerate(GOOD)]
  kwargs = {k: v for k, v in change.items() if isinstance(k, str)}
  with pytest.raises(ValueError) as e:
    data_lib.from_arrays(*arrays, name='mine', **kwargs)
  message = str(e.value)
  assert '\n' not in message and message.startswith("data.from_arrays(name='mine'): ")
  assert all(p in message for p in parts), message


def test_a_data_dir_under_home_is_expanded(tmp_path, monkeypatch):
  # `--config.data.data_dir=~/tensorflow_datasets` reaches the code unexpanded (the shell
  # leaves a tilde after `=` alone); tfds would read a folder named '~'.
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.setenv(data_lib.STATS_ENV, str(tmp_path / 'stats'))
  seen = []
  builder = data_lib._tfds_builder  # pylint: disable=protected-access
  monkeypatch.setattr(data_lib, '_tfds_builder', lambda name, d: seen.append(d) or builder(name, d))
  with tfds.testing.mock_data(num_examples=8):
    data_lib.load_dataset('mnist', data_dir='~/tfds')
  assert seen and set(seen) == {str(tmp_path / 'tfds')}
