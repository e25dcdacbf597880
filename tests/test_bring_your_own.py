"""Bring your own network and data: register_model, import paths, register_dataset."""

import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_config, tiny_train_config
from distill_jax import data as data_lib
from distill_jax import jobs
from distill_jax import models
from distill_jax import validation
from distill_jax.trainers import train as train_lib

MODULE = __name__  # 'test_bring_your_own': importable from the tests folder


class TinyCNN(nn.Module):
  """Three conv-BN-ReLU stages at strides 1, 2, 2: (logits, three attention points)."""
  num_classes: int = 10
  width: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    points = []
    for i in range(3):
      x = nn.Conv(self.width * 2**i, (3, 3), strides=1 if i == 0 else 2, dtype=self.dtype)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
      points.append(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2)))
    return logits.astype(jnp.float32), tuple(points)


class PlainCNN(nn.Module):
  """No dtype field, no batch norm, a required field: the smallest contract."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    del train
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2))), (x,)


class LogitsOnly(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class NoClasses(nn.Module):
  width: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    return x


def not_a_module():
  return None


@pytest.fixture(scope='module', autouse=True)
def registered():
  """'tiny_cnn' and 'plain_cnn' registered for this file only; 'mine' likewise for data."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(models, '_REGISTRY', dict(models._REGISTRY))  # pylint: disable=protected-access
    mp.setattr(data_lib, '_LOADERS', {})
    mp.setattr(data_lib, '_LOADED', {})
    models.register_model('tiny_cnn', TinyCNN)
    models.register_model('plain_cnn', f'{MODULE}:PlainCNN')
    yield


def model_config(name, **fields):
  return ml_collections.ConfigDict({'name': name, 'num_classes': 10, **fields})


def one_line(excinfo, *parts):
  message = str(excinfo.value)
  assert '\n' not in message, message
  for part in parts:
    assert part in message, message


# ---------------------------------------------------------------------------
# Networks.


def test_registered_and_imported_names_build_the_class():
  assert type(models.create_model('tiny_cnn', num_classes=3)) is TinyCNN
  assert type(models.create_model('plain_cnn', num_classes=3)) is PlainCNN  # registered path
  imported = models.check_model(f'{MODULE}:TinyCNN', num_classes=4, width=2)
  assert type(imported) is TinyCNN and imported.width == 2
  assert 'tiny_cnn' in models.model_names() and 'wrn' in models.model_names()
  assert models.model_fields('tiny_cnn') == ('num_classes', 'width', 'dtype')
  # The trainer's float32 dtype is dropped for a network without the field.
  assert type(models.create_model('plain_cnn', num_classes=2, dtype=jnp.float32)) is PlainCNN
  with pytest.raises(ValueError, match='computes in float32 only; got dtype=bfloat16'):
    models.create_model('plain_cnn', num_classes=2, dtype=jnp.bfloat16)


def test_init_checks_the_output_contract():
  variables = models.init_variables(TinyCNN(num_classes=5), jax.random.key(0), (2, 8, 8, 1))
  outputs = TinyCNN(num_classes=5).apply(variables, jnp.ones((2, 8, 8, 1)), train=False)
  assert outputs[0].shape == (2, 5) and [p.shape[1] for p in outputs[1]] == [8, 4, 2]
  with pytest.raises(ValueError) as e:
    models.init_variables(LogitsOnly(), jax.random.key(0), (2, 8, 8, 1))
  one_line(e, 'LogitsOnly.__call__ must return (logits, points); it returned an array of '
           'shape (2, 10)')
  with pytest.raises(ValueError, match='LogitsOnly.__call__ must return'):
    models.param_shapes(LogitsOnly(), (1, 8, 8, 1))


@pytest.mark.parametrize('name, parts', [
    ('no_such_module_xyz:Net', ["config.model.name='no_such_module_xyz:Net' cannot be imported",
                                "ModuleNotFoundError: No module named 'no_such_module_xyz'"]),
    (f'{MODULE}:Missing', [f"module '{MODULE}' has no attribute 'Missing'"]),
    (f'{MODULE}:not_a_module', ['is function', 'not a flax.linen.Module class']),
    (f'{MODULE}:NoClasses', ['has no num_classes field']),
    # The registry is per process: other tests' (the README's) registrations may be listed.
    ('resnet', ["config.model.name='resnet' is not a known network; known: darts, densenet_bc, "
                'wrn; registered: ', 'plain_cnn', 'tiny_cnn', '; or an import path']),
])
def test_bad_network_names_fail_in_one_line(name, parts):
  config = tiny_train_config()
  config.model = model_config(name)
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_train_config(config)
  one_line(e, *parts)


