"""The AutoAttack chain: attacks in AutoAttack's order, each on the points still robust.

APGD-CE, APGD-T, (FAB-T, not implemented here), Square: each attack runs only on the
points that no earlier one broke. With the standard settings (APGD-CE one run of 100
steps, APGD-T 9 target classes of 100 steps, Square 5,000 queries) this is
"AutoAttack (standard) without FAB-T". Every draw of an attack comes from a key
folded with the example's index, so a point's result depends on the seed only.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from dale_jax import threat
from dale_jax.attacks import _common
from dale_jax.attacks import registry

AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "square")
AUTOATTACK_LABEL = "AutoAttack (standard) without FAB-T"
# Attacks measured on every correctly classified point; the others form the chain.
REFERENCE = ("fgsm", "pgd20")
ENSEMBLE = ("apgd-ce", "apgd-dlr", "apgd-t", "square")


def autoattack(logits_fn, x, y, key, *, norm, eps, attacks=AUTOATTACK_STANDARD, settings=None,
               active=None) -> jax.Array:
  """The chain on one batch, as one traceable function; returns ``x_adv``.

  Each attack runs only on the points still correctly classified after the
  previous ones; ``x_adv`` holds, per point, the first adversarial example
  found (``x`` where none was). Same keys as
  :func:`dale_jax.attacks.evaluate_robustness` for a batch holding the points
  ``0 .. batch-1`` of the evaluated set.
  """
  _common.check_inputs(x, y, norm, eps)
  for name in attacks:
    if name not in ENSEMBLE + REFERENCE:
      raise ValueError(f"attacks must be among {ENSEMBLE + REFERENCE}, got {name!r}")
  resolved = registry.resolve_settings(attacks, eps, settings)
  x = jnp.asarray(x)
  return _autoattack_jit(
      _common.as_pytree_fn(logits_fn), x, jnp.asarray(y), key, _common.default_active(x, active),
      eps, norm=norm, attacks=tuple(attacks),
      settings=tuple(registry.freeze(resolved[n]) for n in attacks))


def autoattack_batch(fn, x, y, key, active, eps, *, norm, attacks, settings):
  """Traceable body of :func:`autoattack` (``settings`` frozen, one per attack)."""
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  indices = jnp.arange(x.shape[0])
  robust = _common.predicted_correct(fn(x), y) & active
  x_adv = x
  for name, s in zip(attacks, settings):
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(registry.attack_key(key, name),
                                                           indices)
    adv, still = registry.run(name, s, fn, x, y, keys, robust, eps, norm=norm)
    broken = robust & ~still
    x_adv = jnp.where(_common.bcast(broken, x), adv, x_adv)
    robust = robust & still
  return x_adv


_autoattack_jit = jax.jit(autoattack_batch, static_argnames=("norm", "attacks", "settings"))


@functools.partial(jax.jit, static_argnames=("name", "settings", "norm"))
def _attack_adv_jit(fn, x, y, key, active, eps, *, name, settings, norm):
  keys = _common.example_keys(key, x.shape[0])
  adv, _ = registry.run(name, settings, fn, x, y, keys, active, eps, norm=norm)
  return adv


def make_attack(name: str, *, norm: str = "linf", eps: float, **settings):
  """An attack with its hyperparameters bound: ``attack(key, logits_fn, x, y) -> x_adv``.

  ``name`` is one of :data:`dale_jax.attacks.ATTACKS` (``"clean"`` returns ``x``)
  or ``"autoattack"`` (the standard chain, with ``settings`` a mapping attack ->
  overrides). The returned function is traceable and can run inside a jitted
  evaluation step.
  """
  threat.check_threat(norm, eps)
  if name == "autoattack":
    resolved = registry.resolve_settings(AUTOATTACK_STANDARD, eps, settings)
    frozen = tuple(registry.freeze(resolved[n]) for n in AUTOATTACK_STANDARD)

    def attack_chain(key, logits_fn, x, y):
      return _autoattack_jit(_common.as_pytree_fn(logits_fn), x, y, key,
                             jnp.ones((x.shape[0],), bool), eps, norm=norm,
                             attacks=AUTOATTACK_STANDARD, settings=frozen)

    return attack_chain
  frozen = registry.freeze(registry.resolve_settings((name,), eps, {name: settings})[name])

  def attack(key, logits_fn, x, y):
    return _attack_adv_jit(_common.as_pytree_fn(logits_fn), x, y, key,
                           jnp.ones((x.shape[0],), bool), eps, name=name, settings=frozen,
                           norm=norm)

  return attack


def ensemble_label(names: Sequence[str], resolved: Mapping[str, Mapping[str, Any]], eps: float,
                   n_classes: int) -> str | None:
  """AutoAttack's name only for its standard attacks, order and settings."""
  if not names:
    return None
  standard = {n: registry.default_settings(n, eps) for n in names}
  if "apgd-t" in standard:
    standard["apgd-t"]["n_target_classes"] = min(9, n_classes - 1)
  if tuple(names) == AUTOATTACK_STANDARD and all(resolved[n] == standard[n] for n in names):
    return AUTOATTACK_LABEL
  changed = [n for n in names if resolved[n] != standard[n]]
  label = "custom ensemble: " + ", ".join(names)
  return label + (" (non-standard settings: " + ", ".join(changed) + ")" if changed else "")
