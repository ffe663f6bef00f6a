"""advbench's evaluators against float64 NumPy on a tiny MLP, padded batches included.

The reference re-derives every quantity from its definition in the reference notes:
the MLP's logits and input gradient by hand, PGD/FGSM as signed steps projected onto
the eps-ball and the [0, 1] box, CVaR as ``steps`` subgradient steps on ``t`` from 0
followed by the Rockafellar-Uryasev bracket, Augmented as per-image accuracy over the
draws and the share of images above ``(1 - beta) * 100``. The uniform draws are the
inputs of CVaR and Augmented; they are taken from :func:`dale_jax.threat.uniform` with
the keys the evaluator documents, and everything computed from them is NumPy's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import mlp_logits_fn, mlp_params
from dale_jax import data, evaluation, experiment, parallel, threat
from dale_jax import steps as steps_lib

SHAPE = (10, 6, 6, 1)  # 10 real images
EPS = 0.1
SETTINGS = dict(eps=EPS, norm="linf", pgd_steps=5, pgd_step_size=0.03, cvar_draws=6,
                cvar_beta=0.3, cvar_t_step_size=0.5, cvar_steps=7, augmented_draws=8,
                augmented_betas=(0.5, 0.2, 0.01))


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(3)
  x = rng.uniform(0.0, 1.0, SHAPE).astype(np.float32)
  y = rng.integers(0, 10, SHAPE[0]).astype(np.int32)
  params = mlp_params(int(np.prod(SHAPE[1:])))
  return x, y, params


# ----------------------------------------------------------------------------- NumPy


def _np_forward(p, x):
  p = {k: v.astype(np.float64) for k, v in p.items()}
  h = np.tanh(x.reshape(len(x), -1).astype(np.float64) @ p["w1"] + p["b1"])
  return h, h @ p["w2"] + p["b2"], p


def _np_logits(p, x):
  return _np_forward(p, x)[1]


def _np_ce(logits, y):
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
  return lse - logits[np.arange(len(y)), y]


def _np_input_grad(p, x, y):
  """d CE / d x of the tanh MLP, by the chain rule."""
  h, logits, p = _np_forward(p, x)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  probs[np.arange(len(y)), y] -= 1.0
  dz = (probs @ p["w2"].T) * (1.0 - h**2)
  return (dz @ p["w1"].T).reshape(x.shape)


def _np_pgd(p, x, y, step_size, steps):
  x = x.astype(np.float64)
  adv = x.copy()
  for _ in range(steps):
    adv = adv + step_size * np.sign(_np_input_grad(p, adv, y))
    adv = np.clip(np.clip(adv, x - EPS, x + EPS), 0.0, 1.0)
  return adv


def _scored(prefix, logits, y):
  return {f"{prefix}-Accuracy": 100.0 * np.mean(logits.argmax(-1) == y),
          f"{prefix}-Loss": np.mean(_np_ce(logits, y))}


def _np_cvar(ce, beta, step, steps):
  """``(draws, n)`` losses -> per-example CVaR bracket after ``steps`` t-steps from 0
  (advbench's CVaR evaluator starts at ``torch.zeros``)."""
  t = np.zeros(ce.shape[1])
  for _ in range(steps):
    t = t - step * (1.0 - np.mean(ce > t, axis=0) / beta)
  return t + np.mean(np.maximum(ce - t, 0.0), axis=0) / beta


def _draws(key, x, n, pad):
  """The evaluator's ``n`` uniform draws of ``x`` padded with ``pad`` rows, real rows only:
  ``threat.uniform`` with ``split(key, n)[d]``."""
  padded = np.concatenate([x, np.full((pad,) + x.shape[1:], 0.5, np.float32)])
  return np.stack([np.asarray(threat.uniform(k, jnp.asarray(padded), norm="linf", eps=EPS))
                   for k in jax.random.split(key, n)]).astype(np.float64)[:, :len(x)]


# ----------------------------------------------------------------------------- tests


def _run(name, x, y, params, key, pad=0):
  """The evaluator's finalized result on ``x`` padded with ``pad`` masked junk rows."""
  mask = np.arange(len(x) + pad) < len(x)
  # Junk rows labelled with the model's own prediction: counted, they would raise
  # every accuracy.
  if pad:
    junk = np.full((pad,) + x.shape[1:], 0.5, np.float32)
    x = np.concatenate([x, junk])
    y = np.concatenate([y, _np_logits(params, junk).argmax(-1).astype(np.int32)])
  evaluate = jax.jit(functools.partial(evaluation.make_evaluator(name, SETTINGS),
                                       logits_fn=mlp_logits_fn(params)))
  sums = evaluate(key, x=jnp.asarray(x), y=jnp.asarray(y), mask=jnp.asarray(mask))
  return evaluation.finalize(jax.device_get(sums), int(mask.sum()))


def _assert_matches(result, expected):
  assert result.keys() == expected.keys()
  for k, v in expected.items():
    if "Accuracy" in k:
      assert result[k] == pytest.approx(v, abs=1e-9), k
    else:
      assert result[k] == pytest.approx(v, rel=2e-5), k


@pytest.mark.parametrize("pad", [0, 6])
def test_clean_matches_numpy(problem, pad):
  x, y, params = problem
  _assert_matches(_run("Clean", x, y, params, jax.random.key(0), pad),
                  _scored("Clean", _np_logits(params, x), y))


@pytest.mark.parametrize("pad", [0, 6])
def test_pgd_and_fgsm_match_numpy(problem, pad):
  x, y, params = problem
  adv = _np_pgd(params, x, y, SETTINGS["pgd_step_size"], SETTINGS["pgd_steps"])
  _assert_matches(_run("PGD", x, y, params, jax.random.key(0), pad),
                  _scored("PGD", _np_logits(params, adv), y))
  adv = _np_pgd(params, x, y, EPS, 1)
  _assert_matches(_run("FGSM", x, y, params, jax.random.key(0), pad),
                  _scored("FGSM", _np_logits(params, adv), y))
  # The attack does what it is for: the loss goes up.
  assert np.mean(_np_ce(_np_logits(params, adv), y)) > np.mean(_np_ce(_np_logits(params, x), y))


@pytest.mark.parametrize("pad", [0, 6])
def test_cvar_matches_numpy(problem, pad):
  x, y, params = problem
  key = jax.random.key(4)
  draws = _draws(key, x, SETTINGS["cvar_draws"], pad)
  ce = np.stack([_np_ce(_np_logits(params, d), y) for d in draws])
  expected = _np_cvar(ce, SETTINGS["cvar_beta"], SETTINGS["cvar_t_step_size"],
                      SETTINGS["cvar_steps"])
  _assert_matches(_run("CVaR", x, y, params, key, pad), {"CVaR-Loss": expected.mean()})
  # The CVaR bracket of the draws' losses is at least their mean.
  assert ce.mean(0).mean() <= expected.mean() + 1e-6


@pytest.mark.parametrize("pad", [0, 6])
def test_augmented_matches_numpy(problem, pad):
  x, y, params = problem
  key = jax.random.key(5)
  draws = _draws(key, x, SETTINGS["augmented_draws"], pad)
  logits = np.stack([_np_logits(params, d) for d in draws])
  per_image = 100.0 * np.mean(logits.argmax(-1) == y, axis=0)
  expected = {"Augmented-Accuracy": per_image.mean(),
              "Augmented-Loss": np.mean([_np_ce(l, y) for l in logits])}
  for beta in SETTINGS["augmented_betas"]:
    expected[f"Augmented-{beta}-Quantile-Accuracy"] = 100.0 * np.mean(
        per_image > (1.0 - beta) * 100.0)
  _assert_matches(_run("Augmented", x, y, params, key, pad), expected)


def test_augmented_at_eps_zero_is_clean_accuracy(problem):
  x, y, params = problem
  settings = dict(SETTINGS, eps=0.0)
  sums = evaluation.make_evaluator("Augmented", settings)(
      jax.random.key(0), mlp_logits_fn(params), jnp.asarray(x), jnp.asarray(y),
      jnp.ones(len(x), bool))
  out = evaluation.finalize(jax.device_get(sums), len(x))
  clean = 100.0 * np.mean(_np_logits(params, x).argmax(-1) == y)
  assert out["Augmented-Accuracy"] == pytest.approx(clean)
  for beta in SETTINGS["augmented_betas"]:
    assert out[f"Augmented-{beta}-Quantile-Accuracy"] == pytest.approx(clean)


class _MLP:
  """A model with Flax's ``apply(variables, x, train=...)`` signature."""

  def apply(self, variables, x, train):
    del train
    return mlp_logits_fn(variables["params"])(x)


@pytest.mark.parametrize("batch_size", [3, 4, 10, 16])
def test_evaluate_split_counts_every_example_once(problem, batch_size):
  """Clean, PGD and FGSM over a split in padded batches equal NumPy on the whole split."""
  x, y, params = problem
  evaluators = {n: evaluation.make_evaluator(n, SETTINGS) for n in ("Clean", "PGD", "FGSM")}
  mesh = parallel.make_mesh()
  eval_fn = jax.jit(functools.partial(steps_lib.eval_step, model=_MLP(), evaluators=evaluators))
  result = steps_lib.evaluate_split(eval_fn, {"params": params}, x, y, jax.random.key(0),
                                batch_size=batch_size, mesh=mesh)
  expected = _scored("Clean", _np_logits(params, x), y)
  expected.update(_scored("PGD", _np_logits(params, _np_pgd(
      params, x, y, SETTINGS["pgd_step_size"], SETTINGS["pgd_steps"])), y))
  expected.update(_scored("FGSM", _np_logits(params, _np_pgd(params, x, y, EPS, 1)), y))
  _assert_matches(result, expected)
  assert len(list(data.eval_batches(x, y, batch_size))) == -(-len(x) // batch_size)


def test_records_of_a_bfloat16_model_are_computed_in_float32():
  """``model.dtype=bfloat16`` trains in bfloat16, but the evaluation step computes in
  ``eval.dtype`` (float32 by default): the same records as the float32 model's, which
  ``eval.dtype=bfloat16`` changes."""
  from dale_jax import configs
  from dale_jax.models import init_variables
  from dale_jax.models.mnist_cnn import MnistCNN

  rng = np.random.default_rng(0)
  x = rng.uniform(size=(6, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, 6).astype(np.int32)
  variables = init_variables(MnistCNN(), jax.random.key(0), (28, 28, 1))
  mesh = parallel.make_mesh()

  def records(model_dtype, eval_dtype):
    c = configs.base_config("mnist_digits", "ERM")
    c.model.dtype, c.eval.dtype, c.eval.evaluators = model_dtype, eval_dtype, ("Clean",)
    experiment.check(c)
    eval_fn = steps_lib.make_eval_step(experiment.build(c, num_classes=10), mesh)
    return steps_lib.evaluate_split(eval_fn, variables, x, y, jax.random.key(0),
                                    batch_size=6, mesh=mesh)

  reference = records("float32", "float32")
  assert records("bfloat16", "float32") == reference
  low = records("bfloat16", "bfloat16")
  assert low["Clean-Loss"] != reference["Clean-Loss"]
  np.testing.assert_allclose(low["Clean-Loss"], reference["Clean-Loss"], rtol=0.02)
