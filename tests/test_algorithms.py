"""Every algorithm, built from its default config, against advbench's loss written in NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dale_jax import algorithms
from dale_jax import configs
from dale_jax import experiment
from dale_jax import steps as steps_lib

B, C = 8, 10
NU = 0.7  # a multiplier away from the default 1.0, so nu-weighted terms are visible
STEPS_PER_EPOCH = 3


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ce(z, y):
  """Per-example cross-entropy."""
  return -np.log(_softmax(z)[np.arange(len(y)), y])


def _log_softmax(z):
  return np.log(_softmax(z))


def _kl(clean, adv):
  """TRADES' KLDivLoss(log_softmax(adv), softmax(clean), 'batchmean')."""
  p = _softmax(clean)
  return np.mean(np.sum(p * (np.log(p) - np.log(_softmax(adv))), -1))


def _mart(clean, adv, y, beta):
  adv_probs = _softmax(adv)
  top2 = np.argsort(adv_probs, axis=1)[:, -2:]
  new_y = np.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
  boosted = _ce(adv, y).mean() - np.mean(np.log(1.0001 - adv_probs[np.arange(len(y)), new_y]
                                                + 1e-12))
  nat = _softmax(clean)
  kl = np.sum(nat * (np.log(nat) - np.log(adv_probs + 1e-12)), axis=1)
  return boosted + beta * np.mean(kl * (1.0000001 - nat[np.arange(len(y)), y]))


def _cvar(per_draw, beta, step, n_steps, autograd=False):
  """advbench's CVaR, t from 1.0 (per-example steps): CVaR_SGD(_PD) back-propagate the
  R-U bracket computed in the last pass of their n_steps loop, before its t update;
  CVaR_SGD_Autograd computes it after the loop."""
  bracket = lambda t: np.mean(t + np.mean(np.maximum(per_draw - t, 0.0), axis=0) / beta)
  t = np.ones(per_draw.shape[1])
  loss = None
  for _ in range(n_steps):
    loss = bracket(t)
    t = t - step * (1.0 - np.mean(per_draw > t, axis=0) / beta)
  return bracket(t) if autograd else loss


def _reference(name, loss_cfg, clean, adv, y, nu):
  """(total loss, constraint or None) as advbench computes them (with the documented fixes)."""
  ce_clean = _ce(clean, y).mean() if clean is not None else None
  if adv is not None:
    ce_adv = np.mean([_ce(a, y).mean() for a in adv])  # mean over draws and batch
    a = adv[0]
  if name == "ERM":
    return ce_clean, None
  if name in ("ERM_DataAug", "FGSM", "PGD", "RandSmoothing", "Worst_Of_K"):
    return ce_adv, None
  if name == "TRADES":
    ce = ce_clean if loss_cfg["ce_on"] == "clean" else _ce(a, y).mean()
    return ce + loss_cfg["beta"] * _kl(clean, a), None
  if name in ("ALP", "CLP"):
    # advbench pairs its network's outputs: log-probabilities on MNIST (pair_on).
    out = _log_softmax if loss_cfg.get("pair_on", "logits") == "log_softmax" else np.asarray
    pairing = np.mean(np.linalg.norm(out(a.astype(np.float64)) - out(clean), axis=-1))
    ce = _ce(a, y).mean() if name == "ALP" else ce_clean
    return ce + loss_cfg["weight"] * pairing, None
  if name == "MART":
    return _mart(clean, a, y, loss_cfg["beta"]), None
  if name == "TERM":
    t = loss_cfg["t"]
    return np.log(np.mean(np.exp(t * _ce(clean, y))) + 1e-6) / t, None
  if name.startswith("CVaR"):
    per_draw = np.stack([_ce(d, y) for d in adv])
    cvar = _cvar(per_draw, loss_cfg["beta"], loss_cfg["t_step_size"], loss_cfg["n_steps"],
                 autograd=name == "CVaR_SGD_Autograd")
    if name == "CVaR_SGD_PD":
      # advbench constrains the mean CE over the draws (plain_loss / M); or the clean CE.
      ce = ce_clean if loss_cfg.get("constraint", "draws") == "clean" else per_draw.mean()
      return cvar + nu * ce, ce
    return cvar, None
  if name in ("Gaussian_DALE", "Laplacian_DALE"):
    return _ce(a, y).mean() + loss_cfg["nu_fixed"] * ce_clean, None
  if name in ("Gaussian_DALE_PD", "DALE", "MH_DALE_PD"):
    return _ce(a, y).mean() + nu * ce_clean, ce_clean
  if name in ("Gaussian_DALE_PD_Reverse", "MH_DALE_PD_Reverse"):
    return ce_clean + nu * _ce(a, y).mean(), _ce(a, y).mean()
  if name == "KL_DALE_PD":
    return _kl(clean, a) + nu * ce_clean, ce_clean
  raise AssertionError(f"no reference for {name}")


