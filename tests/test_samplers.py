"""Samplers: invariants, tracing, one-step numbers against float64 NumPy, and direction.

Invariants run on a tiny random MLP (``conftest.tiny``); only the checks that a sampler
moves its loss the right way use the trained CNN (``conftest.trained_cnn``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dale_jax import potentials
from dale_jax import samplers
from dale_jax import threat

# Less LLVM optimisation: these programs are tiny, so compiling them is the cost.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
EPS = {"linf": 0.3, "l2": 1.0}
STEP = {"linf": 0.1, "l2": 0.4}


# The advbench fork's MH (configs.FAMILIES), with a proposal scale that moves on a tiny
# problem: proposal_std * eps^2 per pixel.
_MH_FORK = dict(proposal_std=0.5, proposal="laplace", radius_scaled=True,
                acceptance="loss_ratio", potential="cross_entropy", temperature=1.0,
                per_example=False, outside="project")


def _kwargs(name: str, norm: str) -> tuple[Callable, dict]:
  """The factory and test hyperparameters of sampler variant ``name`` under ``norm``."""
  eps, step = EPS[norm], STEP[norm]
  common = dict(eps=eps, norm=norm)
  table = {
      "pgd": (samplers.pgd, dict(step_size=step, steps=3)),
      "pgd_random_start": (samplers.pgd, dict(step_size=step, steps=3, random_start=True)),
      "pgd_restarts": (samplers.pgd, dict(step_size=step, steps=2, random_start=True, restarts=3)),
      "fgsm": (samplers.fgsm, {}),
      "fgsm_random_start": (samplers.fgsm, dict(random_start=True)),
      "langevin_gaussian": (samplers.langevin_gaussian,
                            dict(step_size=step, steps=3, noise_scale=0.01)),
      "langevin_laplacian": (samplers.langevin_laplacian,
                             dict(step_size=step, steps=3, noise_scale=0.5)),
      "langevin": (samplers.langevin, dict(step_size=1e-3, steps=3, temperature=0.01)),
      # A wider start than TRADES' 0.001: the KL gradient at x' = x + delta is O(delta)
      # and a difference of nearly equal probabilities, so with a tiny delta its L2
      # direction carries float32 noise of ~1e-4 (real, but not what these tests pin).
      "trades_kl": (samplers.trades_kl, dict(step_size=step, steps=3, init_std=0.05)),
      "smooth_adv": (samplers.smooth_adv,
                     dict(step_size=step, steps=3, sigma=0.25, num_samples=4)),
      "uniform": (samplers.uniform, {}),
      "worst_of_k": (samplers.worst_of_k, dict(k=3)),
      "worst_of_k_batch": (samplers.worst_of_k, dict(k=3, select="batch")),
      "metropolis_hastings": (samplers.metropolis_hastings,
                              dict(steps=3, proposal_std=0.05, temperature=0.1)),
      "metropolis_hastings_batch": (samplers.metropolis_hastings,
                                    dict(steps=3, proposal_std=0.05, temperature=0.1,
                                         per_example=False)),
      "metropolis_hastings_fork": (samplers.metropolis_hastings, dict(steps=3, **_MH_FORK)),
  }
  factory, kw = table[name]
  return factory, dict(common, **kw)


VARIANTS = ["pgd", "pgd_random_start", "pgd_restarts", "fgsm", "fgsm_random_start",
            "langevin_gaussian", "langevin_laplacian", "langevin", "trades_kl", "smooth_adv",
            "uniform", "worst_of_k", "worst_of_k_batch", "metropolis_hastings",
            "metropolis_hastings_batch", "metropolis_hastings_fork"]
# Samplers whose output does not depend on the key.
DETERMINISTIC = {"pgd", "fgsm"}
# The samplers' float64 references are written for the Linf and L2 balls; the L1 ball's
# parts (projection, draws, sparse step) have their own tests in test_threat.py.
SAMPLER_NORMS = ("linf", "l2")
CASES = [(name, norm) for name in VARIANTS for norm in SAMPLER_NORMS]


def _build(name: str, norm: str) -> samplers.Sampler:
  factory, kw = _kwargs(name, norm)
  return factory(**kw)


class _Jitted(NamedTuple):
  run: Callable  # run(key, x, y, scale) -> x_adv, jitted
  traces: list  # traces[0]: how often run has been traced
  calls: list  # calls[0]: how often logits_fn has been called while tracing


_CACHE: dict = {}


def _jitted(name: str, norm: str, tiny) -> _Jitted:
  """One jitted sampler per variant, shared by the tests below so that each compiles once.

  ``scale`` multiplies the logits and is a traced argument, so the extreme-logit test
  reuses the same executable. Python counters record traces of ``run`` and calls of
  ``logits_fn`` (which only happen while tracing).
  """
  if (name, norm) not in _CACHE:
    sample = _build(name, norm)
    traces, calls = [0], [0]

    def run(key, x, y, scale):
      traces[0] += 1

      def logits_fn(z):
        calls[0] += 1
        return tiny.scaled(scale)(z)

      return sample(key, logits_fn, x, y)

    _CACHE[name, norm] = _Jitted(jax.jit(run, compiler_options=FAST_COMPILE), traces, calls)
  return _CACHE[name, norm]


def _key(seed: int) -> jax.Array:
  """Keys for the invariant tests below.

  The samplers only split, fold and draw through ``jax.random``, so they behave the
  same for any key implementation; "rbg" keys keep the runs without jit affordable
  (threefry without jit is hundreds of separate ops per draw). The tests against NumPy
  and on the trained model use the default implementation.
  """
  return jax.random.key(seed, impl="rbg")


def _call(sample, key, logits_fn, x, y):
  """``sample(key, logits_fn, x, y)`` compiled once with FAST_COMPILE."""
  return jax.jit(lambda k, x, y: sample(k, logits_fn, x, y), compiler_options=FAST_COMPILE)(
      key, x, y)


def _delta_norm(x_adv, x, norm) -> np.ndarray:
  d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
  return np.abs(d).max(1) if norm == "linf" else np.sqrt((d**2).sum(1))


def _assert_admissible(x_adv, x, norm):
  x_adv = np.asarray(x_adv)
  assert np.all(np.isfinite(x_adv))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.all(_delta_norm(x_adv, x, norm) <= EPS[norm] * (1 + 1e-5) + 1e-6)


# ----------------------------------------------------------------------------
# Invariants on random inputs.


@pytest.mark.parametrize("name,norm", CASES)
def test_invariants_and_keys(name, norm, tiny):
  run = _jitted(name, norm, tiny).run
  out = run(_key(0), tiny.x, tiny.y, 1.0)
  assert out.shape == tiny.x.shape and out.dtype == tiny.x.dtype
  _assert_admissible(out, tiny.x, norm)
  assert not np.allclose(np.asarray(out), np.asarray(tiny.x)), "the sampler did not move"
  again = run(_key(0), tiny.x, tiny.y, 1.0)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(out))
  other = run(_key(1), tiny.x, tiny.y, 1.0)
  if name in DETERMINISTIC:
    np.testing.assert_array_equal(np.asarray(other), np.asarray(out))
  else:
    assert not np.array_equal(np.asarray(other), np.asarray(out))


@pytest.mark.slow
@pytest.mark.parametrize("name,norm", CASES)
def test_jit_matches_eager(name, norm, tiny):
  jitted = _jitted(name, norm, tiny).run(_key(3), tiny.x, tiny.y, 1.0)
  with jax.disable_jit():
    eager = _build(name, norm)(_key(3), tiny.logits_fn, tiny.x, tiny.y)
  # Fusion may reorder float32 sums; a real difference (a flipped sign, another key)
  # moves a pixel by a whole step or a noise draw.
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=0, atol=1e-5)


# The norm changes arithmetic only, not what is traced: Linf variants suffice here.
@pytest.mark.parametrize("name,norm", [(n, "linf") for n in VARIANTS])
def test_traced_once_per_shape(name, norm, tiny):
  jitted = _jitted(name, norm, tiny)
  jitted.run(_key(0), tiny.x, tiny.y, 1.0)
  traces, calls = jitted.traces[0], jitted.calls[0]
  assert traces >= 1
  jitted.run(_key(5), tiny.x, tiny.y, 2.0)  # same shapes, new key and scale
  jitted.run(_key(6), tiny.x + 0.01, (tiny.y + 1) % 10, 1.0)
  assert (jitted.traces[0], jitted.calls[0]) == (traces, calls), "retraced for the same shapes"
  x2, y2 = jnp.concatenate([tiny.x, tiny.x]), jnp.concatenate([tiny.y, tiny.y])
  jitted.run(_key(0), x2, y2, 1.0)
  assert jitted.traces[0] == traces + 1, "a new batch size must trace exactly once"
  # logits_fn is traced as often for the new shape as for the first one.
  assert jitted.calls[0] - calls == calls / traces
  jitted.run(_key(1), x2, y2, 1.0)
  assert jitted.traces[0] == traces + 1


@pytest.mark.parametrize("name,norm", CASES)
def test_finite_when_p_y_rounds_to_one(name, norm, tiny):
  scale = 1e4
  logits = tiny.scaled(scale)(tiny.x)
  y = jnp.argmax(logits, -1).astype(jnp.int32)
  assert np.all(np.asarray(jax.nn.softmax(logits)[jnp.arange(4), y]) == 1.0)
  out = _jitted(name, norm, tiny).run(_key(0), tiny.x, y, scale)
  _assert_admissible(out, tiny.x, norm)


def test_log_one_minus_p_samplers_still_move_when_p_y_rounds_to_one(tiny):
  # The naive log(1 - p_y) has a NaN gradient there; the stable one keeps pointing away
  # from the label, so a noiseless signed sampler moves the input the full step.
  logits_fn = tiny.scaled(1e4)
  y = jnp.argmax(logits_fn(tiny.x), -1).astype(jnp.int32)
  sample = samplers.langevin_gaussian(eps=0.3, step_size=0.1, steps=1, noise_scale=0.0,
                                      init_std=0.0)
  out = np.asarray(_call(sample, jax.random.key(0), logits_fn, tiny.x, y))
  moved = np.abs(out - np.asarray(tiny.x))
  inside_box = (np.asarray(tiny.x) > 0.1) & (np.asarray(tiny.x) < 0.9)
  np.testing.assert_allclose(moved[inside_box], 0.1, rtol=1e-5)


# ----------------------------------------------------------------------------
# How the samplers relate to each other.


@pytest.mark.parametrize("norm", SAMPLER_NORMS)
def test_pgd_is_gaussian_langevin_without_noise(norm, tiny):
  kw = dict(eps=EPS[norm], step_size=STEP[norm], steps=4, norm=norm)
  key = jax.random.key(11)
  pgd = _call(samplers.pgd(**kw), key, tiny.logits_fn, tiny.x, tiny.y)
  langevin = samplers.langevin_gaussian(noise_scale=0.0, init_std=0.0,
                                        potential="cross_entropy", **kw)
  np.testing.assert_array_equal(np.asarray(pgd),
                                np.asarray(_call(langevin, key, tiny.logits_fn, tiny.x, tiny.y)))


@pytest.mark.parametrize("random_start", [False, True])
def test_fgsm_is_one_pgd_step(random_start, tiny):
  key = jax.random.key(2)
  fgsm = _call(samplers.fgsm(eps=0.3, random_start=random_start), key, tiny.logits_fn,
               tiny.x, tiny.y)
  step = 0.375 if random_start else 0.3  # Wong et al.'s 1.25 eps with a random start
  pgd = samplers.pgd(eps=0.3, step_size=step, steps=1, random_start=random_start)
  np.testing.assert_array_equal(np.asarray(fgsm),
                                np.asarray(_call(pgd, key, tiny.logits_fn, tiny.x, tiny.y)))
  if not random_start:
    grad = jax.grad(lambda z: potentials.cross_entropy(tiny.logits_fn(z), tiny.y).sum())(tiny.x)
    want = np.clip(np.asarray(tiny.x, np.float64) + 0.3 * np.sign(np.asarray(grad)), 0, 1)
    np.testing.assert_allclose(np.asarray(fgsm), want, atol=1e-6)


def test_restarts_keep_each_examples_highest_loss_run(tiny):
  kw = dict(eps=0.3, step_size=0.05, steps=2, random_start=True)
  key = jax.random.key(4)
  best = _call(samplers.pgd(restarts=3, **kw), key, tiny.logits_fn, tiny.x, tiny.y)
  single = samplers.pgd(**kw)
  run = jax.jit(lambda k: single(k, tiny.logits_fn, tiny.x, tiny.y), compiler_options=FAST_COMPILE)
  runs = np.stack([np.asarray(run(jax.random.fold_in(key, r))) for r in range(3)])
  ce = np.stack([np.asarray(potentials.cross_entropy(tiny.logits_fn(jnp.asarray(r)), tiny.y))
                 for r in runs])
  want = runs[np.argmax(ce, axis=0), np.arange(len(tiny.y))]
  np.testing.assert_allclose(np.asarray(best), want, atol=1e-6)
  # Different restarts win for different examples, so the choice is not vacuous.
  assert len(set(np.argmax(ce, axis=0))) > 1


# ----------------------------------------------------------------------------
# Update rules and whole samplers against float64 NumPy.


def _np_direction(g: np.ndarray, norm: str) -> np.ndarray:
  if norm == "linf":
    return np.sign(g)
  n = np.sqrt((g**2).reshape(len(g), -1).sum(1)).reshape((-1,) + (1,) * (g.ndim - 1))
  return g / np.maximum(n, 1e-12)


def _np_project(z, x, norm, eps):
  d = z - x
  if norm == "linf":
    d = np.clip(d, -eps, eps)
  else:
    n = np.sqrt((d**2).reshape(len(d), -1).sum(1)).reshape((-1,) + (1,) * (d.ndim - 1))
    d = d * np.minimum(1.0, eps / np.maximum(n, 1e-12))
  return np.clip(x + d, 0.0, 1.0)


def _f64(a) -> np.ndarray:
  return np.asarray(a, np.float64)


@pytest.mark.parametrize("norm", SAMPLER_NORMS)
@pytest.mark.parametrize("noise_scale", [0.0, 0.05])
def test_signed_step_matches_numpy(norm, noise_scale):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (3, 4, 4, 1)), jnp.float32)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  key = jax.random.key(9)
  got = samplers.signed_step(0.1, norm, noise_scale)(key, x, g)
  noise = _f64(jax.random.normal(key, x.shape, jnp.float32))
  want = _f64(x) + 0.1 * _np_direction(_f64(g), norm) + noise_scale * noise
  np.testing.assert_allclose(_f64(got), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", SAMPLER_NORMS)
def test_laplace_signed_step_matches_numpy(norm):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0, 1, (3, 4, 4, 1)), jnp.float32)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  key = jax.random.key(9)
  got = samplers.laplace_signed_step(0.1, norm, 0.7)(key, x, g)
  noise = _f64(jax.random.laplace(key, x.shape, jnp.float32))
  want = _f64(x) + 0.1 * _np_direction(_f64(g) + 0.7 * noise, norm)
  np.testing.assert_allclose(_f64(got), want, rtol=0, atol=1e-6)


def test_langevin_step_matches_numpy():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(0, 1, (3, 4, 4, 1)), jnp.float32)
  g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  key = jax.random.key(9)
  eta, temperature = 1e-3, 0.05
  got = samplers.langevin_step(eta, temperature)(key, x, g)
  noise = _f64(jax.random.normal(key, x.shape, jnp.float32))
  want = _f64(x) + eta / temperature * _f64(g) + math.sqrt(2 * eta) * noise
  np.testing.assert_allclose(_f64(got), want, rtol=0, atol=1e-6)


# A linear model z = flat(x) W + b makes every potential's input gradient a closed form.
_D, _C = 5 * 5, 10


def _linear_problem(seed=0):
  rng = np.random.default_rng(seed)
  w = (rng.normal(size=(_D, _C)) / np.sqrt(_D) * 4).astype(np.float32)
  b = (0.3 * rng.normal(size=_C)).astype(np.float32)
  x = rng.uniform(0, 1, (4, 5, 5, 1)).astype(np.float32)
  y = rng.integers(0, _C, 4).astype(np.int32)
  logits_fn = lambda z: z.reshape((z.shape[0], -1)) @ w + b
  return w.astype(np.float64), b.astype(np.float64), x, y, logits_fn


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_input_grad(potential, w, b, z, y, x_clean=None):
  """d potential(flat(z) W + b) / dz for one of the potentials, per example."""
  logits = z.reshape(len(z), -1) @ w + b
  p = _softmax(logits)
  onehot = np.eye(_C)[y]
  if potential == "cross_entropy":
    dz = p - onehot
  elif potential == "log_one_minus_p":
    q = p * (1 - onehot)
    dz = q / q.sum(-1, keepdims=True) - p
  elif potential == "kl":
    p_clean = _softmax(x_clean.reshape(len(z), -1) @ w + b)
    dz = p - p_clean
  return (dz @ w.T).reshape(z.shape)


def _np_smoothed_grad(w, b, z, y, noise):
  """Gradient of -log mean_k p_y(z + noise_k) for the linear model."""
  onehot = np.eye(_C)[y]
  num = np.zeros(z.shape)
  den = np.zeros(len(z))
  for xi in noise:
    p = _softmax((z + xi).reshape(len(z), -1) @ w + b)
    p_y = (p * onehot).sum(-1)
    num += (p_y[:, None] * (onehot - p) @ w.T).reshape(z.shape)
    den += p_y
  return -num / den.reshape(-1, 1, 1, 1)


def _np_sampler(name, norm, key, w, b, x, y, kw):
  """The whole sampler in NumPy, with jax.random only to reproduce the drawn noise."""
  x = _f64(x)
  eps, steps = kw["eps"], kw.get("steps", 1)
  init_key, loop_key = jax.random.split(key)
  if name in ("pgd", "fgsm", "smooth_adv"):
    z = x
  elif name == "pgd_random_start":
    if norm == "linf":
      z = x + _f64(jax.random.uniform(init_key, x.shape, jnp.float32, -eps, eps))
    else:
      dir_key, radius_key = jax.random.split(init_key)
      u = _f64(jax.random.normal(dir_key, x.shape, jnp.float32))
      u /= np.sqrt((u**2).reshape(len(u), -1).sum(1)).reshape(-1, 1, 1, 1)
      r = _f64(jax.random.uniform(radius_key, (len(x), 1, 1, 1), jnp.float32))
      z = x + u * eps * r ** (1 / x[0].size)
    z = np.clip(z, 0, 1)
  else:
    z = x + kw.get("init_std", 0.001) * _f64(jax.random.normal(init_key, x.shape, jnp.float32))
  z = _np_project(z, x, norm, eps)
  for i in range(steps):
    grad_key, update_key = jax.random.split(jax.random.fold_in(loop_key, i))
    if name in ("pgd", "pgd_random_start", "fgsm"):
      g = _np_input_grad("cross_entropy", w, b, z, y)
    elif name in ("langevin_gaussian", "langevin_laplacian", "langevin"):
      g = _np_input_grad("log_one_minus_p", w, b, z, y)
    elif name == "trades_kl":
      g = _np_input_grad("kl", w, b, z, y, x_clean=x)
    elif name == "smooth_adv":
      n = kw["num_samples"]
      xi = kw["sigma"] * _f64(jax.random.normal(grad_key, (n,) + x.shape, jnp.float32))
      g = _np_smoothed_grad(w, b, z, y, xi)
    if name == "langevin_laplacian":
      # advbench's sign(grad of the batch mean + c xi) = sign(g + c B xi), B = mean_over.
      lap = _f64(jax.random.laplace(update_key, x.shape, jnp.float32))
      c = kw["noise_scale"] * kw.get("mean_over", 1)
      z = z + kw["step_size"] * _np_direction(g + c * lap, norm)
    elif name == "langevin":
      eta, temperature = kw["step_size"], kw["temperature"]
      xi = _f64(jax.random.normal(update_key, x.shape, jnp.float32))
      z = z + eta / temperature * g + math.sqrt(2 * eta) * xi
    else:
      step = kw.get("step_size", eps)
      # advbench's SmoothAdv steps from the clean image every time.
      base = x if name == "smooth_adv" and kw.get("from_clean", True) else z
      z = base + step * _np_direction(g, norm)
      if kw.get("noise_scale"):
        z = z + kw["noise_scale"] * _f64(jax.random.normal(update_key, x.shape, jnp.float32))
    z = _np_project(z, x, norm, eps)
  return z


_NUMPY_CASES = [(name, "linf") for name in (
    "pgd", "pgd_random_start", "fgsm", "langevin_gaussian", "langevin_laplacian", "langevin",
    "trades_kl", "smooth_adv")] + [(name, "l2") for name in (
        "pgd_random_start", "langevin_gaussian", "langevin_laplacian", "trades_kl")]


@pytest.mark.parametrize("name,norm", _NUMPY_CASES)
def test_sampler_matches_numpy(name, norm):
  w, b, x, y, logits_fn = _linear_problem()
  eps = {"linf": 0.2, "l2": 0.8}[norm]
  step = {"linf": 0.05, "l2": 0.3}[norm]
  kw = {
      "pgd": dict(step_size=step, steps=2),
      "pgd_random_start": dict(step_size=step, steps=2, random_start=True),
      "fgsm": {},
      "langevin_gaussian": dict(step_size=step, steps=2, noise_scale=0.02, init_std=0.01),
      "langevin_laplacian": dict(step_size=step, steps=2, noise_scale=0.1, mean_over=3,
                                 init_std=0.01),
      "langevin": dict(step_size=1e-3, steps=2, temperature=0.01, init_std=0.01),
      "trades_kl": dict(step_size=step, steps=2, init_std=0.01),
      "smooth_adv": dict(step_size=step, steps=3, sigma=0.3, num_samples=3),
  }[name]
  factory = _kwargs(name, norm)[0]
  kw = dict(kw, eps=eps, norm=norm)
  key = jax.random.key(21)
  sample = jax.jit(functools.partial(factory(**kw), logits_fn=logits_fn),
                   compiler_options=FAST_COMPILE)
  got = sample(key, x=jnp.asarray(x), y=jnp.asarray(y))
  want = _np_sampler(name, norm, key, w, b, x, y, kw)
  np.testing.assert_allclose(_f64(got), want, rtol=0, atol=2e-5)
  assert np.abs(want - x).max() > 1e-3  # the reference moved, so the comparison means something


@pytest.mark.slow
@pytest.mark.parametrize("from_clean", [True, False])
def test_smooth_adv_restarts_from_the_clean_image_as_advbench_or_accumulates(from_clean):
  w, b, x, y, logits_fn = _linear_problem()
  kw = dict(eps=0.2, step_size=0.05, steps=3, sigma=0.3, num_samples=3, norm="linf",
            from_clean=from_clean)
  key = jax.random.key(5)
  got = _f64(jax.jit(functools.partial(samplers.smooth_adv(**kw), logits_fn=logits_fn))(
      key, x=jnp.asarray(x), y=jnp.asarray(y)))
  np.testing.assert_allclose(got, _np_sampler("smooth_adv", "linf", key, w, b, x, y, kw),
                             rtol=0, atol=2e-5)
  moved = np.abs(got - x).max()
  # One step of 0.05 from x (advbench), or three steps up to 0.15.
  assert (moved <= 0.05 + 1e-6) if from_clean else (moved > 0.1), moved


def _np_lmc_laplacian_linf(key, w, b, x, y, *, eps, step_size, steps, noise_coeff, init_std):
  """advbench's ``LMC_Laplacian_Linf.forward`` (arobey1/advbench bd2071d) in float64::

    adv = x + init_std * randn
    for _ in range(steps):
      adv_loss = log(1 - softmax(f(adv))[range(B), y]).mean()
      grad = autograd.grad(adv_loss, [adv])
      adv = adv + step_size * sign(grad + noise_coeff * Laplace(0, 1).sample())
      adv = clamp(min(max(adv, x - eps), x + eps), 0, 1)

  The gradient is that of the batch *mean*; jax.random only reproduces dale_jax's
  draws (its keys as in :func:`samplers.ascent`).
  """
  x = _f64(x)
  init_key, loop_key = jax.random.split(key)
  adv = x + init_std * _f64(jax.random.normal(init_key, x.shape, jnp.float32))
  for i in range(steps):
    update_key = jax.random.split(jax.random.fold_in(loop_key, i))[1]
    grad = _np_input_grad("log_one_minus_p", w, b, adv, y) / len(x)
    noise = _f64(jax.random.laplace(update_key, x.shape, jnp.float32))
    adv = adv + step_size * np.sign(grad + noise_coeff * noise)
    adv = np.clip(np.minimum(np.maximum(adv, x - eps), x + eps), 0, 1)
  return adv


@pytest.mark.parametrize("algorithm", ["DALE", "Laplacian_DALE"])
def test_dale_samples_as_advbench_lmc_laplacian_linf(algorithm):
  """The sampler that DALE's (and Laplacian_DALE's) config builds, against advbench's
  Langevin-Laplacian update: the config's ``mean_over`` is the batch size, so the
  noise is relative to the batch-mean gradient as in advbench. The images lie in
  [0.1, 0.9], where advbench's unprojected start ``x + 0.001 N`` needs no projection."""
  from dale_jax import configs

  w, b, x, y, logits_fn = _linear_problem()
  x = (0.1 + 0.8 * x).astype(np.float32)
  config = configs.base_config("mnist", algorithm)
  config.batch_size = len(x)
  # Laplace noise of the gradient's size, so that the noise scale decides signs.
  config.sampler.noise_scale = 0.05
  section = configs.sampler_section(config)
  assert section["name"] == "langevin_laplacian" and section["mean_over"] == len(x)
  s = config.sampler
  key = jax.random.key(3)
  want = _np_lmc_laplacian_linf(key, w, b, x, y, eps=s.eps, step_size=s.step_size,
                                steps=s.steps, noise_coeff=s.noise_scale, init_std=0.001)

  def run(section):
    sample = jax.jit(functools.partial(samplers.make_sampler(section), logits_fn=logits_fn),
                     compiler_options=FAST_COMPILE)
    return _f64(sample(key, x=jnp.asarray(x), y=jnp.asarray(y)))

  np.testing.assert_allclose(run(section), want, rtol=0, atol=1e-6)
  # The noise relative to each example's own gradient (mean_over=1) is another sampler.
  assert np.abs(run(dict(section, mean_over=1)) - want).max() > 0.1


