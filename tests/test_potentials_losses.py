"""Potentials and training losses against float64 NumPy formulas written out here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require
from dale_jax import losses
from dale_jax import potentials

B, C = 6, 10


def _logits(seed=0, scale=3.0, batch=B):
  return (scale * np.random.default_rng(seed).normal(size=(batch, C))).astype(np.float32)


def _labels(seed=0, batch=B):
  return np.random.default_rng(seed + 100).integers(0, C, batch).astype(np.int32)


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_ce(z, y):
  p = _np_softmax(z)
  return -np.log(p[np.arange(len(y)), y])


def _np_kl(p, q):
  """KL(p || q) per row, 0 log 0 = 0."""
  return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0), -1)


# ----------------------------------------------------------------------------
# Potentials.


def test_cross_entropy_matches_numpy():
  z, y = _logits(), _labels()
  np.testing.assert_allclose(potentials.cross_entropy(z, y), _np_ce(z, y), rtol=1e-5, atol=1e-6)


def test_log_one_minus_p_matches_numpy():
  z, y = _logits(), _labels()
  p = _np_softmax(z)
  # 1 - p_y summed over the other classes, so that the reference has no cancellation.
  want = np.log(np.sum(np.where(np.eye(C)[y] > 0, 0.0, p), -1))
  np.testing.assert_allclose(potentials.log_one_minus_p(z, y), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gap", [20.0, 40.0, 80.0])
def test_log_one_minus_p_is_finite_when_p_y_rounds_to_one(gap):
  z = _logits(1, scale=1.0)
  y = _labels(1)
  z[np.arange(B), y] += gap
  assert np.all(np.asarray(jax.nn.softmax(jnp.asarray(z)))[np.arange(B), y] == 1.0)
  naive = jnp.log(1.0 - jax.nn.softmax(jnp.asarray(z))[jnp.arange(B), y])
  assert np.all(np.isneginf(np.asarray(naive)))  # the case that matters
  z64 = z.astype(np.float64)
  others = np.where(np.eye(C)[y] > 0, -np.inf, z64)
  m = z64.max(-1)
  want = np.log(np.exp(others - m[:, None]).sum(-1)) - np.log(np.exp(z64 - m[:, None]).sum(-1))
  got = potentials.log_one_minus_p(jnp.asarray(z), jnp.asarray(y))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = jax.grad(lambda z: potentials.log_one_minus_p(z, jnp.asarray(y)).sum())(jnp.asarray(z))
  assert np.all(np.isfinite(np.asarray(grad)))
  # d/dz log(1 - p_y) = q - p with q the softmax over the other classes (q_y = 0).
  p = _np_softmax(z64)
  q = np.where(np.eye(C)[y] > 0, 0.0, _np_softmax(others))
  np.testing.assert_allclose(grad, q - p, atol=1e-6)


def test_log_one_minus_p_of_low_precision_logits_is_float32():
  z, y = _logits(), _labels()
  got = potentials.log_one_minus_p(jnp.asarray(z, jnp.bfloat16), jnp.asarray(y))
  assert got.dtype == jnp.float32
  want = potentials.log_one_minus_p(jnp.asarray(z, jnp.bfloat16).astype(jnp.float32), y)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_kl_to_clean_matches_numpy():
  z, clean = _logits(0), _logits(1)
  got = potentials.kl_to_clean(z, clean)
  np.testing.assert_allclose(got, _np_kl(_np_softmax(clean), _np_softmax(z)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(potentials.kl_to_clean(clean, clean), 0.0, atol=1e-6)
  assert np.all(np.asarray(got) > 0)


def test_kl_to_clean_with_saturated_clean_probabilities():
  # p_clean has exact zeros in float32: 0 * log 0 must count as 0, not NaN.
  clean = np.zeros((2, C), np.float32)
  clean[:, 0] = 200.0
  z = _logits(2, batch=2)
  got = np.asarray(potentials.kl_to_clean(jnp.asarray(z), jnp.asarray(clean)))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, -np.log(_np_softmax(z)[:, 0]), rtol=1e-5)


def test_margin_matches_numpy():
  z, y = _logits(), _labels()
  z64 = z.astype(np.float64)
  z_y = z64[np.arange(B), y]
  z_other = np.where(np.eye(C)[y] > 0, -np.inf, z64).max(-1)
  np.testing.assert_allclose(potentials.margin(z, y), z_other - z_y, rtol=1e-6)
  assert np.all((np.asarray(potentials.margin(z, y)) > 0) == (z.argmax(-1) != y))


def test_potentials_are_per_example_and_registered():
  z, y = _logits(), _labels()
  for name, fn in potentials.POTENTIALS.items():
    out = fn(z, z if name == "kl_to_clean" else y)
    assert out.shape == (B,), name
  assert set(potentials.POTENTIALS) == {"cross_entropy", "log_one_minus_p", "margin",
                                        "kl_to_clean"}


# ----------------------------------------------------------------------------
# Losses of the advbench algorithms.


def test_mean_cross_entropy():
  z, y = _logits(), _labels()
  np.testing.assert_allclose(losses.cross_entropy(z, y), _np_ce(z, y).mean(), rtol=1e-5)


def test_trades_losses_match_numpy():
  clean, adv, y = _logits(0), _logits(1), _labels()
  kl = _np_kl(_np_softmax(clean), _np_softmax(adv)).mean()  # KLDivLoss(batchmean)
  np.testing.assert_allclose(losses.trades_kl(clean, adv), kl, rtol=1e-5)
  np.testing.assert_allclose(losses.trades(clean, adv, y, 6.0), _np_ce(clean, y).mean() + 6.0 * kl,
                             rtol=1e-5)


def test_logit_pairing_matches_numpy():
  clean, adv = _logits(0), _logits(1)
  want = np.mean(np.linalg.norm(adv.astype(np.float64) - clean, axis=-1))
  np.testing.assert_allclose(losses.logit_pairing(clean, adv), want, rtol=1e-5)
  np.testing.assert_allclose(losses.logit_pairing(clean, clean), 0.0, atol=0)


def _np_pairing_grad(clean, adv):
  """float64 gradient of ``mean_i ||adv_i - clean_i||`` w.r.t. ``adv``: ``d_i / (B ||d_i||)``,
  and 0 (torch.norm's subgradient) for a row with ``d_i = 0``."""
  d = np.asarray(adv, np.float64) - np.asarray(clean, np.float64)
  n = np.linalg.norm(d, axis=-1, keepdims=True)
  return np.where(n > 0, d / np.where(n > 0, n, 1.0), 0.0) / len(d)


def test_logit_pairing_gradient_is_zero_where_the_logits_agree_and_exact_near_it():
  clean = _logits(0)
  adv = _logits(1)
  adv[0] = clean[0]                      # equal rows: the subgradient 0
  adv[1] = clean[1] + 1e-6 * (np.arange(C) - 4.5)  # a difference near zero
  grad = np.asarray(jax.grad(losses.logit_pairing, argnums=1)(clean, adv))
  assert np.isfinite(grad).all()
  np.testing.assert_allclose(grad[0], 0.0, atol=0)
  np.testing.assert_allclose(grad, _np_pairing_grad(clean, adv), rtol=2e-3, atol=1e-7)
  # One equal row no longer poisons the gradient of every other row.
  np.testing.assert_allclose(grad[2:], _np_pairing_grad(clean, adv)[2:], rtol=1e-5, atol=1e-8)


@pytest.mark.torch
def test_logit_pairing_value_and_gradient_equal_torch_norm_autograd():
  torch = require("torch")
  clean = _logits(0)
  adv = _logits(1)
  adv[[0, 3]] = clean[[0, 3]]
  t_adv = torch.tensor(adv, requires_grad=True)
  value = torch.norm(t_adv - torch.tensor(clean), dim=1).mean()
  value.backward()
  np.testing.assert_allclose(losses.logit_pairing(clean, adv), value.item(), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(losses.logit_pairing, argnums=1)(clean, adv),
                             t_adv.grad.numpy(), rtol=1e-5, atol=1e-8)


def _np_mart(logits, logits_adv, y, beta):
  """MART's loss as its reference code (YisenWang/MART, train_wideresnet.py) writes it."""
  n = len(y)
  adv_probs = _np_softmax(logits_adv)
  tmp1 = np.argsort(adv_probs, axis=1)[:, -2:]
  new_y = np.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
  loss_adv = _np_ce(logits_adv, y).mean() + np.mean(
      -np.log(1.0001 - adv_probs[np.arange(n), new_y] + 1e-12))
  nat_probs = _np_softmax(logits)
  true_probs = nat_probs[np.arange(n), y]
  # nn.KLDivLoss(reduction='none')(log(adv_probs + 1e-12), nat_probs)
  kl = np.sum(nat_probs * (np.log(nat_probs) - np.log(adv_probs + 1e-12)), axis=1)
  loss_robust = (1.0 / n) * np.sum(kl * (1.0000001 - true_probs))
  return loss_adv + float(beta) * loss_robust


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mart_matches_the_reference_formula(seed):
  clean, adv, y = _logits(seed), _logits(seed + 10), _labels(seed)
  adv[0, y[0]] += 20.0  # an example whose top adversarial class is the label
  np.testing.assert_allclose(losses.mart(clean, adv, y, 5.0), _np_mart(clean, adv, y, 5.0),
                             rtol=1e-5)


def _np_tilted(l, t):
  """(1/t) log(mean exp(t l) + 1e-6), shifted by max(t l) so float64 does not overflow."""
  tl = t * np.asarray(l, np.float64)
  m = tl.max()
  return (m + np.log(np.mean(np.exp(tl - m)) + 1e-6 * np.exp(-m))) / t


@pytest.mark.parametrize("t", [0.5, 2.0, -1.0])
def test_tilted_matches_numpy(t):
  l = np.abs(_logits(3)[:, 0])
  naive = np.log(np.mean(np.exp(t * l.astype(np.float64))) + 1e-6) / t
  np.testing.assert_allclose(losses.tilted(jnp.asarray(l), t), naive, rtol=1e-5)


def test_tilted_does_not_overflow_for_large_t_times_loss():
  l = np.array([50.0, 80.0, 100.0, 3.0], np.float32)
  t = 10.0  # exp(1000) overflows even float64
  got = float(losses.tilted(jnp.asarray(l), t))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, _np_tilted(l, t), rtol=1e-6)
  np.testing.assert_allclose(got, 100.0 + np.log(0.25) / t, rtol=1e-5)  # -> max as t grows
  grad = jax.grad(lambda l: losses.tilted(l, t))(jnp.asarray(l))
  assert np.all(np.isfinite(np.asarray(grad)))


