"""NumPy float64 renderings of RepDistiller's FitNets, VID and CRD parts.

Written from the release's definitions (``models/util.py`` ConvReg,
``distiller_zoo/VID.py``, ``crd/memory.py``, ``crd/criterion.py``,
``dataset/cifar100.py``), step by step and in its layout: maps are NCHW, conv
weights OIHW, transposed-conv weights (in, out, kH, kW), as PyTorch has them.
Used by tests/test_connectors.py, independently of distill_jax.connectors.
"""

import numpy as np

from losses_reference import np_adaptive_avg_pool2d


def np_conv2d(x, w, b=None, stride=1, pad=0):
  """torch.nn.functional.conv2d (cross-correlation) on NCHW with OIHW weights."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  _, _, h, wd = x.shape
  o, _, kh, kw = w.shape
  oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = np.zeros((x.shape[0], o, oh, ow))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
      out[:, :, i, j] = np.einsum('nchw,ochw->no', patch, w)
  if b is not None:
    out = out + np.asarray(b)[None, :, None, None]
  return out


def np_conv_transpose2d(x, w, b, stride, pad):
  """torch.nn.functional.conv_transpose2d: scatter each input pixel, crop ``pad``."""
  x = np.asarray(x, np.float64)
  n, _, h, wd = x.shape
  _, o, kh, kw = w.shape
  full = np.zeros((n, o, (h - 1) * stride + kh, (wd - 1) * stride + kw))
  for i in range(h):
    for j in range(wd):
      full[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum(
          'nc,cokl->nokl', x[:, :, i, j], w)
  out = full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad]
  return out + np.asarray(b)[None, :, None, None]


def np_batch_norm_train(x, gamma, beta, eps=1e-5):
  """BatchNorm2d in training mode: the batch's mean and biased variance per channel."""
  mean = x.mean(axis=(0, 2, 3), keepdims=True)
  var = x.var(axis=(0, 2, 3), keepdims=True)
  y = (x - mean) / np.sqrt(var + eps)
  return y * np.asarray(gamma)[None, :, None, None] + np.asarray(beta)[None, :, None, None]


def np_batch_norm_eval(x, running_mean, running_var, gamma, beta, eps=1e-5):
  c = (None, slice(None), None, None)
  return ((x - np.asarray(running_mean)[c]) / np.sqrt(np.asarray(running_var)[c] + eps)
          * np.asarray(gamma)[c] + np.asarray(beta)[c])


def np_conv_reg(x, t_hw, weight, bias, gamma, beta, *, train=True, running=None,
                use_relu=True):
  """ConvReg.forward: the convolution chosen by heights, BatchNorm2d, ReLU."""
  s_h, t_h = x.shape[2], t_hw[0]
  if s_h == 2 * t_h:
    y = np_conv2d(x, weight, bias, stride=2, pad=1)
  elif s_h * 2 == t_h:
    y = np_conv_transpose2d(x, weight, bias, stride=2, pad=1)
  elif s_h >= t_h:
    y = np_conv2d(x, weight, bias)
  else:
    raise ValueError('no ConvReg for these sizes')
  if train:
    y = np_batch_norm_train(y, gamma, beta)
  else:
    y = np_batch_norm_eval(y, running[0], running[1], gamma, beta)
  return np.maximum(y, 0.0) if use_relu else y


def np_vid(inp, target, weights, log_scale, eps=1e-5):
  """VIDLoss.forward: pool the taller map, regress, Gaussian NLL mean."""
  inp = np.asarray(inp, np.float64)
  target = np.asarray(target, np.float64)
  s_h, t_h = inp.shape[2], target.shape[2]
  if s_h > t_h:
    inp = np_adaptive_avg_pool2d(inp, t_h, t_h)
  elif s_h < t_h:
    target = np_adaptive_avg_pool2d(target, s_h, s_h)
  pred = inp
  for i, w in enumerate(weights):
    if i:
      pred = np.maximum(pred, 0.0)
    pred = np_conv2d(pred, w)
  pred_var = np.log(1.0 + np.exp(np.asarray(log_scale, np.float64))) + eps
  pred_var = pred_var.reshape(1, -1, 1, 1)
  neg_log_prob = 0.5 * ((pred - target)**2 / pred_var + np.log(pred_var))
  return np.mean(neg_log_prob)


