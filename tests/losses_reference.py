"""NumPy references and test data shared by the tests of distill_jax.losses.

The references are float64 and written independently of the implementation.
"""

import jax.numpy as jnp
import numpy as np


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_ce(logits, labels):
  lsm = np_log_softmax(logits)
  return -np.mean(lsm[np.arange(len(labels)), labels])


def np_soft_kl(s, t, temperature):
  log_q = np_log_softmax(np.asarray(s, np.float64) / temperature)
  log_p = np_log_softmax(np.asarray(t, np.float64) / temperature)
  return np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))


def np_kd(s, t, labels, alpha, temperature):
  return ((1 - alpha) * np_ce(s, labels)
          + alpha * temperature**2 * np_soft_kl(s, t, temperature))


def np_ce_per_example(logits, labels):
  lsm = np_log_softmax(logits)
  return -lsm[np.arange(len(labels)), labels]


def np_soft_kl_per_example(s, t, temperature):
  log_q = np_log_softmax(np.asarray(s, np.float64) / temperature)
  log_p = np_log_softmax(np.asarray(t, np.float64) / temperature)
  return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def np_kd_per_example(s, t, labels, alpha, temperature):
  return ((1 - alpha) * np_ce_per_example(s, labels)
          + alpha * temperature**2 * np_soft_kl_per_example(s, t, temperature))


def np_attention_map(a, p=2):
  a = np.asarray(a, np.float64)
  v = (np.abs(a)**p).mean(axis=-1).reshape(a.shape[0], -1)
  norm = np.sqrt((v**2).sum(axis=-1, keepdims=True))
  return v / np.maximum(norm, 1e-12)


def np_avg_pool(a, height, width):
  n, h, w, c = a.shape
  return a.reshape(n, height, h // height, width, w // width, c).mean(axis=(2, 4))


def np_at_layers(student, teacher, form='released', p=2):
  out = []
  for s, t in zip(student, teacher):
    d = np_attention_map(s, p) - np_attention_map(t, p)
    if form == 'released':
      out.append(np.mean(d**2))
    else:
      out.append(np.mean(np.sqrt((d**2).sum(axis=-1))))
  return out


def np_at_layers_per_example(student, teacher, form='released', p=2):
  """One (N,) array per layer; the larger activation is average-pooled first."""
  out = []
  for s, t in zip(student, teacher):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    h, w = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
    d = np_attention_map(np_avg_pool(s, h, w), p) - np_attention_map(np_avg_pool(t, h, w), p)
    if form == 'released':
      out.append((d**2).mean(axis=-1))
    else:
      out.append(np.sqrt((d**2).sum(axis=-1)))
  return out


def _randn(seed, shape, scale=1.0):
  return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _labels(seed, n, k):
  return np.random.default_rng(seed).integers(0, k, size=n).astype(np.int32)


def _f64(x):
  return jnp.asarray(x, jnp.float64)


# ----------------------------------------------------------------------------
# The distillation zoo (tests/test_losses_zoo.py): float64 NumPy renderings of
# the authors' PyTorch releases, step by step and in their layout (feature maps
# NCHW, so the tests feed them the NHWC test data transposed).
# ----------------------------------------------------------------------------


def np_nchw(x):
  """NHWC test data as the releases see it: NCHW, float64."""
  return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


def np_torch_normalize(x, axis, eps=1e-12):
  """torch.nn.functional.normalize(x, p=2, dim=axis)."""
  norm = np.sqrt((x**2).sum(axis=axis, keepdims=True))
  return x / np.maximum(norm, eps)


def np_adaptive_avg_pool2d(x, out_h, out_w):
  """torch.nn.functional.adaptive_avg_pool2d on NCHW, with PyTorch's bins."""
  _, _, h, w = x.shape
  out = np.empty(x.shape[:2] + (out_h, out_w))
  for i in range(out_h):
    h0, h1 = (i * h) // out_h, -(-((i + 1) * h) // out_h)
    for j in range(out_w):
      w0, w1 = (j * w) // out_w, -(-((j + 1) * w) // out_w)
      out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
  return out


def np_smooth_l1_mean(a, b):
  d = np.abs(a - b)
  return np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_kl_div_sum(log_input, target):
  """torch.nn.functional.kl_div(log_input, target, reduction='sum')."""
  safe = np.where(target > 0, target, 1.0)
  return np.sum(np.where(target > 0, target * (np.log(safe) - log_input), 0.0))


def np_sp(g_s, g_t):
  """RepDistiller SP.py, the per-layer terms summed (the training loop's sum)."""
  total = 0.0
  for f_s, f_t in zip(g_s, g_t):
    b = f_s.shape[0]
    f_s, f_t = f_s.reshape(b, -1), f_t.reshape(b, -1)
    g_s_ = np_torch_normalize(f_s @ f_s.T, axis=1)
    g_t_ = np_torch_normalize(f_t @ f_t.T, axis=1)
    total += ((g_t_ - g_s_)**2).sum() / (b * b)
  return total


def _np_pdist(e, eps=1e-12):
  sq = (e**2).sum(axis=1)
  res = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * e @ e.T, eps))
  res[np.arange(len(e)), np.arange(len(e))] = 0
  return res


