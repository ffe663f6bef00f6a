"""Dual-variable updates for constrained learning, in optax's ``init``/``update`` shape.

For constraints ``c_k(theta) <= rho_k`` the Lagrangian is
``L(theta, nu) = objective(theta) + sum_k nu_k (c_k(theta) - rho_k)``; the
primal-dual method descends in ``theta`` and ascends in ``nu`` by projected
gradient steps:

.. math:: \\nu_k \\leftarrow \\big[\\nu_k + \\eta_d (\\bar c_k - \\rho_k)\\big]_+

where ``c_bar`` is the constraint value averaged over the last ``every`` calls
(``every = 1``: advbench's per-minibatch update; ``every = steps_per_epoch``: the
paper's per-epoch update). Constraints are any pytree; ``margin`` is a scalar or a
matching pytree, so several constraints need no new code.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dale_jax import validation

PyTree = Any


class DualState(NamedTuple):
  """``nu``: the multipliers; ``total``/``count``: the running sum of constraint values."""

  nu: PyTree
  total: PyTree
  count: jax.Array


class DualTransformation(NamedTuple):
  """``init(constraints_like) -> DualState``; ``update(constraints, state) -> DualState``."""

  init: Callable[..., DualState]
  update: Callable[[PyTree, DualState], DualState]


def dual_ascent(
    step_size: float, margin: PyTree, init_value: float = 1.0, every: int = 1
) -> DualTransformation:
  """Projected dual ascent ``nu <- max(0, nu + step_size * (mean constraint - margin))``.

  Args:
    step_size: dual learning rate ``eta_d >= 0`` (0 keeps ``nu`` fixed).
    margin: the constraint level ``rho`` (scalar or a pytree like the constraints).
    init_value: initial multiplier (advbench 1.0; the paper 0.0); must be >= 0.
    every: apply the update once every ``every`` calls with the mean of the
      constraint values seen since the last one.

  Returns:
    A :class:`DualTransformation`; ``init`` takes a pytree shaped like the
    constraints (default a scalar).
  """
  validation.nonnegative("dual.step_size", step_size)
  validation.nonnegative("dual.init_value", init_value)
  validation.integer("dual.every", every, minimum=1)
  # A loss is >= 0: a negative margin is a constraint no model can meet.
  for leaf in jax.tree.leaves(margin):
    validation.nonnegative("dual.margin", leaf)

  def init(constraints_like: PyTree = 0.0) -> DualState:
    zeros = jax.tree.map(lambda c: jnp.zeros(jnp.shape(c), jnp.float32), constraints_like)
    nu = jax.tree.map(lambda z: z + init_value, zeros)
    return DualState(nu=nu, total=zeros, count=jnp.zeros((), jnp.int32))

  def update(constraints: PyTree, state: DualState) -> DualState:
    constraints = jax.lax.stop_gradient(constraints)
    total = jax.tree.map(lambda t, c: t + c, state.total, constraints)
    count = state.count + 1
    apply = count >= every
    # A margin shaped like the constraints (even a one-entry dict) is used as is; a
    # scalar margin applies to every constraint.
    margins = margin if jax.tree.structure(margin) == jax.tree.structure(constraints) else (
        jax.tree.map(lambda _: margin, constraints))

    def step(nu, t, rho):
      new = jnp.maximum(0.0, nu + step_size * (t / count - rho))
      return jnp.where(apply, new, nu)

    nu = jax.tree.map(step, state.nu, total, margins)
    total = jax.tree.map(lambda t: jnp.where(apply, jnp.zeros_like(t), t), total)
    return DualState(nu=nu, total=total, count=jnp.where(apply, 0, count))

  return DualTransformation(init, update)
