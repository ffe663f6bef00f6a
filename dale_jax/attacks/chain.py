"""The AutoAttack chain: attacks in AutoAttack's order, each on the points still robust.

Each attack runs only on the points that no earlier one broke. The versions of the
reference (``AutoAttack(model, norm, eps, version)``, fra31/auto-attack) by name:

* ``standard``: APGD-CE (one run of 100 steps), APGD-T (9 target classes), FAB-T
  (9 target classes), Square (5,000 queries). For L1: APGD-CE with 5 restarts and
  APGD-T with 5 target classes, both with the large-radius schedule
  (``use_largereps``), then FAB-T and Square.
* ``plus``: APGD-CE and APGD-DLR with 5 restarts, FAB with 5 restarts, Square,
  APGD-T, FAB-T.
* ``rand``, for randomised defences: APGD-CE and APGD-DLR (one run each) with
  expectation over transformation, the gradient averaged over 20 draws of the
  model's randomness (``eot_iter=20``). The model is ``logits_fn(x, key)``,
  wrapped as :class:`dale_jax.attacks.Randomized` (or
  ``evaluate_robustness(..., randomized=True)``).

Every draw of an attack comes from a key folded with the example's index, so a
point's result depends on the seed only.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from dale_jax import threat
from dale_jax import validation
from dale_jax.attacks import _common
from dale_jax.attacks import registry

AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
AUTOATTACK_LABEL = "AutoAttack (standard)"
VERSIONS = ("standard", "plus", "rand")
RAND_EOT_ITER = 20
# Attacks measured on every correctly classified point; the others form the chain.
REFERENCE = ("fgsm", "pgd20")
ENSEMBLE = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


def version(name: str, norm: str, eps: float, n_classes: int = 10
            ) -> tuple[tuple[str, ...], dict[str, dict[str, Any]], str]:
  """``(attacks, settings, label)`` of AutoAttack's version ``name`` for ``norm``.

  ``settings`` holds every field of every attack (defaults with the version's
  changes); target classes are capped at ``n_classes - 1``.
  """
  threat.check_threat(norm, eps)
  validation.one_of("version", name, VERSIONS)
  if name == "standard":
    names = AUTOATTACK_STANDARD
    changes = {"apgd-t": {"n_target_classes": 9}, "fab-t": {"n_target_classes": 9}}
    if norm == "l1":
      changes["apgd-ce"] = {"restarts": 5, "use_largereps": True}
      changes["apgd-t"] = {"n_target_classes": 5, "use_largereps": True}
  elif name == "plus":
    names = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
    changes = {"apgd-ce": {"restarts": 5}, "apgd-dlr": {"restarts": 5}, "fab": {"restarts": 5}}
  else:
    names = ("apgd-ce", "apgd-dlr")
    changes = {"apgd-ce": {"eot_iter": RAND_EOT_ITER}, "apgd-dlr": {"eot_iter": RAND_EOT_ITER}}
  settings = registry.resolve_settings(names, eps, changes)
  for target_attack in ("apgd-t", "fab-t"):
    if target_attack in settings:
      settings[target_attack]["n_target_classes"] = min(
          settings[target_attack]["n_target_classes"], n_classes - 1)
  label = f"AutoAttack ({name})"
  return names, settings, label


def autoattack(key, logits_fn, x, y, *, norm, eps, version="standard", attacks=None,
               settings=None, active=None) -> jax.Array:
  """The chain on one batch, jit-compiled; returns ``x_adv``.

  ``version`` names AutoAttack's chain (:func:`version`); ``attacks`` (a list of
  names, with ``settings`` overrides per attack) replaces it, as the
  reference's ``version="custom"``.

  Each attack runs only on the points still correctly classified after the
  previous ones; ``x_adv`` holds, per point, the first adversarial example
  found (``x`` where none was). Same keys as
  :func:`dale_jax.attacks.evaluate_robustness` for a batch holding the points
  ``0 .. batch-1`` of the evaluated set.
  """
  _common.check_inputs(x, y, norm, eps)
  attacks, resolved = _chain(logits_fn, x, norm, eps, version, attacks, settings)
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


def _chain(logits_fn, x, norm, eps, version_name, attacks, settings):
  """The chain's names and resolved settings, from a version or an explicit list."""
  if attacks is None:
    n_classes = int(jax.eval_shape(
        logits_fn, jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), jnp.float32)).shape[-1])
    attacks, resolved, _ = version(version_name, norm, eps, n_classes)
    for name, changes in dict(settings or {}).items():
      resolved.update(registry.resolve_settings((name,), eps, {name: {
          **resolved.get(name, {}), **changes}}))
    return tuple(attacks), resolved
  for name in attacks:
    validation.one_of("attacks", name, ENSEMBLE + REFERENCE)
  return tuple(attacks), registry.resolve_settings(attacks, eps, settings)


_autoattack_jit = jax.jit(autoattack_batch, static_argnames=("norm", "attacks", "settings"))


@functools.partial(jax.jit, static_argnames=("name", "settings", "norm"))
def _attack_adv_jit(fn, x, y, key, active, eps, *, name, settings, norm):
  keys = _common.example_keys(key, x.shape[0])
  adv, _ = registry.run(name, settings, fn, x, y, keys, active, eps, norm=norm)
  return adv


def make_attack(name: str, *, norm: str = "linf", eps: float, **settings):
  """An attack with its hyperparameters bound: ``attack(key, logits_fn, x, y) -> x_adv``.

  ``name`` is one of :data:`dale_jax.attacks.ATTACKS` (``"clean"`` returns ``x``)
  or ``"autoattack"`` (the standard chain for ``norm``, with ``settings`` a
  mapping attack -> overrides; target classes are capped at the model's class
  count when the chain first runs). The returned function is traceable and can
  run inside a jitted evaluation step.
  """
  threat.check_threat(norm, eps)
  if name == "autoattack":

    def attack_chain(key, logits_fn, x, y):
      names, resolved = _chain(logits_fn, x, norm, eps, "standard", None, settings)
      return _autoattack_jit(_common.as_pytree_fn(logits_fn), x, y, key,
                             jnp.ones((x.shape[0],), bool), eps, norm=norm, attacks=names,
                             settings=tuple(registry.freeze(resolved[n]) for n in names))

    return attack_chain
  frozen = registry.freeze(registry.resolve_settings((name,), eps, {name: settings})[name])

  def attack(key, logits_fn, x, y):
    return _attack_adv_jit(_common.as_pytree_fn(logits_fn), x, y, key,
                           jnp.ones((x.shape[0],), bool), eps, name=name, settings=frozen,
                           norm=norm)

  return attack


def ensemble_label(names: Sequence[str], resolved: Mapping[str, Mapping[str, Any]], eps: float,
                   n_classes: int, norm: str = "linf") -> str | None:
  """AutoAttack's name for a chain that is one of its versions (attacks, order, settings)."""
  if not names:
    return None
  for name in VERSIONS:
    v_names, v_settings, label = version(name, norm, eps, n_classes)
    if tuple(names) == v_names and all(dict(resolved[n]) == v_settings[n] for n in names):
      return label
  standard = {n: registry.default_settings(n, eps) for n in names}
  for target_attack in ("apgd-t", "fab-t"):
    if target_attack in standard:
      standard[target_attack]["n_target_classes"] = min(9, n_classes - 1)
  changed = [n for n in names if resolved[n] != standard[n]]
  label = "custom ensemble: " + ", ".join(names)
  return label + (" (non-standard settings: " + ", ".join(changed) + ")" if changed else "")
