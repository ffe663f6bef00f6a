"""PGD and FGSM on the cross-entropy, for evaluation.

The loop is :func:`dale_jax.samplers.ascent`, the training code's PGD:
``x <- P(x + step_size * s(grad CE))`` with ``s`` the steepest-ascent direction of
the norm and ``P`` the projection onto the eps-ball intersected with ``[0, 1]``.
The start is ``x`` or, with ``random_start``, a uniform draw in the ball from each
example's own key. FGSM is one step of size ``eps``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dale_jax import potentials
from dale_jax import samplers
from dale_jax import threat
from dale_jax.attacks import _common


def pgd(key, logits_fn, x, y, *, norm, eps, steps=20, step_size=None, random_start=False,
        active=None):
  """PGD on the cross-entropy, ``steps`` steps of ``step_size`` (default ``2.5 eps / steps``).

  Args:
    logits_fn: ``x -> logits``, the model in eval mode.
    x, y: clean inputs in ``[0, 1]`` and integer labels.
    key: one PRNG key, or one per example.
    norm, eps: the threat model.
    active: optional boolean mask; inactive points are returned unchanged.

  Returns:
    ``x_adv`` of ``x``'s shape, inside the eps-ball and ``[0, 1]``.
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


def fgsm(key, logits_fn, x, y, *, norm, eps, active=None):
  """One steepest-ascent step of size ``eps`` on the cross-entropy, from ``x``."""
  return pgd(key, logits_fn, x, y, norm=norm, eps=eps, steps=1, step_size=eps, active=active)


def pgd_batch(fn, x, y, key, active, eps, *, step_size, norm, steps, random_start):
  """Traceable PGD on one batch; returns ``(x_adv, still_correct)``."""
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


_pgd_jit = jax.jit(pgd_batch, static_argnames=("step_size", "norm", "steps", "random_start"))
