"""Randomised models: EOT gradients against float64 NumPy, and AutoAttack's ``rand`` version."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dale_jax import attacks
from dale_jax.attacks import autopgd

N_CLASSES = 10
DIM = 12


def _linear_problem(seed=0, n=5):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((DIM, N_CLASSES)).astype(np.float32)
  x = rng.uniform(0, 1, (n, 2, 2, 3)).astype(np.float32)
  y = rng.integers(0, N_CLASSES, n).astype(np.int32)
  return w, x, y


def _noisy_linear(w, scale):
  """``logits = flat(x) W + scale * noise(key)``: additive Gaussian noise on the logits."""

  def fn(x, key):
    noise = jax.random.normal(key, (x.shape[0], N_CLASSES))
    return x.reshape(x.shape[0], -1) @ w + scale * noise

  return fn


def _ce_grad_numpy(w, x, y, noise):
  """Gradient of sum_i CE(flat(x_i) W + noise_i, y_i) w.r.t. x in float64."""
  w = w.astype(np.float64)
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  z = flat @ w + noise.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return (p @ w.T).reshape(x.shape)


def test_eot_gradient_is_the_mean_over_the_draws():
  w, x, y = _linear_problem()
  fn = _noisy_linear(w, 2.0)
  model = attacks.Randomized(fn, jax.random.key(3))
  loss_fn = lambda z, yy, t: optax.softmax_cross_entropy_with_integer_labels(z, yy)
  eot, query = 7, 4
  logits, loss, grad = jax.jit(
      lambda m, xa: autopgd.eot_loss_and_grad(m, loss_fn, xa, y, y, query=query, eot_iter=eot)
  )(model, x)
  draws = [np.asarray(jax.random.normal(model.redraw(query * eot + d).key, (len(y), N_CLASSES)))
           for d in range(eot)]
  expected = np.mean([_ce_grad_numpy(w, x, y, 2.0 * nz) for nz in draws], axis=0)
  np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-5, rtol=1e-4)
  # The logits are those of the last draw; one draw alone has another gradient.
  last = x.reshape(len(y), -1).astype(np.float64) @ w + 2.0 * draws[-1]
  np.testing.assert_allclose(np.asarray(logits), last, atol=1e-4)
  assert np.abs(_ce_grad_numpy(w, x, y, 2.0 * draws[0]) - expected).max() > 1e-2
  # A deterministic model is queried once: eot_iter changes nothing.
  plain = jax.tree_util.Partial(lambda xa: fn(xa, jax.random.key(0)))
  g1 = autopgd.eot_loss_and_grad(plain, loss_fn, x, y, y, query=0, eot_iter=1)[2]
  g20 = autopgd.eot_loss_and_grad(plain, loss_fn, x, y, y, query=5, eot_iter=20)[2]
  np.testing.assert_array_equal(np.asarray(g1), np.asarray(g20))


@pytest.mark.slow
def test_rand_version_on_a_randomised_model():
  w, x, y = _linear_problem(n=40)
  x = x * 0.5
  fn = _noisy_linear(w, 0.5)
  kw = dict(norm="linf", eps=0.05, batch_size=16, seed=0, randomized=True)
  out = attacks.evaluate_robustness(fn, x, y, attacks=("clean",), version="rand", **kw)
  assert out["ensemble"] == "AutoAttack (rand)"
  assert list(out["per_attack"]) == ["clean", "apgd-ce", "apgd-dlr"]
  for name in ("apgd-ce", "apgd-dlr"):
    assert out["attack_settings"][name]["eot_iter"] == 20
    assert out["attack_settings"][name]["restarts"] == 1
  assert out["randomized"] and not any("randomised" in w_ for w_ in out["warnings"])
  again = attacks.evaluate_robustness(fn, x, y, attacks=("clean",), version="rand", **kw)
  assert again["per_attack"] == out["per_attack"]  # every draw comes from the seed
  standard = attacks.evaluate_robustness(
      fn, x, y, attacks=("clean",), version="standard", norm="linf", eps=0.05, batch_size=16,
      randomized=True, settings={"apgd-ce": {"steps": 5}, "apgd-t": {"steps": 5},
                                 "fab-t": {"steps": 5}, "square": {"n_queries": 20}})
  assert any("version='rand'" in w_ for w_ in standard["warnings"])


def test_rand_version_on_a_deterministic_model_is_apgd_ce_and_dlr(tiny):
  x = jnp.concatenate([tiny.x] * 4)
  y = jnp.concatenate([tiny.y] * 4)
  steps = {"apgd-ce": {"steps": 8}, "apgd-dlr": {"steps": 8}}
  rand = attacks.evaluate_robustness(tiny.logits_fn, x, y, attacks=("clean",), version="rand",
                                     norm="linf", eps=0.05, settings=steps)
  custom = attacks.evaluate_robustness(tiny.logits_fn, x, y, attacks=("clean", "apgd-ce",
                                                                      "apgd-dlr"),
                                       norm="linf", eps=0.05, settings=steps)
  assert rand["per_attack"] == custom["per_attack"]
  assert any("deterministic model" in w_ for w_ in rand["warnings"])


def test_randomized_checks_its_function():
  with pytest.raises(TypeError, match="fn"):
    attacks.Randomized(3, jax.random.key(0))
  with pytest.raises(ValueError, match="eot_iter"):
    w, x, y = _linear_problem()
    attacks.apgd(jax.random.key(0), attacks.Randomized(_noisy_linear(w, 1.0), jax.random.key(0)), x,
                 y, norm="linf", eps=0.1, eot_iter=0)
