"""FAB and FAB-T: the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020).

"Minimally distorted adversarial examples with a fast adaptive boundary
attack". FAB looks for the adversarial example of smallest ``Lp`` norm: at the
iterate ``x_k`` it linearises the decision boundary between the label ``y`` and
a class ``j``,

.. math::

  \\pi_j = \\{z : f_j(x_k) - f_y(x_k) + \\langle \\nabla f_j(x_k) - \\nabla f_y(x_k),
  z - x_k \\rangle = 0\\},

takes the closest hyperplane (``j`` minimising ``|f_j - f_y| / ||grad||_q``, ``q``
the dual norm; FAB-T uses one target class and needs only the gradient of
``f_t - f_y``, one backward pass), and projects both ``x_k`` and the clean ``x``
onto it intersected with the box ``[0, 1]^d`` (:func:`project_hyperplane_box`,
minimal ``Lp`` distance): ``d_1`` and ``d_2``. The step is the biased convex
combination

.. math::

  x_{k+1} = \\mathrm{clip}_{[0,1]}\\big((1 - \\alpha)(x_k + \\eta d_1)
  + \\alpha (x + \\eta d_2)\\big),\\quad
  \\alpha = \\min\\Big(\\frac{\\|d_1\\|}{\\|d_1\\| + \\|d_2\\|}, \\alpha_{max}\\Big),

with overshoot ``eta = 1.05``; once ``x_{k+1}`` is misclassified it is recorded
when it is the closest found so far and the iterate moves back towards ``x``:
``x + beta (x_{k+1} - x)``, ``beta = 0.9``. Every detail (random restarts at half
the radius, the ``1e-12`` and ``1e-8`` guards, the recorded distance) follows the
authors' reference code (``autoattack/fab_base.py``). As in AutoAttack, a point
counts as broken only when the closest adversarial example found lies within
``eps``; the returned inputs are then that example, else the clean point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dale_jax import threat
from dale_jax import validation
from dale_jax.attacks import _common
from dale_jax.attacks import autopgd

_NOT_FOUND = 1e10


# ----------------------------------------------------------------------------- projection


def project_hyperplane_box(t: jax.Array, w: jax.Array, b: jax.Array, norm: str) -> jax.Array:
  """Smallest ``d`` (in ``norm``) with ``<w, t + d> = b`` and ``t + d`` in ``[0, 1]^d``.

  Rows are independent: ``t`` and ``w`` are ``(batch, dim)``, ``b`` is
  ``(batch,)``. After flipping the signs so that ``c = <w, t> - b >= 0``, every
  coordinate ``i`` moves against ``sign(w_i)`` by at most ``room_i`` (the
  distance to the box's face) and lowers ``<w, .>`` by ``|w_i|`` per unit:

  * ``linf``: ``d_i = -sign(w_i) min(lam, room_i)``, the smallest ``lam`` with
    ``sum_i |w_i| min(lam, room_i) = c``;
  * ``l2``: ``d_i = -sign(w_i) min(lam |w_i|, room_i)`` (the KKT point), same
    equation with ``min(lam |w_i|, room_i)``;
  * ``l1``: the coordinates with the largest ``|w_i|`` move first, each to its
    face, until ``c`` is reached (the last one, or the ties at the threshold
    ``|w|``, move part of their room).

  ``lam`` (and the L1 threshold) is found exactly by
  :func:`dale_jax.threat.float_bisection`. When even moving every coordinate
  to its face does not reach the hyperplane, every coordinate does, as in the
  reference. Coordinates with ``w_i = 0`` stay.
  """
  c = jnp.sum(w * t, axis=1) - b
  sign = jnp.where(c >= 0, 1.0, -1.0).astype(t.dtype)
  w = w * sign[:, None]
  c = c * sign
  a = jnp.abs(w)
  room = jnp.where(w > 0, t, 1.0 - t)
  room = jnp.where(a > 0, jnp.maximum(room, 0.0), 0.0)
  direction = -jnp.sign(w)
  batch = t.shape[0]

  if norm in ("linf", "l2"):
    scale = jnp.ones_like(a) if norm == "linf" else a

    def reached(lam):
      return jnp.sum(a * jnp.minimum(lam[:, None] * scale, room), axis=1) >= c

    _, lam = threat.float_bisection(reached, batch)
    move = jnp.minimum(lam[:, None] * scale, room)  # lam = inf: every face
  elif norm == "l1":
    capacity = a * room
    total = jnp.sum(capacity, axis=1)

    def short(tau):  # moving every coordinate with |w| >= tau does not reach c
      return jnp.sum(jnp.where(a >= tau[:, None], capacity, 0.0), axis=1) < c

    tau, _ = threat.float_bisection(short, batch)
    full = a > tau[:, None]
    tie = (a == tau[:, None]) & (a > 0)
    left = c - jnp.sum(jnp.where(full, capacity, 0.0), axis=1)
    tie_capacity = jnp.sum(jnp.where(tie, capacity, 0.0), axis=1)
    share = jnp.clip(left / jnp.maximum(tie_capacity, 1e-30), 0.0, 1.0)
    move = jnp.where(full, room, jnp.where(tie, share[:, None] * room, 0.0))
    move = jnp.where((total < c)[:, None], room, move)
  else:
    raise validation.InvalidArgument("norm", f"one of {list(threat.NORMS)}", norm)
  return jnp.where(a > 0, direction * move, 0.0)


def _dual_norm(g: jax.Array, norm: str) -> jax.Array:
  """``||g||_q`` over the last axis, ``q`` the dual exponent of ``norm``."""
  if norm == "linf":
    return jnp.sum(jnp.abs(g), axis=-1)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))
  return jnp.max(jnp.abs(g), axis=-1)


# ----------------------------------------------------------------------------- one run


def _boundaries(fn, x1, y, target):
  """Differences of logits to ``y`` and their input gradients, flattened.

  Untargeted: every class (``(batch, K)`` and ``(batch, K, dim)``, with the
  label's own entry set to ``1e10`` so that it is never the closest); the
  gradients are one backward pass per class. Targeted: only ``f_t - f_y`` and
  its gradient, one backward pass.
  """
  n = x1.shape[0]
  rows = jnp.arange(n)
  if target is not None:
    def diff(xa):
      z = fn(xa)
      return jnp.sum(z[rows, target] - z[rows, y]), z[rows, target] - z[rows, y]

    grad, df = jax.grad(diff, has_aux=True)(x1)
    return df[:, None], grad.reshape(n, 1, -1)
  z, vjp = jax.vjp(fn, x1)
  k = z.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(k, dtype=z.dtype)[:, None, :], (k, n, k))
  jac = jax.vmap(lambda ct: vjp(ct)[0])(eye)  # (K, batch, ...)
  jac = jnp.moveaxis(jac, 0, 1).reshape(n, k, -1)
  df = z - z[rows, y][:, None]
  dg = jac - jac[rows, y][:, None]
  df = df.at[rows, y].set(_NOT_FOUND)
  return df, dg


def _start(key_batch, x, eps, norm):
  """The reference's random restart: a point at distance ``eps / 2`` (before the box clip)."""
  if norm == "linf":
    t = _common.per_example(
        lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0), key_batch)
  else:
    t = _common.per_example(lambda k: jax.random.normal(k, x.shape[1:], x.dtype), key_batch)
  t = t / threat.per_example_norm(t, norm).reshape(_common.batch_shape(t))
  return jnp.clip(x + 0.5 * eps * t, 0.0, 1.0)


def single_run(fn, x, y, x_start, target, *, norm, steps, alpha_max, eta, beta):
  """One run of FAB from ``x_start``; returns ``(closest adversarial, its distance)``.

  The distance is ``1e10`` where no adversarial example was found (the
  returned input is then ``x``). ``target`` is ``None`` for untargeted FAB.
  """
  n = x.shape[0]
  shape = x.shape
  x0 = x.reshape(n, -1)
  rows = jnp.arange(n)

  def step(state, _):
    x1, adv, best = state
    df, dg = _boundaries(fn, x1.reshape(shape), y, target)
    dist = jnp.abs(df) / (1e-12 + _dual_norm(dg, norm))
    closest = jnp.argmin(dist, axis=1)
    w = dg[rows, closest]
    b = -df[rows, closest] + jnp.sum(w * x1, axis=1)
    d = project_hyperplane_box(
        jnp.concatenate([x1, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]), norm)
    size = jnp.maximum(threat.per_example_norm(d, norm), 1e-8)
    d1, d2 = d[:n], d[n:]
    alpha = jnp.clip(size[:n] / (size[:n] + size[n:]), 0.0, alpha_max)[:, None]
    x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + d2 * eta) * alpha, 0.0, 1.0)

    is_adv = jnp.argmax(fn(x1.reshape(shape)), axis=-1) != y
    distance = threat.per_example_norm(x1 - x0, norm)
    closer = is_adv & (distance < best)
    adv = jnp.where(closer[:, None], x1, adv)
    best = jnp.where(closer, distance, best)
    x1 = jnp.where(is_adv[:, None], x0 + (x1 - x0) * beta, x1)
    return (x1, adv, best), None

  init = (x_start.reshape(n, -1), x0, jnp.full((n,), _NOT_FOUND, x.dtype))
  (_, adv, best), _ = jax.lax.scan(step, init, None, length=steps)
  return adv.reshape(shape), best