def _build(name, dataset="mnist_digits", **overrides):
  config = configs.base_config(dataset, name)
  for section, values in overrides.items():
    config[section].update(values)
  return config, steps_lib.chunked(experiment.make_algorithm(config, STEPS_PER_EPOCH), config)


def _inputs(algorithm, seed=0):
  rng = np.random.default_rng(seed)
  clean = (3 * rng.normal(size=(B, C))).astype(np.float32) if algorithm.needs_clean else None
  adv = ((3 * rng.normal(size=(algorithm.draws, B, C))).astype(np.float32)
         if algorithm.sampler is not None else None)
  y = rng.integers(0, C, B).astype(np.int32)
  nu = jnp.float32(NU) if algorithm.dual is not None else None
  return clean, adv, y, nu


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
def test_loss_matches_the_advbench_formula(name):
  config, algorithm = _build(name)
  assert algorithm.name == name
  clean, adv, y, nu = _inputs(algorithm)
  total, meters, constraint = jax.jit(algorithm.loss)(clean, adv, y, nu)
  want, want_constraint = _reference(name, config.loss.to_dict(), clean, adv, y,
                                     None if nu is None else NU)
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  np.testing.assert_allclose(float(meters["Loss"]), want, rtol=1e-5)
  if want_constraint is None:
    assert constraint is None
  else:
    np.testing.assert_allclose(float(constraint), want_constraint, rtol=1e-5)
    np.testing.assert_allclose(float(meters["dual variable"]), NU)


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
def test_structure_follows_the_config(name):
  config, algorithm = _build(name)
  spec = algorithms.ALGORITHMS[name]
  assert (algorithm.sampler is not None) == spec.uses_sampler == bool(config.sampler)
  assert algorithm.draws == (config.draws if spec.uses_sampler else 0)
  assert (algorithm.dual is not None) == spec.uses_dual == bool(config.dual)
  if name in ("ERM_DataAug", "CVaR_SGD", "CVaR_SGD_Autograd", "CVaR_SGD_PD"):
    assert config.sampler.name == "uniform" and algorithm.draws == 20


@pytest.mark.parametrize("name", ["Gaussian_DALE_PD", "Gaussian_DALE_PD_Reverse", "KL_DALE_PD",
                                  "CVaR_SGD_PD", "DALE"])
def test_primal_step_treats_nu_as_a_constant(name):
  _, algorithm = _build(name)
  clean, adv, y, nu = _inputs(algorithm, seed=1)
  grad = jax.grad(lambda nu: algorithm.loss(clean, adv, y, nu)[0])(nu)
  assert float(grad) == 0.0


@pytest.mark.parametrize("name", ["Gaussian_DALE_PD", "Gaussian_DALE_PD_Reverse", "KL_DALE_PD",
                                  "CVaR_SGD_PD"])
def test_advbench_dual_updates_every_step(name):
  # nu starts at 1.0 and moves by eta_d (c - rho) = 0.001 (c - 0.1) at every minibatch.
  _, algorithm = _build(name)
  state = algorithm.dual.init()
  state = algorithm.dual.update(jnp.float32(2.1), state)
  np.testing.assert_allclose(float(state.nu), 1.0 + 0.001 * 2.0, rtol=1e-6)


