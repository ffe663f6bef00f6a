"""Perturbation sets beyond Lp balls: warps against SciPy, the sets' invariants, the
samplers over their parameters, and the grid and worst-of-k evaluators.

The toy model: a linear intensity ramp rotated by ``theta`` is again a ramp, and
bilinear interpolation reproduces a ramp exactly, so on a central disk (whose
rotated sources stay inside the image) a template ``w`` sees
``<w, rotate(x, theta)> = a S cos(theta - phi)`` in closed form.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from conftest import require
from dale_jax import configs, evaluation, experiment, perturbations, samplers, validation

FAST_COMPILE = {"xla_backend_optimization_level": 0}
SIZE, RADIUS, SLOPE = 15, 4.5, 0.03
PHI = 12.0  # degrees: the toy model's worst angle, inside the +-30 degree set


def _jit(f):
  return jax.jit(f, compiler_options=FAST_COMPILE)


def _images(seed=0, shape=(3, 9, 11, 2)):
  return np.random.RandomState(seed).rand(*shape).astype(np.float32)


# ----------------------------------------------------------------------------
# The warp against scipy.ndimage (float64).


_MODES = {"zeros": "grid-constant", "edge": "nearest"}


def _scipy_per_channel(x, fn):
  return np.stack([np.stack([fn(im[..., ch].astype(np.float64)) for ch in range(im.shape[-1])], -1)
                   for im in x])


@pytest.mark.parametrize("padding", perturbations.PADDINGS)
@pytest.mark.parametrize("angle", [17.0, -33.0, 90.0])
def test_rotation_matches_scipy(angle, padding):
  x = _images()
  got = perturbations.warp(jnp.asarray(x), jnp.full(3, angle), jnp.zeros(3), jnp.zeros(3), padding)
  want = _scipy_per_channel(x, lambda im: ndimage.rotate(
      im, angle, reshape=False, order=1, mode=_MODES[padding]))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-6)


@pytest.mark.parametrize("padding", perturbations.PADDINGS)
def test_translation_matches_scipy(padding):
  x = _images(1)
  got = perturbations.warp(jnp.asarray(x), jnp.zeros(3), jnp.full(3, 1.5), jnp.full(3, -2.25),
                           padding)
  want = _scipy_per_channel(x, lambda im: ndimage.shift(im, (-2.25, 1.5), order=1,
                                                        mode=_MODES[padding]))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-6)


@pytest.mark.parametrize("padding", perturbations.PADDINGS)
def test_se2_matches_scipy_affine_transform(padding):
  """Per example: rotation then shift, as one affine map ``q = M p + offset``."""
  x = _images(2)
  angle, tx, ty = np.array([25.0, -10.0, 3.0]), np.array([1.2, -2.0, 0.0]), np.array([0.7, 1.0, -3.0])
  got = perturbations.warp(jnp.asarray(x), jnp.asarray(angle), jnp.asarray(tx), jnp.asarray(ty),
                           padding)
  centre = (np.array(x.shape[1:3]) - 1) / 2.0
  want = []
  for i in range(3):
    t = np.deg2rad(angle[i])
    # Counter-clockwise as displayed: output (row, col) reads R^-1 (p - t - c) + c.
    m = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    offset = centre - m @ (np.array([ty[i], tx[i]]) + centre)
    want.append(_scipy_per_channel(x[i:i + 1], lambda im: ndimage.affine_transform(
        im, m, offset=offset, order=1, mode=_MODES[padding]))[0])
  np.testing.assert_allclose(np.asarray(got, np.float64), np.stack(want), atol=2e-6)


def test_positive_angles_turn_counter_clockwise_and_shifts_move_right_and_down():
  x = np.zeros((1, 11, 11, 1), np.float32)
  x[0, 5, 8, 0] = 1.0  # three pixels right of the centre
  up = perturbations.warp(jnp.asarray(x), jnp.array([90.0]), jnp.zeros(1), jnp.zeros(1))
  assert tuple(np.argwhere(np.asarray(up)[0, ..., 0] > 0.5)[0]) == (2, 5)  # now above it
  moved = perturbations.warp(jnp.asarray(x), jnp.zeros(1), jnp.array([1.0]), jnp.array([2.0]))
  assert tuple(np.argwhere(np.asarray(moved)[0, ..., 0] > 0.5)[0]) == (7, 9)


def test_warp_gradient_matches_finite_differences():
  """In float64, with a step small enough not to cross the bilinear kinks."""
  with jax.enable_x64(True):
    x = jnp.asarray(_images(3, (2, 9, 9, 1)), jnp.float64)
    w = jnp.asarray(_images(4, (2, 9, 9, 1)), jnp.float64)
    params = jnp.array([[7.3, 0.31, -0.42], [-12.1, -1.17, 0.63]], jnp.float64)
    f = lambda p: jnp.sum(w * perturbations.warp(x, p[:, 0], p[:, 1], p[:, 2]))
    grad = np.asarray(jax.grad(f)(params))
    h = 1e-5
    fd = np.array([[(float(f(params.at[i, j].add(h))) - float(f(params.at[i, j].add(-h)))) / (2 * h)
                    for j in range(3)] for i in range(2)])
  np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
  assert np.abs(grad).min() > 1e-2


def test_warp_rejects_non_images():
  with pytest.raises(ValueError, match=r"\bx\b.*\(batch, H, W, C\)"):
    perturbations.warp(jnp.zeros((2, 9, 9)), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2))
  with pytest.raises(ValueError, match=r"padding"):
    perturbations.warp(jnp.zeros((2, 9, 9, 1)), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), "wrap")


# ----------------------------------------------------------------------------
# The sets.


SETS = {
    "rotation": lambda: perturbations.rotation(30.0),
    "translation": lambda: perturbations.translation((3.0, 2.0), padding="edge"),
    "se2": lambda: perturbations.se2(30.0, (3.0, 3.0)),
    "se2+linf": lambda: perturbations.with_linf(perturbations.se2(30.0, (3.0, 3.0)), 0.1),
    "lp": lambda: perturbations.lp_ball("linf", 0.3),
}


@pytest.mark.parametrize("name", sorted(SETS))
def test_the_identity_parameter_gives_the_input_back(name):
  pset = SETS[name]()
  x = jnp.asarray(_images(5, (4, 12, 10, 1)))
  np.testing.assert_array_equal(np.asarray(pset.apply(x, pset.identity(x))), np.asarray(x))


@pytest.mark.parametrize("name", sorted(SETS))
def test_projection_lands_in_the_set_and_keeps_its_points(name):
  pset = SETS[name]()
  x = jnp.asarray(_images(6, (4, 12, 10, 1)))
  key = jax.random.key(0)
  far = jax.tree.map(lambda d: 3.0 * jax.random.normal(key, d.shape), pset.identity(x))
  projected = pset.project(far, x)
  if name == "lp":
    assert float(jnp.max(jnp.abs(projected))) <= 0.3 + 1e-6
    assert float(jnp.min(x + projected)) >= 0 and float(jnp.max(x + projected)) <= 1
  else:
    assert all(float(jnp.max(jnp.abs(d))) <= 1.0 for d in jax.tree.leaves(projected))
  again = pset.project(projected, x)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               again, projected)
  inside = pset.uniform(jax.random.key(1), x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7),
               pset.project(inside, x), inside)
  out = pset.apply(x, far)
  assert float(jnp.min(out)) >= 0.0 and float(jnp.max(out)) <= 1.0


def test_parameters_are_in_units_of_the_radii():
  pset = perturbations.se2(30.0, (3.0, 2.0))
  got = pset.physical(jnp.array([[0.5, -1.0, 0.25]]))
  assert {k: float(v[0]) for k, v in got.items()} == {"angle": 15.0, "shift_x": -3.0,
                                                       "shift_y": 0.5}
  x = jnp.asarray(_images(7, (1, 12, 12, 1)))
  np.testing.assert_array_equal(
      np.asarray(pset.apply(x, jnp.array([[0.5, -1.0, 0.25]]))),
      np.asarray(jnp.clip(perturbations.warp(x, jnp.array([15.0]), jnp.array([-3.0]),
                                             jnp.array([0.5])), 0, 1)))
  grid = np.asarray(pset.grid((3, 2, 1)))
  assert grid.shape == (6, 3)
  np.testing.assert_array_equal(np.unique(grid[:, 0]), [-1, 0, 1])
  np.testing.assert_array_equal(np.unique(grid[:, 1]), [-1, 1])
  np.testing.assert_array_equal(grid[:, 2], 0)


@pytest.mark.parametrize("build,field", [
    (lambda: perturbations.rotation(0.0), "angle"),
    (lambda: perturbations.translation((0.0, 0.0)), "shift"),
    (lambda: perturbations.translation((3.0,)), "shift"),
    (lambda: perturbations.se2(30.0, (3.0, 3.0), padding="reflect"), "padding"),
    (lambda: perturbations.with_linf(perturbations.rotation(30.0), -0.1), "linf_eps"),
    (lambda: perturbations.se2(30.0, (3.0, 3.0)).grid((5, 5)), "grid_points"),
    (lambda: perturbations.lp_ball("linf", 0.3).grid(5), "perturbation.name"),
])
def test_bad_sets_raise_naming_the_field(build, field):
  with pytest.raises(ValueError, match=rf"\b{field}\b"):
    build()


def test_make_perturbation_reads_the_config_section():
  assert perturbations.make_perturbation(None) is None
  assert perturbations.make_perturbation({"name": "lp", "angle": 30.0}) is None
  pset = perturbations.make_perturbation(dict(name="se2", angle=20.0, shift=(2.0, 1.0),
                                              padding="edge", linf_eps=0.1))
  assert pset.name == "se2+linf" and pset.radii == (20.0, 2.0, 1.0)
  with pytest.raises(validation.InvalidArgument, match=r"perturbation\.name.*'shear'"):
    perturbations.make_perturbation({"name": "shear"})
  with pytest.raises(validation.InvalidArgument, match=r"perturbation\.angle"):
    perturbations.make_perturbation({"name": "rotation", "angle": -5.0})
  with pytest.raises(validation.InvalidArgument, match=r"perturbation\.scale\b.*accepted"):
    perturbations.make_perturbation({"name": "rotation", "scale": 2.0})


# ----------------------------------------------------------------------------
# The toy model with a closed-form worst angle.


def _ramp():
  """One ramp image ``0.5 + SLOPE * (col - c)`` and the disk mask of radius RADIUS."""
  c = (SIZE - 1) / 2.0
  rows, cols = np.meshgrid(np.arange(SIZE) - c, np.arange(SIZE) - c, indexing="ij")
  mask = (rows**2 + cols**2 <= RADIUS**2).astype(np.float64)
  image = 0.5 + SLOPE * cols
  return image, rows, cols, mask


def _toy(gain: float):
  """Logits ``[gain * cos(theta - PHI), 0]`` of a rotated ramp, label 0.

  ``s = sum mask * w * z`` with ``w = col cos(phi) - row sin(phi)`` is
  ``SLOPE * S * cos(theta - phi)``, ``S = sum mask * col^2``; the model divides by
  ``SLOPE * S``, so the logits are ``[-gain cos(theta - phi), 0]`` and the CE of
  label 0 is ``softplus(gain cos(theta - phi))``, highest at ``theta = PHI``.
  """
  image, rows, cols, mask = _ramp()
  phi = math.radians(PHI)
  w = mask * (cols * math.cos(phi) - rows * math.sin(phi))
  # The two templates that read theta itself back: cos and sin of the rotation.
  read_cos, read_sin = mask * cols, -mask * rows
  scale = SLOPE * float(np.sum(mask * cols**2))
  w, read_cos, read_sin = (jnp.asarray(a / scale, jnp.float32)[None, :, :, None]
                           for a in (w, read_cos, read_sin))

  def logits_fn(z):
    s = jnp.sum(w * z, axis=(1, 2, 3))
    return jnp.stack([-gain * s, jnp.zeros_like(s)], -1)

  def angle_of(z):  # degrees, from the rotated ramp itself
    return np.degrees(np.arctan2(np.asarray(jnp.sum(read_sin * z, (1, 2, 3))),
                                 np.asarray(jnp.sum(read_cos * z, (1, 2, 3)))))

  x = jnp.asarray(image, jnp.float32)[None, :, :, None]
  return logits_fn, angle_of, x


def _ce_at(gain, theta_deg):
  return np.logaddexp(0.0, gain * np.cos(np.radians(theta_deg - PHI)))


def test_toy_model_reads_the_angle_back():
  logits_fn, angle_of, x = _toy(3.0)
  theta = np.array([-30.0, -7.5, 0.0, 12.0, 29.0])
  z = perturbations.warp(jnp.repeat(x, 5, 0), jnp.asarray(theta), jnp.zeros(5), jnp.zeros(5))
  np.testing.assert_allclose(angle_of(z), theta, atol=1e-3)
  logits = np.asarray(logits_fn(z), np.float64)
  np.testing.assert_allclose(logits[:, 0], -3.0 * np.cos(np.radians(theta - PHI)), atol=1e-4)


def _eval_settings(**kw):
  s = configs.base_config("mnist_digits", "ERM").eval.to_dict()
  s["perturbation"] = dict(s["perturbation"], name="rotation", angle=30.0)
  s.update(kw)
  return s


def test_grid_attack_finds_the_analytic_worst_angle():
  gain = 3.0
  logits_fn, _, x = _toy(gain)
  x, y, mask = jnp.repeat(x, 2, 0), jnp.zeros(2, jnp.int32), jnp.array([True, False])
  evaluate = evaluation.make_evaluator("Grid", _eval_settings(grid_points=61))  # 1-degree steps
  out = _jit(lambda k, x: evaluate(k, logits_fn, x, y, mask))(jax.random.key(0), x)
  # The highest CE over the grid is the closed form at PHI; its neighbours' (1 degree off)
  # is lower by 4.4e-4, over ten times the tolerance.
  np.testing.assert_allclose(float(out["Grid-Loss"]), _ce_at(gain, PHI), rtol=1e-5)
  assert _ce_at(gain, PHI) - _ce_at(gain, PHI + 1) > 10 * 1e-5 * _ce_at(gain, PHI)
  assert int(out["Grid-Accuracy"]) == 0  # always wrong: logit 0 < 0 for |theta - phi| < 90


def test_grid_accuracy_counts_an_example_wrong_if_any_grid_point_fools_it():
  # A bias makes the toy right except within about 5 degrees of PHI.
  logits_fn, _, x = _toy(3.0)
  bias = 3.0 * math.cos(math.radians(5.0))
  biased = lambda z: logits_fn(z) + jnp.array([bias, 0.0])
  y, mask = jnp.zeros(1, jnp.int32), jnp.ones(1, bool)
  counts = {}
  for points in (61, 3):  # 1-degree steps; or -30, 0, 30 only
    evaluate = evaluation.make_evaluator("Grid", _eval_settings(grid_points=points))
    counts[points] = int(_jit(lambda k, x: evaluate(k, biased, x, y, mask)["Grid-Accuracy"])(
        jax.random.key(0), x))
  assert counts == {61: 0, 3: 1}


def test_worst_of_k_keeps_the_worst_of_its_draws():
  pset = perturbations.se2(30.0, (2.0, 2.0))
  logits_fn, _, x = _toy(3.0)
  x = jnp.repeat(x, 6, 0) * jnp.linspace(0.8, 1.0, 6)[:, None, None, None]
  y = jnp.zeros(6, jnp.int32)
  key, k = jax.random.key(3), 7
  out = _jit(lambda key, x: samplers.worst_of_k(eps=0.3, k=k, perturbation=pset)(
      key, logits_fn, x, y))(key, x)
  ce = lambda z: np.asarray(jax.nn.logsumexp(logits_fn(z), -1) - logits_fn(z)[:, 0])
  draws = np.stack([ce(pset.apply(x, pset.uniform(jax.random.fold_in(key, j), x)))
                    for j in range(k)])
  got = ce(out)
  assert np.all(got >= draws.max(0) - 1e-6)  # >= each of its draws
  np.testing.assert_allclose(got, draws.max(0), rtol=1e-6)  # and one of them
  assert len(set(draws.argmax(0))) > 1  # the examples keep different draws


def test_worst_of_k_over_the_batch_keeps_the_draw_with_the_highest_mean():
  """The advbench fork's rule: one draw index for every example. Labels 0 and 1 want
  opposite angles (CE ``softplus(+-gain cos(theta - PHI))``), so the examples' own worst
  draws are not all the batch's."""
  gain, k, batch = 3.0, 5, 4
  logits_fn, angle_of, x = _toy(gain)
  x, y = jnp.repeat(x, batch, 0), jnp.arange(batch, dtype=jnp.int32) % 2
  pset, key = perturbations.rotation(30.0), jax.random.key(7)
  theta = 30.0 * np.stack([np.asarray(pset.uniform(jax.random.fold_in(key, j), x), np.float64)[:, 0]
                           for j in range(k)])  # (k, batch), degrees
  cos = np.cos(np.radians(theta - PHI))
  ce = np.where(np.asarray(y) == 0, np.logaddexp(0.0, gain * cos), np.logaddexp(0.0, -gain * cos))
  best, each = ce.mean(1).argmax(), ce.argmax(0)

  def run(select):
    sample = samplers.worst_of_k(eps=0.3, k=k, select=select, perturbation=pset)
    return angle_of(_jit(lambda key, x: sample(key, logits_fn, x, y))(key, x))

  np.testing.assert_allclose(run("batch"), theta[best], atol=1e-3)
  np.testing.assert_allclose(run("example"), theta[each, np.arange(batch)], atol=1e-3)
  assert np.any(each != best)  # the two rules differ on this case


