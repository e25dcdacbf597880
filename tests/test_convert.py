"""Tests for distill_jax.convert: PyTorch state dicts of the CIFAR releases <-> variables.

Without PyTorch: the release key names (an independent table for a tiny WRN), exact round
trips for every naming, the one-line errors, the DARTS grouped layout under both
implementations, and the command end to end on a ``.npz`` (then ``load_teacher``).
Against PyTorch: tests/test_convert_torch.py.
"""

from __future__ import annotations

import json
import os
import sys
import types

import jax
import numpy as np
import pytest

from distill_jax import convert, data as data_lib, genotypes, models
from distill_jax.trainers import steps as steps_lib
from distill_jax.trainers import teacher as teacher_lib

DIGITS = (2, 8, 8, 1)
WRN = {'name': 'wrn', 'depth': 10, 'widen_factor': 1, 'num_classes': 10}
DENSENET = {'name': 'densenet_bc', 'depth': 10, 'growth_rate': 4, 'num_classes': 10}
# Every operation with parameters, a stride-2 skip (factorized reduce) and both pools.
GENOTYPE = genotypes.get_genotype({
    'normal': [['sep_conv_3x3', 0], ['sep_conv_5x5', 1], ['dil_conv_3x3', 0],
               ['dil_conv_5x5', 1], ['skip_connect', 0], ['avg_pool_3x3', 2],
               ['max_pool_3x3', 1], ['sep_conv_3x3', 3]],
    'normal_concat': [2, 3, 4, 5],
    'reduce': [['skip_connect', 0], ['sep_conv_3x3', 1], ['max_pool_3x3', 0],
               ['dil_conv_3x3', 1], ['avg_pool_3x3', 0], ['skip_connect', 2],
               ['sep_conv_5x5', 1], ['dil_conv_5x5', 3]],
    'reduce_concat': [2, 3, 4, 5]})
DARTS = {'name': 'darts', 'genotype': GENOTYPE, 'layers': 5, 'init_channels': 4,
         'auxiliary': True, 'num_classes': 10}
CONFIGS = {'wrn': WRN, 'densenet_bc': DENSENET, 'darts': DARTS}


