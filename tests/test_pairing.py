"""Pairing scores (distill_jax.pairing) against independent NumPy renderings."""

from __future__ import annotations

import numpy as np
import pytest

from distill_jax import pairing


def cka_numpy(x, y):
  """Linear CKA from the N x N Gram matrices (Kornblith et al. 2019, eq. for HSIC with
  the centring matrix H): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
  return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def test_cka_equals_the_gram_form_and_its_invariances():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 12))
  y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(50, 7))
  assert float(pairing.representation_cka(x, y)) == pytest.approx(cka_numpy(x, y), rel=1e-4)
  assert float(pairing.representation_cka(x, x)) == pytest.approx(1.0, rel=1e-5)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  assert float(pairing.representation_cka(x @ q * 3.7, y)) == pytest.approx(
      cka_numpy(x, y), rel=1e-4)
  # Not invariant to an arbitrary invertible map (linear CKA is not CCA).
  a = rng.normal(size=(12, 12)) * np.linspace(0.1, 3, 12)
  assert abs(float(pairing.representation_cka(x @ a, y)) - cka_numpy(x, y)) > 1e-3
  # Independent features: near 0 (bias ~ D / N); a constant side: 0.
  z = rng.normal(size=(2000, 5))
  assert float(pairing.representation_cka(z, rng.normal(size=(2000, 5)))) < 0.01
  assert float(pairing.representation_cka(np.ones((10, 3)), x[:10])) == 0.0
  # (N, H, W, C) arrays are flattened per example.
  assert float(pairing.representation_cka(x.reshape(50, 2, 2, 3), y)) == pytest.approx(
      cka_numpy(x, y), rel=1e-4)


def test_minibatch_cka_is_the_summed_unbiased_hsic():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(96, 6))
  y = np.tanh(x @ rng.normal(size=(6, 4))) + 0.3 * rng.normal(size=(96, 4))

  def hsic1(k, l):  # Song et al. 2012, eq. (5), written out from its definition
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    return (np.trace(k @ l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
            - 2 * (k.sum(0) @ l.sum(1)) / (n - 2)) / (n * (n - 3))

  parts = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
  grams = [(a @ a.T, b @ b.T) for a, b in parts]
  ref = sum(hsic1(k, l) for k, l in grams) / np.sqrt(
      sum(hsic1(k, k) for k, _ in grams) * sum(hsic1(l, l) for _, l in grams))
  assert float(pairing.minibatch_cka(parts)) == pytest.approx(ref, rel=1e-4)
  assert float(pairing.minibatch_cka([(x, x)])) == pytest.approx(1.0, rel=1e-5)
  with pytest.raises(ValueError, match='batches of equal size >= 4'):
    pairing.minibatch_cka([(x[:3], y[:3])])


def test_logit_agreement_and_confidence():
  rng = np.random.default_rng(2)
  t = rng.normal(size=(40, 10)) * 3
  s = t + rng.normal(size=(40, 10))
  same = pairing.logit_agreement(t, t)
  assert float(same['agreement']) == 1.0 and float(same['kl']) == pytest.approx(0.0, abs=1e-6)
  out = pairing.logit_agreement(t, s, temperature=2.0)
  assert float(out['agreement']) == pytest.approx(np.mean(t.argmax(1) == s.argmax(1)))
  p = np.exp(t / 2) / np.exp(t / 2).sum(1, keepdims=True)
  q = np.exp(s / 2) / np.exp(s / 2).sum(1, keepdims=True)
  assert float(out['kl']) == pytest.approx(np.mean(np.sum(p * np.log(p / q), 1)), rel=1e-4)

  labels = rng.integers(0, 10, 40)
  labels[:20] = t[:20].argmax(1)
  probs = np.exp(t) / np.exp(t).sum(1, keepdims=True)
  top, correct = probs.max(1), probs.argmax(1) == labels
  ece = 0.0
  for b in range(15):  # bins (b/15, (b+1)/15]
    inside = (top > b / 15) & (top <= (b + 1) / 15)
    if inside.any():
      ece += inside.mean() * abs(correct[inside].mean() - top[inside].mean())
  conf = pairing.teacher_confidence(t, labels)
  assert float(conf['ece']) == pytest.approx(ece, rel=1e-4)
  assert float(conf['confidence']) == pytest.approx(top.mean(), rel=1e-5)


def test_attention_similarity_of_a_network_with_itself_and_another():
  rng = np.random.default_rng(3)
  points = [rng.normal(size=(6, 8, 8, 4)), rng.normal(size=(6, 4, 4, 8))]
  same = pairing.attention_similarity(points, points)
  assert float(same['at_distance']) == pytest.approx(0.0, abs=1e-7)
  assert float(same['attention_cka']) == pytest.approx(1.0, rel=1e-5)
  other = [rng.normal(size=(6, 8, 8, 16)), rng.normal(size=(6, 4, 4, 2))]
  out = pairing.attention_similarity(points, other)

  def amap(a):  # mean over channels of a², each example's map L2-normalised
    v = (a ** 2).mean(-1).reshape(len(a), -1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)

  # The released AT term: mean over positions of the squared difference of the maps.
  dist = np.mean([np.mean((amap(t) - amap(s)) ** 2, axis=1) for t, s in zip(points, other)])
  assert float(out['at_distance']) == pytest.approx(dist, rel=1e-4)
  cka = np.mean([cka_numpy(amap(t), amap(s)) for t, s in zip(points, other)])
  assert float(out['attention_cka']) == pytest.approx(cka, rel=1e-4)
  with pytest.raises(ValueError, match='same number'):
    pairing.attention_similarity(points, other[:1])


def test_gradient_alignment_of_a_softmax_regression():
  # logits = x W: closed-form gradients X^T (softmax(XW) - Y) / N and, for T^2 KL,
  # T X^T (softmax(XW / T) - softmax(t / T)) / N.
  rng = np.random.default_rng(4)
  x, w = rng.normal(size=(32, 6)), rng.normal(size=(6, 5)) * 0.5
  labels = rng.integers(0, 5, 32)
  t = rng.normal(size=(32, 5)) * 2

  def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  temperature = 3.0
  g_ce = x.T @ (softmax(x @ w) - np.eye(5)[labels]) / 32
  g_kd = temperature * x.T @ (softmax(x @ w / temperature) - softmax(t / temperature)) / 32
  ref = np.sum(g_ce * g_kd) / np.linalg.norm(g_ce) / np.linalg.norm(g_kd)
  logits_fn = lambda params, images: images @ params['w']
  got = pairing.gradient_alignment(logits_fn, {'w': w}, x, labels, t, temperature=temperature)
  assert float(got) == pytest.approx(ref, rel=1e-4)
  # A teacher whose soft labels are the labels, sharply: the two gradients align.
  sharp = 50.0 * np.eye(5)[labels]
  assert float(pairing.gradient_alignment(logits_fn, {'w': w}, x, labels, sharp,
                                          temperature=1.0)) == pytest.approx(1.0, abs=1e-4)