def test_worst_of_k_evaluator_needs_all_draws_right():
  logits_fn, _, x = _toy(3.0)
  bias = 3.0 * math.cos(math.radians(20.0))  # wrong within ~20 degrees of PHI
  biased = lambda z: logits_fn(z) + jnp.array([bias, 0.0])
  x, y, mask = jnp.repeat(x, 200, 0), jnp.zeros(200, jnp.int32), jnp.ones(200, bool)
  evaluate = evaluation.make_evaluator("Worst-of-K", _eval_settings(worst_of_k=3))
  right = int(_jit(lambda k, x: evaluate(k, biased, x, y, mask)["Worst-of-K-Accuracy"])(
      jax.random.key(0), x))
  # Wrong on (-8, 30] (38 of the 60 degrees): all 3 draws right with (22/60)^3 = 4.9%,
  # about 10 of 200 examples; any single draw alone would leave about 73 right.
  assert 2 <= right <= 25, right


@pytest.mark.slow
def test_metropolis_hastings_samples_the_target_density():
  """The chains' final angles against the float64 density exp(CE(theta) / T) on [-30, 30]."""
  gain, temperature, chains = 3.0, 0.25, 4000
  logits_fn, angle_of, x = _toy(gain)
  sample = samplers.metropolis_hastings(
      eps=0.3, steps=60, proposal_std=0.5, temperature=temperature, potential="cross_entropy",
      perturbation=perturbations.rotation(30.0))
  x, y = jnp.repeat(x, chains, 0), jnp.zeros(chains, jnp.int32)
  theta = angle_of(_jit(lambda k, x: sample(k, logits_fn, x, y))(jax.random.key(0), x))
  assert np.all(np.abs(theta) <= 30.0 + 1e-3)
  edges = np.linspace(-30.0, 30.0, 11)
  fine = np.linspace(-30.0, 30.0, 60001)
  density = np.exp(_ce_at(gain, fine) / temperature)
  want = np.array([density[(fine >= a) & (fine < b)].sum() for a, b in zip(edges, edges[1:])])
  want /= want.sum()
  got = np.histogram(theta, edges)[0] / chains
  assert want.max() / want.min() > 5  # far from uniform, so the test can tell
  assert 0.5 * np.abs(got - want).sum() < 0.04, (got, want)


