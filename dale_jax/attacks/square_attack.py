"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020).

A score-based black-box attack: random search over perturbations made of
squares, accepting a proposal when it lowers the margin loss

.. math::

  m(z, y) = z_y - \\max_{i \\ne y} z_i

(or ``-CE``), or misclassifies. The side of the squares shrinks with the
iteration following the reference schedule for ``p`` (the share of pixels a
square covers): ``p_init`` halved after 10, 50, 200, 500, 1000, 2000, 4000,
6000 and 8000 iterations (counted on a 10,000-query scale when
``rescale_schedule``). AutoAttack runs it with ``p_init = 0.8``, 5,000 queries
and no rescaling, the defaults here.

Linf: the start is a vertical-stripe pattern of ``+-eps``; every proposal sets
one ``s x s`` square (per channel a random sign) to ``x +- eps``.
L2: the start is a grid of ``h // 5`` squares holding the pattern ``eta`` of
nested rectangles; every proposal moves the mass of one square into another
random square and redistributes the budget left in the ball.
L1: the same grid and moves with the L1 pattern (rectangles weighted by
``1 / (n + 1)^4`` instead of ``1 / (n + 1)^2``, halves and whole normalised in
L1); the window that receives the mass gets the L1 budget left in the ball,
``max(eps - ||delta||_1, 0) + c ||delta_windows||_1`` per channel (``c``
channels, as the reference broadcasts it), and the start and every proposal
are projected onto the L1 ball of radius ``eps (1 - 1e-6)`` intersected with
``[0, 1]`` (exact Euclidean projection, :func:`dale_jax.threat.project_l1_box`).

Details follow ``autoattack/square.py`` except that each example draws its
own square positions, signs and pattern orientations (as the authors'
original implementation does), which makes an example's result independent
of the batch it is in.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dale_jax import potentials
from dale_jax import threat
from dale_jax import validation
from dale_jax.attacks import _common

LOSSES = ("margin", "ce")
NORMS = ("linf", "l2", "l1")
_TINY = 1e-12
# The reference projects L1 points onto a ball shrunk by this share, so that the
# rounding of ``x + delta`` does not carry them outside the eps-ball.
_L1_SHRINK = 1e-6


# ----------------------------------------------------------------------------- schedule


def p_selection(it: int, n_queries: int, p_init: float, rescale_schedule: bool) -> float:
  """The reference schedule of ``p`` at iteration ``it``."""
  if rescale_schedule:
    it = int(it / n_queries * 10000)
  for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                     (4000, 64), (6000, 128), (8000, 256)):
    if it <= bound:
      return p_init / div
  return p_init / 512


def square_sizes(n_queries, p_init, height, width, channels, norm, rescale_schedule):
  """Side of the square at each iteration (a static table)."""
  n_features = channels * height * width
  sizes = np.empty(n_queries, np.int32)
  for it in range(n_queries):
    p = p_selection(it, n_queries, p_init, rescale_schedule)
    s = int(round(math.sqrt(p * n_features / channels)))
    if norm == "linf":
      s = max(s, 1)
    else:
      s = max(s, 3)
      s += 1 - s % 2
    sizes[it] = min(s, height, width)
  return sizes


# ----------------------------------------------------------------------------- losses


def margin_and_loss(logits, y, loss):
  """Margin ``z_y - max_{i != y} z_i`` and the loss Square minimises."""
  margin = -potentials.margin(logits, y)
  if loss == "margin":
    return margin, margin
  return margin, -optax.softmax_cross_entropy_with_integer_labels(logits, y)


# ----------------------------------------------------------------------------- L2 and L1 pattern

_MAX_SIDE = 4096
# The rectangles of eta(s) are weighted by 1 / (n + 1)^power.
_ETA_POWER = {"l2": 2, "l1": 4}