def np_contrast_memory(memory_v1, memory_v2, z_v1, z_v2, v1, v2, y, idx, t=0.07,
                       momentum=0.5):
  """ContrastMemory.forward with given contrast indices.

  Returns ``(out_v1, out_v2, z_v1, z_v2, memory_v1, memory_v2)``, the memories
  updated (copies).
  """
  memory_v1 = np.array(memory_v1, np.float64)
  memory_v2 = np.array(memory_v2, np.float64)
  v1 = np.asarray(v1, np.float64)
  v2 = np.asarray(v2, np.float64)
  bsz, k1 = idx.shape
  output_size, input_size = memory_v1.shape
  weight_v1 = memory_v1[idx.reshape(-1)].reshape(bsz, k1, input_size)
  out_v2 = np.exp(np.einsum('bkd,bd->bk', weight_v1, v2) / t)
  weight_v2 = memory_v2[idx.reshape(-1)].reshape(bsz, k1, input_size)
  out_v1 = np.exp(np.einsum('bkd,bd->bk', weight_v2, v1) / t)
  if z_v1 < 0:
    z_v1 = out_v1.mean() * output_size
  if z_v2 < 0:
    z_v2 = out_v2.mean() * output_size
  out_v1 = out_v1 / z_v1
  out_v2 = out_v2 / z_v2
  for memory, v in ((memory_v1, v1), (memory_v2, v2)):
    l_pos = memory[y] * momentum + v * (1 - momentum)
    memory[y] = l_pos / np.sqrt((l_pos**2).sum(axis=1, keepdims=True))
  return out_v1, out_v2, z_v1, z_v2, memory_v1, memory_v2


def np_contrast_loss(x, n_data, eps=1e-7):
  """ContrastLoss.forward: NCE over the positive (column 0) and the K negatives."""
  bsz, m = x.shape[0], x.shape[1] - 1
  pn = 1 / float(n_data)
  p_pos = x[:, 0]
  log_d1 = np.log(p_pos / (p_pos + m * pn + eps))
  p_neg = x[:, 1:]
  log_d0 = np.log(np.full_like(p_neg, m * pn) / (p_neg + m * pn + eps))
  return -(log_d1.sum() + log_d0.sum()) / bsz


def np_crd(memory_v1, memory_v2, z_v1, z_v2, f_s, f_t, y, idx, t=0.07, momentum=0.5):
  """CRDLoss.forward after the heads: ``(loss, z_v1, z_v2, memory_v1, memory_v2)``."""
  out_s, out_t, z_v1, z_v2, memory_v1, memory_v2 = np_contrast_memory(
      memory_v1, memory_v2, z_v1, z_v2, f_s, f_t, y, idx, t, momentum)
  n_data = memory_v1.shape[0]
  loss = np_contrast_loss(out_s, n_data) + np_contrast_loss(out_t, n_data)
  return loss, z_v1, z_v2, memory_v1, memory_v2


def np_cls_negative(labels, num_classes):
  """CIFAR100InstanceSample's cls_negative: per class, the examples of the others."""
  cls_positive = [[] for _ in range(num_classes)]
  for i, label in enumerate(labels):
    cls_positive[label].append(i)
  cls_negative = [[] for _ in range(num_classes)]
  for i in range(num_classes):
    for j in range(num_classes):
      if j != i:
        cls_negative[i].extend(cls_positive[j])
  return [np.asarray(c) for c in cls_negative]


def np_numerical_grad(f, x, h=1e-6):
  """Central differences of a scalar function of a float64 array."""
  x = np.array(x, np.float64)
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += h
    down[i] -= h
    grad[i] = (f(up) - f(down)) / (2 * h)
  return grad