def _np_cvar(l, t, beta):
  l, t = np.asarray(l, np.float64), np.asarray(t, np.float64)
  return np.mean(t + np.mean(np.maximum(l - t, 0.0), axis=0) / beta)


def _cvar_problem(m_draws=7, batch=5, seed=0):
  rng = np.random.default_rng(seed)
  l = rng.exponential(1.0, (m_draws, batch)).astype(np.float32)
  t = rng.uniform(0.2, 2.0, batch).astype(np.float32)
  return l, t


def test_cvar_and_its_t_subgradient_match_numpy():
  l, t = _cvar_problem()
  beta = 0.3
  np.testing.assert_allclose(losses.cvar(l, t, beta), _np_cvar(l, t, beta), rtol=1e-5)
  want = 1.0 - np.mean(l > t, axis=0) / beta
  np.testing.assert_allclose(losses.cvar_t_subgradient(l, t, beta), want, rtol=1e-6)
  # Away from ties it is the gradient of the per-example bracket (m times the batch mean).
  grad = jax.grad(lambda t: l.shape[1] * losses.cvar(l, t, beta))(jnp.asarray(t))
  np.testing.assert_allclose(grad, want, rtol=1e-5)


def _np_optimize_t(l, beta, step, steps, t_init=1.0):
  t = np.full(l.shape[1], t_init, np.float64)
  for _ in range(steps):
    t = t - step * (1.0 - np.mean(l > t, axis=0) / beta)
  return t