def _np_potential(name, w, b, z, y):
  """``potential(flat(z) W + b, y)`` per example in float64: CE or ``log(1 - p_y)``."""
  logits = z.reshape(len(z), -1) @ w + b
  log_p = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  if name == "cross_entropy":
    return -log_p[np.arange(len(z)), y]
  return np.logaddexp.reduce(np.where(np.eye(_C, dtype=bool)[y], -np.inf, log_p), axis=-1)


def _np_metropolis_hastings(key, w, b, x, y, kw):
  """The sampler over the Linf ball in float64 NumPy, jax.random only for the draws.

  The fork's rule (advbench/attacks.py, class MH, 31c09cb) as its code writes it:
  ``proposal = delta + eps * Laplace(0, mh_dale_scale * eps)``, clamped (its SE and
  Translation clamp the proposal in place), ``alpha = min(1, L' / L)`` on the mean CE of
  the batch and one Bernoulli(alpha) for all; the other fields as the docstring writes.
  Returns ``x + delta`` and the counts of accepted and rejected per-example moves.
  """
  x = _f64(x)
  eps, s, temperature = kw["eps"], kw["proposal_std"], kw["temperature"]
  start_key, chain_key = jax.random.split(key)
  delta = np.clip(x + _f64(jax.random.uniform(start_key, x.shape, jnp.float32, -eps, eps)),
                  0, 1) - x
  value_of = lambda d: _np_potential(kw["potential"], w, b, x + d, y)
  value = value_of(delta)
  accepted = rejected = 0
  for i in range(kw["steps"]):
    prop_key, accept_key = jax.random.split(jax.random.fold_in(chain_key, i))
    draw = jax.random.laplace if kw["proposal"] == "laplace" else jax.random.normal
    xi = _f64(draw(jax.random.split(prop_key, 1)[0], x.shape, jnp.float32))
    if kw["radius_scaled"]:
      proposal = delta + (s * eps * xi) * eps
    else:
      proposal = delta + s * xi
    clamped = np.clip(np.clip(proposal, -eps, eps), -x, 1 - x)  # advbench's Linf.clamp_delta
    if kw["outside"] == "project":
      proposal, inside = clamped, np.ones(len(x), bool)
    else:
      inside = np.abs(clamped - proposal).reshape(len(x), -1).max(1) < 1e-6
    proposed = value_of(proposal)
    current = value
    if not kw["per_example"]:
      total = np.sum if kw["acceptance"] == "density" else np.mean
      current, proposed_total, inside = total(current), total(proposed), inside.all()
    else:
      proposed_total = proposed
    if kw["acceptance"] == "density":
      alpha = np.exp(np.minimum((proposed_total - current) / temperature, 0.0))
    else:
      alpha = np.minimum(1.0, (proposed_total / current) ** (1 / temperature))
    alpha = np.where(inside, alpha, 0.0)
    u = _f64(jax.random.uniform(accept_key, np.shape(alpha), jnp.float32))
    accept = np.broadcast_to(u < alpha, (len(x),))
    delta = np.where(accept.reshape(-1, 1, 1, 1), proposal, delta)
    value = np.where(accept, proposed, value)
    accepted, rejected = accepted + accept.sum(), rejected + (~accept).sum()
  return x + delta, accepted, rejected