def _weight_sums(n, norm):
  """``sums[k] = sum_{n' < k} w(n') - C`` for ``k <= n``, ``w(n) = 1 / (n + 1)^q``, float32.

  Only differences ``sums[N] - sums[m]`` are used, so the constant ``C`` is
  free; it sets the rounding. L1's weights fall so fast that with ``C = 0`` its
  border values (``~1 / (3 m^3)``, 1e-4 and less) would be differences of
  numbers near ``pi^4 / 90`` and lose three to four digits; ``C = sum_{n' < n}
  w(n')`` stores minus the tails, which keeps them to float32 precision. L2
  keeps ``C = 0`` (its border values ``1 / N^2`` lose at most ~1e-5 relative),
  so that its results stay what they were.
  """
  terms = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** _ETA_POWER[norm]
  if norm == "l1":
    return -np.concatenate([np.cumsum(terms[::-1])[::-1], [0.0]]).astype(np.float32)
  return np.concatenate([[0.0], np.cumsum(terms)]).astype(np.float32)


def _eta_local(r, c, s, norm="l2"):
  """Unnormalised halves of ``eta(s)`` at local coordinates ``(r, c)`` inside the square.

  ``eta`` stacks ``rect(s // 2, s)`` above ``-rect(s - s // 2, s)``, where
  ``rect(a, b)[i, j] = sum_{n >= max(|i - a // 2|, |j - b // 2|)}^{N-1} 1/(n+1)^q``
  with ``N = max(a // 2, b // 2) + 1``: nested rectangles around the centre
  weighted by ``1 / (n + 1)^q``, ``q = 2`` for L2 and ``q = 4`` for L1.
  Returns ``(value, top)``.
  """
  sums = jnp.asarray(_weight_sums(_MAX_SIDE, norm))
  h1 = s // 2
  top = r < h1
  rows = jnp.where(top, h1, s - h1)
  i = jnp.where(top, r, r - h1)
  ic, jc = rows // 2, s // 2
  m = jnp.maximum(jnp.abs(i - ic), jnp.abs(c - jc))
  n_rect = jnp.maximum(ic, jc) + 1
  value = sums[jnp.clip(n_rect, 0, _MAX_SIDE)] - sums[jnp.clip(m, 0, _MAX_SIDE)]
  return value, top


def _pattern_norm(v, norm):
  """L2 or L1 norm of ``(batch, h, w)`` patterns over the image axes."""
  if norm == "l1":
    return jnp.sum(jnp.abs(v), axis=(1, 2), keepdims=True)
  return jnp.sqrt(jnp.sum(v**2, axis=(1, 2), keepdims=True))


def _placed_eta(vh, vw, s, transpose, height, width, norm="l2"):
  """``eta(s)`` placed at rows ``vh..vh+s`` and columns ``vw..vw+s``; ``(batch, h, w, 1)``.

  ``vh, vw, transpose`` are per example; ``s`` is a (traced) scalar. Each half
  of ``eta`` and then the whole pattern have unit norm (L2 or L1, ``norm``), as
  the reference's ``eta_rectangles`` and ``eta`` normalise them.
  """
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  r = rows - vh[:, None, None]
  c = cols - vw[:, None, None]
  inside = (r >= 0) & (r < s) & (c >= 0) & (c < s)
  t = transpose[:, None, None]
  r, c = jnp.where(t, c, r), jnp.where(t, r, c)
  value, top = _eta_local(jnp.clip(r, 0, s - 1), jnp.clip(c, 0, s - 1), s, norm)
  value = jnp.where(inside, value, 0.0)
  norm_top = _pattern_norm(jnp.where(top, value, 0.0), norm)
  norm_bot = _pattern_norm(jnp.where(top, 0.0, value), norm)
  value = jnp.where(top, value / norm_top, -value / norm_bot)
  value = value / _pattern_norm(value, norm)
  return value[..., None]


def _l2_normalize(v):
  return v / (jnp.sqrt(jnp.sum(v**2, axis=(1, 2, 3), keepdims=True)) + _TINY)


