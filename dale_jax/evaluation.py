"""advbench's evaluators as pure, jit-able per-batch functions.

An evaluator is ``evaluate(key, logits_fn, x, y, mask) -> dict of sums`` over the
unmasked examples of one batch; :func:`finalize` turns summed results into
advbench's result keys (accuracies in percent, losses as means). Batches are
padded to a fixed size with ``mask = False`` rows so one program serves them all.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from dale_jax import attacks
from dale_jax import losses
from dale_jax import perturbations
from dale_jax import potentials
from dale_jax import samplers
from dale_jax import threat
from dale_jax import validation

Array = jax.Array
Evaluator = Callable[[Array, Callable, Array, Array, Array], dict]


def _scored(prefix: str, logits: Array, y: Array, mask: Array) -> dict:
  correct = (jnp.argmax(logits, -1) == y) & mask
  loss = jnp.where(mask, potentials.cross_entropy(logits, y), 0.0)
  return {f"{prefix}-Accuracy": jnp.sum(correct), f"{prefix}-Loss": jnp.sum(loss)}


def clean(settings: Mapping[str, Any]) -> Evaluator:
  del settings

  def evaluate(key, logits_fn, x, y, mask):
    return _scored("Clean", logits_fn(x), y, mask)

  return evaluate


def attacked(prefix: str, sampler: samplers.Sampler) -> Evaluator:
  """Accuracy and CE on ``sampler``'s perturbed inputs (PGD, FGSM, APGD, ...)."""

  def evaluate(key, logits_fn, x, y, mask):
    return _scored(prefix, logits_fn(sampler(key, logits_fn, x, y)), y, mask)

  return evaluate


def pgd(s: Mapping[str, Any]) -> Evaluator:
  return attacked("PGD", samplers.pgd(eps=s["eps"], step_size=s["pgd_step_size"],
                                      steps=s["pgd_steps"], norm=s["norm"]))


def fgsm(s: Mapping[str, Any]) -> Evaluator:
  return attacked("FGSM", samplers.fgsm(eps=s["eps"], norm=s["norm"]))


def _uniform_losses(key, logits_fn, x, y, draws, norm, eps):
  """``(draws, batch)`` logits and CE under uniform perturbations, one draw at a time."""

  def one(k):
    logits = logits_fn(threat.uniform(k, x, norm=norm, eps=eps))
    return logits, potentials.cross_entropy(logits, y)

  return jax.lax.map(one, jax.random.split(key, draws))


def cvar(s: Mapping[str, Any]) -> Evaluator:
  """``CVaR_beta`` of the CE under uniform perturbations, ``t`` optimised per example."""

  def evaluate(key, logits_fn, x, y, mask):
    _, ce = _uniform_losses(key, logits_fn, x, y, s["cvar_draws"], s["norm"], s["eps"])
    # advbench's CVaR evaluator starts t at 0 (its training loss at 1, losses' default).
    t = losses.optimize_cvar_t(ce, s["cvar_beta"], s["cvar_t_step_size"], s["cvar_steps"],
                               t_init=0.0)
    per_example = t + jnp.mean(jax.nn.relu(ce - t), axis=0) / s["cvar_beta"]
    return {"CVaR-Loss": jnp.sum(jnp.where(mask, per_example, 0.0))}

  return evaluate


def augmented(s: Mapping[str, Any]) -> Evaluator:
  """Accuracy over ``augmented_draws`` uniform perturbations per image and, for each
  beta, the share of images whose accuracy exceeds ``(1 - beta) * 100``."""

  def evaluate(key, logits_fn, x, y, mask):
    logits, ce = _uniform_losses(key, logits_fn, x, y, s["augmented_draws"], s["norm"], s["eps"])
    per_image = jnp.mean(jnp.argmax(logits, -1) == y, axis=0) * 100.0
    out = {
        "Augmented-Accuracy": jnp.sum(jnp.where(mask, per_image / 100.0, 0.0)),
        "Augmented-Loss": jnp.sum(jnp.where(mask, jnp.mean(ce, axis=0), 0.0)),
    }
    for beta in s["augmented_betas"]:
      out[f"Augmented-{beta}-Quantile-Accuracy"] = jnp.sum(
          (per_image > (1.0 - beta) * 100.0) & mask)
    return out

  return evaluate


