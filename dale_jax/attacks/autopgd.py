"""Auto-PGD: APGD-CE, APGD-DLR and APGD-T (Croce & Hein, ICML 2020).

"Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks". Gradient ascent with momentum on a per-example loss,
whose step size starts at ``2 eps`` and is halved at checkpoints when progress
stalls; after a halving the iterate restarts from the best point found so far.
Details follow the authors' reference code (``autoattack/autopgd_base.py``).

One step, with ``P`` the projection onto the threat model and ``s`` the
steepest-ascent direction (``sign(g)`` for Linf, ``g / ||g||_2`` for L2)::

  z      = P(x_k + eta_k s(grad f(x_k)))
  x_k+1  = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_k-1)),   alpha = 0.75

(``alpha = 1`` at the first step). Checkpoints ``w_j`` (:func:`checkpoints`)
follow ``p_0 = 0, p_1 = 0.22, p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06)``.
At ``w_j`` the step size of an example is halved when

1. the loss increased in at most ``rho (w_j - w_j-1)`` of the steps since
   ``w_j-1`` (``rho = 0.75``), or
2. its step size was not halved at ``w_j-1`` and the best loss has not
   improved since then.

The losses are the cross-entropy, the Difference of Logits Ratio

.. math::

  \\mathrm{DLR}(z, y) = -\\frac{z_y - \\max_{i \\ne y} z_i}{z_{\\pi_1} - z_{\\pi_3}},

and its targeted version with target ``t``

.. math::

  \\mathrm{DLR}_t(z, y) = -\\frac{z_y - z_t}{z_{\\pi_1} - (z_{\\pi_3} + z_{\\pi_4})/2},

where ``z_pi1 >= z_pi2 >= ...`` are the sorted logits (a ``1e-12`` keeps the
denominators positive).

L1 (Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks on
image classifiers", ICML 2021) follows the reference's own rules: the step is
the sparse sign :func:`dale_jax.threat.sparse_sign` on a share ``k`` of the
coordinates (``k = 0.2`` at first) with step size ``eps``, without momentum,
projected exactly onto the L1 ball and the box; every ``max(int(0.04 steps), 1)``
steps ``k`` becomes ``||x_best - x||_0 / (1.5 d)`` and the step size returns to
``eps`` (with the iterate to the best point) where the sparsity of the best
point fell below 95% of the previous check, and is divided by 1.5 otherwise
(within ``[eps / 10, eps]``). With ``use_largereps`` a run is the reference's
three stages of 30%, 30% and 40% of the steps at radii ``3 eps``, ``2 eps`` and
``eps``, each starting from the best point of the previous one.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dale_jax import threat
from dale_jax import validation
from dale_jax.attacks import _common

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75
_DENOM_EPS = 1e-12


# ----------------------------------------------------------------------------- losses


def dlr_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Untargeted DLR loss per example (higher = closer to misclassification)."""
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  top_is_y = jnp.argmax(logits, axis=-1) == y
  z_other = jnp.where(top_is_y, z_sorted[:, -2], z_sorted[:, -1])
  return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + _DENOM_EPS)


def dlr_loss_targeted(logits: jax.Array, y: jax.Array, y_target: jax.Array) -> jax.Array:
  """Targeted DLR loss per example; needs at least 4 classes."""
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(logits, y_target[:, None], axis=-1)[:, 0]
  denom = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + _DENOM_EPS
  return -(z_y - z_t) / denom


def _loss_fn(loss: str, targeted: bool):
  if loss == "ce" and not targeted:
    return lambda z, y, t: optax.softmax_cross_entropy_with_integer_labels(z, y)
  if loss == "ce":
    return lambda z, y, t: -optax.softmax_cross_entropy_with_integer_labels(z, t)
  if not targeted:
    return lambda z, y, t: dlr_loss(z, y)
  return dlr_loss_targeted


def target_classes(clean_logits: jax.Array, n_target_classes: int) -> jax.Array:
  """Targets of APGD-T, shape ``(n_target_classes, batch)``.

  Row ``i`` holds, per example, the class with the ``(i + 2)``-th largest clean
  logit: for a correctly classified point, its ``i + 1``-th most likely wrong
  class.
  """
  order = jnp.argsort(clean_logits, axis=-1)
  return order[:, ::-1][:, 1:n_target_classes + 1].T.astype(jnp.int32)


