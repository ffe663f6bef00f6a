"""Every attack by name: its traceable batch function and its default settings.

A batch function is ``run(fn, x, y, keys, active, eps, *, norm, **settings) ->
(x_adv, still_correct)``: it attacks the ``active`` points of one batch with one key
per example and says which of them the model still classifies correctly. The
settings of an attack are exactly the keyword arguments of its batch function, so
``default_settings(name, eps)`` lists every field a caller may override.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax

from dale_jax import validation
from dale_jax.attacks import _common
from dale_jax.attacks import autopgd
from dale_jax.attacks import fab_attack as fab_lib
from dale_jax.attacks import pgd as pgd_lib
from dale_jax.attacks import square_attack


APGD_STEPS = _common.APGD_STEPS
FAB_STEPS = _common.FAB_STEPS
SQUARE_QUERIES = _common.SQUARE_QUERIES


class Attack(NamedTuple):
  run: Callable[..., tuple[jax.Array, jax.Array]]
  defaults: Callable[[float], dict[str, Any]]  # eps -> settings


def _clean(fn, x, y, keys, active, eps, *, norm):
  del keys, eps, norm
  return x, _common.predicted_correct(fn(x), y) & active


def _apgd(loss: str, targeted: bool, **extra) -> Attack:
  return Attack(autopgd.apgd_batch, lambda eps: dict(
      steps=APGD_STEPS, restarts=1, loss=loss, targeted=targeted, rho=0.75, use_largereps=False,
      eot_iter=1, **extra))


def _fab(targeted: bool, **extra) -> Attack:
  return Attack(fab_lib.fab_batch, lambda eps: dict(
      steps=FAB_STEPS, restarts=1, targeted=targeted, alpha_max=0.1, eta=1.05, beta=0.9, **extra))


REGISTRY: Mapping[str, Attack] = {
    "clean": Attack(_clean, lambda eps: {}),
    "fgsm": Attack(pgd_lib.pgd_batch, lambda eps: dict(
        steps=1, step_size=float(eps), random_start=False)),
    "pgd20": Attack(pgd_lib.pgd_batch, lambda eps: dict(
        steps=20, step_size=2.5 * float(eps) / 20, random_start=False)),
    "apgd-ce": _apgd("ce", False),
    "apgd-dlr": _apgd("dlr", False),
    "apgd-t": _apgd("dlr", True, n_target_classes=9),
    "fab": _fab(False),
    "fab-t": _fab(True, n_target_classes=9),
    "square": Attack(square_attack.square_batch, lambda eps: dict(
        n_queries=SQUARE_QUERIES, p_init=0.8, restarts=1, loss="margin", rescale_schedule=False)),
}
ATTACKS = tuple(REGISTRY)  # the names, in the order of their keys
# Each attack's label: how records, tables and the configs' ``eval.evaluators`` write
# it (AutoAttack's and advbench's spelling). :func:`canonical` takes either.
LABELS: Mapping[str, str] = {
    "clean": "Clean", "fgsm": "FGSM", "pgd20": "PGD-20", "apgd-ce": "APGD-CE",
    "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "fab": "FAB", "fab-t": "FAB-T",
    "square": "Square",
}
_BY_SPELLING = {**{k: k for k in REGISTRY}, **{v.lower(): k for k, v in LABELS.items()}}


def canonical(name: str) -> str:
  """The registry name of the attack ``name`` names by its name or its label, in any
  case: ``"APGD-CE"``, ``"apgd-ce"`` -> ``"apgd-ce"``; ``"PGD-20"`` -> ``"pgd20"``.

  Raises:
    dale_jax.validation.InvalidArgument: no attack is spelled so.
  """
  key = _BY_SPELLING.get(str(name).lower())
  if key is None:
    raise validation.InvalidArgument(
        "attack", f"one of {', '.join(ATTACKS)} (or their labels "
        f"{', '.join(LABELS.values())})", name)
  return key


def check_name(name: str) -> None:
  if name not in REGISTRY:
    raise validation.InvalidArgument("attack", f"one of {', '.join(ATTACKS)}", name)


def default_settings(name: str, eps: float) -> dict[str, Any]:
  """Hyperparameters of attack ``name`` at radius ``eps``."""
  check_name(name)
  return REGISTRY[name].defaults(eps)


def resolve_settings(names: Sequence[str], eps: float,
                     overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict]:
  """``{name: default settings updated with overrides[name]}``, unknown fields refused."""
  overrides = dict(overrides or {})
  for name in overrides:
    if name not in REGISTRY:
      raise validation.InvalidArgument(
          "settings", rest=f"names an unknown attack {name!r}; known: {ATTACKS}")
  out = {}
  for name in names:
    s = default_settings(name, eps)
    for k, v in dict(overrides.get(name, {})).items():
      if k not in s:
        raise validation.InvalidArgument(
            f"settings[{name!r}]", rest=f"has no field {k!r}; fields: {sorted(s)}")
      s[k] = v
    out[name] = s
  return out


def budget_settings(names: Sequence[str], *, apgd_steps: int | None = None,
                    square_queries: int | None = None) -> dict[str, dict[str, int]]:
  """Overrides of the budgets for the attacks among ``names`` that have them.

  ``apgd_steps`` sets the iterations of APGD-CE, APGD-DLR and APGD-T,
  ``square_queries`` Square's queries; ``None`` keeps the default
  (:data:`APGD_STEPS`, :data:`SQUARE_QUERIES`). The result is the ``settings``
  argument of :func:`dale_jax.attacks.evaluate_robustness`.
  """
  budgets = {"apgd-ce": {"steps": apgd_steps}, "apgd-dlr": {"steps": apgd_steps},
             "apgd-t": {"steps": apgd_steps}, "square": {"n_queries": square_queries}}
  return {name: dict(budget) for name, budget in budgets.items()
          if name in names and None not in budget.values()}


def freeze(settings: Mapping[str, Any]) -> tuple:
  """Settings as a hashable tuple, for ``jit``'s static arguments."""
  return tuple(sorted(settings.items()))


def run(name: str, settings, fn, x, y, keys, active, eps, *, norm):
  """Traceable: attack ``name`` with (frozen or plain) ``settings`` on the ``active`` points."""
  return REGISTRY[name].run(fn, x, y, keys, active, eps, norm=norm, **dict(settings))


def attack_key(seed_key: jax.Array, name: str) -> jax.Array:
  """The key of attack ``name``: the seed's key folded with the attack's index."""
  return jax.random.fold_in(seed_key, ATTACKS.index(name))