def _l2_norm(v, axis=(1, 2, 3)):
  return jnp.sqrt(jnp.sum(v**2, axis=axis, keepdims=True))


def _l1_norm(v, axis=(1, 2, 3)):
  return jnp.sum(jnp.abs(v), axis=axis, keepdims=True)


def _project_l1(x, delta, eps):
  """``x + delta`` projected onto the L1 ball of radius ``eps (1 - 1e-6)`` and ``[0, 1]``.

  The reference adds ``L1_projection(x, delta, eps (1 - 1e-6))``, the
  correction to ``delta`` that gives this Euclidean projection.
  """
  return x + threat.project_l1_box(delta, x, eps * (1.0 - _L1_SHRINK))


def _window(vh, vw, s, height, width):
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  vh = vh[:, None, None, None]
  vw = vw[:, None, None, None]
  return (rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s)


def _signs(key, shape):
  return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)


def _corner(key, side, s):
  """Top-left corner in ``[0, side - s)`` (``0`` when ``s = side``), as the reference draws it."""
  return jnp.floor(jax.random.uniform(key) * (side - s)).astype(jnp.int32)


# ----------------------------------------------------------------------------- one run


def _init(keys, x, eps, norm):
  """The start: Linf stripes, or (L2, L1) a grid of ``eta`` squares with random signs."""
  _, height, width, channels = x.shape
  if norm == "linf":
    stripes = _common.per_example(lambda k: _signs(k, (1, width, channels)), keys)
    return jnp.clip(x + eps * stripes, 0.0, 1.0)
  s = height // 5
  start = (height - 5 * s) // 2
  delta = jnp.zeros_like(x)
  n = 0
  for gh in range(height // s):
    for gw in range(width // s):
      vh, vw = start + gh * s, start + gw * s
      if vh + s > height or vw + s > width:
        continue

      def draw(k):
        k_t, k_s = jax.random.split(k)
        return jax.random.bernoulli(k_t), _signs(k_s, (1, 1, channels))

      transpose, signs = _common.per_example(draw, _common.fold_keys(keys, n))
      n += 1
      pattern = _placed_eta(jnp.zeros_like(transpose, jnp.int32), jnp.zeros_like(
          transpose, jnp.int32), s, transpose, s, s, norm)
      delta = delta.at[:, vh:vh + s, vw:vw + s, :].add(pattern * signs)
  if norm == "l1":
    # Not rescaled: the projection alone brings the grid into the ball.
    return _project_l1(x, delta, eps)
  return jnp.clip(x + _l2_normalize(delta) * eps, 0.0, 1.0)


def _proposal_linf(keys, x, x_best, eps, s):
  _, height, width, channels = x.shape

  def draw(k):
    k_h, k_w, k_s = jax.random.split(k, 3)
    return _corner(k_h, height, s), _corner(k_w, width, s), _signs(k_s, (1, 1, channels))

  vh, vw, signs = _common.per_example(draw, keys)
  square = _window(vh, vw, s, height, width)
  x_new = jnp.where(square, x_best + 2.0 * eps * signs, x_best)
  return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)


def _draw_two_windows(keys, x, s):
  """Per example: corners of the two windows, the pattern's orientation, channel signs."""
  _, height, width, channels = x.shape

  def draw(k):
    k = jax.random.split(k, 6)
    return (_corner(k[0], height, s), _corner(k[1], width, s), _corner(k[2], height, s),
            _corner(k[3], width, s), jax.random.bernoulli(k[4]),
            _signs(k[5], (1, 1, channels)))

  return _common.per_example(draw, keys)


def _move_into_window_1(keys, x, x_best, s, norm_fn, norm):
  """The common start of the L2 and L1 proposals: two windows and window 1's new content.

  Returns ``(delta, window_1, window_2, new, norm_image, norms_windows)``: the
  current perturbation, the two windows' masks, ``eta(s) * sign + delta_W1 /
  ||delta_W1||`` (still to be rescaled), ``||delta||`` over the whole image and
  ``||delta_{W1 u W2}||`` per channel, every norm ``norm_fn``'s.
  """
  _, height, width, _ = x.shape
  vh, vw, vh2, vw2, transpose, signs = _draw_two_windows(keys, x, s)
  delta = x_best - x
  window_1 = _window(vh, vw, s, height, width)
  window_2 = _window(vh2, vw2, s, height, width)
  in_window_1 = jnp.where(window_1, delta, 0.0)
  new = (_placed_eta(vh, vw, s, transpose, height, width, norm) * signs
         + in_window_1 / (_TINY + norm_fn(in_window_1, axis=(1, 2))))
  norms_windows = norm_fn(jnp.where(window_1 | window_2, delta, 0.0), axis=(1, 2))
  return delta, window_1, window_2, new, norm_fn(delta), norms_windows


def _proposal_l2(keys, x, x_best, eps, s):
  channels = x.shape[-1]
  delta, window_1, window_2, new, norm_image, norms_windows = _move_into_window_1(
      keys, x, x_best, s, _l2_norm, "l2")
  budget = jnp.maximum(eps**2 - norm_image**2, 0.0) / channels + norms_windows**2
  new = new / (_TINY + _l2_norm(new, axis=(1, 2))) * jnp.sqrt(budget)
  delta = jnp.where(window_1, new, jnp.where(window_2, 0.0, delta))
  return jnp.clip(x + _l2_normalize(delta) * eps, 0.0, 1.0)


def _proposal_l1(keys, x, x_best, eps, s):
  """Moves the mass of window 2 into window 1 (the reference's L1 branch).

  Per channel ``k``, window 1 gets ``eta(s) * sign_k + delta_W1 / ||delta_W1||_1``
  rescaled to L1 norm ``(max(eps - ||delta||_1, 0) / c + ||delta_{W1 u W2}||_1) c``
  (window norms per channel, the image norm over all channels: the reference's
  broadcasting, which for ``c > 1`` hands each channel more than its share and
  leaves the cut to the projection). Window 2 outside window 1 is zeroed, and
  the result projected onto the L1 ball and the box.
  """
  channels = x.shape[-1]
  delta, window_1, window_2, new, norm_image, norms_windows = _move_into_window_1(
      keys, x, x_best, s, _l1_norm, "l1")
  budget = (jnp.maximum(eps - norm_image, 0.0) / channels + norms_windows) * channels
  new = new / (_TINY + _l1_norm(new, axis=(1, 2))) * budget
  delta = jnp.where(window_1, new, jnp.where(window_2, 0.0, delta))
  return _project_l1(x, delta, eps)


_PROPOSALS = {"linf": _proposal_linf, "l2": _proposal_l2, "l1": _proposal_l1}


def single_run(fn, x, y, keys, active, eps, *, norm, n_queries, p_init, loss,
               rescale_schedule):
  """One Square run on the ``active`` points; returns ``(x_best, margin_min)``."""
  _, height, width, channels = x.shape
  sizes = jnp.asarray(square_sizes(
      n_queries, p_init, height, width, channels, norm, rescale_schedule))
  proposal = _PROPOSALS[norm]

  x_best = _init(_common.fold_keys(keys, 0), x, eps, norm)
  x_best = jnp.where(_common.bcast(active, x), x_best, x)
  margin_min, loss_min = margin_and_loss(fn(x_best), y, loss)

  def todo(margin_min):
    return active & (margin_min > 0)

  def cond(state):
    i, _, margin_min, _ = state
    return (i < n_queries) & jnp.any(todo(margin_min))

  def body(state):
    i, x_best, margin_min, loss_min = state
    x_new = proposal(_common.fold_keys(keys, i + 1), x, x_best, eps, sizes[i])
    margin, loss_new = margin_and_loss(fn(x_new), y, loss)
    attacking = todo(margin_min)
    lower = loss_new < loss_min
    loss_min = jnp.where(attacking & lower, loss_new, loss_min)
    accept = attacking & (lower | (margin <= 0))
    margin_min = jnp.where(accept, margin, margin_min)
    x_best = jnp.where(_common.bcast(accept, x), x_new, x_best)
    return i + 1, x_best, margin_min, loss_min

  _, x_best, margin_min, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), x_best, margin_min, loss_min))
  return x_best, margin_min