def _point_toy(gain: float, a: float = 1.0, b: float = 0.7):
  """One bright pixel at the centre; shifted by ``(tx, ty)``, its bilinear taps keep its
  centroid at exactly the shift. Logits ``[gain (a tx + b ty), 0]`` in closed form."""
  c = (SIZE - 1) // 2
  x = np.zeros((1, SIZE, SIZE, 1), np.float32)
  x[0, c, c, 0] = 1.0
  rows, cols = np.meshgrid(np.arange(SIZE) - c, np.arange(SIZE) - c, indexing="ij")
  read_x, read_y = (jnp.asarray(r, jnp.float32)[None, :, :, None] for r in (cols, rows))

  def logits_fn(z):
    s = a * jnp.sum(read_x * z, (1, 2, 3)) + b * jnp.sum(read_y * z, (1, 2, 3))
    return jnp.stack([gain * s, jnp.zeros_like(s)], -1)

  def shift_of(z):
    z = np.asarray(z, np.float64)[..., 0]
    return np.stack([(z * cols).sum((1, 2)), (z * rows).sum((1, 2))], -1)

  def ce(shift, y):  # float64
    logit = gain * (a * shift[:, 0] + b * shift[:, 1])
    return np.logaddexp(logit, 0.0) - np.where(y == 0, logit, 0.0)

  return logits_fn, shift_of, ce, jnp.asarray(x)