def _random_variables(config: dict, seed: int, shape=DIGITS) -> dict:
  """``{'params', 'batch_stats'}`` of ``config``'s network drawn at random (He-scaled
  kernels, parameters and statistics off their init), so a misplaced or swapped array
  changes the logits; built from the shapes alone (no eager ``init``)."""
  rng = np.random.default_rng(seed)
  shapes = models.param_shapes(models.create_model(**config), shape)

  def draw(path, s):
    if path[-1].key == 'var':
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    if path[-1].key == 'kernel':
      return (rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(np.float32)
    base = 1.0 if path[-1].key == 'scale' else 0.0
    return (base + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _logits(model, variables, x) -> np.ndarray:
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(variables, x))


@pytest.fixture(scope='module')
def nets() -> dict:
  """family -> (model, random variables for 8x8x1 inputs)."""
  return {family: (models.create_model(**config), _random_variables(config, seed))
          for seed, (family, config) in enumerate(CONFIGS.items())}


def _images(shape=DIGITS, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _one_line_error(fn, match: str) -> str:
  with pytest.raises(convert.ConvertError, match=match) as e:
    fn()
  assert '\n' not in str(e.value)
  return str(e.value)


# --------------------------------------------------------------------- names and round trips


def test_wrn_keys_are_the_release_names(nets):
  _, variables = nets['wrn']
  state = convert.to_torch(variables, WRN)
  bn = lambda p: {f'{p}.{s}' for s in ('weight', 'bias', 'running_mean', 'running_var',
                                        'num_batches_tracked')}
  expected = {'conv1.weight', 'fc.weight', 'fc.bias', *bn('bn1')}
  for i in (1, 2, 3):
    block = f'block{i}.layer.0'
    expected |= {f'{block}.conv1.weight', f'{block}.conv2.weight', *bn(f'{block}.bn1'),
                 *bn(f'{block}.bn2')}
    if i > 1:  # WRN-10-1: 16 -> 16 in the first group keeps the identity
      expected.add(f'{block}.convShortcut.weight')
  assert set(state) == expected
  assert state['conv1.weight'].shape == (16, 1, 3, 3)
  assert state['block2.layer.0.conv1.weight'].shape == (32, 16, 3, 3)
  assert state['block3.layer.0.convShortcut.weight'].shape == (64, 32, 1, 1)
  assert state['fc.weight'].shape == (10, 64)
  np.testing.assert_array_equal(state['block2.layer.0.conv1.weight'],
                                np.transpose(variables['params']['group1_block0']['conv0']['kernel'],
                                             (3, 2, 0, 1)))
  np.testing.assert_array_equal(state['bn1.running_var'], variables['batch_stats']['final_bn']['var'])


def test_densenet_and_darts_keys_are_the_release_names(nets):
  dense = convert.to_torch(nets['densenet_bc'][1], DENSENET)
  # stem 8 -> block 12 -> transition 6 -> block 10 -> transition 5 -> block 9 channels.
  for key, shape in {'conv1.weight': (8, 1, 3, 3), 'block1.layer.0.conv1.weight': (16, 8, 1, 1),
                     'block1.layer.0.conv2.weight': (4, 16, 3, 3), 'trans1.conv1.weight': (6, 12, 1, 1),
                     'trans2.bn1.running_mean': (10,), 'block3.layer.0.bn2.weight': (16,),
                     'bn1.weight': (9,), 'fc.weight': (10, 9)}.items():
    assert dense[key].shape == shape, key
  darts = convert.to_torch(nets['darts'][1], DARTS)
  for key, shape in {
      'stem.0.weight': (12, 1, 3, 3), 'stem.1.running_var': (12,),
      'cells.0.preprocess0.op.1.weight': (4, 12, 1, 1), 'cells.0._ops.0.op.1.weight': (4, 1, 3, 3),
      'cells.0._ops.1.op.5.weight': (4, 1, 5, 5), 'cells.0._ops.0.op.7.running_mean': (4,),
      'cells.0._ops.3.op.3.weight': (4,), 'cells.1._ops.0.conv_1.weight': (4, 8, 1, 1),
      'cells.2.preprocess0.conv_2.weight': (4, 16, 1, 1), 'cells.2.preprocess0.bn.bias': (8,),
      'auxiliary_head.features.2.weight': (128, 64, 1, 1),
      'auxiliary_head.features.5.weight': (768, 128, 2, 2),
      'auxiliary_head.features.6.running_var': (768,),
      'auxiliary_head.classifier.weight': (10, 768), 'classifier.weight': (10, 64)}.items():
    assert darts[key].shape == shape, key
  assert not any(k.startswith(('cells.0._ops.5.', 'cells.0._ops.6.')) for k in darts)  # pools


@pytest.mark.parametrize('family,naming', [
    ('wrn', 'wrn_py'), ('wrn', 'attention_transfer'), ('densenet_bc', 'densenet3'),
    ('densenet_bc', 'bamos'), ('darts', 'darts')])
def test_round_trip_is_exact_and_the_naming_is_detected(nets, family, naming):
  model, variables = nets[family]
  state = convert.to_torch(variables, CONFIGS[family], naming=naming)
  done = convert.convert(state, CONFIGS[family])  # the stem reads 1 channel: found in the state dict
  assert done.naming == naming
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  back = jax.tree_util.tree_flatten_with_path(done.variables)[0]
  assert [p for p, _ in flat] == [p for p, _ in back]
  for (path, a), (_, b) in zip(flat, back):
    assert b.dtype == np.float32 and a.shape == b.shape, path
    np.testing.assert_array_equal(a, b, err_msg=str(path))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])  # one compile for both
  x = _images()
  np.testing.assert_array_equal(apply(variables, x), apply(done.variables, x))


def test_module_prefix_and_num_batches_tracked_are_accepted(nets):
  _, variables = nets['wrn']
  state = {'module.' + k: v for k, v in convert.to_torch(variables, WRN).items()}
  done = convert.convert(state, WRN)
  assert len(done.ignored) == 7 and all(k.endswith('.num_batches_tracked') for k in done.ignored)
  np.testing.assert_array_equal(done.variables['params']['stem']['kernel'],
                                variables['params']['stem']['kernel'])


# --------------------------------------------------------------------- one-line errors


