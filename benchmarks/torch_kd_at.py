r"""The KD + AT train step written in plain PyTorch, for the comparison in ``versus_torch.py``.

The same computation as ``distill_jax.trainers.steps.train_step`` with ``method='kd_at'``:
random crop (zero padding 4) and horizontal flip of a uint8 batch, normalisation,
a frozen WRN-40-2 teacher in inference mode, a WRN-16-2 student in training mode,

  loss = (1 - alpha) CE + alpha T^2 KL(softmax(t / T) || softmax(s / T))
         + beta * sum_j mean((Q_s,j - Q_t,j)^2),   Q = l2-normalised mean_c(a^2),

the backward pass and an SGD step with momentum 0.9 (as the benchmark's optax.sgd).
The networks are the pre-activation WRNs of the attention-transfer release (691,674
and 2,243,546 parameters, the counts of ``distill_jax.models``).

``python benchmarks/torch_kd_at.py`` checks that claim: it copies the weights of
distill_jax's WRN-16-2 and WRN-40-2 into these networks and compares logits, the loss
and its gradient with ``distill_jax.losses.distillation_loss`` (no augmentation).

Variants: ``eager`` (NCHW), ``channels_last`` (NHWC memory format), ``compile``
(``torch.compile`` of the whole step: forward, loss, backward and the SGD update;
channels-last when that variant is faster is not assumed, both memory formats are
tried by ``--variants``), and ``amp_bf16`` / ``compile_amp_bf16`` (channels-last under
``torch.autocast`` in bfloat16, float32 parameters). On a CUDA device when PyTorch sees
one, else on the CPU. PyTorch is an optional benchmark extra
(``pip install torch==2.13.0``), never a dependency of distill_jax or its tests.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
VARIANTS = ('eager', 'channels_last', 'compile', 'compile_channels_last', 'amp_bf16',
            'compile_amp_bf16')


class Block(nn.Module):
  """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, plus the identity or a 1x1 conv of the
  pre-activated input."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn0 = nn.BatchNorm2d(cin)
    self.conv0 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.shortcut = (nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
                     if stride != 1 or cin != cout else None)

  def forward(self, x):
    pre = F.relu(self.bn0(x))
    y = self.conv1(F.relu(self.bn1(self.conv0(pre))))
    return y + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(nn.Module):
  """WRN-depth-k; returns (logits, (group0, group1, group2 outputs))."""

  def __init__(self, depth: int, widen_factor: int, num_classes: int = 10):
    super().__init__()
    n = (depth - 4) // 6
    self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    groups, cin = [], 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
      cout = width * widen_factor
      groups.append(nn.Sequential(*[Block(cin if b == 0 else cout, cout, stride if b == 0 else 1)
                                    for b in range(n)]))
      cin = cout
    self.groups = nn.ModuleList(groups)
    self.final_bn = nn.BatchNorm2d(cin)
    self.classifier = nn.Linear(cin, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

  def forward(self, x):
    x = self.stem(x)
    points = []
    for group in self.groups:
      x = group(x)
      points.append(x)
    x = F.relu(self.final_bn(x)).mean(dim=(2, 3))
    return self.classifier(x), tuple(points)


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def attention_map(a: torch.Tensor) -> torch.Tensor:
  """(N, C, H, W) -> (N, H*W), rows of unit L2 norm."""
  return F.normalize(a.pow(2).mean(1).flatten(1))


def augment(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
  """uint8 (N, 3, H, W) -> random crop of the zero-padded image, random flip, normalised."""
  n, _, h, w = images.shape
  x = F.pad(images.float() / 255.0, (4, 4, 4, 4))
  dy = torch.randint(0, 9, (n, 1, 1), device=x.device)
  dx = torch.randint(0, 9, (n, 1, 1), device=x.device)
  rows = (torch.arange(h, device=x.device)[None, :, None] + dy).expand(n, h, w)
  cols = (torch.arange(w, device=x.device)[None, None, :] + dx).expand(n, h, w)
  flip = torch.rand(n, 1, 1, device=x.device) < 0.5
  cols = torch.where(flip, dx + (w - 1) - torch.arange(w, device=x.device)[None, None, :], cols)
  batch = torch.arange(n, device=x.device)[:, None, None].expand(n, h, w)
  x = x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
  return (x - mean) / std


def kd_at_loss(logits, points, t_logits, t_points, labels, *, alpha: float = 0.9,
               temperature: float = 4.0, beta: float = 1e3) -> torch.Tensor:
  """(1 - alpha) CE + alpha T^2 KL(teacher || student) + beta sum_j mean((Q_s - Q_t)^2)."""
  ce = F.cross_entropy(logits, labels)
  kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(t_logits / temperature, 1),
                reduction='batchmean', log_target=True)
  at = sum((attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(points, t_points))
  return (1 - alpha) * ce + alpha * temperature**2 * kl + beta * at


def make_runner(variant: str, batch_size: int, *, alpha: float = 0.9, temperature: float = 4.0,
                beta: float = 1e3, seed: int = 0) -> tuple[float, Callable[[], float]]:
  """Builds the step for ``variant``; returns (seconds of the first step, run_one_step)."""
  if variant not in VARIANTS:
    raise ValueError(f'variant={variant!r} is not allowed; use one of {VARIANTS}')
  torch.manual_seed(seed)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  channels_last = variant.endswith('channels_last') or variant.endswith('amp_bf16')
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  student = WideResNet(16, 2).to(device=device, memory_format=fmt).train()
  teacher = WideResNet(40, 2).to(device=device, memory_format=fmt).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
  mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
  gen = torch.Generator().manual_seed(seed)
  images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
  labels = torch.randint(0, 10, (batch_size,), generator=gen).to(device)
  # Automatic mixed precision: bfloat16 compute, float32 parameters and optimizer.
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if variant.endswith(
      'amp_bf16') else contextlib.nullcontext

  def step(images, labels):
    with autocast():
      x = augment(images, mean, std).contiguous(memory_format=fmt)
      with torch.no_grad():
        t_logits, t_points = teacher(x)
      logits, points = student(x)
      loss = kd_at_loss(logits.float(), [p.float() for p in points], t_logits.float(),
                        [p.float() for p in t_points], labels, alpha=alpha,
                        temperature=temperature, beta=beta)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

  if variant.startswith('compile'):
    step = torch.compile(step)

  def run() -> float:
    t0 = time.perf_counter()
    loss = step(images, labels)
    loss.item()  # waits for the step (CPU ops are synchronous; this also syncs other devices)
    return time.perf_counter() - t0

  first = run()
  return first, run


def load_flax_variables(model: WideResNet, variables: dict) -> None:
  """Copies distill_jax WRN ``{'params', 'batch_stats'}`` into ``model`` (same names)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  params, stats = variables['params'], variables['batch_stats']
  t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))
  modules = {'stem': model.stem, 'final_bn': model.final_bn, 'classifier': model.classifier}
  for g, group in enumerate(model.groups):
    for b, block in enumerate(group):
      modules[f'group{g}_block{b}'] = block
  with torch.no_grad():
    for name, p in params.items():
      module = modules[name]
      if name == 'stem':
        module.weight.copy_(t(p['kernel']).permute(3, 2, 0, 1))
      elif name == 'classifier':
        module.weight.copy_(t(p['kernel']).T)
        module.bias.copy_(t(p['bias']))
      else:
        items = {'': p} if name == 'final_bn' else p
        for sub, q in items.items():
          layer = getattr(module, sub) if sub else module
          if 'kernel' in q:
            layer.weight.copy_(t(q['kernel']).permute(3, 2, 0, 1))
          else:
            s = stats[name][sub] if sub else stats[name]
            layer.weight.copy_(t(q['scale']))
            layer.bias.copy_(t(q['bias']))
            layer.running_mean.copy_(t(s['mean']))
            layer.running_var.copy_(t(s['var']))


def check_against_jax(batch_size: int = 16) -> dict:
  """Max differences between this step's loss / logits / a gradient and distill_jax's."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from distill_jax import losses, models  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, batch_size)
  nets = {}
  for role, depth, seed in (('student', 16, 0), ('teacher', 40, 1)):
    flax_model = models.create_model('wrn', depth=depth, widen_factor=2, num_classes=10)
    variables = models.init_variables(flax_model, jax.random.key(seed), (1, 32, 32, 3))
    # Non-trivial running statistics, so the teacher's inference batch norm is exercised.
    variables['batch_stats'] = jax.tree.map(
        lambda a: a + 0.1 * rng.random(a.shape).astype(np.float32), variables['batch_stats'])
    torch_model = WideResNet(depth, 2)
    load_flax_variables(torch_model, variables)
    nets[role] = (flax_model, variables, torch_model)

  (fs, vs, ts), (ft, vt, tt) = nets['student'], nets['teacher']
  t_logits, t_points = ft.apply(vt, x, train=False)

  def jax_loss(params):
    (logits, points), _ = fs.apply({'params': params, 'batch_stats': vs['batch_stats']}, x,
                                   train=True, mutable=['batch_stats'])
    loss, _ = losses.distillation_loss(logits, labels, points, t_logits, t_points, method='kd_at')
    return loss, logits

  (j_loss, j_logits), j_grads = jax.value_and_grad(jax_loss, has_aux=True)(vs['params'])
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  tt.eval()
  ts.train()
  with torch.no_grad():
    tl, tp = tt(xt)
  logits, points = ts(xt)
  loss = kd_at_loss(logits, points, tl, tp, torch.from_numpy(labels))
  loss.backward()
  grad_torch = ts.groups[1][0].conv0.weight.grad.permute(2, 3, 1, 0).numpy()
  grad_jax = np.asarray(j_grads['group1_block0']['conv0']['kernel'])
  return {
      'teacher_logits_max_abs_diff': float(np.abs(tl.numpy() - np.asarray(t_logits)).max()),
      'student_logits_max_abs_diff': float(np.abs(logits.detach().numpy() - np.asarray(j_logits)).max()),
      'loss_jax': float(j_loss), 'loss_torch': float(loss.detach()),
      'loss_rel_diff': abs(float(loss.detach()) - float(j_loss)) / abs(float(j_loss)),
      'grad_max_rel_diff': float(np.abs(grad_torch - grad_jax).max() / np.abs(grad_jax).max()),
  }


if __name__ == '__main__':
  for key, value in check_against_jax().items():
    print(f'{key}: {value:.3g}')