@pytest.mark.parametrize('model, parts', [
    (model_config('tiny_cnn', depth=16), ["config.model.depth is not a field of model 'tiny_cnn'",
                                          'allowed: num_classes, width, dtype']),
    (ml_collections.ConfigDict({'name': 'plain_cnn'}), ['config.model.num_classes is required']),
    (model_config('tiny_cnn', num_classes=0), ['config.model.num_classes=0 is invalid']),
    (model_config('tiny_cnn', num_classes=3), ["dataset 'digits' has 10 classes"]),
])
def test_registered_network_fields_are_checked(model, parts):
  config = tiny_train_config()
  config.model = model
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_train_config(config)
  one_line(e, *parts)


def test_bfloat16_needs_a_dtype_field():
  config = tiny_train_config(compute_dtype='bfloat16')
  config.model = model_config('tiny_cnn')
  validation.validate_train_config(config)  # TinyCNN has a dtype field
  config.model = model_config('plain_cnn')
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_train_config(config)
  one_line(e, "config.compute_dtype='bfloat16' is invalid",
           "model.name='plain_cnn' has no dtype field")


def test_register_model_refuses_bad_arguments():
  with pytest.raises(ValueError, match="name='wrn' is a built-in network"):
    models.register_model('wrn', TinyCNN)
  with pytest.raises(ValueError, match='give a flax.linen.Module class'):
    models.register_model('mine', not_a_module)
  with pytest.raises(ValueError, match="constructor='nocolon' is invalid"):
    models.register_model('mine', 'nocolon')
  with pytest.raises(ValueError, match="no ':'"):
    models.register_model('a:b', TinyCNN)


# ---------------------------------------------------------------------------
# Training and distillation with them.


@pytest.fixture(scope='module')
def wrn_teacher(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('wrn_teacher'))
  train_lib.train_and_evaluate(tiny_train_config(num_epochs=1, checkpoint_every_steps=0), workdir)
  return workdir


def distill_config(student, teacher, teacher_workdir, method='kd_at'):
  c = load_config('distill', 'demo')
  c.model = student
  c.distill.teacher_model = teacher
  c.distill.teacher_workdir = teacher_workdir
  c.distill.method = method
  c.num_epochs = 1
  c.batch_size = 32
  c.eval_batch_size = 120
  c.log_every_steps = 10
  c.checkpoint_every_steps = 0
  c.num_devices = 1
  return c


def train_rows(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r for r in rows if 'train_loss' in r]


@pytest.fixture(scope='module')
def cnn_student(wrn_teacher, tmp_path_factory):
  """A registered TinyCNN distilled (KD + AT) from a WRN-10-1."""
  workdir = str(tmp_path_factory.mktemp('cnn_student'))
  config = distill_config(model_config('tiny_cnn', width=4),
                          model_config('wrn', depth=10, widen_factor=1), wrn_teacher)
  return workdir, jobs.run(config, workdir)


@pytest.mark.e2e
def test_registered_network_distils_from_a_wrn(cnn_student):
  workdir, results = cnn_student
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  assert math.isfinite(results['test_loss']) and results['test_top1_error'] < 0.9
  assert 0.0 <= results['test_teacher_agreement'] <= 1.0
  assert results['num_params'] == models.count_params(models.param_shapes(
      TinyCNN(width=4), (1, 8, 8, 1))['params'])
  rows = train_rows(workdir)
  # The teacher was in the loss: both of its terms are there and positive.
  assert rows and all(r['train_kd'] > 0 and r['train_at'] > 0 for r in rows)


@pytest.mark.e2e
def test_imported_network_teaches_a_wrn(cnn_student, tmp_path):
  """The TinyCNN run is the teacher, named by its import path; a WRN-10-1 learns by AT."""
  teacher_dir, _ = cnn_student
  config = distill_config(model_config('wrn', depth=10, widen_factor=1),
                          model_config(f'{MODULE}:TinyCNN', width=4), teacher_dir, method='at')
  results = jobs.run(config, str(tmp_path))
  assert math.isfinite(results['test_loss']) and 0.0 <= results['test_teacher_agreement'] <= 1.0
  rows = train_rows(str(tmp_path))
  assert rows and all(r['train_at'] > 0 and r.get('train_kd', 0.0) == 0 for r in rows)