def _np_fork_mh(key, ce, y, radii, scale, steps, per_example):
  """advbench's ``MH.attack`` (constrainedlearning/advbench 31c09cb) over its
  Translation, in pixels and float64, with jax.random only for the draws. The start is
  dale_jax's uniform one (the fork's, ``clamp(2 eps randn - eps)``, has no counterpart).
  Returns the final shifts and the counts of accepted, rejected and clamped moves."""
  eps = np.asarray(radii, np.float64)
  batch = len(y)
  start_key, chain_key = jax.random.split(key)
  delta = eps * np.asarray(jax.random.uniform(start_key, (batch, 2), jnp.float32, -1.0, 1.0),
                           np.float64)
  last_loss = ce(delta, y)
  accepted = rejected = clamped = 0
  for i in range(steps):
    prop_key, accept_key = jax.random.split(jax.random.fold_in(chain_key, i))
    laplace = np.asarray(jax.random.laplace(jax.random.split(prop_key, 1)[0], (batch, 2)),
                         np.float64)
    # noise_dist = Laplace(zeros, mh_dale_scale * eps); proposal = delta + sample * eps
    proposal = delta + (scale * eps * laplace) * eps
    clamped += int(np.sum(np.abs(proposal) > eps))
    proposal = np.clip(proposal, -eps, eps)  # Translation.clamp_delta, in place
    proposal_loss = ce(proposal, y)
    if per_example:
      ratio = np.minimum(proposal_loss / last_loss, 1.0)
    else:  # F.cross_entropy's mean: one ratio, one Bernoulli for the batch
      ratio = np.minimum(proposal_loss.mean() / last_loss.mean(), 1.0)
    u = np.asarray(jax.random.uniform(accept_key, np.shape(ratio)), np.float64)
    accept = np.broadcast_to(u < ratio, (batch,))
    delta = np.where(accept[:, None], proposal, delta)
    last_loss = np.where(accept, proposal_loss, last_loss)
    accepted, rejected = accepted + accept.sum(), rejected + (~accept).sum()
  return delta, accepted, rejected, clamped


