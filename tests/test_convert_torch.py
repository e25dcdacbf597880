"""distill_jax.convert against PyTorch: modules built as the CIFAR releases build theirs
(WRN, DenseNet-BC, DARTS), with random weights and batch-norm statistics, give the logits
of the converted variables. Skipped where PyTorch is not installed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from distill_jax import convert, models
from distill_jax.models import darts_ops
from distill_jax.trainers import teacher as teacher_lib
from test_convert import DARTS, DENSENET, GENOTYPE, _images, _run


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