def test_missing_extra_and_misshapen_keys_are_one_line_errors(nets):
  state = convert.to_torch(nets['wrn'][1], WRN)
  missing = dict(state)
  del missing['block1.layer.0.conv1.weight']
  _one_line_error(lambda: convert.from_torch(missing, WRN),
                  r"^state dict key 'block1.layer.0.conv1.weight' is missing: the wrn model "
                  r'needs it with shape \(16, 16, 3, 3\)')
  extra = {**state, 'block1.layer.1.conv1.weight': np.zeros((16, 16, 3, 3), np.float32)}
  _one_line_error(lambda: convert.from_torch(extra, WRN),
                  r"^state dict key 'block1.layer.1.conv1.weight' \(shape \(16, 16, 3, 3\)\) is "
                  'not used by the wrn model')
  wrong = {**state, 'block1.layer.0.conv1.weight': np.zeros((16, 16, 1, 1), np.float32)}
  _one_line_error(lambda: convert.from_torch(wrong, WRN),
                  r"^state dict key 'block1.layer.0.conv1.weight' has shape \(16, 16, 1, 1\), "
                  r'the model needs \(16, 16, 3, 3\)$')
  classes = {**state, 'fc.weight': np.zeros((100, 64), np.float32),
             'fc.bias': np.zeros((100,), np.float32)}
  _one_line_error(lambda: convert.from_torch(classes, WRN), r'set model.num_classes=100$')
  _one_line_error(lambda: convert.from_torch(state, {**WRN, 'depth': 16}),
                  r"'block1\.layer\.1\.\S+' is missing \(and \d+ more keys\)")
  _one_line_error(lambda: convert.from_torch({'features.0.weight': np.zeros(3)}, WRN),
                  r'none of its keys is there .*wrn_py .*attention_transfer')
  _one_line_error(lambda: convert.from_torch(state, WRN, naming='darts'),
                  r"naming='darts' is not a naming of wrn; allowed: wrn_py, attention_transfer")
  _one_line_error(lambda: convert.from_torch(state, {'name': 'vgg'}), r"model.name='vgg'")


def test_darts_auxiliary_head_is_kept_or_dropped_on_request(nets):
  state = convert.to_torch(nets['darts'][1], DARTS)
  plain = {**DARTS, 'auxiliary': False}
  _one_line_error(lambda: convert.from_torch(state, plain),
                  r"'auxiliary_head\.\S+' .* is not used .*set model.auxiliary=True .*drop_auxiliary")
  done = convert.convert(state, plain, drop_auxiliary=True)
  assert 'aux_head' not in done.variables['params']
  assert done.dropped and all(k.startswith('auxiliary_head.') for k in done.dropped)
  assert len(done.dropped) == len([k for k in state if k.startswith('auxiliary_head.')]) - 2


# --------------------------------------------------------------------- DARTS implementations