@pytest.mark.parametrize("per_example", [False, True], ids=["fork", "fork_per_example"])
def test_fork_metropolis_hastings_matches_numpy_over_translations(per_example):
  """The fork's rule with per-axis radii (3 and 1 pixels): proposal scale
  ``mh_dale_scale * r_i^2`` pixels, clamped, accepted on the ratio of cross-entropies."""
  radii, scale, steps, batch = (3.0, 1.0), 0.2, 10, 6
  logits_fn, shift_of, ce, x = _point_toy(2.0)
  x, y = jnp.repeat(x, batch, 0), jnp.arange(batch, dtype=jnp.int32) % 2
  sample = samplers.metropolis_hastings(
      eps=0.3, steps=steps, proposal_std=scale, proposal="laplace", radius_scaled=True,
      acceptance="loss_ratio", potential="cross_entropy", per_example=per_example,
      outside="project", perturbation=perturbations.translation(radii))
  key = jax.random.key(2)
  got = shift_of(_jit(lambda key, x: sample(key, logits_fn, x, y))(key, x))
  want, accepted, rejected, clamped = _np_fork_mh(key, ce, np.asarray(y), radii, scale, steps,
                                                  per_example)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  # Both outcomes and the clamp occur, so each part of the rule is pinned.
  assert accepted > 0 and rejected > 0 and clamped > 0, (accepted, rejected, clamped)