def test_paper_dale_updates_once_per_epoch_with_advbench_steps_added_up():
  # nu from advbench's 1.0; once per epoch (3 steps here) it takes the sum of advbench's
  # per-step moves 0.001 * (c_t - 0.1), projected once.
  _, algorithm = _build("DALE")
  state = algorithm.dual.init()
  assert float(state.nu) == 1.0
  for c in (0.5, 0.3):
    state = algorithm.dual.update(jnp.float32(c), state)
    assert float(state.nu) == 1.0
  state = algorithm.dual.update(jnp.float32(0.4), state)  # third step: the epoch is over
  np.testing.assert_allclose(float(state.nu), 1.0 + 0.001 * (0.4 + 0.2 + 0.3), rtol=1e-6)
  # The epoch's sum (3 steps of -0.1), not its mean; projected onto nu >= 0.
  for step_size, want in ((1.0, 0.7), (10.0, 0.0)):
    _, algorithm = _build("DALE", dual=dict(step_size=step_size))
    state = algorithm.dual.init()
    for c in (0.0, 0.0, 0.0):
      state = algorithm.dual.update(jnp.float32(c), state)
    np.testing.assert_allclose(float(state.nu), want, rtol=1e-6, atol=1e-7)


def test_trades_can_put_the_cross_entropy_on_the_adversarial_images():
  config, algorithm = _build("TRADES", loss=dict(ce_on="adv"))
  clean, adv, y, _ = _inputs(algorithm)
  total = algorithm.loss(clean, adv, y, None)[0]
  want, _ = _reference("TRADES", config.loss.to_dict(), clean, adv, y, None)
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert abs(want - _reference("TRADES", dict(config.loss.to_dict(), ce_on="clean"), clean, adv,
                               y, None)[0]) > 1e-2  # the two choices differ here


def test_erm_data_aug_averages_the_perturbed_draws():
  # advbench averaged the clean loss M times; here each draw counts.
  _, algorithm = _build("ERM_DataAug")
  _, adv, y, _ = _inputs(algorithm)
  adv[1:] = 0.0
  total = float(algorithm.loss(None, adv, y, None)[0])
  want = (_ce(adv[0], y).mean() + (algorithm.draws - 1) * np.log(C)) / algorithm.draws
  np.testing.assert_allclose(total, want, rtol=1e-5)


def test_cvar_autograd_and_subgradient_agree():
  # With one more pass, CVaR_SGD's loss is taken at the t of all of Autograd's updates.
  _, auto = _build("CVaR_SGD_Autograd")
  config, _ = _build("CVaR_SGD")
  _, sub = _build("CVaR_SGD", loss=dict(n_steps=config.loss.n_steps + 1))
  _, adv, y, _ = _inputs(sub, seed=3)
  np.testing.assert_allclose(float(sub.loss(None, adv, y, None)[0]),
                             float(auto.loss(None, adv, y, None)[0]), rtol=1e-6)


def test_unknown_algorithm_lists_the_valid_names():
  with pytest.raises(ValueError, match=r"algorithm must be one of .*'Gaussian_DALE_PD'.*'PGD'"):
    algorithms.make_algorithm("DALE_PD")
  with pytest.raises(ValueError, match="Gaussian_DALE_PD"):
    configs.base_config("mnist_digits", "dale")