def test_darts_variables_are_the_same_for_both_impls_grouped_and_depthwise():
  small = {**DARTS, 'layers': 3, 'auxiliary': False}
  for groups in (None, (2, 2, 2)):  # depthwise, and grouped (2 input channels per group)
    config = {**small, 'cell_groups': groups}
    shapes = {impl: jax.tree.map(lambda s: s.shape, models.param_shapes(
        models.create_model(**config, impl=impl), DIGITS)) for impl in ('fast', 'lax')}
    assert shapes['fast'] == shapes['lax']
    variables = _random_variables(config, 3)
    converted = convert.from_torch(convert.to_torch(variables, config), config)
    logits = {impl: _logits(models.create_model(**config, impl=impl), converted, _images())
              for impl in ('fast', 'lax')}
    np.testing.assert_allclose(logits['fast'], logits['lax'], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- the command


def _npz(tmp_path, variables, config, name='wrn.npz') -> str:
  path = str(tmp_path / name)
  np.savez(path, **convert.to_torch(variables, config))
  return path


def _run(argv, capsys) -> tuple[int, str, str]:
  rc = convert.main(argv)
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def test_command_writes_a_teacher_workdir_from_npz_without_torch(nets, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` fails: .npz must not need it
  model, variables = nets['wrn']
  path, out = _npz(tmp_path, variables, WRN), str(tmp_path / 'teacher')
  # num_classes comes from the state dict's classifier.
  model_flag = json.dumps({'name': 'wrn', 'depth': 10, 'widen_factor': 1})
  rc, stdout, err = _run(['--from=torch', path, f'--model={model_flag}', f'--out={out}'], capsys)
  assert rc == 0, err
  assert f'--config.distill.teacher_workdir={out}' in stdout
  with open(os.path.join(out, 'results.json')) as f:
    results = json.load(f)
  assert results['converted'] is True and results['test_error_measured'] is False
  assert 'no test error was measured here' in results['note']
  assert 'test_top1_error' not in results
  assert results['source']['format'] == 'npz' and results['source']['naming'] == 'wrn_py'
  assert results['source']['file'] == os.path.abspath(path)
  assert results['model'] == WRN
  assert results['num_params'] == models.count_params(variables['params'])

  teacher = teacher_lib.load_teacher(WRN, out, (1, 8, 8, 1))
  x = _images()
  np.testing.assert_array_equal(model.apply(teacher.variables, x, train=False)[0],
                                model.apply(variables, x, train=False)[0])
  rc, _, err = _run(['--from=torch', path, f'--model={model_flag}', f'--out={out}'], capsys)
  assert rc == 2 and err.count('\n') == 1 and 'already holds a run' in err


def test_command_measures_the_test_error_with_data(nets, tmp_path, capsys):
  model, variables = nets['wrn']
  path, out = _npz(tmp_path, variables, WRN), str(tmp_path / 'teacher')
  rc, stdout, err = _run(['--from=torch', path, '--model=' + json.dumps(WRN), '--data=digits',
                          f'--out={out}'], capsys)
  assert rc == 0, err
  with open(os.path.join(out, 'results.json')) as f:
    results = json.load(f)
  # The trainer's own evaluation of the same weights on the same split.
  digits = data_lib.load_dataset('digits')
  n = len(digits.test_labels)
  state = types.SimpleNamespace(**variables)
  batch = {'image': digits.test_images, 'label': digits.test_labels,
           'mask': np.ones(n, np.float32)}
  sums = steps_lib.eval_step(state, batch, None, model=model,
                             normalize=steps_lib.make_normalize(digits.mean, digits.std))
  wrong = int(round(float(sums['top1_error'])))  # counted in integers: exact fractions
  assert float(sums['count']) == n
  expected = wrong / n
  assert results['test_top5_error'] == int(round(float(sums['top5_error']))) / n
  assert results['test_error_measured'] is True and results['data'] == 'digits'
  assert results['test_top1_error'] == expected
  assert results['test_examples'] == len(digits.test_labels)
  assert f'{100 * expected:.2f}%' in stdout


def test_command_errors_are_one_line(nets, tmp_path, monkeypatch, capsys):
  out = f'--out={tmp_path / "teacher"}'
  pt = tmp_path / 'wrn.pt'
  pt.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)
  rc, _, err = _run(['--from=torch', str(pt), '--model=wrn_16_2', out], capsys)
  assert (rc, err) == (2, f'error: loading {pt} needs PyTorch: pip install torch\n')
  path = _npz(tmp_path, nets['wrn'][1], WRN)
  for argv, match in [
      (['--from=torch', path, '--model=wrn_99_9', out], "--model='wrn_99_9' is neither a network"),
      (['--from=torch', path, '--model={"depth": 10}', out], 'nor a JSON model config with a "name"'),
      (['--from=torch', path, '--model=wrn_16_2', out], 'is missing (and'),
      (['--from=torch', path, '--model=wrn_40_2', '--num_classes=0', out], 'model.num_classes=0'),
      (['--from=torch', path, '--model=wrn_16_2'], 'the following arguments are required: --out'),
      (['--from=onnx', path, '--model=wrn_16_2', out], "invalid choice: 'onnx'"),
      (['--from=torch', str(tmp_path / 'none.npz'), '--model=wrn_16_2', out], 'is not a file')]:
    try:
      rc, _, err = _run(argv, capsys)
    except SystemExit as e:  # argparse's own errors
      rc, err = e.code, capsys.readouterr().err
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1, (argv, err)
    assert match in err, (argv, err)
  assert not os.path.exists(tmp_path / 'teacher' / 'results.json')