# ----------------------------------------------------------------------------
# Every sampler over a geometric set.


_SAMPLER_KWARGS = {
    "pgd": dict(step_size=0.1, steps=3),
    "fgsm": dict(random_start=True),
    "langevin_gaussian": dict(step_size=0.1, steps=3, noise_scale=0.05),
    "langevin_laplacian": dict(step_size=0.1, steps=3, noise_scale=0.5),
    "langevin": dict(step_size=1e-2, steps=3, temperature=0.1),
    "trades_kl": dict(step_size=0.1, steps=3, init_std=0.05),
    "smooth_adv": dict(step_size=0.1, steps=3, sigma=0.05, num_samples=2),
    "uniform": {},
    "worst_of_k": dict(k=3),
    "metropolis_hastings": dict(steps=3, proposal_std=0.3),
}


# The other rules of worst-of-k and MH: the advbench fork's, and one chain per batch.
_SET_MODES = {
    "worst_of_k_batch": ("worst_of_k", dict(k=3, select="batch")),
    "metropolis_hastings_fork": ("metropolis_hastings", dict(
        steps=3, proposal_std=0.01, proposal="laplace", radius_scaled=True,
        acceptance="loss_ratio", potential="cross_entropy", per_example=False,
        outside="project")),
    "metropolis_hastings_batch": ("metropolis_hastings",
                                  dict(steps=3, proposal_std=0.3, per_example=False)),
}
_SET_CASES = {**{name: (name, kw) for name, kw in _SAMPLER_KWARGS.items()}, **_SET_MODES}