def square_batch(fn, x, y, key, active, eps, *, norm, n_queries, p_init, restarts, loss,
                 rescale_schedule):
  """Traceable Square on one batch (the body of :func:`square`); returns ``(x_adv, still_correct)``."""
  validation.one_of("norm", norm, NORMS)
  keys = _common.example_keys(key, x.shape[0])
  acc = _common.predicted_correct(fn(x), y) & active

  def one_run(r, acc):
    x_best, _ = single_run(
        fn, x, y, _common.fold_keys(keys, r), acc, eps, norm=norm, n_queries=n_queries,
        p_init=p_init, loss=loss, rescale_schedule=rescale_schedule)
    return x_best, _common.predicted_correct(fn(x_best), y)

  return _common.attack_runs(one_run, x, acc, restarts)


_square_jit = jax.jit(square_batch, static_argnames=(
    "norm", "n_queries", "p_init", "restarts", "loss", "rescale_schedule"))


def square(
    key: jax.Array,
    logits_fn,
    x: jax.Array,
    y: jax.Array,
    *,
    norm: str,
    eps: float,
    n_queries: int = _common.SQUARE_QUERIES,
    p_init: float = 0.8,
    restarts: int = 1,
    loss: str = "margin",
    rescale_schedule: bool = False,
    active: jax.Array | None = None,
) -> jax.Array:
  """Runs the Square attack and returns adversarial inputs.

  Only still correctly classified (and ``active``) points are attacked; a
  point's search stops once it is misclassified. The loop ends early when no
  point of the batch is left.

  Args:
    logits_fn: ``x -> logits`` (only its outputs are used).
    x: clean NHWC images in ``[0, 1]``.
    y: integer labels.
    key: one PRNG key, or one per example.
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    eps: radius of the threat model.
    n_queries: iterations per restart (one model query each, plus one at the start).
    p_init: initial share of pixels a square covers, in ``(0, 1]``.
    restarts: independent restarts on the points still correct.
    loss: ``"margin"`` or ``"ce"``.
    rescale_schedule: count iterations on a 10,000-query scale in the schedule
      of ``p`` (the reference class's default; AutoAttack turns it off).
    active: optional boolean mask; inactive points are returned unchanged.

  Returns:
    ``x_adv`` inside the eps-ball and ``[0, 1]``.
  """
  _common.check_inputs(x, y, norm, eps)
  if x.ndim != 4:
    raise validation.InvalidArgument(
        "x", rest=f"must be NHWC images for square, got shape {x.shape}")
  # The L2 and L1 start tiles the image with squares of side h // 5 (at least 2).
  if norm in ("l2", "l1") and min(x.shape[1:3]) < 10:
    raise validation.InvalidArgument(
        "x", rest=f"must be images of at least 10x10 for square with norm={norm!r}, "
        f"got shape {x.shape}")
  _common.check_positive_int("n_queries", n_queries)
  _common.check_positive_int("restarts", restarts)
  validation.real("p_init", p_init, minimum=0, maximum=1, open_min=True)
  validation.one_of("loss", loss, LOSSES)
  x = jnp.asarray(x)
  adv, _ = _square_jit(
      _common.as_pytree_fn(logits_fn), x, jnp.asarray(y), key,
      _common.default_active(x, active), eps, norm=norm, n_queries=n_queries,
      p_init=float(p_init), restarts=restarts, loss=loss,
      rescale_schedule=bool(rescale_schedule))
  return adv