def np_rkd(f_s, f_t, w_d=25.0, w_a=50.0):
  """RepDistiller RKD.py (RKDLoss)."""
  s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1)
  t_d = _np_pdist(t)
  t_d = t_d / t_d[t_d > 0].mean()
  d = _np_pdist(s)
  d = d / d[d > 0].mean()
  loss_d = np_smooth_l1_mean(d, t_d)

  def angles(e):
    diff = np_torch_normalize(e[None, :, :] - e[:, None, :], axis=2)
    return np.matmul(diff, diff.transpose(0, 2, 1)).reshape(-1)

  loss_a = np_smooth_l1_mean(angles(s), angles(t))
  return w_d * loss_d + w_a * loss_a


def np_pkt(f_s, f_t, eps=1e-7):
  """RepDistiller PKT.py (cosine_similarity_loss)."""
  def density(x):
    x = x / (np.sqrt((x**2).sum(axis=1, keepdims=True)) + eps)
    x[x != x] = 0
    sim = (x @ x.T + 1.0) / 2.0
    return sim / sim.sum(axis=1, keepdims=True)
  p_s, p_t = density(np.array(f_s)), density(np.array(f_t))
  return np.mean(p_t * np.log((p_t + eps) / (p_s + eps)))


def np_nst(g_s, g_t):
  """RepDistiller NST.py (NSTLoss, full_loss), the layer terms summed."""
  def poly_kernel(a, b):
    return ((a[:, None] * b[:, :, None]).sum(-1))**2

  total = 0.0
  for f_s, f_t in zip(g_s, g_t):
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
      f_s = np_adaptive_avg_pool2d(f_s, t_h, t_h)
    elif s_h < t_h:
      f_t = np_adaptive_avg_pool2d(f_t, s_h, s_h)
    f_s = np_torch_normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), axis=2)
    f_t = np_torch_normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), axis=2)
    total += (poly_kernel(f_t, f_t).mean() + poly_kernel(f_s, f_s).mean()
              - 2 * poly_kernel(f_s, f_t).mean())
  return total


def np_cc(f_s, f_t):
  """RepDistiller CC.py (Correlation)."""
  delta = np.abs(f_s - f_t)
  return np.mean((delta[:-1] * delta[1:]).sum(1))


def np_fsp(g_s, g_t):
  """RepDistiller FSP.py, the pair terms summed (as its init stage does)."""
  def fsp_matrices(g):
    out = []
    for i in range(len(g) - 1):
      bot, top = g[i], g[i + 1]
      b_h, t_h = bot.shape[2], top.shape[2]
      if b_h > t_h:
        bot = np_adaptive_avg_pool2d(bot, t_h, t_h)
      elif b_h < t_h:
        top = np_adaptive_avg_pool2d(top, b_h, b_h)
      bot = bot[:, None]
      top = top[:, :, None]
      bot = bot.reshape(bot.shape[0], bot.shape[1], bot.shape[2], -1)
      top = top.reshape(top.shape[0], top.shape[1], top.shape[2], -1)
      out.append((bot * top).mean(-1))
    return out
  return sum(((s - t)**2).mean() for s, t in zip(fsp_matrices(g_s), fsp_matrices(g_t)))


def np_fitnet(f_s, f_t):
  """RepDistiller FitNet.py (HintLoss: nn.MSELoss)."""
  return np.mean((np.asarray(f_s, np.float64) - f_t)**2)


def np_dkd(logits_s, logits_t, target, alpha=1.0, beta=8.0, temperature=4.0):
  """mdistiller DKD.py (dkd_loss)."""
  logits_s = np.asarray(logits_s, np.float64)
  logits_t = np.asarray(logits_t, np.float64)
  gt = np.zeros_like(logits_s, bool)
  gt[np.arange(len(target)), target] = True
  other = ~gt

  def cat_mask(p):
    return np.stack([(p * gt).sum(1), (p * other).sum(1)], axis=1)

  pred_s = cat_mask(np_softmax(logits_s / temperature))
  pred_t = cat_mask(np_softmax(logits_t / temperature))
  tckd = np_kl_div_sum(np.log(pred_s), pred_t) * temperature**2 / len(target)
  pred_t2 = np_softmax(logits_t / temperature - 1000.0 * gt)
  log_pred_s2 = np_log_softmax(logits_s / temperature - 1000.0 * gt)
  nckd = np_kl_div_sum(log_pred_s2, pred_t2) * temperature**2 / len(target)
  return alpha * tckd + beta * nckd


def np_dist(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0):
  """hunto/image_classification_sota lib/models/losses/dist_kd.py (DIST)."""
  def cosine(a, b, eps=1e-8):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + eps)

  def pearson(a, b):
    return cosine(a - a.mean(1)[:, None], b - b.mean(1)[:, None])

  def inter(y_s, y_t):
    return 1 - pearson(y_s, y_t).mean()

  y_s = np_softmax(np.asarray(z_s, np.float64) / tau)
  y_t = np_softmax(np.asarray(z_t, np.float64) / tau)
  return beta * tau**2 * inter(y_s, y_t) + gamma * tau**2 * inter(y_s.T, y_t.T)