def test_every_sampler_is_covered_over_sets():
  assert set(_SAMPLER_KWARGS) == set(samplers.SAMPLERS)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_SET_CASES))
def test_every_sampler_stays_a_rotation_in_the_set(case):
  """Over rotations by up to 30 degrees the output is the ramp turned by |theta| <= 30."""
  name, kw = _SET_CASES[case]
  logits_fn, angle_of, x = _toy(3.0)
  x, y = jnp.repeat(x, 4, 0), jnp.zeros(4, jnp.int32)
  sample = samplers.make_sampler(dict(name=name, eps=0.3, **kw), perturbations.rotation(30.0))
  out = _jit(lambda k, x: sample(k, logits_fn, x, y))(jax.random.key(1), x)
  theta = angle_of(out)
  assert np.all(np.abs(theta) <= 30.0 + 1e-3) and np.abs(theta).max() > 0.1, theta
  # On the disk the output is exactly the ramp at the angle read back.
  want = perturbations.warp(x, jnp.asarray(theta, jnp.float32), jnp.zeros(4), jnp.zeros(4))
  _, _, _, mask = _ramp()
  on_disk = mask[None, :, :, None] > 0
  np.testing.assert_allclose(np.asarray(out)[np.broadcast_to(on_disk, out.shape)],
                             np.asarray(want)[np.broadcast_to(on_disk, out.shape)], atol=1e-4)


def test_pgd_over_rotations_climbs_to_the_worst_angle():
  logits_fn, angle_of, x = _toy(3.0)
  y = jnp.zeros(1, jnp.int32)
  sample = samplers.pgd(eps=0.3, step_size=0.02, steps=40, perturbation=perturbations.rotation(30.0))
  theta = angle_of(_jit(lambda k, x: sample(k, logits_fn, x, y))(jax.random.key(0), x))
  np.testing.assert_allclose(theta, [PHI], atol=0.02 * 30.0 + 1e-3)


