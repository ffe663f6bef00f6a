"""Robustness evaluation: FGSM, PGD-20 and an AutoAttack-style ensemble.

The ensemble runs attacks in AutoAttack's order -- APGD-CE, APGD-T, (FAB-T,
not implemented here), Square -- each only on the points that no earlier
attack broke, and reports the robust accuracy: the share of points that every
attack leaves correctly classified. With the standard settings (APGD-CE one
run of 100 steps, APGD-T 9 target classes of 100 steps, Square 5,000 queries)
it is "AutoAttack (standard) without FAB-T".

Every random draw of an attack comes from a key folded with the example's
index in the evaluated set, so the numbers depend on the seed only: not on
``batch_size``, on which points an earlier attack already broke, or on the
number of devices the batch is sharded over.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from dale_jax import potentials
from dale_jax import samplers
from dale_jax import threat
from dale_jax.attacks import _common
from dale_jax.attacks import autopgd as apgd_lib
from dale_jax.attacks import square_attack as square_lib

ATTACKS = ("clean", "fgsm", "pgd20", "apgd-ce", "apgd-dlr", "apgd-t", "square")
AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "square")
AUTOATTACK_LABEL = "AutoAttack (standard) without FAB-T"
DEFAULT_ATTACKS = ("clean", "pgd20", "apgd-ce", "apgd-t", "square")
# Attacks measured on every correctly classified point; the others form the ensemble.
_REFERENCE = ("fgsm", "pgd20")
_ENSEMBLE = ("apgd-ce", "apgd-dlr", "apgd-t", "square")
_WHITE_BOX = ("fgsm", "pgd20", "apgd-ce", "apgd-dlr", "apgd-t")
# (weaker, stronger) pairs: the stronger attack should never do clearly worse.
_STRENGTH_ORDER = (("fgsm", "pgd20"), ("pgd20", "apgd-ce"), ("fgsm", "apgd-ce"))
# AutoAttack flags Square when it breaks more than this share of points.
_SQUARE_ALPHA = 0.2


def default_settings(name: str, eps: float) -> dict[str, Any]:
  """Hyperparameters of attack ``name`` at radius ``eps``."""
  if name == "clean":
    return {}
  if name == "fgsm":
    return {"steps": 1, "step_size": float(eps), "random_start": False}
  if name == "pgd20":
    return {"steps": 20, "step_size": 2.5 * float(eps) / 20, "random_start": False}
  if name == "apgd-ce":
    return {"steps": 100, "restarts": 1, "loss": "ce", "targeted": False, "rho": 0.75}
  if name == "apgd-dlr":
    return {"steps": 100, "restarts": 1, "loss": "dlr", "targeted": False, "rho": 0.75}
  if name == "apgd-t":
    return {"steps": 100, "restarts": 1, "loss": "dlr", "targeted": True,
            "n_target_classes": 9, "rho": 0.75}
  if name == "square":
    return {"n_queries": 5000, "p_init": 0.8, "restarts": 1, "loss": "margin",
            "rescale_schedule": False}
  raise ValueError(f"attack must be one of {ATTACKS}, got {name!r}")


def _resolve_settings(names, eps, overrides) -> dict[str, dict[str, Any]]:
  overrides = dict(overrides or {})
  for name in overrides:
    if name not in ATTACKS:
      raise ValueError(f"settings names an unknown attack {name!r}; known: {ATTACKS}")
  out = {}
  for name in names:
    s = default_settings(name, eps)
    for k, v in dict(overrides.get(name, {})).items():
      if k not in s:
        raise ValueError(f"settings[{name!r}] has no field {k!r}; fields: {sorted(s)}")
      s[k] = v
    out[name] = s
  return out


# ----------------------------------------------------------------------------- PGD


def pgd(logits_fn, x, y, key, *, norm, eps, steps=20, step_size=None, random_start=False,
        active=None):
  """PGD on the cross-entropy: ``x <- P(x + step_size * s(grad))``, ``steps`` times.

  The loop is :func:`dale_jax.samplers.ascent` (the training code's PGD), with
  ``s`` the steepest-ascent direction of ``norm``; the start is ``x`` or, with
  ``random_start``, a uniform draw in the ball from each example's own key.
  FGSM is one step of size ``eps``. ``step_size`` defaults to ``2.5 eps / steps``.
  """
  _common.check_inputs(x, y, norm, eps)
  _common.check_positive_int("steps", steps)
  if step_size is None:
    step_size = 2.5 * eps / steps
  x = jnp.asarray(x)
  adv, _ = _pgd_jit(_common.as_pytree_fn(logits_fn), x, jnp.asarray(y), key,
                    _common.default_active(x, active), eps, step_size=float(step_size),
                    norm=norm, steps=steps, random_start=bool(random_start))
  return adv


def fgsm(logits_fn, x, y, key, *, norm, eps, active=None):
  """One steepest-ascent step of size ``eps`` on the cross-entropy, from ``x``."""
  return pgd(logits_fn, x, y, key, norm=norm, eps=eps, steps=1, step_size=eps, active=active)


def _pgd(fn, x, y, key, active, eps, *, step_size, norm, steps, random_start):
  keys = _common.example_keys(key, x.shape[0])
  if random_start:
    def init(_, x):
      return jax.vmap(lambda k, xi: threat.uniform(k, xi[None], norm=norm, eps=eps)[0])(keys, x)
  else:
    init = samplers.init_identity
  sample = samplers.ascent(
      init=init, objective=samplers.potential_objective(potentials.cross_entropy),
      update=samplers.signed_step(step_size, norm), steps=steps, norm=norm, eps=eps)
  adv = sample(keys[0], fn, x, y)
  adv = jnp.where(_common.bcast(active, x), adv, x)
  return jax.lax.stop_gradient(adv), _common.predicted_correct(fn(adv), y) & active


_pgd_jit = jax.jit(_pgd, static_argnames=("step_size", "norm", "steps", "random_start"))


# ----------------------------------------------------------------------------- one attack


def _attack(name, settings, fn, x, y, keys, active, eps, *, norm):
  """Traceable: attack ``name`` on the ``active`` points; ``(x_adv, still_correct)``."""
  s = dict(settings)
  if name == "clean":
    adv = x
  elif name in _REFERENCE:
    adv, _ = _pgd(fn, x, y, keys, active, eps, step_size=float(s["step_size"]), norm=norm,
                  steps=s["steps"], random_start=s["random_start"])
  elif name.startswith("apgd"):
    adv, _ = apgd_lib._apgd(  # pylint: disable=protected-access
        fn, x, y, keys, active, eps, norm=norm, steps=s["steps"], restarts=s["restarts"],
        loss=s["loss"], targeted=s["targeted"], n_target_classes=s.get("n_target_classes", 0),
        rho=s["rho"])
  else:
    adv, _ = square_lib._square(  # pylint: disable=protected-access
        fn, x, y, keys, active, eps, norm=norm, n_queries=s["n_queries"], p_init=s["p_init"],
        restarts=s["restarts"], loss=s["loss"], rescale_schedule=s["rescale_schedule"])
  return adv, _common.predicted_correct(fn(adv), y) & active


@functools.partial(jax.jit, static_argnames=("name", "settings", "norm"))
def _attack_adv_jit(fn, x, y, key, active, eps, *, name, settings, norm):
  keys = _common.example_keys(key, x.shape[0])
  adv, _ = _attack(name, settings, fn, x, y, keys, active, eps, norm=norm)
  return adv


def _attack_key(seed_key, name):
  return jax.random.fold_in(seed_key, ATTACKS.index(name))


@functools.partial(jax.jit, static_argnames=("name", "settings", "norm"))
def _attack_batch(fn, x, y, attack_key, indices, active, eps, *, name, settings, norm):
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(attack_key, indices)
  _, still_correct = _attack(name, settings, fn, x, y, keys, active, eps, norm=norm)
  return still_correct


@jax.jit
def _clean_batch(fn, x, y):
  """Correct predictions, whether the logits look like probabilities, zero input gradients."""
  def loss(xa):
    logits = fn(xa)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)), logits

  grad, logits = jax.grad(loss, has_aux=True)(x)
  zero_grad = jnp.all(grad.reshape(grad.shape[0], -1) == 0, axis=-1)
  probs_like = ((jnp.max(logits) < 1 + 1e-5) & (jnp.min(logits) > -1e-5)
                & jnp.all(jnp.abs(jnp.sum(logits, -1) - 1) < 1e-5))
  return _common.predicted_correct(logits, y), zero_grad, probs_like


def _freeze(settings: Mapping[str, Any]) -> tuple:
  return tuple(sorted(settings.items()))


# ----------------------------------------------------------------------------- ensemble (traceable)


def autoattack(logits_fn, x, y, key, *, norm, eps, attacks=AUTOATTACK_STANDARD, settings=None,
               active=None) -> jax.Array:
  """The ensemble on one batch, as one traceable function; returns ``x_adv``.

  Each attack runs only on the points still correctly classified after the
  previous ones; ``x_adv`` holds, per point, the first adversarial example
  found (``x`` where none was). Same keys as :func:`evaluate_robustness` for
  a batch holding the points ``0 .. batch-1`` of the evaluated set.
  """
  _common.check_inputs(x, y, norm, eps)
  for name in attacks:
    if name not in _ENSEMBLE + _REFERENCE:
      raise ValueError(f"attacks must be among {_ENSEMBLE + _REFERENCE}, got {name!r}")
  resolved = _resolve_settings(attacks, eps, settings)
  x = jnp.asarray(x)
  return _autoattack_jit(
      _common.as_pytree_fn(logits_fn), x, jnp.asarray(y), key, _common.default_active(x, active),
      eps, norm=norm, attacks=tuple(attacks),
      settings=tuple(_freeze(resolved[n]) for n in attacks))


def _autoattack(fn, x, y, key, active, eps, *, norm, attacks, settings):
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  indices = jnp.arange(x.shape[0])
  robust = _common.predicted_correct(fn(x), y) & active
  x_adv = x
  for name, s in zip(attacks, settings):
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(_attack_key(key, name), indices)
    adv, still = _attack(name, s, fn, x, y, keys, robust, eps, norm=norm)
    broken = robust & ~still
    x_adv = jnp.where(_common.bcast(broken, x), adv, x_adv)
    robust = robust & still
  return x_adv


_autoattack_jit = jax.jit(_autoattack, static_argnames=("norm", "attacks", "settings"))


# ----------------------------------------------------------------------------- evaluation


def _data_sharding(mesh):
  if mesh is None:
    if jax.device_count() == 1:
      return None, 1
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, PartitionSpec("data")), mesh.shape["data"]


def _batches(indices: np.ndarray, batch_size: int):
  """Yields ``(chunk, padded)``: the indices of a batch and their padding to ``batch_size``."""
  for start in range(0, len(indices), batch_size):
    chunk = indices[start:start + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
    yield chunk, padded


def evaluate_robustness(
    logits_fn,
    x,
    y,
    *,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    norm: str,
    eps: float,
    batch_size: int = 256,
    seed: int = 0,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    individual: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    warning_margin: float = 0.5,
) -> dict[str, Any]:
  """Accuracy under attack of ``logits_fn`` on ``(x, y)``, all accuracies in percent.

  ``"clean"``, ``"fgsm"`` and ``"pgd20"`` are measured on their own. The
  ensemble attacks (``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-t"``, ``"square"``)
  run in the given order, each only on the points that the ensemble has not
  broken yet, and ``per_attack`` then holds the robust accuracy after each of
  them (as AutoAttack reports it); with ``individual=True`` each runs on all
  correctly classified points and ``per_attack`` holds its own accuracy.
  ``robust_accuracy`` is the share of points that no attack broke.

  Args:
    logits_fn: ``x -> logits``, the model in eval mode. Passing
      ``jax.tree_util.Partial(model.apply, variables)`` keeps the weights out
      of the compiled program.
    x: NHWC images in ``[0, 1]`` (NumPy or JAX); y: integer labels.
    attacks: names among :data:`ATTACKS`.
    norm, eps: the threat model.
    batch_size: points per attack call (bounds memory); rounded up to a
      multiple of the device count.
    seed: seed of every random draw.
    settings: per-attack overrides of :func:`default_settings`, e.g.
      ``{"square": {"n_queries": 1000}}``.
    individual: run each ensemble attack on every correct point.
    mesh: a mesh with a ``"data"`` axis to shard batches over; by default all
      devices when there are several.
    warning_margin: accuracy gap (points) that triggers an ordering warning.

  Returns:
    A dict with ``clean_accuracy``, ``robust_accuracy``, ``per_attack``
    (name -> accuracy), ``per_attack_kind`` (name -> ``"individual"`` or
    ``"cumulative"``), ``ensemble`` (its label), ``eps``, ``norm``,
    ``n_examples``, ``attack_settings``, ``zero_gradient_share`` and
    ``warnings`` (sanity flags of gradient masking).
  """
  attacks = tuple(attacks)
  for name in attacks:
    if name not in ATTACKS:
      raise ValueError(f"attacks must be among {ATTACKS}, got {name!r}")
  if len(set(attacks)) != len(attacks):
    raise ValueError(f"attacks must not repeat a name, got {attacks}")
  _common.check_inputs(x, y, norm, eps)
  _common.check_positive_int("batch_size", batch_size)
  if x.ndim != 4 and "square" in attacks:
    raise ValueError(f"square needs NHWC images, got x of shape {x.shape}")
  resolved = _resolve_settings(attacks, eps, settings)

  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  n = x.shape[0]
  if n == 0:
    raise ValueError("x holds no example")
  fn = _common.as_pytree_fn(logits_fn)
  sharding, n_devices = _data_sharding(mesh)
  batch_size = min(batch_size, n)
  batch_size = n_devices * math.ceil(batch_size / n_devices)

  def put(*arrays):
    arrays = tuple(jnp.asarray(a) for a in arrays)
    return arrays if sharding is None else tuple(jax.device_put(a, sharding) for a in arrays)

  # Clean pass.
  correct = np.zeros(n, bool)
  zero_grad = np.zeros(n, bool)
  probs_like = False
  for chunk, padded in _batches(np.arange(n), batch_size):
    c, z, p = _clean_batch(fn, *put(x[padded], y[padded]))
    correct[chunk] = np.asarray(c)[:len(chunk)]
    zero_grad[chunk] = np.asarray(z)[:len(chunk)]
    probs_like |= bool(p)
  n_classes = int(jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)).shape[-1])
  if "apgd-t" in resolved:
    resolved["apgd-t"]["n_target_classes"] = min(
        resolved["apgd-t"]["n_target_classes"], n_classes - 1)

  seed_key = jax.random.key(seed)
  broken: dict[str, np.ndarray] = {}
  per_attack: dict[str, float] = {}
  kind: dict[str, str] = {}
  chain = correct.copy()
  chain_started = False
  for name in attacks:
    if name == "clean":
      per_attack[name] = _percent(correct)
      kind[name] = "individual"
      continue
    in_chain = name in _ENSEMBLE
    active = chain if in_chain and not individual else correct
    kind[name] = "cumulative" if in_chain and not individual and chain_started else "individual"
    still = np.zeros(n, bool)
    attack_key = _attack_key(seed_key, name)
    frozen = _freeze(resolved[name])
    for chunk, padded in _batches(np.nonzero(active)[0], batch_size):
      mask = np.arange(batch_size) < len(chunk)
      out = _attack_batch(fn, *put(x[padded], y[padded]), attack_key, *put(padded, mask), eps,
                          name=name, settings=frozen, norm=norm)
      still[chunk] = np.asarray(out)[:len(chunk)]
    broken[name] = active & ~still
    if in_chain:
      chain &= ~broken[name]
      chain_started = True
    per_attack[name] = _percent(chain) if kind[name] == "cumulative" else _percent(
        correct & ~broken[name])

  any_broken = np.zeros(n, bool)
  for b in broken.values():
    any_broken |= b
  robust = correct & ~any_broken
  ensemble_names = tuple(a for a in attacks if a in _ENSEMBLE)
  result = {
      "clean_accuracy": _percent(correct),
      "robust_accuracy": _percent(robust),
      "per_attack": per_attack,
      "per_attack_kind": kind,
      "ensemble": _ensemble_label(ensemble_names, resolved, eps, n_classes),
      "ensemble_accuracy": _percent(chain) if ensemble_names else None,
      "eps": float(eps),
      "norm": norm,
      "n_examples": int(n),
      "seed": int(seed),
      "attack_settings": {k: v for k, v in resolved.items() if v},
      "zero_gradient_share": _percent(zero_grad & correct),
  }
  result["warnings"] = _sanity_warnings(
      result, broken, correct, probs_like, warning_margin)
  return result


def _percent(mask: np.ndarray) -> float:
  return round(float(100.0 * np.mean(mask)), 6)


def _ensemble_label(names, resolved, eps, n_classes) -> str | None:
  """AutoAttack's name only for its standard attacks, order and settings."""
  if not names:
    return None
  standard = {n: default_settings(n, eps) for n in names}
  if "apgd-t" in standard:
    standard["apgd-t"]["n_target_classes"] = min(9, n_classes - 1)
  if names == AUTOATTACK_STANDARD and all(resolved[n] == standard[n] for n in names):
    return AUTOATTACK_LABEL
  changed = [n for n in names if resolved[n] != standard[n]]
  label = "custom ensemble: " + ", ".join(names)
  return label + (" (non-standard settings: " + ", ".join(changed) + ")" if changed else "")


def _sanity_warnings(result, broken, correct, probs_like, margin) -> list[str]:
  """Flags that suggest gradient masking or a misconfigured evaluation."""
  warnings = []
  acc, kind = result["per_attack"], result["per_attack_kind"]
  if probs_like:
    warnings.append("the model's outputs look like probabilities, not logits; attacks on "
                    "logits of softmax outputs are weak")
  if result["zero_gradient_share"] > 0:
    warnings.append(f"{result['zero_gradient_share']:.2f}% of correctly classified points have "
                    "an all-zero input gradient: gradient-based attacks cannot move them")
  for weak, strong in _STRENGTH_ORDER:
    if weak in acc and strong in acc and kind[weak] == kind[strong] == "individual":
      if acc[strong] > acc[weak] + margin:
        warnings.append(
            f"{weak} ({acc[weak]:.2f}%) is stronger than {strong} ({acc[strong]:.2f}%): a "
            "weaker attack beating a stronger one suggests gradient masking")
  if "square" in broken:
    white = np.zeros_like(correct)
    for name in _WHITE_BOX:
      if name in broken:
        white |= broken[name]
    if any(name in broken for name in _WHITE_BOX):
      extra = _percent(broken["square"] & ~white)
      if extra > _SQUARE_ALPHA:
        warnings.append(
            f"the black-box Square attack broke {extra:.2f}% of the points that every white-box "
            "attack missed: the gradients are probably uninformative (gradient masking)")
  if result["eps"] > 0 and len(broken) > 0 and not any(b.any() for b in broken.values()) \
      and correct.sum() >= 100:
    warnings.append("no attack changed any prediction: check eps, the input range [0, 1] and "
                    "that logits_fn is differentiable")
  return warnings


# ----------------------------------------------------------------------------- evaluators


def make_evaluator(name: str, *, norm: str = "linf", eps: float, **settings):
  """An attack with its hyperparameters bound: ``fn(key, logits_fn, x, y) -> x_adv``.

  ``name`` is one of :data:`ATTACKS` (``"clean"`` returns ``x``) or
  ``"autoattack"`` (the standard ensemble, with ``settings`` a mapping
  attack -> overrides). The returned function is traceable and can run inside
  a jitted evaluation step.
  """
  threat.check_threat(norm, eps)
  if name == "autoattack":
    resolved = _resolve_settings(AUTOATTACK_STANDARD, eps, settings)
    frozen = tuple(_freeze(resolved[n]) for n in AUTOATTACK_STANDARD)

    def evaluate_autoattack(key, logits_fn, x, y):
      return _autoattack_jit(_common.as_pytree_fn(logits_fn), x, y, key,
                             jnp.ones((x.shape[0],), bool), eps, norm=norm,
                             attacks=AUTOATTACK_STANDARD, settings=frozen)

    return evaluate_autoattack
  resolved = _resolve_settings((name,), eps, {name: settings})[name]
  frozen = _freeze(resolved)

  def evaluate(key, logits_fn, x, y):
    return _attack_adv_jit(_common.as_pytree_fn(logits_fn), x, y, key,
                           jnp.ones((x.shape[0],), bool), eps, name=name, settings=frozen,
                           norm=norm)

  return evaluate
