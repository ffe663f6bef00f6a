"""Threat models: projections, steepest-ascent directions and uniform draws against NumPy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dale_jax import threat

SHAPE = (5, 4, 4, 2)


def _np_norm(v: np.ndarray, norm: str) -> np.ndarray:
  flat = v.reshape(v.shape[0], -1)
  if norm == "l1":
    return np.abs(flat).sum(axis=1)
  return np.abs(flat).max(axis=1) if norm == "linf" else np.sqrt((flat**2).sum(axis=1))


def _np_sparse_sign(g: np.ndarray, share) -> np.ndarray:
  """AutoAttack's L1 step, with a sort: sign(g) where |g| >= sorted |g| at (1 - share) n."""
  flat = g.reshape(len(g), -1).astype(np.float64)
  n = flat.shape[1]
  share = np.broadcast_to(np.asarray(share, np.float32), (len(g),))
  index = np.clip(((1 - share) * n).astype(np.int32), 0, n - 1)
  threshold = np.sort(np.abs(flat), axis=1)[np.arange(len(g)), index]
  s = np.sign(flat) * (np.abs(flat) >= threshold[:, None])
  return (s / (np.abs(s).sum(1, keepdims=True) + 1e-10)).reshape(g.shape)


def _np_project_l1_box(delta, x, eps):
  """The projection onto the L1 ball and the box by a float64 bisection on the shift."""
  d = delta.reshape(len(delta), -1).astype(np.float64)
  x = x.reshape(len(delta), -1).astype(np.float64)
  a, room = np.abs(d), np.where(d >= 0, 1 - x, x)
  out = np.empty_like(d)
  for i in range(len(d)):
    size = lambda lam: np.clip(a[i] - lam, 0, room[i]).sum()  # pylint: disable=cell-var-from-loop
    lo, hi = 0.0, a[i].max()
    if size(0.0) <= eps:
      hi = 0.0
    for _ in range(200):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if size(mid) > eps else (lo, mid)
    out[i] = np.sign(d[i]) * np.clip(a[i] - hi, 0, room[i])
  return out.reshape(delta.shape)


def _np_project(x_adv: np.ndarray, x: np.ndarray, norm: str, eps: float) -> np.ndarray:
  x_adv, x = x_adv.astype(np.float64), x.astype(np.float64)
  d = x_adv - x
  if norm == "linf":
    d = np.clip(d, -eps, eps)
  else:
    n = _np_norm(d, "l2").reshape((-1,) + (1,) * (d.ndim - 1))
    d = np.where(n > eps, d * eps / np.maximum(n, 1e-300), d)
  return np.clip(x + d, 0.0, 1.0)


def _points(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, SHAPE).astype(np.float32)
  x_adv = (x + rng.normal(0, 0.6, SHAPE)).astype(np.float32)
  return x, x_adv


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("linf", 0.0), ("l2", 0.5), ("l2", 3.0)])
def test_project_matches_numpy_and_lands_in_the_threat_model(norm, eps):
  x, x_adv = _points()
  got = np.asarray(threat.project(jnp.asarray(x_adv), jnp.asarray(x), norm=norm, eps=eps))
  np.testing.assert_allclose(got, _np_project(x_adv, x, norm, eps), rtol=0, atol=1e-6)
  assert np.all(_np_norm(got.astype(np.float64) - x, norm) <= eps + 1e-5)
  assert got.min() >= 0.0 and got.max() <= 1.0
  # Projecting twice changes nothing.
  again = np.asarray(threat.project(jnp.asarray(got), jnp.asarray(x), norm=norm, eps=eps))
  np.testing.assert_allclose(again, got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eps", [0.5, 4.0, 12.0, 1e3])
def test_l1_projection_matches_a_float64_bisection(eps):
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (12, 28, 28, 1)).astype(np.float32)
  x[:, :4] = 0.0  # pixels on the box's face
  x[:, 4:6] = 1.0
  delta = rng.normal(0, 0.3, x.shape).astype(np.float32)
  delta[0] = 0.0
  got = np.asarray(threat.project_l1_box(jnp.asarray(delta), jnp.asarray(x), eps), np.float64)
  want = _np_project_l1_box(delta, x, eps)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)
  assert np.all(_np_norm(got, "l1") <= eps * (1 + 1e-6))
  assert np.all(x + got >= -1e-7) and np.all(x + got <= 1 + 1e-7)
  full = threat.project(jnp.asarray(x + delta), jnp.asarray(x), norm="l1", eps=eps)
  assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0