_DENSITY = dict(proposal="gaussian", radius_scaled=False, acceptance="density",
                potential="log_one_minus_p", temperature=0.05, per_example=True,
                outside="reject")


def _mh_problem(gain=4.0):
  """The linear problem with the model's own labels, its logits times ``gain``, and the
  inputs in [0.25, 0.75]: small cross-entropies that a step changes by large factors,
  and an eps = 0.2 ball that the box does not cut."""
  w, b, x, _, _ = _linear_problem()
  w, b, x = gain * w, gain * b, 0.25 + 0.5 * x
  y = (_f64(x).reshape(len(x), -1) @ w + b).argmax(-1).astype(np.int32)
  w32, b32 = w.astype(np.float32), b.astype(np.float32)
  return w, b, x, y, lambda z: z.reshape((z.shape[0], -1)) @ w32 + b32


@pytest.mark.parametrize("fields", [
    dict(_MH_FORK, proposal_std=2.0),  # the advbench fork's MH
    dict(_MH_FORK, proposal_std=2.0, per_example=True),  # its rules, a chain per example
    dict(_MH_FORK, proposal="gaussian", radius_scaled=False, proposal_std=0.003,
         outside="reject"),
    dict(_DENSITY, proposal_std=0.003),  # the paper's density, a chain per example
    dict(_DENSITY, proposal_std=0.003, per_example=False, proposal="laplace"),
], ids=["fork", "fork_per_example", "loss_ratio_reject", "density", "density_batch"])
def test_metropolis_hastings_matches_numpy(fields):
  w, b, x, y, logits_fn = _mh_problem()
  kw = dict(fields, eps=0.2, norm="linf", steps=10)
  key = jax.random.key(5)
  got = _call(samplers.metropolis_hastings(**kw), key, logits_fn, x, y)
  want, accepted, rejected = _np_metropolis_hastings(key, w, b, x, y, kw)
  np.testing.assert_allclose(_f64(got), want, rtol=0, atol=1e-5)
  # Both outcomes occur, so the acceptance rule is what the comparison pins.
  assert accepted > 0 and rejected > 0, (accepted, rejected)
  if not kw["per_example"]:  # the batch moves together or not at all
    assert accepted % len(x) == 0 and rejected % len(x) == 0


