"""Threat models: the perturbation set Delta, always intersected with the [0, 1] box.

A threat model is an ``(norm, eps)`` pair. ``norm`` is ``"linf"``, ``"l2"`` or
``"l1"``; the set of admissible inputs around a clean ``x`` is

.. math::

  \\mathcal{A}(x) = \\{x' : \\|x' - x\\|_p \\le \\epsilon\\} \\cap [0, 1]^d.

Norms are taken per example over every axis but the first (the batch axis).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from dale_jax import validation

NORMS = ("linf", "l2", "l1")
# Share of the coordinates that an L1 steepest-ascent step moves: the top 1% of
# |gradient|, SLIDE's 99th percentile (Tramer & Boneh 2019).
L1_STEP_SHARE = 0.01

_TINY = 1e-12
_BISECTIONS = 32


def check_threat(norm: str, eps: float) -> None:
  """Raises ``ValueError`` naming the field when ``(norm, eps)`` is not a threat model."""
  validation.one_of("norm", norm, NORMS)
  if not isinstance(eps, jax.core.Tracer):
    validation.nonnegative("eps", eps)


def _per_example_norm(v: jax.Array, norm: str, keepdims: bool = True) -> jax.Array:
  axes = tuple(range(1, v.ndim))
  if norm == "linf":
    return jnp.max(jnp.abs(v), axis=axes, keepdims=keepdims)
  if norm == "l1":
    return jnp.sum(jnp.abs(v), axis=axes, keepdims=keepdims)
  # optax.safe_norm: gradient 0 (not NaN) at v_i = 0, e.g. a perturbation not yet moved.
  norms = optax.safe_norm(v.reshape(v.shape[0], -1), 0.0, axis=-1)
  return norms.reshape((-1,) + (1,) * (v.ndim - 1)) if keepdims else norms


def per_example_norm(v: jax.Array, norm: str) -> jax.Array:
  """Returns ``||v_i||_p`` for every example ``i``; shape ``(batch,)``."""
  check_threat(norm, 0.0)
  return _per_example_norm(v, norm, keepdims=False)


def project(x_adv: jax.Array, x: jax.Array, *, norm: str, eps: float) -> jax.Array:
  """Projects ``x_adv`` onto the eps-ball around ``x`` and then onto ``[0, 1]``.

  For ``linf`` both sets are boxes, so the two clips give the exact Euclidean
  projection onto their intersection. For ``l2`` the difference is rescaled to
  norm ``min(||d||, eps)`` and then clipped to the box; clipping moves every
  coordinate towards ``x`` (which lies in the box), so the result stays in the
  ball. For ``l1`` the result is the exact Euclidean projection onto the
  intersection (:func:`project_l1_box`), as AutoAttack's APGD-L1 uses it.

  Args:
    x_adv: perturbed inputs, shape ``(batch, ...)``.
    x: clean inputs in ``[0, 1]``, same shape.
    norm: ``"linf"`` or ``"l2"``.
    eps: radius of the ball.

  Returns:
    An array of ``x_adv``'s shape inside the threat model.
  """
  check_threat(norm, eps)
  delta = x_adv - x
  if norm == "linf":
    delta = jnp.clip(delta, -eps, eps)
  elif norm == "l1":
    return jnp.clip(x + project_l1_box(delta, x, eps), 0.0, 1.0)
  else:
    n = _per_example_norm(delta, "l2")
    delta = delta * jnp.minimum(1.0, eps / jnp.maximum(n, _TINY))
  return jnp.clip(x + delta, 0.0, 1.0)


def project_l1_box(delta: jax.Array, x: jax.Array, eps) -> jax.Array:
  """Euclidean projection of ``delta`` onto ``{d : ||d||_1 <= eps, 0 <= x + d <= 1}``.

  Per example, the projection is ``d_i = sign(delta_i) min(max(|delta_i| - lam, 0),
  room_i)`` with ``room_i`` the distance from ``x_i`` to the box's face in the
  direction of ``delta_i``, and ``lam >= 0`` the smallest shift with
  ``||d||_1 <= eps`` (the KKT conditions of the projection). ``f(lam) =
  ||d(lam)||_1`` is piecewise linear and non-increasing; ``lam`` is bracketed by
  bisection (:data:`_BISECTIONS` halvings of ``[0, max |delta_i|]``, each one
  elementwise pass) and then placed exactly by one Newton step on the linear
  piece it lies in. Exact up to float rounding, like the reference's
  ``L1_projection`` (which sorts the kinks of ``f`` and searches them); a
  bisection avoids the sort, which is the slow part on a CPU.
  """
  shape = delta.shape
  d = delta.reshape(shape[0], -1)
  x = jnp.broadcast_to(x, shape).reshape(shape[0], -1)
  a = jnp.abs(d)
  room = jnp.maximum(jnp.where(d >= 0, 1.0 - x, x), 0.0)
  eps = jnp.asarray(eps, d.dtype)

  def norm_at(lam):
    return jnp.sum(jnp.clip(a - lam[:, None], 0.0, room), axis=1)

  def halve(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    above = norm_at(mid) > eps
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  zero = jnp.zeros((d.shape[0],), d.dtype)
  _, hi = jax.lax.fori_loop(0, _BISECTIONS, halve, (zero, jnp.max(a, axis=1)))
  # ||d(hi)||_1 <= eps; on its linear piece the exact lam is one Newton step away.
  moving = jnp.sum((a - hi[:, None] > 0) & (a - hi[:, None] < room), axis=1).astype(d.dtype)
  lam = hi - jnp.where(moving > 0, (eps - norm_at(hi)) / jnp.maximum(moving, 1.0), 0.0)
  lam = jnp.where(norm_at(zero) <= eps, 0.0, jnp.maximum(lam, 0.0))
  out = jnp.sign(d) * jnp.clip(a - lam[:, None], 0.0, room)
  return out.reshape(shape)


def float_bisection(above, batch: int) -> tuple[jax.Array, jax.Array]:
  """Per row, the float32 ``t >= 0`` where a monotone test ``above(t)`` turns true.

  ``above`` maps a ``(batch,)`` float32 array to booleans and is false up to a
  point and true beyond it. Non-negative floats order like their bit patterns
  read as integers, so 31 halvings of the bit patterns find, exactly and
  without sorting, ``lo``, the largest float with ``above(lo)`` false, and
  ``hi``, the next float up (``+inf`` when ``above`` is never true).
  """
  def halve(_, bracket):
    lo, hi = bracket
    mid = lo + (hi - lo) // 2
    up = above(jax.lax.bitcast_convert_type(mid, jnp.float32))
    return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

  lo = jnp.zeros((batch,), jnp.int32)
  hi = jnp.full((batch,), 0x7F800000, jnp.int32)  # +inf
  lo, hi = jax.lax.fori_loop(0, 31, halve, (lo, hi))
  return (jax.lax.bitcast_convert_type(lo, jnp.float32),
          jax.lax.bitcast_convert_type(hi, jnp.float32))


def _kth_largest(a: jax.Array, k: jax.Array) -> jax.Array:
  """Per row, the ``k``-th largest of the non-negative ``a`` (``k >= 1``), without a sort."""
  a32 = a.astype(jnp.float32)
  kth, _ = float_bisection(lambda t: jnp.sum(a32 >= t[:, None], axis=1) < k, a.shape[0])
  return kth.astype(a.dtype)


def sparse_sign(grad: jax.Array, share) -> jax.Array:
  """``sign(g)`` on the ``share`` of coordinates with the largest ``|g|``, unit L1 norm.

  The L1 step of APGD-L1 (and of SLIDE): per example, the coordinates whose
  ``|g|`` reaches the value at index ``int((1 - share) n)`` of the sorted
  ``|g|`` move, each by ``1 / count`` (AutoAttack's rule, ties included).
  ``share`` may be a scalar or one value per example.
  """
  flat = grad.reshape(grad.shape[0], -1)
  n = flat.shape[1]
  share = jnp.broadcast_to(jnp.asarray(share, flat.dtype), (flat.shape[0],))
  index = jnp.clip(((1.0 - share) * n).astype(jnp.int32), 0, n - 1)
  threshold = _kth_largest(jnp.abs(flat), n - index)
  s = jnp.sign(flat) * (jnp.abs(flat) >= threshold[:, None])
  s = s / (jnp.sum(jnp.abs(s), axis=1, keepdims=True) + 1e-10)
  return s.reshape(grad.shape)


def steepest_ascent(grad: jax.Array, norm: str) -> jax.Array:
  """Unit-norm direction of steepest ascent for the dual norm of ``norm``.

  ``sign(g)`` for ``linf``; ``g / ||g||_2`` for ``l2`` (zero where ``g = 0``);
  for ``l1`` the sparse sign step :func:`sparse_sign` on the top
  :data:`L1_STEP_SHARE` of coordinates (the exact L1 steepest ascent moves one
  coordinate only, which is too slow to be useful).
  """
  check_threat(norm, 0.0)
  if norm == "linf":
    return jnp.sign(grad)
  if norm == "l1":
    return sparse_sign(grad, L1_STEP_SHARE)
  return grad / jnp.maximum(_per_example_norm(grad, "l2"), _TINY)


def uniform(key: jax.Array, x: jax.Array, *, norm: str, eps: float) -> jax.Array:
  """Draws ``x + delta`` with ``delta`` uniform in the eps-ball, then clips to ``[0, 1]``.

  As in advbench the clip follows the draw, so points outside the box are
  moved onto its faces rather than redrawn.
  """
  check_threat(norm, eps)
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  elif norm == "l1":
    # (e_1..e_d) / (e_1 + .. + e_d+1) with e_i ~ Exp(1) is uniform in the simplex
    # {v >= 0, sum(v) <= 1}; random signs make it uniform in the unit L1 ball.
    exp_key, sign_key = jax.random.split(key)
    dim = x[0].size
    e = jax.random.exponential(exp_key, (x.shape[0], dim + 1), x.dtype)
    v = e[:, :dim] / jnp.sum(e, axis=1, keepdims=True)
    signs = jax.random.rademacher(sign_key, v.shape, x.dtype)
    delta = (eps * signs * v).reshape(x.shape)
  else:
    dir_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(dir_key, x.shape, x.dtype)
    direction = direction / jnp.maximum(_per_example_norm(direction, "l2"), _TINY)
    dim = x[0].size
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    radius = eps * jax.random.uniform(radius_key, shape, x.dtype) ** (1.0 / dim)
    delta = direction * radius
  return jnp.clip(x + delta, 0.0, 1.0)