# ----------------------------------------------------------------------------- restarts


def fab_batch(fn, x, y, key, active, eps, *, norm, steps, restarts, targeted,
              n_target_classes=0, alpha_max=0.1, eta=1.05, beta=0.9):
  """Traceable FAB on one batch; returns ``(x_adv, still_correct)``.

  Untargeted: ``restarts`` runs, the first from ``x`` and the others from
  random points at distance ``eps / 2``. Targeted (FAB-T): the same for each of
  the ``n_target_classes`` classes ranked 2nd, 3rd, ... by the clean logits.
  Each run attacks the points not yet broken; a point is broken when the
  closest adversarial example of a run lies within ``eps``.
  """
  keys = _common.example_keys(key, x.shape[0])
  clean_logits = fn(x)
  n_classes = clean_logits.shape[-1]
  validation.require(not targeted or n_target_classes <= n_classes - 1, "n_target_classes",
                     f"at most n_classes - 1 = {n_classes - 1}", n_target_classes)
  acc = _common.predicted_correct(clean_logits, y) & active
  targets = autopgd.target_classes(clean_logits, n_target_classes) if targeted else None
  n_runs = (n_target_classes if targeted else 1) * restarts

  def one_run(j, acc):
    del acc
    restart = j % restarts
    start = jax.lax.cond(restart > 0,
                         lambda: _start(_common.fold_keys(keys, j), x, eps, norm),
                         lambda: x)
    target = targets[j // restarts] if targeted else None
    found, distance = single_run(fn, x, y, start, target, norm=norm, steps=steps,
                                 alpha_max=alpha_max, eta=eta, beta=beta)
    # Broken only when the closest adversarial example found lies within eps.
    return found, distance > eps

  return _common.attack_runs(one_run, x, acc, n_runs)


_fab_jit = jax.jit(fab_batch, static_argnames=(
    "norm", "steps", "restarts", "targeted", "n_target_classes", "alpha_max", "eta", "beta"))


def fab(
    key: jax.Array,
    logits_fn,
    x: jax.Array,
    y: jax.Array,
    *,
    norm: str,
    eps: float,
    steps: int = _common.FAB_STEPS,
    restarts: int = 1,
    targeted: bool = False,
    n_target_classes: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    active: jax.Array | None = None,
) -> jax.Array:
  """Runs FAB (``targeted=False``) or FAB-T and returns adversarial inputs.

  Args:
    logits_fn: ``x -> logits``; a ``jax.tree_util.Partial`` keeps its bound
      arguments (weights) traced.
    x: clean inputs in ``[0, 1]``, ``(batch, ...)``.
    y: integer labels, ``(batch,)``.
    key: one PRNG key, or one per example (used by the random restarts only).
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    eps: radius within which an adversarial example counts.
    steps: iterations per run (the reference's ``n_iter``).
    restarts: runs per target (the first starts at ``x``).
    targeted: FAB-T, one run per target class.
    n_target_classes: target classes of FAB-T.
    alpha_max, eta, beta: the paper's step parameters.
    active: optional boolean mask; inactive points are returned unchanged.

  Returns:
    ``x_adv`` of ``x``'s shape: the closest adversarial example found within
    ``eps`` of ``x`` (inside ``[0, 1]``), or ``x`` where none was.
  """
  _common.check_inputs(x, y, norm, eps)
  _common.check_positive_int("steps", steps)
  _common.check_positive_int("restarts", restarts)
  if targeted:
    _common.check_positive_int("n_target_classes", n_target_classes)
  x = jnp.asarray(x)
  adv, _ = _fab_jit(
      _common.as_pytree_fn(logits_fn), x, jnp.asarray(y), key, _common.default_active(x, active),
      eps, norm=norm, steps=steps, restarts=restarts, targeted=bool(targeted),
      n_target_classes=n_target_classes if targeted else 0, alpha_max=float(alpha_max),
      eta=float(eta), beta=float(beta))
  return adv