# ----------------------------------------------------------------------------- schedule


def checkpoints(steps: int) -> list[int]:
  """Iteration counts ``w_j`` after which the step size is checked.

  The reference code's integer form of ``w_j = ceil(p_j steps)``: the first
  window has ``max(int(0.22 steps), 1)`` steps and every next window is
  ``max(int(0.03 steps), 1)`` shorter, but no shorter than
  ``max(int(0.06 steps), 1)``. For ``steps = 100``: 22, 41, 57, 70, 80, 87,
  93, 99.
  """
  _common.check_positive_int("steps", steps)
  window = max(int(0.22 * steps), 1)
  min_window = max(int(0.06 * steps), 1)
  decrement = max(int(0.03 * steps), 1)
  out, done = [], window
  while done <= steps:
    out.append(done)
    window = max(window - decrement, min_window)
    done += window
  return out


def _checkpoint_tables(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per step: whether a checkpoint follows it, and the window it closes."""
  is_checkpoint = np.zeros(steps, bool)
  window = np.zeros(steps, np.int32)
  last = 0
  for w in checkpoints(steps):
    is_checkpoint[w - 1] = True
    window[w - 1] = w - last
    last = w
  return is_checkpoint, window


def halving_condition(
    n_increases: jax.Array,
    window: jax.Array,
    loss_best: jax.Array,
    loss_best_last_check: jax.Array,
    halved_last_check: jax.Array,
    rho: float = 0.75,
) -> jax.Array:
  """Whether to halve the step size at a checkpoint (conditions 1 or 2).

  Args:
    n_increases: per example, how many steps since the last checkpoint raised
      the loss above that of the previous iterate.
    window: number of steps since the last checkpoint.
    loss_best: best loss so far.
    loss_best_last_check: best loss at the last checkpoint.
    halved_last_check: whether the step size was halved at the last checkpoint.
    rho: the paper's ``rho``.

  Returns:
    A boolean per example. Condition 1 uses ``<=``, as the reference code does.
  """
  oscillating = n_increases <= rho * window
  stalled = jnp.logical_not(halved_last_check) & (loss_best_last_check >= loss_best)
  return oscillating | stalled


# ----------------------------------------------------------------------------- one run


class RunResult(NamedTuple):
  """Outputs of one APGD run.

  x_best: iterate of highest loss per example; acc: still correctly
  classified after every iterate; loss_best: highest loss; x_best_adv: last
  misclassified iterate (the initial point where there is none); step_size:
  final step size per example; losses: loss of every iterate, shape
  ``(steps + 1, batch)`` (row 0 is the initial point).
  """

  x_best: jax.Array
  acc: jax.Array
  loss_best: jax.Array
  x_best_adv: jax.Array
  step_size: jax.Array
  losses: jax.Array


def _initial_point(keys, x, norm, eps):
  """Random point on the sphere of radius eps (Linf: uniform direction, max-normalised).

  L1: a Gaussian draw projected onto the ball and the box, as the reference does.
  """
  if norm == "l1":
    t = _common.per_example(lambda k: jax.random.normal(k, x.shape[1:], x.dtype), keys)
    return jnp.clip(x + threat.project_l1_box(t, x, eps), 0.0, 1.0)
  if norm == "linf":
    t = _common.per_example(
        lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0), keys)
  else:
    t = _common.per_example(lambda k: jax.random.normal(k, x.shape[1:], x.dtype), keys)
  t = t / (threat.per_example_norm(t, norm).reshape(_common.batch_shape(t)) + _DENOM_EPS)
  return jnp.clip(x + eps * t, 0.0, 1.0)


def eot_loss_and_grad(fn, loss_fn, x_adv, y, y_target, *, query, eot_iter):
  """``(logits, per-example loss, gradient of the summed loss)`` at ``x_adv``.

  A deterministic ``fn`` is queried once. A randomised one
  (:class:`dale_jax.attacks.Randomized`) is queried at the draws
  ``fn.redraw(query * eot_iter + d)`` for ``d < eot_iter``; the gradient is their
  mean (expectation over transformation, Athalye et al. 2018), the logits and
  loss are those of the last draw, as in the reference APGD.
  """

  def value_and_grad(f):
    def total(xa):
      logits = f(xa)
      per_example = loss_fn(logits, y, y_target)
      return jnp.sum(per_example), (logits, per_example)

    (_, (logits, per_example)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
    return logits, per_example, grad

  if not isinstance(fn, _common.Randomized):
    return value_and_grad(fn)

  def draw(grad_sum, d):
    logits, per_example, grad = value_and_grad(fn.redraw(query * eot_iter + d))
    return grad_sum + grad, (logits, per_example)

  grad_sum, (logits, per_example) = jax.lax.scan(
      draw, jnp.zeros_like(x_adv), jnp.arange(eot_iter))
  return logits[-1], per_example[-1], grad_sum / eot_iter


def single_run(fn, x, y, keys, y_target, eps, *, norm, steps, loss, targeted, rho=0.75,
               x_init=None, eot_iter=1):
  """One run of APGD from a random start (or ``x_init``); traceable. Returns a :class:`RunResult`.

  With a randomised model every query is a fresh draw and the gradient the
  mean over ``eot_iter`` draws (:func:`eot_loss_and_grad`).
  """
  loss_fn = _loss_fn(loss, targeted)
  if y_target is None:
    y_target = y

  def loss_and_grad(x_adv, query):
    return eot_loss_and_grad(fn, loss_fn, x_adv, y, y_target, query=query, eot_iter=eot_iter)

  project = functools.partial(threat.project, x=x, norm=norm, eps=eps)
  if x_init is None:
    x_adv = _initial_point(keys, x, norm, eps)
  else:
    x_adv = jnp.clip(x_init, 0.0, 1.0)
  logits, loss0, grad = loss_and_grad(x_adv, 0)
  state = dict(
      x_adv=x_adv, x_prev=x_adv, grad=grad,
      x_best=x_adv, grad_best=grad, loss_best=loss0,
      x_best_adv=x_adv, acc=_common.predicted_correct(logits, y),
      step_size=jnp.full(_common.batch_shape(x), (1.0 if norm == "l1" else 2.0) * eps, x.dtype),
      loss_prev=loss0, n_increases=jnp.zeros(loss0.shape, jnp.int32),
      loss_best_last_check=loss0, halved_last_check=jnp.ones(loss0.shape, bool),
  )
  if norm == "l1":
    n_features = x[0].size
    sparsity = jnp.sum((x_adv - x).reshape(x.shape[0], -1) != 0, axis=1).astype(x.dtype)
    if x_init is None:
      state.update(share=jnp.full(loss0.shape, 0.2, x.dtype),
                   sparsity=jnp.full(loss0.shape, n_features, x.dtype))
    else:
      state.update(share=sparsity / n_features / 1.5, sparsity=sparsity)
    interval = max(int(0.04 * steps), 1)
    is_checkpoint = (np.arange(1, steps + 1) % interval) == 0
    window = np.full(steps, interval, np.int32)
  else:
    is_checkpoint, window = _checkpoint_tables(steps)

  def track(s, z, logits, loss_z, grad_z):
    """The bookkeeping shared by every norm after the iterate ``z``."""
    correct = _common.predicted_correct(logits, y)
    improved = loss_z > s["loss_best"]
    imp = _common.bcast(improved, z)
    return dict(
        s, x_best_adv=jnp.where(_common.bcast(~correct, z), z, s["x_best_adv"]),
        acc=s["acc"] & correct, x_best=jnp.where(imp, z, s["x_best"]),
        grad_best=jnp.where(imp, grad_z, s["grad_best"]),
        loss_best=jnp.where(improved, loss_z, s["loss_best"]),
        x_prev=s["x_adv"], x_adv=z, grad=grad_z)

  def step(s, inputs):
    i, at_checkpoint, win = inputs
    a = jnp.where(i > 0, MOMENTUM, 1.0).astype(x.dtype)
    z = project(s["x_adv"] + s["step_size"] * threat.steepest_ascent(s["grad"], norm))
    z = project(s["x_adv"] + (z - s["x_adv"]) * a + (s["x_adv"] - s["x_prev"]) * (1 - a))
    logits, loss_z, grad_z = loss_and_grad(z, i + 1)
    new = track(s, z, logits, loss_z, grad_z)
    n_increases = s["n_increases"] + (loss_z > s["loss_prev"]).astype(jnp.int32)

    halve = at_checkpoint & halving_condition(
        n_increases, win, new["loss_best"], s["loss_best_last_check"], s["halved_last_check"],
        rho)
    hal = _common.bcast(halve, z)
    new.update(
        x_adv=jnp.where(hal, new["x_best"], z),
        grad=jnp.where(hal, new["grad_best"], grad_z),
        step_size=jnp.where(hal, s["step_size"] / 2, s["step_size"]),
        loss_prev=loss_z,
        n_increases=jnp.where(at_checkpoint, 0, n_increases),
        loss_best_last_check=jnp.where(at_checkpoint, new["loss_best"],
                                       s["loss_best_last_check"]),
        halved_last_check=jnp.where(at_checkpoint, halve, s["halved_last_check"]),
    )
    return new, loss_z

  def step_l1(s, inputs):
    i, at_checkpoint, _ = inputs
    z = project(s["x_adv"] + s["step_size"] * threat.sparse_sign(s["grad"], s["share"]))
    logits, loss_z, grad_z = loss_and_grad(z, i + 1)
    new = track(s, z, logits, loss_z, grad_z)
    sparsity = jnp.sum((new["x_best"] - x).reshape(x.shape[0], -1) != 0,
                       axis=1).astype(x.dtype)
    reset = at_checkpoint & (sparsity / s["sparsity"] < 0.95)
    full = eps * jnp.ones_like(s["step_size"])
    step_size = jnp.clip(jnp.where(_common.bcast(reset, z), full, s["step_size"] / 1.5),
                         eps / 10.0, eps)
    res = _common.bcast(reset, z)
    new.update(
        x_adv=jnp.where(res, new["x_best"], z),
        grad=jnp.where(res, new["grad_best"], grad_z),
        step_size=jnp.where(at_checkpoint, step_size, s["step_size"]),
        share=jnp.where(at_checkpoint, sparsity / x[0].size / 1.5, s["share"]),
        sparsity=jnp.where(at_checkpoint, sparsity, s["sparsity"]),
    )
    return new, loss_z

  state, losses = jax.lax.scan(
      step_l1 if norm == "l1" else step, state,
      (jnp.arange(steps), jnp.asarray(is_checkpoint), jnp.asarray(window)))
  return RunResult(
      x_best=state["x_best"], acc=state["acc"], loss_best=state["loss_best"],
      x_best_adv=state["x_best_adv"], step_size=state["step_size"].reshape(-1),
      losses=jnp.concatenate([loss0[None], losses], axis=0))


def large_reps_schedule(steps: int) -> list[tuple[float, int]]:
  """The stages ``(radius / eps, steps)`` of ``use_largereps``: 3, 2 and 1 times eps."""
  first = math.ceil(0.3 * steps)
  return [(3.0, first), (2.0, first), (1.0, steps - 2 * first)]


def large_reps_run(fn, x, y, keys, y_target, eps, *, steps, **kwargs):
  """AutoAttack's ``decr_eps_pgd`` for L1: stages at ``3 eps, 2 eps, eps``, warm-started."""
  start = x + _common.per_example(lambda k: jax.random.normal(k, x.shape[1:], x.dtype), keys)
  for stage, (factor, stage_steps) in enumerate(large_reps_schedule(steps)):
    if stage_steps < 1:
      continue
    start = x + threat.project_l1_box(start - x, x, factor * eps)
    res = single_run(_redraw(fn, stage), x, y, keys, y_target, factor * eps, norm="l1",
                     steps=stage_steps, x_init=start, **kwargs)
    start = res.x_best
  return res


def _redraw(fn, i):
  """Independent draws of a randomised model for each run; a deterministic one as it is."""
  return fn.redraw(i) if isinstance(fn, _common.Randomized) else fn


# ----------------------------------------------------------------------------- restarts


def apgd_batch(fn, x, y, key, active, eps, *, norm, steps, restarts, loss, targeted,
               n_target_classes=0, rho=0.75, use_largereps=False, eot_iter=1):
  """Traceable APGD on one batch (the body of :func:`apgd`); returns ``(x_adv, still_correct)``."""
  keys = _common.example_keys(key, x.shape[0])
  clean_logits = fn(x)
  n_classes = clean_logits.shape[-1]
  if loss == "dlr" and n_classes < (4 if targeted else 3):
    raise validation.InvalidArgument(
        "loss", rest=f"'dlr' needs at least {4 if targeted else 3} classes, got {n_classes}")
  validation.require(not use_largereps or norm == "l1", "norm",
                     "'l1' with use_largereps (AutoAttack's L1 schedule)", norm)
  validation.require(not targeted or n_target_classes <= n_classes - 1, "n_target_classes",
                     f"at most n_classes - 1 = {n_classes - 1}", n_target_classes)
  acc = _common.predicted_correct(clean_logits, y) & active
  if targeted:
    targets = target_classes(clean_logits, n_target_classes)
    n_runs = n_target_classes * restarts
  else:
    targets = y[None]
    n_runs = restarts

  run = large_reps_run if use_largereps else functools.partial(single_run, norm=norm)

  def one_run(j, acc):
    del acc  # each run attacks the whole batch; only the points left take its result
    res = run(_redraw(fn, j), x, y, _common.fold_keys(keys, j), targets[j // restarts], eps,
              steps=steps, loss=loss, targeted=targeted, rho=rho, eot_iter=eot_iter)
    return res.x_best_adv, res.acc

  return _common.attack_runs(one_run, x, acc, n_runs)


_apgd_jit = jax.jit(apgd_batch, static_argnames=(
    "norm", "steps", "restarts", "loss", "targeted", "n_target_classes", "rho", "use_largereps",
    "eot_iter"))


def apgd(
    key: jax.Array,
    logits_fn,
    x: jax.Array,
    y: jax.Array,
    *,
    norm: str,
    eps: float,
    steps: int = _common.APGD_STEPS,
    restarts: int = 1,
    loss: str = "ce",
    targeted: bool = False,
    n_target_classes: int = 9,
    rho: float = 0.75,
    use_largereps: bool = False,
    eot_iter: int = 1,
    active: jax.Array | None = None,
) -> jax.Array:
  """Runs APGD and returns adversarial inputs.

  A point is attacked only while it is still classified correctly (and
  ``active``); a restart (or, when targeted, a target class) that finds a
  misclassified iterate replaces it, otherwise the point stays at ``x``.
  APGD-CE is ``loss="ce"``; APGD-T is ``loss="dlr", targeted=True`` with one
  run per target class, the classes ranked 2nd to ``n_target_classes + 1``-th
  by the clean logits.

  Args:
    logits_fn: ``x -> logits``; a ``jax.tree_util.Partial`` keeps its bound
      arguments (weights) traced.
    x: clean inputs in ``[0, 1]``, ``(batch, ...)``.
    y: integer labels, ``(batch,)``.
    key: one PRNG key, or one per example.
    norm: ``"linf"``, ``"l2"`` or ``"l1"``.
    eps: radius of the threat model.
    steps: iterations per run.
    restarts: random restarts (per target class when targeted).
    loss: ``"ce"`` or ``"dlr"``; targeted CE is ``-CE(z, target)``.
    targeted: attack target classes instead of the label.
    n_target_classes: number of target classes when targeted.
    rho: threshold of the step-size condition 1.
    use_largereps: L1 only: AutoAttack's three stages at 3, 2 and 1 times eps.
    eot_iter: draws of a randomised model averaged per gradient (EOT); such a
      model is passed as ``dale_jax.attacks.Randomized(fn, key)``, ``fn(x, key)``.
    active: optional boolean mask; inactive points are returned unchanged.

  Returns:
    ``x_adv`` of ``x``'s shape, inside the eps-ball and ``[0, 1]``.
  """
  _common.check_inputs(x, y, norm, eps)
  _common.check_positive_int("steps", steps)
  _common.check_positive_int("restarts", restarts)
  _common.check_positive_int("eot_iter", eot_iter)
  validation.one_of("loss", loss, LOSSES)
  if targeted:
    _common.check_positive_int("n_target_classes", n_target_classes)
  x = jnp.asarray(x)
  adv, _ = _apgd_jit(
      _common.as_pytree_fn(logits_fn), x, jnp.asarray(y), key,
      _common.default_active(x, active), eps, norm=norm, steps=steps, restarts=restarts,
      loss=loss, targeted=bool(targeted), n_target_classes=n_target_classes if targeted else 0,
      rho=float(rho), use_largereps=bool(use_largereps), eot_iter=eot_iter)
  return adv