def test_sparse_sign_matches_the_sorted_reference():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(64, 28, 28, 1)).astype(np.float32)
  g[:, :2] = 0.0
  g[1] = 0.0
  g[2, :, :, 0] = 1.0  # all ties
  share = rng.uniform(0, 1, 64).astype(np.float32)
  share[:4] = [0.0, 1.0, 0.2, 1.0]
  got = np.asarray(threat.sparse_sign(jnp.asarray(g), jnp.asarray(share)))
  np.testing.assert_allclose(got, _np_sparse_sign(g, share), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_uniform_l1_draws_fill_the_ball():
  x = jnp.full((4000, 3, 1, 1), 0.5, jnp.float32)
  eps, dim = 0.3, 3
  d = np.asarray(threat.uniform(jax.random.key(0), x, norm="l1", eps=eps), np.float64) - 0.5
  n = _np_norm(d, "l1")
  assert np.all(n <= eps + 1e-6)
  # Uniform in the ball: P(||d||_1 <= r) = (r / eps)^3, so E||d||_1 = 3/4 eps, and the
  # inner half-radius ball holds 1/8 of the draws; signs are symmetric.
  np.testing.assert_allclose(np.mean(n / eps), dim / (dim + 1), atol=0.01)
  np.testing.assert_allclose(np.mean(n < eps / 2), 1 / 8, atol=0.015)
  assert abs(np.mean(d > 0) - np.mean(d < 0)) < 0.03


def test_project_keeps_admissible_points():
  x, _ = _points()
  rng = np.random.default_rng(3)
  inside = np.clip(x + rng.uniform(-0.05, 0.05, SHAPE), 0, 1).astype(np.float32)
  for norm, eps in (("linf", 0.05), ("l2", 10.0)):
    got = threat.project(jnp.asarray(inside), jnp.asarray(x), norm=norm, eps=eps)
    # x + (x' - x) may differ from x' by one rounding.
    np.testing.assert_allclose(np.asarray(got), inside, rtol=0, atol=1e-7)


@pytest.mark.parametrize("norm", threat.NORMS)
def test_steepest_ascent_is_the_dual_norm_direction(norm):
  rng = np.random.default_rng(0)
  g = rng.normal(size=SHAPE).astype(np.float32)
  g[1] = 0.0  # an example with zero gradient must not move (and must not be NaN)
  got = np.asarray(threat.steepest_ascent(jnp.asarray(g), norm), np.float64)
  if norm == "linf":
    want = np.sign(g)
  elif norm == "l1":
    want = _np_sparse_sign(g, threat.L1_STEP_SHARE)
  else:
    n = _np_norm(g.astype(np.float64), "l2").reshape(-1, 1, 1, 1)
    want = np.where(n > 0, g / np.where(n > 0, n, 1.0), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # Unit norm of the right kind, and a direction of ascent: <g, s> = ||g||_dual (for l1
  # with 1% of 32 coordinates the step moves the largest |g| only, the exact L1 ascent).
  norms = _np_norm(got, norm)
  np.testing.assert_allclose(np.delete(norms, 1), 1.0, rtol=1e-6)
  flat = np.abs(g).reshape(len(g), -1)
  dual = {"linf": flat.sum(1), "l1": flat.max(1), "l2": _np_norm(g, "l2")}[norm]
  np.testing.assert_allclose((got * g).reshape(len(g), -1).sum(1), dual, rtol=1e-5)


@pytest.mark.parametrize("norm", threat.NORMS)
def test_per_example_norm_matches_numpy(norm):
  _, v = _points()
  np.testing.assert_allclose(np.asarray(threat.per_example_norm(jnp.asarray(v), norm)),
                             _np_norm(v.astype(np.float64), norm), rtol=1e-6)


def test_l2_norm_gradient_is_zero_at_zero_and_exact_elsewhere():
  _, v = _points()
  v = v.copy()
  v[1] = 0.0  # a perturbation that has not moved: sqrt's gradient would be NaN here
  grad = np.asarray(jax.grad(lambda z: jnp.sum(threat.per_example_norm(z, "l2")))(jnp.asarray(v)))
  assert np.isfinite(grad).all()
  np.testing.assert_allclose(grad[1], 0.0, atol=0)
  v64 = np.delete(v, 1, axis=0).astype(np.float64)
  norms = _np_norm(v64, "l2").reshape((-1,) + (1,) * (v.ndim - 1))
  np.testing.assert_allclose(np.delete(grad, 1, axis=0), v64 / norms, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 0.5)])