def test_uniform_sampler_matches_threat_uniform(tiny):
  key = jax.random.key(8)
  got = samplers.uniform(eps=0.3)(key, tiny.logits_fn, tiny.x, tiny.y)
  want = np.clip(_f64(tiny.x) + _f64(jax.random.uniform(key, tiny.x.shape, jnp.float32, -.3, .3)),
                 0, 1)
  np.testing.assert_allclose(_f64(got), want, atol=1e-6)


def test_steps_zero_returns_the_projected_start(tiny):
  sample = samplers.langevin_gaussian(eps=0.3, step_size=0.1, steps=0, noise_scale=0.1,
                                      init_std=0.5)
  key = jax.random.key(0)
  out = _call(sample, key, tiny.logits_fn, tiny.x, tiny.y)
  init_key, _ = jax.random.split(key)
  start = _f64(tiny.x) + 0.5 * _f64(jax.random.normal(init_key, tiny.x.shape, jnp.float32))
  np.testing.assert_allclose(_f64(out), _np_project(start, _f64(tiny.x), "linf", 0.3), atol=1e-6)


def test_no_gradient_flows_out_of_a_sampler(tiny):
  # x_adv is a constant for the model: d x_adv / d params = 0.
  def f(scale):
    logits_fn = lambda z: scale * tiny.logits_fn(z)
    x_adv = samplers.pgd(eps=0.3, step_size=0.1, steps=2)(jax.random.key(0), logits_fn,
                                                            tiny.x, tiny.y)
    return jnp.sum(x_adv)

  assert float(jax.jit(jax.grad(f), compiler_options=FAST_COMPILE)(1.0)) == 0.0


