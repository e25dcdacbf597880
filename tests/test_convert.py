"""Tests for distill_jax.convert: PyTorch state dicts of the CIFAR releases <-> variables.

Without PyTorch: the release key names (an independent table for a tiny WRN), exact round
trips for every naming, the one-line errors, the DARTS grouped layout under both
implementations, and the command end to end on a ``.npz`` (then ``load_teacher``). With
PyTorch (skipped where it is not installed): modules built as the releases build theirs,
with random weights and batch-norm statistics, give the logits of the converted variables.
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
from distill_jax.models import darts_ops
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


# --------------------------------------------------------------------- against PyTorch


def _torch_wrn(torch, depth: int, widen: int, num_classes: int):
  """WRN as the RepDistiller / WideResNet-pytorch ``wrn.py`` builds it."""
  nn, F = torch.nn, torch.nn.functional

  class BasicBlock(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.equal = cin == cout
      self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
      o = F.relu(self.bn1(x))
      y = self.conv2(F.relu(self.bn2(self.conv1(o))))
      return (x if self.equal else self.convShortcut(o)) + y

  class NetworkBlock(nn.Module):

    def __init__(self, n, cin, cout, stride):
      super().__init__()
      self.layer = nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                   for i in range(n)])

    def forward(self, x):
      return self.layer(x)

  class WideResNet(nn.Module):

    def __init__(self):
      super().__init__()
      n, ch = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
      self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
      self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
      self.bn1 = nn.BatchNorm2d(ch[3])
      self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x):
      x = F.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
      return self.fc(F.avg_pool2d(x, 8).flatten(1))

  return WideResNet()


def _torch_densenet3(torch, depth: int, growth: int, num_classes: int):
  """DenseNet-BC as densenet-pytorch's ``DenseNet3(bottleneck=True, reduction=0.5)``."""
  nn, F = torch.nn, torch.nn.functional

  class Bottleneck(nn.Module):

    def __init__(self, cin):
      super().__init__()
      self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(4 * growth)
      self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
      self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
      return torch.cat([x, self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))], 1)

  class DenseBlock(nn.Module):

    def __init__(self, n, cin):
      super().__init__()
      self.layer = nn.Sequential(*[Bottleneck(cin + i * growth) for i in range(n)])

    def forward(self, x):
      return self.layer(x)

  class Transition(nn.Module):

    def __init__(self, cin, cout):
      super().__init__()
      self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
      return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)

  class DenseNet3(nn.Module):

    def __init__(self):
      super().__init__()
      n, c = (depth - 4) // 6, 2 * growth
      self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
      self.block1, c = DenseBlock(n, c), c + n * growth
      self.trans1, c = Transition(c, c // 2), c // 2
      self.block2, c = DenseBlock(n, c), c + n * growth
      self.trans2, c = Transition(c, c // 2), c // 2
      self.block3, c = DenseBlock(n, c), c + n * growth
      self.bn1, self.fc = nn.BatchNorm2d(c), nn.Linear(c, num_classes)

    def forward(self, x):
      x = self.trans2(self.block2(self.trans1(self.block1(self.conv1(x)))))
      return self.fc(F.avg_pool2d(F.relu(self.bn1(self.block3(x))), 8).flatten(1))

  return DenseNet3()


def _torch_darts(torch, genotype, C: int, layers: int, num_classes: int):
  """DARTS NetworkCIFAR (with its auxiliary head) as quark0/darts ``cnn/model.py`` and
  ``cnn/operations.py`` build it; returns (logits, aux logits in train mode else None)."""
  nn = torch.nn
  relu = lambda: nn.ReLU(inplace=False)

  def conv(cin, cout, k, stride=1, padding=0, dilation=1, groups=1):
    return nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False)

  class ReLUConvBN(nn.Module):

    def __init__(self, cin, cout):
      super().__init__()
      self.op = nn.Sequential(relu(), conv(cin, cout, 1), nn.BatchNorm2d(cout))

    def forward(self, x):
      return self.op(x)

  class FactorizedReduce(nn.Module):

    def __init__(self, cin, cout):
      super().__init__()
      self.relu = relu()
      self.conv_1, self.conv_2 = conv(cin, cout // 2, 1, 2), conv(cin, cout // 2, 1, 2)
      self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
      x = self.relu(x)
      return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))

  class Identity(nn.Module):

    def forward(self, x):
      return x

  def sep(k, stride):
    return nn.Sequential(relu(), conv(C_, C_, k, stride, k // 2, groups=C_), conv(C_, C_, 1),
                         nn.BatchNorm2d(C_), relu(), conv(C_, C_, k, 1, k // 2, groups=C_),
                         conv(C_, C_, 1), nn.BatchNorm2d(C_))

  def dil(k, stride):
    return nn.Sequential(relu(), conv(C_, C_, k, stride, 2 * (k // 2), 2, groups=C_),
                         conv(C_, C_, 1), nn.BatchNorm2d(C_))

  class Op(nn.Module):  # SepConv / DilConv keep their layers in self.op

    def __init__(self, seq):
      super().__init__()
      self.op = seq

    def forward(self, x):
      return self.op(x)

  def make_op(name, stride):
    if name == 'skip_connect':
      return Identity() if stride == 1 else FactorizedReduce(C_, C_)
    if name == 'max_pool_3x3':
      return nn.MaxPool2d(3, stride, 1)
    if name == 'avg_pool_3x3':
      return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    k = int(name[-1])
    return Op(sep(k, stride) if name.startswith('sep') else dil(k, stride))

  class Cell(nn.Module):

    def __init__(self, cpp, cp, c, reduction, reduction_prev):
      super().__init__()
      nonlocal C_
      C_ = c
      self.preprocess0 = FactorizedReduce(cpp, c) if reduction_prev else ReLUConvBN(cpp, c)
      self.preprocess1 = ReLUConvBN(cp, c)
      pairs, self._concat = ((genotype.reduce, genotype.reduce_concat) if reduction
                             else (genotype.normal, genotype.normal_concat))
      self._indices = [i for _, i in pairs]
      self._ops = nn.ModuleList([make_op(op, 2 if reduction and i < 2 else 1) for op, i in pairs])

    def forward(self, s0, s1):
      states = [self.preprocess0(s0), self.preprocess1(s1)]
      for i in range(len(self._ops) // 2):
        states.append(sum(self._ops[j](states[self._indices[j]]) for j in (2 * i, 2 * i + 1)))
      return torch.cat([states[i] for i in self._concat], dim=1)

  class AuxiliaryHeadCIFAR(nn.Module):

    def __init__(self, c):
      super().__init__()
      self.features = nn.Sequential(
          nn.ReLU(inplace=True), nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
          conv(c, 128, 1), nn.BatchNorm2d(128), nn.ReLU(inplace=True), conv(128, 768, 2),
          nn.BatchNorm2d(768), nn.ReLU(inplace=True))
      self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
      return self.classifier(self.features(x).flatten(1))

  C_ = C

  class NetworkCIFAR(nn.Module):

    def __init__(self):
      super().__init__()
      self._layers = layers
      c = 3 * C
      self.stem = nn.Sequential(conv(3, c, 3, padding=1), nn.BatchNorm2d(c))
      cpp, cp, c = c, c, C
      self.cells, reduction_prev = nn.ModuleList(), False
      for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        c = 2 * c if reduction else c
        self.cells.append(Cell(cpp, cp, c, reduction, reduction_prev))
        reduction_prev, cpp, cp = reduction, cp, 4 * c
        if i == 2 * layers // 3:
          self.auxiliary_head = AuxiliaryHeadCIFAR(cp)
      self.global_pooling = nn.AdaptiveAvgPool2d(1)
      self.classifier = nn.Linear(cp, num_classes)

    def forward(self, x):
      s0 = s1 = self.stem(x)
      aux = None
      for i, cell in enumerate(self.cells):
        s0, s1 = s1, cell(s0, s1)
        if i == 2 * self._layers // 3 and self.training:
          aux = self.auxiliary_head(s1)
      return self.classifier(self.global_pooling(s1).flatten(1)), aux

  return NetworkCIFAR()


def _random_bn_statistics(torch, module, seed: int):
  """Random affine parameters and running statistics in every batch norm (eval mode)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen))
  return module.eval()


CIFAR = (2, 32, 32, 3)


def _compare(torch, net, config, *, seed=0, state=None):
  """Torch logits (eval mode) vs the logits of the converted variables."""
  x = _images(CIFAR, seed)
  with torch.no_grad():
    out = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  expected = (out[0] if isinstance(out, tuple) else out).numpy()
  variables = convert.from_torch(state if state is not None else net.state_dict(), config)
  got = models.create_model(**config).apply(variables, x, train=False)[0]
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
  return variables, x, expected


def test_torch_wrn_logits_match_and_the_pth_file_converts(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  config = {'name': 'wrn', 'depth': 16, 'widen_factor': 2, 'num_classes': 7}
  net = _random_bn_statistics(torch, _torch_wrn(torch, 16, 2, 7), 0)
  _, x, expected = _compare(torch, net, config)
  # The release's checkpoint wrapping (RepDistiller saves {'model': state_dict, ...}).
  path = str(tmp_path / 'wrn_16_2.pth')
  torch.save({'epoch': 240, 'model': net.state_dict(), 'best_acc': 75.6}, path)
  out = str(tmp_path / 'teacher')
  rc, _, err = _run(['--from=torch', path, '--model=wrn_16_2', f'--out={out}'], capsys)
  assert rc == 0, err
  teacher = teacher_lib.load_teacher(config, out, (1, 32, 32, 3))
  np.testing.assert_allclose(teacher.model.apply(teacher.variables, x, train=False)[0], expected,
                             rtol=1e-4, atol=1e-4)
  with open(os.path.join(out, 'results.json')) as f:
    assert json.load(f)['source']['format'] == 'torch'
  # to_torch's state dict loads into the release's module (strict) and gives the same logits.
  back = _torch_wrn(torch, 16, 2, 7).eval()
  back.load_state_dict({k: torch.from_numpy(v) for k, v in
                        convert.to_torch(teacher.variables, config).items()})
  with torch.no_grad():
    np.testing.assert_allclose(back(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy(), expected,
                               rtol=1e-5, atol=1e-5)


def test_torch_attention_transfer_functional_wrn_matches():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  torch.manual_seed(1)
  config = {'name': 'wrn', 'depth': 10, 'widen_factor': 2, 'num_classes': 10}
  net = _random_bn_statistics(torch, _torch_wrn(torch, 10, 2, 10), 1)
  variables, x, expected = _compare(torch, net, config, seed=1)
  p = {k: torch.from_numpy(v) for k, v in
       convert.to_torch(variables, config, naming='attention_transfer').items()}

  def bn(x, base):  # attention-transfer's utils.batch_norm in inference mode
    return F.batch_norm(x, p[f'{base}.running_mean'], p[f'{base}.running_var'],
                        p[f'{base}.weight'], p[f'{base}.bias'], training=False)

  def block(x, base, stride):  # its cifar.py block()
    o1 = F.relu(bn(x, f'{base}.bn0'))
    y = F.conv2d(o1, p[f'{base}.conv0'], stride=stride, padding=1)
    z = F.conv2d(F.relu(bn(y, f'{base}.bn1')), p[f'{base}.conv1'], stride=1, padding=1)
    return z + (F.conv2d(o1, p[f'{base}.convdim'], stride=stride) if f'{base}.convdim' in p else x)

  with torch.no_grad():
    o = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), p['conv0'], padding=1)
    for g, stride in enumerate((1, 2, 2)):
      o = block(o, f'group{g}.block0', stride)
    o = F.avg_pool2d(F.relu(bn(o, 'bn')), 8, 1, 0).flatten(1)
    logits = F.linear(o, p['fc.weight'], p['fc.bias']).numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_torch_densenet_bc_logits_match():
  torch = pytest.importorskip('torch')
  torch.manual_seed(2)
  net = _random_bn_statistics(torch, _torch_densenet3(torch, 10, 4, 10), 2)
  _compare(torch, net, {**DENSENET, 'num_classes': 10}, seed=2)


def test_torch_darts_logits_and_auxiliary_logits_match():
  torch = pytest.importorskip('torch')
  torch.manual_seed(3)
  config = {**DARTS, 'num_classes': 10}
  net = _random_bn_statistics(torch, _torch_darts(torch, GENOTYPE, 4, 5, 10), 3)
  variables, x, _ = _compare(torch, net, config, seed=3)
  # Train mode (batch statistics) reaches the auxiliary head: its logits match too.
  net.train()
  with torch.no_grad():
    _, aux = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  _, state = models.create_model(**config).apply(variables, x, train=True,
                                                 mutable=['batch_stats', 'intermediates'])
  np.testing.assert_allclose(np.asarray(state['intermediates']['aux_logits'][0]), aux.numpy(),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('groups', [2, 8])  # grouped (4 channels per group) and depthwise
def test_torch_grouped_conv_layout_for_both_impls(groups):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(groups)
  x = rng.standard_normal((2, 9, 9, 8)).astype(np.float32)
  weight = rng.standard_normal((8, 8 // groups, 3, 3)).astype(np.float32)  # (O, I / groups, H, W)
  with torch.no_grad():
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(weight), stride=2, padding=2,
        dilation=2, groups=groups).permute(0, 2, 3, 1).numpy()
  kernel = {'params': {'kernel': weight.transpose(2, 3, 1, 0)}}  # (H, W, I / groups, O)
  for impl in ('fast', 'lax'):
    conv = darts_ops.Conv(8, 3, stride=2, padding=2, dilation=2, groups=groups, impl=impl)
    np.testing.assert_allclose(conv.apply(kernel, x), expected, rtol=1e-5, atol=1e-5, err_msg=impl)