def test_uniform_draws_fill_the_ball(norm, eps):
  # Centre 0.5 with small eps would never clip; here eps is large enough to clip at the
  # box faces, so check the box, the ball, and the statistics of an unclipped centre.
  x = jnp.full((2000, 3, 3, 1), 0.5, jnp.float32)
  d = np.asarray(threat.uniform(jax.random.key(0), x, norm=norm, eps=eps), np.float64) - 0.5
  n = _np_norm(d, norm)
  assert np.all(n <= eps + 1e-6)
  assert np.all(np.abs(d) <= 0.5)
  dim = 9
  if norm == "linf":
    flat = d.ravel()
    # U(-0.3, 0.3): mean 0, variance eps^2 / 3, quartiles at +-eps/2.
    assert abs(flat.mean()) < 0.01
    assert abs(flat.var() - eps**2 / 3) < 0.003
    np.testing.assert_allclose(np.quantile(flat, [0.25, 0.75]), [-eps / 2, eps / 2], atol=0.01)
  else:
    # Uniform in the 9-dimensional ball (the clip at 0.5 from the centre almost never
    # acts for eps = 0.5): P(||d|| <= r) = (r / eps)^9, so E||d|| = 9/10 eps; direction isotropic.
    unclipped = np.all(np.abs(d) < 0.5 - 1e-6, axis=(1, 2, 3))
    assert unclipped.mean() > 0.95
    np.testing.assert_allclose(np.mean(n[unclipped] / eps), dim / (dim + 1), atol=0.02)
    assert abs(d[unclipped].mean()) < 0.02


def test_uniform_is_deterministic_per_key_and_stays_in_the_box():
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, SHAPE), jnp.float32)
  a = threat.uniform(jax.random.key(1), x, norm="linf", eps=0.5)
  b = threat.uniform(jax.random.key(1), x, norm="linf", eps=0.5)
  c = threat.uniform(jax.random.key(2), x, norm="linf", eps=0.5)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


@pytest.mark.parametrize("norm,eps,field", [
    ("l0", 0.1, "norm"), ("Linf", 0.1, "norm"), ("linf", -0.1, "eps"),
    ("l2", math.nan, "eps"), ("l2", math.inf, "eps"), ("linf", "0.3", "eps"),
])
def test_bad_threat_models_are_rejected_by_name(norm, eps, field):
  with pytest.raises(ValueError, match=field):
    threat.check_threat(norm, eps)
  with pytest.raises(ValueError, match=field):
    threat.uniform(jax.random.key(0), jnp.zeros((1, 2)), norm=norm, eps=eps)


def test_numpy_scalar_eps_is_a_threat_model():
  threat.check_threat("linf", np.float32(0.3))
  threat.check_threat("l2", np.int64(1))