# ----------------------------------------------------------------------------
# Samplers move the loss the right way on a trained model.


@pytest.fixture(scope="module")
def cnn_batch(trained_cnn):
  assert trained_cnn.accuracy > 0.8
  x, y = jnp.asarray(trained_cnn.x[:8]), jnp.asarray(trained_cnn.y[:8])
  return trained_cnn.logits_fn, x, y


def _run(sample, logits_fn, x, y):
  # Default compiler options: at lower LLVM optimisation CPU convolutions are far slower.
  return jax.jit(lambda k, x, y: sample(k, logits_fn, x, y))(jax.random.key(0), x, y)


def _mean(potential, logits_fn, x, y):
  return float(jnp.mean(potential(logits_fn(x), y)))


@pytest.mark.slow
def test_pgd_raises_cross_entropy(cnn_batch):
  logits_fn, x, y = cnn_batch
  pgd = _run(samplers.pgd(eps=0.1, step_size=0.03, steps=5), logits_fn, x, y)
  noise = _run(samplers.uniform(eps=0.1), logits_fn, x, y)
  ce = lambda z: potentials.cross_entropy(logits_fn(z), y)
  assert float(ce(pgd).mean()) > float(ce(x).mean()) + 1.0
  assert float(ce(pgd).mean()) > float(ce(noise).mean()) + 1.0
  assert np.all(np.asarray(ce(pgd)) > np.asarray(ce(x)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["langevin_gaussian", "langevin_laplacian", "langevin"])
def test_langevin_samplers_raise_log_one_minus_p(name, cnn_batch):
  logits_fn, x, y = cnn_batch
  kw = {
      "langevin_gaussian": dict(step_size=0.03, steps=5, noise_scale=0.001),
      "langevin_laplacian": dict(step_size=0.03, steps=5, noise_scale=0.001),
      "langevin": dict(step_size=1e-4, steps=5, temperature=1e-3),
  }[name]
  x_adv = _run(getattr(samplers, name)(eps=0.1, **kw), logits_fn, x, y)
  noise = _run(samplers.uniform(eps=0.1), logits_fn, x, y)
  pot = lambda z: _mean(potentials.log_one_minus_p, logits_fn, z, y)
  assert pot(x_adv) > pot(x) + 1.0
  assert pot(x_adv) > pot(noise) + 1.0


@pytest.mark.slow
def test_smooth_adv_lowers_the_smoothed_label_probability(cnn_batch):
  logits_fn, x, y = cnn_batch
  sigma = 0.25
  # Accumulated steps (advbench's restarts from x move one step only; tested above).
  x_adv = _run(samplers.smooth_adv(eps=0.1, step_size=0.03, steps=5, sigma=sigma,
                                   num_samples=8, from_clean=False), logits_fn, x, y)

  @jax.jit
  def smoothed_p_y(z):
    # Monte Carlo estimate of E_xi softmax_y(f(z + sigma xi)) with 64 fresh draws.
    xi = sigma * jax.random.normal(jax.random.key(123), (64,) + z.shape)
    p = jax.nn.softmax(logits_fn((z[None] + xi).reshape((-1,) + z.shape[1:])))
    p_y = jnp.take_along_axis(p.reshape(64, z.shape[0], -1), y[None, :, None], -1)[..., 0]
    return jnp.mean(p_y, axis=0)

  clean, adv = np.asarray(smoothed_p_y(x)), np.asarray(smoothed_p_y(x_adv))
  assert adv.mean() < clean.mean() - 0.1
  assert np.sum(adv < clean) >= 6


@pytest.mark.slow
def test_trades_sampler_raises_kl(cnn_batch):
  logits_fn, x, y = cnn_batch
  x_adv = _run(samplers.trades_kl(eps=0.1, step_size=0.03, steps=5), logits_fn, x, y)
  noise = _run(samplers.uniform(eps=0.1), logits_fn, x, y)
  clean = logits_fn(x)
  kl = lambda z: float(jnp.mean(potentials.kl_to_clean(logits_fn(z), clean)))
  assert kl(x_adv) > 0.2
  assert kl(x_adv) > 10 * kl(noise)


# ----------------------------------------------------------------------------
# Bad input is rejected before anything is traced, naming the field.


_BAD = [
    (samplers.pgd, dict(eps=-0.1, step_size=0.1, steps=3), "eps"),
    (samplers.pgd, dict(eps=math.inf, step_size=0.1, steps=3), "eps"),
    (samplers.pgd, dict(eps=0.3, step_size=0.0, steps=3), "step_size"),
    (samplers.pgd, dict(eps=0.3, step_size=-0.1, steps=3), "step_size"),
    (samplers.pgd, dict(eps=0.3, step_size=math.nan, steps=3), "step_size"),
    (samplers.pgd, dict(eps=0.3, step_size=0.1, steps=-1), "steps"),
    (samplers.pgd, dict(eps=0.3, step_size=0.1, steps=2.5), "steps"),
    (samplers.pgd, dict(eps=0.3, step_size=0.1, steps=3.0), "steps"),
    (samplers.pgd, dict(eps=0.3, step_size=0.1, steps=3, norm="l0"), "norm"),
    (samplers.pgd, dict(eps=0.3, step_size=0.1, steps=3, restarts=0), "restarts"),
    (samplers.pgd, dict(eps=0.3, step_size=0.1, steps=3, potential="hinge"), "potential"),
    (samplers.fgsm, dict(eps=-0.3), "eps"),
    (samplers.fgsm, dict(eps=0.3, norm="L2"), "norm"),
    (samplers.langevin_gaussian, dict(eps=0.3, step_size=0.1, steps=3, noise_scale=-1.0),
     "noise_scale"),
    (samplers.langevin_gaussian, dict(eps=0.3, step_size=0.1, steps=3, noise_scale=0.0,
                                      init_std=-1.0), "init_std"),
    (samplers.langevin_laplacian, dict(eps=0.3, step_size=0.0, steps=3, noise_scale=0.1),
     "step_size"),
    (samplers.langevin, dict(eps=0.3, step_size=1e-3, steps=3, temperature=0.0), "temperature"),
    (samplers.langevin, dict(eps=0.3, step_size=1e-3, steps=-2), "steps"),
    (samplers.trades_kl, dict(eps=0.3, step_size=0.1, steps=3, norm="linfty"), "norm"),
    (samplers.smooth_adv, dict(eps=0.3, step_size=0.1, steps=3, sigma=-0.5, num_samples=4),
     "sigma"),
    (samplers.smooth_adv, dict(eps=0.3, step_size=0.1, steps=3, sigma=0.5, num_samples=0),
     "num_samples"),
    (samplers.uniform, dict(eps=-0.3), "eps"),
    (samplers.uniform, dict(eps=0.3, norm="l0"), "norm"),
    (samplers.worst_of_k, dict(eps=0.3, k=3, select="draw"), "select"),
    (samplers.metropolis_hastings, dict(eps=0.3, steps=3, proposal_std=0.1, proposal="cauchy"),
     "proposal"),
    (samplers.metropolis_hastings, dict(eps=0.3, steps=3, proposal_std=0.1, radius_scaled=1),
     "radius_scaled"),
    (samplers.metropolis_hastings, dict(eps=0.3, steps=3, proposal_std=0.1, acceptance="ratio"),
     "acceptance"),
    (samplers.metropolis_hastings, dict(eps=0.3, steps=3, proposal_std=0.1, per_example="no"),
     "per_example"),
    (samplers.metropolis_hastings, dict(eps=0.3, steps=3, proposal_std=0.1, outside="clip"),
     "outside"),
    (samplers.metropolis_hastings, dict(eps=0.3, steps=3, proposal_std=0.1, potential="hinge"),
     "potential"),
    # A ratio of losses needs a positive loss: log(1 - p_y) is negative.
    (samplers.metropolis_hastings, dict(eps=0.3, steps=3, proposal_std=0.1,
                                        acceptance="loss_ratio"), "potential"),
]


@pytest.mark.parametrize("factory,kw,field", _BAD,
                         ids=[f"{f.__name__}-{field}-{i}" for i, (f, _, field) in enumerate(_BAD)])
def test_bad_hyperparameters_raise_at_build_time(factory, kw, field):
  with pytest.raises(ValueError, match=rf"\b{field}\b"):
    factory(**kw)


def test_numpy_scalar_hyperparameters_are_accepted(tiny):
  # Hyperparameters often come out of NumPy (random search, config arithmetic).
  sample = samplers.pgd(eps=np.float32(0.3), step_size=np.float64(0.1), steps=np.int64(2),
                        restarts=np.int32(1))
  out = _call(sample, jax.random.key(0), tiny.logits_fn, tiny.x, tiny.y)
  ref = _call(samplers.pgd(eps=0.3, step_size=0.1, steps=2), jax.random.key(0), tiny.logits_fn,
              tiny.x, tiny.y)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)