@pytest.mark.parametrize("method", ["subgradient", "autograd"])
def test_optimize_cvar_t_matches_numpy(method):
  l, _ = _cvar_problem(m_draws=20)
  got = losses.optimize_cvar_t(jnp.asarray(l), 0.5, 1.0, 5, method=method)
  np.testing.assert_allclose(got, _np_optimize_t(l, 0.5, 1.0, 5), rtol=1e-6)


def test_optimize_cvar_t_converges_to_the_value_at_risk():
  # Minimisers of t + E[(l - t)_+] / beta are the (1 - beta)-quantiles of l (Rockafellar &
  # Uryasev); many small steps must end within a step or two of one.
  rng = np.random.default_rng(4)
  m_draws, beta, step = 400, 0.1, 0.002
  l = rng.uniform(0.0, 5.0, (m_draws, 3)).astype(np.float32)
  l[:, 1] = rng.exponential(1.0, m_draws)
  l[:, 2] = rng.normal(3.0, 0.5, m_draws)
  t_sub = np.asarray(losses.optimize_cvar_t(jnp.asarray(l), beta, step, 5000))
  t_auto = np.asarray(losses.optimize_cvar_t(jnp.asarray(l), beta, step, 5000,
                                             method="autograd"))
  np.testing.assert_allclose(t_sub, t_auto, atol=1e-5)
  srt = np.sort(l.astype(np.float64), axis=0)
  k = int(round(m_draws * (1 - beta)))
  lo, hi = srt[k - 2], srt[k + 1]  # the (1 - beta)-quantile lies in [srt[k-1], srt[k]]
  tol = step / beta + 1e-4  # one up-step or one down-step of the subgradient method
  assert np.all(t_sub >= lo - tol) and np.all(t_sub <= hi + tol), (
      t_sub, np.quantile(l, 1 - beta, axis=0))
  np.testing.assert_allclose(t_sub, np.quantile(l, 1 - beta, axis=0), atol=0.1)
  # And the CVaR there is the mean of the top beta fraction of the losses.
  top = srt[k:].mean(axis=0)
  np.testing.assert_allclose(
      [float(losses.cvar(l[:, i:i + 1], t_sub[i:i + 1], beta)) for i in range(3)], top,
      rtol=2e-3)


def test_optimize_cvar_t_rejects_unknown_methods():
  with pytest.raises(ValueError, match="method"):
    losses.optimize_cvar_t(jnp.ones((3, 2)), 0.5, 1.0, 5, method="newton")