def test_composition_with_an_linf_ball_is_a_warp_plus_at_most_eps():
  pset = perturbations.with_linf(perturbations.se2(30.0, (3.0, 3.0)), 0.05)
  x = jnp.asarray(_images(8, (4, 12, 12, 1)))
  u, v = pset.uniform(jax.random.key(0), x)
  assert u.shape == (4, 3) and v.shape == x.shape
  warped = perturbations.se2(30.0, (3.0, 3.0)).apply(x, u)
  gap = np.abs(np.asarray(pset.apply(x, (u, v))) - np.asarray(warped))
  assert gap.max() <= 0.05 + 1e-6 and gap.max() > 0.04
  # A sampler over it moves both parts and stays in the box.
  logits_fn = lambda z: jnp.stack([0.01 * jnp.sum(z, (1, 2, 3)), jnp.zeros(z.shape[0])], -1)
  out = _jit(lambda k, x: samplers.pgd(eps=0.3, step_size=0.25, steps=2, perturbation=pset)(
      k, logits_fn, x, jnp.zeros(4, jnp.int32)))(jax.random.key(1), x)
  assert float(jnp.min(out)) >= 0 and float(jnp.max(out)) <= 1
  assert not np.allclose(np.asarray(out), np.asarray(x), atol=1e-3)


# ----------------------------------------------------------------------------
# The experiment config and the example.


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arg,perturbation,sampler", [
    ("Gaussian_DALE_PD", "se2", dict(name="langevin_gaussian", start="uniform")),
    ("PGD,lp", "lp", dict(name="pgd")),
    ("PGD", "se2", dict(name="pgd", random_start=True)),
    ("MH_DALE_PD,rotation", "rotation", dict(name="metropolis_hastings")),
])
def test_spatial_config_trains_over_its_set_and_evaluates_over_se2(arg, perturbation, sampler):
  config = _load(pathlib.Path(configs.CONFIG_DIR) / "spatial.py", "spatial").get_config(arg)
  experiment.check(config)
  assert config.perturbation.name == perturbation
  assert {k: config.sampler[k] for k in sampler} == sampler
  assert "random_start" not in config.sampler or perturbation != "lp"
  assert config.eval.perturbation.name == "se2" and tuple(config.eval.grid_points) == (31, 5, 5)
  assert {"Grid", "Worst-of-K"} <= set(config.eval.evaluators)


@pytest.mark.slow
def test_rotated_digits_example_builds_its_config_and_draws_predictions(tmp_path):
  require("matplotlib")
  example = _load(_ROOT / "experiments" / "spatial_digits.py", "spatial_digits")
  config = example.rotation_config(epochs=2, train_examples=64, test_examples=20)
  experiment.check(config)
  assert config.perturbation.name == "rotation" and config.eval.perturbation.name == "rotation"
  assert tuple(config.schedule.boundaries) == () and config.num_epochs == 2
  x = _images(9, (6, 28, 28, 1))
  weights = jnp.asarray(np.random.RandomState(0).randn(784, 10), jnp.float32)
  path = tmp_path / "rotated.png"
  example.plot_rotated_digits(lambda z: z.reshape(len(z), -1) @ weights, x, np.arange(6), path)
  assert path.read_bytes()[:4] == b"\x89PNG"


def test_grid_needs_a_geometric_set_and_worst_of_k_takes_any():
  config = configs.base_config("mnist_digits", "ERM")
  config.eval.perturbation.linf_eps = 0.1  # se2 then an Linf ball: no finite grid
  config.eval.evaluators = ("Clean", "Worst-of-K")
  experiment.check(config)
  config.eval.evaluators = ("Clean", "Grid")
  with pytest.raises(validation.InvalidArgument, match=r"^config\.eval\.perturbation\.name"):
    experiment.check(config)
  config.eval.perturbation.update(name="lp", linf_eps=0.0)
  with pytest.raises(validation.InvalidArgument, match=r"^config\.eval\.perturbation\.name"):
    experiment.check(config)