@pytest.mark.parametrize("name", ["pgd", "uniform", "smooth_adv"])
def test_bad_inputs_raise_naming_the_argument(name, tiny):
  sample = _build(name, "linf")
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"\by\b.*\[0, 10\)"):
    sample(key, tiny.logits_fn, tiny.x, tiny.y.at[0].set(10))
  with pytest.raises(ValueError, match=r"\by\b.*\[0, 10\)"):
    sample(key, tiny.logits_fn, tiny.x, tiny.y.at[1].set(-1))
  with pytest.raises(ValueError, match=r"\by\b"):
    sample(key, tiny.logits_fn, tiny.x, tiny.y[:3])
  with pytest.raises(ValueError, match=r"\by\b"):
    sample(key, tiny.logits_fn, tiny.x, tiny.y[:, None])
  with pytest.raises(ValueError, match=r"\by\b.*integer"):
    sample(key, tiny.logits_fn, tiny.x, tiny.y.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"\bx\b"):
    sample(key, tiny.logits_fn, tiny.x[0, 0, 0], tiny.y)


def test_make_sampler_builds_the_factory():
  w, b, x, y, logits_fn = _linear_problem()
  key = jax.random.key(1)
  config = dict(name="pgd", eps=0.2, step_size=0.05, steps=3, random_start=True)
  got = _call(samplers.make_sampler(config), key, logits_fn, x, y)
  want = _call(samplers.pgd(eps=0.2, step_size=0.05, steps=3, random_start=True), key,
               logits_fn, x, y)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert config["name"] == "pgd"  # the config is not consumed


