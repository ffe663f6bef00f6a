"""Perturbation sets: what a sampler may do to an input, as a parameter of its own.

A :class:`PerturbationSet` describes a set ``Delta`` of perturbations ``delta`` (a
pytree of its own shape) and how one acts on a batch of clean inputs ``x``:

* ``identity(x)``: the ``delta`` that leaves ``x`` unchanged;
* ``uniform(key, x)``: a uniform draw from ``Delta``, independent per example;
* ``apply(x, delta)``: the perturbed inputs, in ``[0, 1]``;
* ``project(delta, x)``: the Euclidean projection of ``delta`` onto ``Delta``;
* ``steepest_ascent(grad)``: the unit-norm direction that the signed samplers step in;
* ``norm``: the norm that direction belongs to (the update rules' ``norm``).

The Lp balls (:func:`lp_ball`) are the additive case: ``delta`` has the image's
shape, ``apply(x, delta) = clip(x + delta, 0, 1)`` and the projection keeps
``x + delta`` in the box as well. The samplers in :mod:`dale_jax.samplers` run Lp
balls in input space, which is the same iteration.

The geometric sets (:func:`rotation`, :func:`translation`, :func:`se2`) have one
parameter per degree of freedom, *normalised by its radius*: ``delta`` has shape
``(batch, k)`` with values in ``[-1, 1]^k``, so that ``delta = (0.5, -1, 0)`` in
:func:`se2` with ``angle = 30`` and ``shift = (3, 3)`` means 15 degrees and
``(-3, 0)`` pixels. The box is an Linf unit ball: projection is a clip, the
steepest-ascent direction is ``sign(grad)``, and a sampler's step size and noise
scale are fractions of each parameter's radius. They act by a bilinear warp
(:func:`warp`), differentiable in the parameters. :func:`with_linf` adds an
additive Linf ball of radius ``eps`` after the warp, its ``delta`` likewise in
units of ``eps``.

A perturbation set is data (a NamedTuple of pure functions), so it composes with
every sampler that takes one, under ``jit`` and ``vmap``::

  spatial = perturbations.se2(angle=30.0, shift=(3.0, 3.0))
  sample = samplers.langevin_gaussian(eps=0.3, step_size=0.1, steps=7, noise_scale=1e-3,
                                      perturbation=spatial)
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dale_jax import threat
from dale_jax import validation

Array = jax.Array
Delta = Any  # a pytree of arrays whose leaves lead with the batch axis

PADDINGS = ("zeros", "edge")
NAMES = ("lp", "rotation", "translation", "se2")


class PerturbationSet(NamedTuple):
  """A perturbation set: pure functions of ``(x, delta)`` (see the module docstring).

  ``axes`` names the parameters of a geometric set (``("angle", "shift_x",
  "shift_y")`` for SE(2)) and ``radii`` their ranges in degrees or pixels; both are
  empty for an Lp ball. ``grid(points)`` is the exhaustive grid of a geometric
  set: ``points`` per axis, ends included.
  """
  name: str
  norm: str
  identity: Callable[[Array], Delta]
  uniform: Callable[[Array, Array], Delta]
  apply: Callable[[Array, Delta], Array]
  project: Callable[[Delta, Array], Delta]
  steepest_ascent: Callable[[Delta], Delta]
  axes: tuple[str, ...] = ()
  radii: tuple[float, ...] = ()

  @property
  def parametric(self) -> bool:
    """True for the geometric sets, whose ``delta`` is ``(batch, len(axes))``."""
    return bool(self.axes)

  def grid(self, points: int | Sequence[int]) -> Array:
    """The ``prod(points)`` grid points, shape ``(prod(points), len(axes))``, in ``[-1, 1]``.

    Raises:
      ValueError: for an Lp ball or a composition with one (no finite grid), or
        ``points`` that is not one count >= 1 per axis.
    """
    if not self.parametric or self.name.endswith("+linf"):
      raise validation.InvalidArgument(
          "perturbation.name", f"a geometric set ({', '.join(NAMES[1:])}) for a grid", self.name)
    counts = grid_counts(points, len(self.axes))
    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in counts]
    return jnp.asarray(list(itertools.product(*axes)), jnp.float32)

  def physical(self, delta: Array) -> dict[str, Array]:
    """``delta`` of a geometric set in degrees and pixels: ``{axis: (batch,)}``."""
    if not self.parametric:
      raise ValueError(f"perturbation {self.name!r} has no named parameters")
    u = delta[0] if isinstance(delta, tuple) else delta
    return {a: u[:, i] * r for i, (a, r) in enumerate(zip(self.axes, self.radii))}


def grid_counts(points, k: int) -> tuple[int, ...]:
  """``points`` as one count per axis of a ``k``-parameter set (an int means all axes)."""
  counts = (points,) * k if validation.is_integer(points) else tuple(points)
  validation.require(len(counts) == k and all(validation.is_integer(n) and n >= 1 for n in counts),
                     "grid_points", f"an integer >= 1 or a tuple of {k} of them (one per axis)",
                     points)
  return tuple(int(n) for n in counts)


# ----------------------------------------------------------------------------
# Lp balls.


def lp_ball(norm: str, eps: float) -> PerturbationSet:
  """The additive ball ``{delta : ||delta||_p <= eps, x + delta in [0, 1]^d}``."""
  threat.check_threat(norm, eps)

  def project(delta, x):
    return threat.project(x + delta, x, norm=norm, eps=eps) - x

  return PerturbationSet(
      name="lp", norm=norm,
      identity=jnp.zeros_like,
      uniform=lambda key, x: threat.uniform(key, x, norm=norm, eps=eps) - x,
      apply=lambda x, delta: jnp.clip(x + delta, 0.0, 1.0),
      project=project,
      steepest_ascent=lambda g: threat.steepest_ascent(g, norm))


# ----------------------------------------------------------------------------
# The bilinear warp.


def _bilinear(image: Array, rows: Array, cols: Array, padding: str) -> Array:
  """``image`` (H, W, C) sampled at real coordinates ``rows, cols`` (H, W), bilinearly.

  Taps outside the image read 0 (``zeros``) or the nearest edge pixel (``edge``).
  """
  h, w = image.shape[:2]
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
  r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)

  def tap(r, c):
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    value = image[jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1)]
    return value if padding == "edge" else jnp.where(inside[..., None], value, 0.0)

  top = tap(r0, c0) * (1 - fc) + tap(r0, c0 + 1) * fc
  bottom = tap(r0 + 1, c0) * (1 - fc) + tap(r0 + 1, c0 + 1) * fc
  return top * (1 - fr) + bottom * fr


def warp(x: Array, angle: Array, shift_x: Array, shift_y: Array, padding: str = "zeros") -> Array:
  """Rotates each image by ``angle`` degrees about its centre, then shifts it.

  A positive angle turns the picture counter-clockwise as displayed (row 0 on
  top), as ``scipy.ndimage.rotate`` and ``torchvision``'s ``rotate`` do; a positive
  ``shift_x`` moves it right, a positive ``shift_y`` down. Output pixel ``p``
  (row, column) reads the input at

  .. math:: q = R(\\theta)^{-1} (p - t - c) + c,

  with ``c`` the centre ``((H - 1) / 2, (W - 1) / 2)`` and ``t = (shift_y, shift_x)``,
  interpolated bilinearly (:func:`_bilinear`). The result is differentiable in
  the angle and the shifts almost everywhere.

  Args:
    x: images ``(batch, H, W, C)``.
    angle: ``(batch,)``, degrees.
    shift_x: ``(batch,)``, pixels.
    shift_y: ``(batch,)``, pixels.
    padding: ``"zeros"`` or ``"edge"``.
  """
  validation.one_of("padding", padding, PADDINGS)
  if x.ndim != 4:
    raise validation.InvalidArgument(
        "x", rest=f"must be images (batch, H, W, C), got shape {x.shape}")
  h, w = x.shape[1:3]
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=x.dtype), jnp.arange(w, dtype=x.dtype),
                            indexing="ij")
  cr, cc = (h - 1) / 2.0, (w - 1) / 2.0

  def one(image, theta, tx, ty):
    theta = jnp.deg2rad(theta).astype(x.dtype)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    dr, dc = rows - ty - cr, cols - tx - cc
    # Counter-clockwise as displayed is clockwise in (row, column) coordinates.
    src_r = cos * dr + sin * dc + cr
    src_c = cos * dc - sin * dr + cc
    return _bilinear(image, src_r, src_c, padding)

  return jax.vmap(one)(x, angle, shift_x, shift_y)


# ----------------------------------------------------------------------------
# Geometric sets.


def _box_set(name: str, axes: tuple[str, ...], radii: tuple[float, ...], padding: str,
             to_warp: Callable[[Array], tuple[Array, Array, Array]]) -> PerturbationSet:
  validation.one_of("padding", padding, PADDINGS)
  k = len(axes)

  def apply(x, delta):
    angle, tx, ty = to_warp(delta * jnp.asarray(radii, x.dtype))
    return jnp.clip(warp(x, angle, tx, ty, padding), 0.0, 1.0)

  return PerturbationSet(
      name=name, norm="linf",
      identity=lambda x: jnp.zeros((x.shape[0], k), x.dtype),
      uniform=lambda key, x: jax.random.uniform(key, (x.shape[0], k), x.dtype, -1.0, 1.0),
      apply=apply,
      project=lambda delta, x: jnp.clip(delta, -1.0, 1.0),
      steepest_ascent=jnp.sign,
      axes=axes, radii=radii)


def rotation(angle: float, padding: str = "zeros") -> PerturbationSet:
  """Rotations by up to ``angle`` degrees either way; ``delta`` is ``(batch, 1)``."""
  validation.positive("angle", angle)
  zero = lambda p: jnp.zeros_like(p[:, 0])
  return _box_set("rotation", ("angle",), (float(angle),), padding,
                  lambda p: (p[:, 0], zero(p), zero(p)))


def translation(shift: Sequence[float], padding: str = "zeros") -> PerturbationSet:
  """Shifts by up to ``shift = (sx, sy)`` pixels in each direction; ``delta`` is ``(batch, 2)``."""
  sx, sy = _shift(shift)
  return _box_set("translation", ("shift_x", "shift_y"), (sx, sy), padding,
                  lambda p: (jnp.zeros_like(p[:, 0]), p[:, 0], p[:, 1]))


def se2(angle: float, shift: Sequence[float], padding: str = "zeros") -> PerturbationSet:
  """Rigid motions: a rotation by up to ``angle`` degrees, then a shift by up to
  ``shift = (sx, sy)`` pixels; ``delta`` is ``(batch, 3)``."""
  validation.positive("angle", angle)
  sx, sy = _shift(shift)
  return _box_set("se2", ("angle", "shift_x", "shift_y"), (float(angle), sx, sy), padding,
                  lambda p: (p[:, 0], p[:, 1], p[:, 2]))


def _shift(shift) -> tuple[float, float]:
  validation.require(isinstance(shift, (tuple, list)) and len(shift) == 2
                     and all(validation.is_real(s) and s >= 0 for s in shift)
                     and any(s > 0 for s in shift),
                     "shift", "a pair (sx, sy) of pixel counts >= 0, not both 0", shift)
  return float(shift[0]), float(shift[1])


def with_linf(base: PerturbationSet, eps: float) -> PerturbationSet:
  """``base`` followed by an additive Linf ball: ``clip(base.apply(x, u) + eps v, 0, 1)``.

  ``delta = (u, v)`` with ``u`` the base's parameters and ``v`` image-shaped in
  ``[-1, 1]`` (units of ``eps``); both parts are projected by clipping and ascended
  by their sign.
  """
  validation.require(base.parametric, "base",
                     "a geometric set (with_linf composes it with an Linf ball)", base.name)
  validation.positive("linf_eps", eps)

  def apply(x, delta):
    u, v = delta
    return jnp.clip(base.apply(x, u) + eps * v, 0.0, 1.0)

  return PerturbationSet(
      name=f"{base.name}+linf", norm="linf",
      identity=lambda x: (base.identity(x), jnp.zeros_like(x)),
      uniform=lambda key, x: (base.uniform(jax.random.fold_in(key, 0), x),
                              jax.random.uniform(jax.random.fold_in(key, 1), x.shape, x.dtype,
                                                 -1.0, 1.0)),
      apply=apply,
      project=lambda delta, x: jax.tree.map(lambda d: jnp.clip(d, -1.0, 1.0), delta),
      steepest_ascent=lambda g: jax.tree.map(jnp.sign, g),
      axes=base.axes, radii=base.radii)


# ----------------------------------------------------------------------------
# The worst case over candidate perturbations (the grid and worst-of-k attacks).


def search(logits_fn: Callable, pset: PerturbationSet, x: Array, y: Array,
           candidates: Any, chunk: int = 1) -> tuple[Array, Array]:
  """Whether the model is right on every candidate perturbation, and the highest CE.

  ``candidates`` holds ``K`` deltas per example, stacked on a leading axis (leaves
  ``(K, batch, ...)``). They are tried ``chunk`` at a time, each group in one
  forward pass of ``chunk * batch`` inputs (the examples stay the major axis, so a
  batch sharded over devices stays sharded); the last group repeats the last
  candidate, which changes neither result.

  Returns:
    ``(right, worst)``: ``right[i] = all_j [argmax logits(apply(x, delta_j))_i == y_i]``
    and ``worst[i] = max_j CE_i(apply(x, delta_j))``, each ``(batch,)``.
  """
  k = jax.tree.leaves(candidates)[0].shape[0]
  chunk = max(1, min(int(chunk), k))
  groups = -(-k // chunk)
  pad = groups * chunk - k
  b = y.shape[0]

  def grouped(c):
    if pad:
      c = jnp.concatenate([c, jnp.repeat(c[-1:], pad, axis=0)])
    return c.reshape((groups, chunk) + c.shape[1:])

  def one(carry, group):
    right, worst = carry
    flat = jax.tree.map(lambda d: jnp.swapaxes(d, 0, 1).reshape((b * chunk,) + d.shape[2:]),
                        group)
    logits = logits_fn(pset.apply(jnp.repeat(x, chunk, axis=0) if chunk > 1 else x, flat))
    labels = jnp.repeat(y, chunk) if chunk > 1 else y
    hit = (jnp.argmax(logits, -1) == labels).reshape(b, chunk)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).reshape(b, chunk)
    return (right & jnp.all(hit, axis=1), jnp.maximum(worst, jnp.max(ce, axis=1))), None

  init = (jnp.ones(y.shape, bool), jnp.full(y.shape, -jnp.inf, jnp.float32))
  (right, worst), _ = jax.lax.scan(one, init, jax.tree.map(grouped, candidates))
  return right, worst


# ----------------------------------------------------------------------------
# From a config section.


def make_perturbation(config: Mapping[str, Any] | None) -> PerturbationSet | None:
  """Builds the set a ``perturbation`` config section names.

  ``{name: "lp"}`` (or no section) returns ``None``: the sampler's own ``(norm,
  eps)`` ball, run in input space. Otherwise ``name`` is ``rotation`` (``angle``),
  ``translation`` (``shift``) or ``se2`` (both), warped with ``padding``; with
  ``linf_eps > 0`` an additive Linf ball of that radius follows the warp.

  Raises:
    InvalidArgument: naming the field, for an unknown name, padding or radius.
  """
  config = dict(config or {})
  name = config.get("name", "lp")
  validation.one_of("perturbation.name", name, NAMES)
  fields = ("name", "angle", "shift", "padding", "linf_eps")
  unknown = sorted(set(config) - set(fields))
  if unknown:
    raise validation.InvalidArgument(f"perturbation.{unknown[0]}",
                                     rest=f"is not a field of perturbation; accepted: {list(fields)}")
  # Every field is checked, whichever set the name picks.
  with validation.prefixed("perturbation"):
    angle = validation.positive("angle", config.get("angle", 30.0))
    shift = _shift(config.get("shift", (3.0, 3.0)))
    padding = validation.one_of("padding", config.get("padding", "zeros"), PADDINGS)
    linf_eps = validation.nonnegative("linf_eps", config.get("linf_eps", 0.0))
    if name == "lp":
      return None
    pset = {"rotation": lambda: rotation(angle, padding),
            "translation": lambda: translation(shift, padding),
            "se2": lambda: se2(angle, shift, padding)}[name]()
    return with_linf(pset, linf_eps) if linf_eps > 0 else pset


__all__ = ["PerturbationSet", "lp_ball", "rotation", "translation", "se2", "with_linf", "warp",
           "make_perturbation", "grid_counts", "search", "PADDINGS", "NAMES"]