@pytest.mark.e2e
def test_kd_needs_no_matching_points(wrn_teacher, tmp_path):
  """PlainCNN has one attention point, the WRN three: KD distils; there is no AT distance."""
  config = distill_config(model_config('plain_cnn'), model_config('wrn', depth=10, widen_factor=1),
                          wrn_teacher, method='kd')
  results = jobs.run(config, str(tmp_path))
  assert 0.0 <= results['test_teacher_agreement'] <= 1.0 and 'test_at_distance' not in results
  assert all(r['train_kd'] > 0 for r in train_rows(str(tmp_path)))


@pytest.mark.parametrize('method', ['at', 'kd_at'])
def test_attention_transfer_between_unpaired_points_is_one_line(method, tmp_path):
  config = distill_config(model_config('plain_cnn'), model_config('wrn', depth=10, widen_factor=1),
                          str(tmp_path / 'never_read'), method=method)
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_distill_config(config)
  one_line(e, f"config.distill.method='{method}' is invalid",
           'model (plain_cnn) has 1 point [8x8]',
           'distill.teacher_model (wrn) has 3 points [8x8, 4x4, 2x2]',
           'use kd')


def test_embedding_methods_need_a_sown_embedding(tmp_path):
  config = distill_config(model_config('plain_cnn'), model_config('wrn', depth=10, widen_factor=1),
                          str(tmp_path / 'never_read'), method='kd_rkd')
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_distill_config(config)
  one_line(e, "config.distill.method='kd_rkd' is invalid", 'model (plain_cnn) sows none',
           "self.sow('intermediates', 'embedding', x)")
  config.distill.method = 'sp'  # SP compares the last points only: one each is enough
  validation.validate_distill_config(config)


# ---------------------------------------------------------------------------
# Your own data.


def brightness_arrays(n_train=512, n_test=128, seed=0):
  """Dark (class 0) or bright (class 1) 8x8x1 noise: the label is a function of the image."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n_train + n_test)
  low = np.where(labels == 1, 150, 0)[:, None, None, None]
  images = (low + rng.integers(0, 106, (n_train + n_test, 8, 8, 1))).astype(np.uint8)
  return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


@pytest.mark.e2e
def test_training_on_registered_arrays(tmp_path):
  arrays = brightness_arrays()
  calls = []
  data_lib.register_dataset('mine', lambda: calls.append(1) or arrays)
  config = tiny_train_config(num_epochs=3, checkpoint_every_steps=0, **{'data.name': 'mine'})
  config.model.num_classes = 2
  validation.validate_train_config(config)
  assert data_lib.dataset_info('mine') == (2, (8, 8, 1))
  loaded = data_lib.load_dataset('mine')
  np.testing.assert_array_equal(loaded.train_images, arrays[0])
  np.testing.assert_array_equal(loaded.test_labels, arrays[3])
  mean, std = data_lib.channel_stats(arrays[0])
  assert loaded.mean == mean and loaded.std == std
  assert mean[0] == pytest.approx(arrays[0].mean() / 255) and std[0] == pytest.approx(
      arrays[0].std() / 255)
  device = data_lib.DeviceData.create(loaded, data_lib.make_mesh(1))
  idx = data_lib.train_indices(0, 3, num_examples=512, batch_size=32)
  np.testing.assert_array_equal(device.batch('train', idx)['image'], arrays[0][idx])
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert calls == [1]  # validation, dataset_info and training shared one call of the loader
  assert results['test_top1_error'] < 0.2  # chance is 0.5: it learned the arrays' labels


def test_registered_loader_errors_are_one_line():
  data_lib.register_dataset('floats', lambda: (np.zeros((4, 8, 8, 1), np.float32),
                                               np.zeros(4, int), np.zeros((2, 8, 8, 1), np.uint8),
                                               np.zeros(2, int)))
  config = tiny_train_config(**{'data.name': 'floats'})
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_train_config(config)
  one_line(e, "data.from_arrays(name='floats'): train_images are float32", 'expected uint8 NHWC')
  data_lib.register_dataset('odd', lambda: 'not data')
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_train_config(tiny_train_config(**{'data.name': 'odd'}))
  one_line(e, "config.data.name='odd': its loader returned str")
  with pytest.raises(ValueError, match="name='digits' is a built-in dataset"):
    data_lib.register_dataset('digits', brightness_arrays)
  with pytest.raises(ValueError, match='give a callable'):
    data_lib.register_dataset('x', brightness_arrays())