def test_make_sampler_rejects_unknown_names_and_fields():
  with pytest.raises(ValueError, match=r"sampler\.name.*langevin_gaussian.*'apgd'"):
    samplers.make_sampler(dict(name="apgd", eps=0.3))
  with pytest.raises(ValueError, match=r"sampler\.name"):
    samplers.make_sampler(dict(eps=0.3))
  with pytest.raises(ValueError, match=r"sampler\.noise_scale.*'pgd'.*step_size"):
    samplers.make_sampler(dict(name="pgd", eps=0.3, step_size=0.1, steps=3, noise_scale=0.1))
  with pytest.raises(ValueError, match=r"sampler\.init\b"):
    samplers.make_sampler(dict(name="langevin_gaussian", eps=0.3, step_size=0.1, steps=3,
                               noise_scale=0.0, init="uniform"))
  with pytest.raises(ValueError, match=r"\bstep_size\b"):
    samplers.make_sampler(dict(name="pgd", eps=0.3, step_size=-1.0, steps=3))


def test_every_registered_sampler_is_covered():
  assert set(samplers.SAMPLERS) == {_kwargs(n, "linf")[0].__name__ for n in VARIANTS}


# ----------------------------------------------------------------------------
# Chunked sampling.


@pytest.mark.parametrize("groups", [1, 2])
def test_in_chunks_matches_the_whole_batch_without_noise(groups, tiny):
  pgd = samplers.pgd(eps=0.3, step_size=0.1, steps=3)
  key = jax.random.key(5)
  whole = _call(pgd, key, tiny.logits_fn, tiny.x, tiny.y)
  chunked = _call(samplers.in_chunks(pgd, 2, groups=groups), key, tiny.logits_fn, tiny.x, tiny.y)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-6)