def _eval_set(s: Mapping[str, Any]) -> perturbations.PerturbationSet:
  """The ``eval.perturbation`` set; ``lp`` is the evaluation's ``(norm, eps)`` ball."""
  with validation.prefixed("eval"):
    pset = perturbations.make_perturbation(s["perturbation"])
  return perturbations.lp_ball(s["norm"], s["eps"]) if pset is None else pset


def _searched(prefix: str, candidates: Callable[[Array, Array], Array],
              pset: perturbations.PerturbationSet) -> Evaluator:
  """An example counts as robust when the model is right on *every* candidate
  perturbation; the loss is the highest CE over them. ``candidates(key, x)`` returns
  the candidate deltas stacked on a leading axis; they are tried one at a time
  (:func:`dale_jax.perturbations.search`)."""

  def evaluate(key, logits_fn, x, y, mask):
    right, worst = perturbations.search(logits_fn, pset, x, y, candidates(key, x))
    return {f"{prefix}-Accuracy": jnp.sum(right & mask),
            f"{prefix}-Loss": jnp.sum(jnp.where(mask, worst, 0.0))}

  return evaluate


def grid(s: Mapping[str, Any]) -> Evaluator:
  """The exhaustive grid attack over a geometric set (Engstrom et al. 2019): every
  combination of ``eval.grid_points`` values per parameter, ends included; robust
  accuracy is the share of examples classified right at every grid point."""
  pset = _eval_set(s)
  with validation.prefixed("eval"):
    points = pset.grid(s["grid_points"])

  def candidates(key, x):
    return jnp.broadcast_to(points[:, None, :], (points.shape[0], x.shape[0], points.shape[1]))

  return _searched("Grid", candidates, pset)


def worst_of_k(s: Mapping[str, Any]) -> Evaluator:
  """``eval.worst_of_k`` uniform draws from ``eval.perturbation`` per example; robust
  when right on all of them (``lp``: draws from the ``(norm, eps)`` ball)."""
  pset = _eval_set(s)
  k = s["worst_of_k"]

  def candidates(key, x):
    return jax.vmap(lambda j: pset.uniform(jax.random.fold_in(key, j), x))(jnp.arange(k))

  return _searched("Worst-of-K", candidates, pset)


def _attack(prefix: str, name: str, **fields: str) -> Callable[[Mapping[str, Any]], Evaluator]:
  """An evaluator from :mod:`dale_jax.attacks`, with ``fields`` mapping the attack's
  settings to ``eval`` config fields (e.g. ``steps="apgd_steps"``)."""

  def build(s):
    settings = {k: s[v] for k, v in fields.items()}
    return attacked(prefix, attacks.make_attack(name, norm=s["norm"], eps=s["eps"], **settings))

  return build


EVALUATORS: dict[str, Callable[[Mapping[str, Any]], Evaluator]] = {
    "Clean": clean,
    "PGD": pgd,
    "FGSM": fgsm,
    "CVaR": cvar,
    "Augmented": augmented,
    # Stronger, parameter-free attacks (Croce & Hein 2020; Andriushchenko et al. 2020).
    # AutoAttack is the standard version for eval.norm.
    # Named by their labels in dale_jax.attacks.LABELS, as dale-eval's tables name them.
    attacks.LABELS["apgd-ce"]: _attack(attacks.LABELS["apgd-ce"], "apgd-ce", steps="apgd_steps"),
    attacks.LABELS["apgd-t"]: _attack(attacks.LABELS["apgd-t"], "apgd-t", steps="apgd_steps"),
    attacks.LABELS["fab-t"]: _attack(attacks.LABELS["fab-t"], "fab-t"),
    attacks.LABELS["square"]: _attack(attacks.LABELS["square"], "square",
                                      n_queries="square_queries"),
    "AutoAttack": _attack("AutoAttack", "autoattack"),
    # Spatial robustness over eval.perturbation (rotations, translations, SE(2)).
    "Grid": grid,
    "Worst-of-K": worst_of_k,
}


def make_evaluator(name: str, settings: Mapping[str, Any]) -> Evaluator:
  validation.one_of("evaluator", name, EVALUATORS)
  return EVALUATORS[name](settings)


def finalize(sums: Mapping[str, float], count: int) -> dict[str, float]:
  """Summed results -> advbench's keys: accuracies in percent, losses as means."""
  out = {}
  for k, v in sums.items():
    v = float(v) / max(count, 1)
    out[k] = 100.0 * v if "Accuracy" in k else v
  return out
