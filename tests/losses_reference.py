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
