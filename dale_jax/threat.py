"""Threat models: the perturbation set Delta, always intersected with the [0, 1] box.

A threat model is an ``(norm, eps)`` pair. ``norm`` is ``"linf"`` or ``"l2"``;
the set of admissible inputs around a clean ``x`` is

.. math::

  \\mathcal{A}(x) = \\{x' : \\|x' - x\\|_p \\le \\epsilon\\} \\cap [0, 1]^d.

Norms are taken per example over every axis but the first (the batch axis).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from dale_jax import validation

NORMS = ("linf", "l2")

_TINY = 1e-12


def check_threat(norm: str, eps: float) -> None:
  """Raises ``ValueError`` naming the field when ``(norm, eps)`` is not a threat model."""
  validation.one_of("norm", norm, NORMS)
  if not isinstance(eps, jax.core.Tracer):
    validation.nonnegative("eps", eps)


def _per_example_norm(v: jax.Array, norm: str, keepdims: bool = True) -> jax.Array:
  axes = tuple(range(1, v.ndim))
  if norm == "linf":
    return jnp.max(jnp.abs(v), axis=axes, keepdims=keepdims)
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=keepdims))


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
  ball.

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
  else:
    n = _per_example_norm(delta, "l2")
    delta = delta * jnp.minimum(1.0, eps / jnp.maximum(n, _TINY))
  return jnp.clip(x + delta, 0.0, 1.0)


def steepest_ascent(grad: jax.Array, norm: str) -> jax.Array:
  """Unit-norm direction of steepest ascent for the dual norm of ``norm``.

  ``sign(g)`` for ``linf``; ``g / ||g||_2`` for ``l2`` (zero where ``g = 0``).
  """
  check_threat(norm, 0.0)
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(_per_example_norm(grad, "l2"), _TINY)


def uniform(key: jax.Array, x: jax.Array, *, norm: str, eps: float) -> jax.Array:
  """Draws ``x + delta`` with ``delta`` uniform in the eps-ball, then clips to ``[0, 1]``.

  As in advbench the clip follows the draw, so points outside the box are
  moved onto its faces rather than redrawn.
  """
  check_threat(norm, eps)
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  else:
    dir_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(dir_key, x.shape, x.dtype)
    direction = direction / jnp.maximum(_per_example_norm(direction, "l2"), _TINY)
    dim = x[0].size
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    radius = eps * jax.random.uniform(radius_key, shape, x.dtype) ** (1.0 / dim)
    delta = direction * radius
  return jnp.clip(x + delta, 0.0, 1.0)