@pytest.mark.parametrize("name,kwargs,field", [
    ("TRADES", dict(loss=dict(beta=1.0, ce_on="both")), "ce_on"),
    ("TRADES", dict(loss=dict(beta=1.0, gamma=2.0)), "gamma"),
    ("Gaussian_DALE_PD_Reverse", dict(loss=dict(objective="adv")), "objective"),
    ("Gaussian_DALE_PD", dict(sampler=dict(name="langevin_gaussian", eps=0.3, step_size=0.1,
                                           steps=7, noise_scale=0.0, temperature=1.0)),
     "temperature"),
    ("PGD", dict(sampler=dict(name="pgd", eps=0.3, step_size=0.1, steps=-7)), "steps"),
    ("PGD", dict(sampler=dict(name="pgdd", eps=0.3)), "sampler.name"),
    ("Gaussian_DALE_PD", dict(dual=dict(step_size=0.001, margin=0.1, every="batch")), "every"),
    ("Gaussian_DALE_PD", dict(dual=dict(step_size=-0.001, margin=0.1)), "step_size"),
    ("ERM_DataAug", dict(sampler=dict(name="uniform", eps=0.3), draws=0), "draws"),
    # Values that would only show up as inf/NaN losses or a tracing error later.
    ("TERM", dict(loss=dict(t=0.0)), "loss.t"),
    ("CVaR_SGD", dict(loss=dict(beta=0.0, t_step_size=1.0, n_steps=5)), "loss.beta"),
    ("CVaR_SGD_PD", dict(loss=dict(beta=1.5, t_step_size=1.0, n_steps=5)), "loss.beta"),
    ("CVaR_SGD", dict(loss=dict(beta=0.5, t_step_size=-1.0, n_steps=5)), "loss.t_step_size"),
    ("CVaR_SGD_Autograd", dict(loss=dict(beta=0.5, t_step_size=1.0, n_steps=2.5)),
     "loss.n_steps"),
    ("CVaR_SGD", dict(loss=dict(beta=0.5, t_step_size=1.0, n_steps=-1)), "loss.n_steps"),
    # advbench's loop computes the loss it back-propagates: no pass, no loss.
    ("CVaR_SGD_PD", dict(loss=dict(beta=0.5, t_step_size=1.0, n_steps=0)), "loss.n_steps"),
])
def test_bad_sections_raise_naming_the_field(name, kwargs, field):
  config = configs.base_config("mnist_digits", name)
  sections = dict(sampler=config.sampler.to_dict(), loss=config.loss.to_dict(),
                  dual=config.dual.to_dict(), draws=config.draws)
  with pytest.raises(ValueError, match=field):
    algorithms.make_algorithm(name, **dict(sections, **kwargs))


def test_missing_sections_are_named():
  with pytest.raises(ValueError, match=r"sampler\.name"):
    algorithms.make_algorithm("PGD")
  sampler = configs.base_config("mnist_digits", "Gaussian_DALE").sampler.to_dict()
  with pytest.raises(ValueError, match="nu_fixed"):
    algorithms.make_algorithm("Gaussian_DALE", sampler=sampler)
  with pytest.raises(ValueError, match=r"dual.*step_size"):
    algorithms.make_algorithm("Gaussian_DALE_PD", sampler=sampler)
  with pytest.raises(ValueError, match=r"dual.*momentum"):
    algorithms.make_algorithm("Gaussian_DALE_PD", sampler=sampler,
                              dual=dict(step_size=0.1, margin=0.1, momentum=0.9))


@pytest.mark.slow
def test_batch_level_samplers_are_not_cut_into_chunks():
  from dale_jax import samplers
  assert samplers.couples_examples({"name": "worst_of_k", "select": "batch"})
  assert samplers.couples_examples({"name": "metropolis_hastings", "per_example": False})
  assert not samplers.couples_examples({"name": "worst_of_k", "select": "example"})
  assert not samplers.couples_examples({"name": "pgd"})
  config = configs.base_config("mnist_digits", "Worst_Of_K")
  assert config.sampler.select == "batch"
  n = 2 * steps_lib.CPU_SAMPLER_CHUNK
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(n, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(np.arange(n) % C, jnp.int32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(16, C)), jnp.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w
  built = steps_lib.chunked(experiment.make_algorithm(config), config, platform="cpu").sampler
  whole = samplers.make_sampler(configs.sampler_section(config))
  key = jax.random.key(3)
  np.testing.assert_array_equal(built(key, logits_fn, x, y), whole(key, logits_fn, x, y))
  # The fork's rule keeps one draw for all examples: the whole batch moved alike.
  chunked = samplers.in_chunks(whole, steps_lib.CPU_SAMPLER_CHUNK)(key, logits_fn, x, y)
  assert not np.array_equal(np.asarray(chunked), np.asarray(whole(key, logits_fn, x, y)))