def test_in_chunks_takes_each_devices_rows_into_every_chunk():
  # A "sampler" that writes the smallest label of the chunk it was given.
  first_label = lambda key, logits_fn, x, y: jnp.zeros_like(x) + jnp.min(y).astype(x.dtype)
  x, y = jnp.zeros((8, 1)), jnp.arange(8)
  run = lambda groups: np.asarray(samplers.in_chunks(first_label, 4, groups=groups)(
      jax.random.key(0), None, x, y))[:, 0]
  # One group: chunks are rows 0-3 and 4-7. Two groups (devices holding rows 0-3 and
  # 4-7): each chunk takes two rows from each device, {0, 1, 4, 5} and {2, 3, 6, 7}.
  np.testing.assert_array_equal(run(1), [0, 0, 0, 0, 4, 4, 4, 4])
  np.testing.assert_array_equal(run(2), [0, 0, 2, 2, 0, 0, 2, 2])
  # A batch the chunk does not divide is sampled whole.
  np.testing.assert_array_equal(
      np.asarray(samplers.in_chunks(first_label, 3)(jax.random.key(0), None, x, y))[:, 0],
      np.zeros(8))


def test_in_chunks_draws_independent_noise_per_chunk(tiny):
  noisy = samplers.langevin_gaussian(eps=0.3, step_size=1e-6, steps=1, noise_scale=0.05,
                                     init_std=0.0)
  x = jnp.full((4, 6, 6, 1), 0.5)
  out = np.asarray(_call(samplers.in_chunks(noisy, 2), jax.random.key(1), tiny.logits_fn, x,
                         tiny.y))
  assert not np.allclose(out[:2], out[2:], atol=1e-5)  # chunks do not reuse a key
  assert np.all(np.abs(out - 0.5) <= 0.3 + 1e-6)


@pytest.mark.parametrize("chunk_size,groups", [(0, 1), (4, 0), (3, 2)])
def test_in_chunks_rejects_bad_sizes(chunk_size, groups):
  with pytest.raises(ValueError, match="chunk_size|groups"):
    samplers.in_chunks(samplers.fgsm(eps=0.3), chunk_size, groups=groups)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_sampler_stays_in_the_l1_ball_and_the_box(name, tiny):
  """norm="l1" (PGD-L1 or DALE-L1 training): inside the ball of radius 2 and [0, 1], and moved."""
  factory, kw = _kwargs(name, "linf")
  kw.update(norm="l1", eps=2.0)
  if "step_size" in kw:
    kw["step_size"] = 1.0
  out = np.asarray(_call(factory(**kw), _key(0), tiny.logits_fn, tiny.x, tiny.y))
  delta = (out.astype(np.float64) - np.asarray(tiny.x, np.float64)).reshape(len(out), -1)
  assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0
  assert np.all(np.abs(delta).sum(1) <= 2.0 * (1 + 1e-5) + 1e-6)
  assert np.abs(delta).sum(1).min() > 0, "the sampler did not move every example"
