"""Perturbation samplers: pure functions ``sample(key, logits_fn, x, y) -> x_adv``.

Every sampler here is one loop, :func:`ascent`, assembled from four small parts:

* an **init** rule ``init(key, x) -> x0`` (identity, Gaussian jitter, uniform in the ball);
* an **objective** builder ``objective(logits_fn, x, y) -> f(key, x_adv) -> (batch,)``,
  the per-example potential that is ascended (see :mod:`dale_jax.potentials`);
* an **update** rule ``update(key, x_adv, grad) -> x_adv`` (signed step plus Gaussian
  noise, signed step of a Laplace-perturbed gradient, the paper's unsigned Langevin step);
* the threat model ``(norm, eps)``, projected onto after every step.

The gradient is that of the *sum* of the per-example objective, so each example's
step depends on that example only: step sizes mean the same at any batch size.
advbench ascends the batch *mean*; a sign step is the same either way, and where a
noise term is added to the gradient inside the sign (the Laplacian step) its scale is
converted with ``mean_over`` (:func:`laplace_signed_step`).
The loop is a ``lax.fori_loop`` and the result is under ``stop_gradient``, so no
gradient flows from a sampler into the model parameters.

Every factory also takes a ``perturbation`` (:mod:`dale_jax.perturbations`): a
rotation, translation or SE(2) set, possibly followed by an Linf ball. The same
parts then run on the set's parameters ``delta`` (:func:`ascent_over`): the
objective is evaluated at ``apply(x, delta)``, the update steps ``delta`` and the
projection is the set's. Without one (the default) the sampler's ``(norm, eps)``
ball is run in input space, as above. :func:`worst_of_k` and
:func:`metropolis_hastings` are gradient-free and take any set.

PGD is the Gaussian Langevin sampler with zero noise (:func:`pgd` calls
:func:`langevin_gaussian`), FGSM is one PGD step of size eps. A new sampler is a
few lines::

  sample = samplers.ascent(
      init=samplers.init_uniform("linf", 0.3),
      objective=samplers.potential_objective(potentials.margin),
      update=samplers.signed_step(0.05, "linf", noise_scale=0.01),
      steps=20, norm="linf", eps=0.3)
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dale_jax import perturbations as perturbations_lib
from dale_jax import potentials
from dale_jax import threat
from dale_jax import validation

Array = jax.Array
LogitsFn = Callable[[Array], Array]
Sampler = Callable[[Array, LogitsFn, Array, Array], Array]
Init = Callable[[Array, Array], Array]
Objective = Callable[[Array, Array], Array]
ObjectiveBuilder = Callable[[LogitsFn, Array, Array], Objective]
Update = Callable[[Array, Array, Array], Array]
PerturbationSet = perturbations_lib.PerturbationSet
STARTS = ("identity", "gaussian", "uniform")


# ----------------------------------------------------------------------------
# Validation.


_check_positive = validation.positive
_check_nonnegative = validation.nonnegative


def _check_count(name: str, value: Any, minimum: int) -> None:
  validation.integer(name, value, minimum=minimum)


def check_inputs(logits_fn: LogitsFn, x: Array, y: Array) -> None:
  """Checks shapes (at trace time) and label values (when they are concrete).

  Raises:
    ValueError: naming ``x`` or ``y`` when shapes disagree, ``y`` is not an
      integer vector, or a concrete label is outside ``[0, num_classes)``.
  """
  if x.ndim < 2:
    raise validation.InvalidArgument(
        "x", rest=f"must have a batch axis and at least one more, got shape {x.shape}")
  if y.ndim != 1 or y.shape[0] != x.shape[0]:
    raise validation.InvalidArgument(
        "y", rest=f"must have shape ({x.shape[0]},) to match x {x.shape}, got {y.shape}")
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise validation.InvalidArgument(
        "y", rest=f"must hold integer class labels, got dtype {y.dtype}")
  if not isinstance(y, jax.core.Tracer):
    num_classes = jax.eval_shape(logits_fn, x).shape[-1]
    # On the host: inside a trace (e.g. the restart loop) jnp.min of a concrete
    # array is a tracer and int() of it fails.
    labels = np.asarray(y)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
      raise validation.InvalidArgument(
          "y", rest=f"must lie in [0, {num_classes}), got labels in [{lo}, {hi}]")


# ----------------------------------------------------------------------------
# Init rules.


def init_identity(key: Array, x: Array) -> Array:
  """Starts at the clean input."""
  del key
  return x


def init_gaussian(std: float) -> Init:
  """Starts at ``x + std * N(0, I)`` (advbench's Langevin and TRADES start, std 0.001)."""
  _check_nonnegative("init_std", std)

  def init(key, x):
    return x + std * jax.random.normal(key, x.shape, x.dtype)

  return init


def init_uniform(norm: str, eps: float) -> Init:
  """Starts uniformly in the eps-ball (PGD's random start)."""
  threat.check_threat(norm, eps)

  def init(key, x):
    return threat.uniform(key, x, norm=norm, eps=eps)

  return init


# ----------------------------------------------------------------------------
# Objectives.


def potential_objective(potential: Callable[[Array, Array], Array]) -> ObjectiveBuilder:
  """Ascends ``potential(logits_fn(x_adv), y)``, e.g. cross-entropy or log(1 - p_y)."""

  def build(logits_fn, x, y):
    del x
    return lambda key, z: potential(logits_fn(z), y)

  return build


def kl_objective() -> ObjectiveBuilder:
  """Ascends ``KL(p(x) || p(x_adv))`` (TRADES); ``p(x)`` is computed once per call."""

  def build(logits_fn, x, y):
    del y
    clean_logits = jax.lax.stop_gradient(logits_fn(x))
    return lambda key, z: potentials.kl_to_clean(logits_fn(z), clean_logits)

  return build


def smoothed_objective(sigma: float, num_samples: int) -> ObjectiveBuilder:
  """SmoothAdv's objective ``-log (1/n) sum_k softmax_y(f(x_adv + sigma * xi_k))``.

  The noise ``xi_k ~ N(0, I)`` is redrawn at every step. The log-mean is taken in
  log space (``logsumexp``), so it is finite even when every ``p_y`` underflows.
  """
  _check_nonnegative("sigma", sigma)
  _check_count("num_samples", num_samples, 1)

  def build(logits_fn, x, y):
    del x

    def objective(key, z):
      noise = sigma * jax.random.normal(key, (num_samples,) + z.shape, z.dtype)
      noisy = (z[None] + noise).reshape((-1,) + z.shape[1:])
      log_p = jax.nn.log_softmax(logits_fn(noisy).astype(jnp.float32))
      log_p = log_p.reshape((num_samples, z.shape[0], -1))
      log_p_y = jnp.take_along_axis(log_p, y[None, :, None], axis=-1)[..., 0]
      return -(jax.nn.logsumexp(log_p_y, axis=0) - math.log(num_samples))

    return objective

  return build


# ----------------------------------------------------------------------------
# Update rules.


def signed_step(step_size: float, norm: str = "linf", noise_scale: float = 0.0) -> Update:
  """``x + eta * s(g) + c * N(0, I)`` with ``s`` the steepest-ascent direction of ``norm``.

  With ``norm="linf"`` this is advbench's Langevin-Gaussian step
  (``sign(g)``); with ``noise_scale=0`` it is the PGD step.
  """
  _check_positive("step_size", step_size)
  _check_nonnegative("noise_scale", noise_scale)
  threat.check_threat(norm, 0.0)

  def update(key, x_adv, grad):
    x_adv = x_adv + step_size * threat.steepest_ascent(grad, norm)
    if noise_scale:
      x_adv = x_adv + noise_scale * jax.random.normal(key, x_adv.shape, x_adv.dtype)
    return x_adv

  return update


def laplace_signed_step(step_size: float, norm: str = "linf", noise_scale: float = 0.0,
                        mean_over: int = 1) -> Update:
  """``x + eta * s(g + c * B * Laplace(0, 1))``: advbench's Langevin-Laplacian step.

  ``g`` is example ``i``'s own gradient. advbench ascends the *mean* over a batch of
  ``B`` examples, whose gradient is ``g / B``, and adds ``c * Laplace`` to that inside
  the sign; ``sign(g / B + c xi) = sign(g + c B xi)``, so with ``mean_over = B`` this
  step equals advbench's at batch size ``B`` while each example's step still depends
  on that example only (``mean_over = 1``: ``c`` relative to the per-example gradient).
  """
  _check_positive("step_size", step_size)
  _check_nonnegative("noise_scale", noise_scale)
  _check_count("mean_over", mean_over, 1)
  threat.check_threat(norm, 0.0)
  scale = noise_scale * mean_over

  def update(key, x_adv, grad):
    noise = jax.random.laplace(key, grad.shape, grad.dtype)
    return x_adv + step_size * threat.steepest_ascent(grad + scale * noise, norm)

  return update


def langevin_step(step_size: float, temperature: float = 1.0) -> Update:
  """The paper's Langevin step on ``U = (1/T) log g``:

  .. math:: x \\leftarrow x + \\eta \\nabla_x U + \\sqrt{2 \\eta}\\, \\xi, \\quad \\xi \\sim N(0, I)

  The objective passed alongside must be ``log g`` (e.g. ``log(1 - p_y)``); the
  gradient is used as is, not its sign.
  """
  _check_positive("step_size", step_size)
  _check_positive("temperature", temperature)
  noise_std = math.sqrt(2.0 * step_size)

  def update(key, x_adv, grad):
    noise = jax.random.normal(key, x_adv.shape, x_adv.dtype)
    return x_adv + (step_size / temperature) * grad + noise_std * noise

  return update


# ----------------------------------------------------------------------------
# The loop.


def ascent(
    *,
    init: Init,
    objective: ObjectiveBuilder,
    update: Update,
    steps: int,
    norm: str,
    eps: float,
    from_clean: bool = False,
) -> Sampler:
  """Builds ``sample(key, logits_fn, x, y)``: ``steps`` projected ascent steps.

  ``x_0 = P(init(x))``, ``x_{k+1} = P(update(x_k, grad_x sum_i f_i(x_k)))`` with
  ``P`` the projection onto the threat model. ``steps = 0`` returns ``P(init(x))``.
  With ``from_clean`` every step starts again from the clean input,
  ``x_{k+1} = P(update(x, grad f(x_k)))`` (advbench's SmoothAdv).
  """
  _check_count("steps", steps, 0)
  threat.check_threat(norm, eps)

  def sample(key: Array, logits_fn: LogitsFn, x: Array, y: Array) -> Array:
    check_inputs(logits_fn, x, y)
    init_key, loop_key = jax.random.split(key)
    f = objective(logits_fn, x, y)
    grad_fn = jax.grad(lambda z, k: jnp.sum(f(k, z)))
    x_adv = threat.project(init(init_key, x), x, norm=norm, eps=eps)

    def body(i, x_adv):
      grad_key, update_key = jax.random.split(jax.random.fold_in(loop_key, i))
      grad = grad_fn(x_adv, grad_key)
      return threat.project(update(update_key, x if from_clean else x_adv, grad), x, norm=norm,
                            eps=eps)

    x_adv = jax.lax.fori_loop(0, steps, body, x_adv)
    return jax.lax.stop_gradient(x_adv)

  return sample


def _tree_update(update: Update, key: Array, delta, grad):
  """``update`` on every leaf of a pytree perturbation, each leaf with its own key."""
  leaves, tree = jax.tree.flatten(delta)
  keys = jax.random.split(key, len(leaves))
  grads = tree.flatten_up_to(grad)
  return jax.tree.unflatten(tree, [update(k, d, g) for k, d, g in zip(keys, leaves, grads)])


def start(kind: str, perturbation: PerturbationSet, init_std: float = 0.0) -> Init:
  """The start of a loop over ``perturbation``'s parameters: its identity, the identity
  plus ``init_std * N(0, I)`` (in the set's units), or a uniform draw from the set."""
  validation.one_of("start", kind, STARTS)
  _check_nonnegative("init_std", init_std)

  def init(key, x):
    if kind == "uniform":
      return perturbation.uniform(key, x)
    delta = perturbation.identity(x)
    if kind == "identity" or not init_std:
      return delta
    leaves, tree = jax.tree.flatten(delta)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [d + init_std * jax.random.normal(k, d.shape, d.dtype)
                                     for k, d in zip(keys, leaves)])

  return init


def ascent_over(
    perturbation: PerturbationSet,
    *,
    init: Init,
    objective: ObjectiveBuilder,
    update: Update,
    steps: int,
    from_clean: bool = False,
) -> Sampler:
  """:func:`ascent` on the parameters of ``perturbation`` (``from_clean``: each step
  from the set's identity).

  ``delta_0 = P(init(x))``, ``delta_{k+1} = P(update(delta_k, grad_delta sum_i
  f_i(apply(x, delta_k))))`` with ``P`` the set's projection; returns
  ``apply(x, delta_steps)``. ``init`` returns a ``delta`` (see :func:`start`) and
  ``update`` acts on each leaf of it; build it with ``perturbation.norm``.
  """
  _check_count("steps", steps, 0)

  def sample(key: Array, logits_fn: LogitsFn, x: Array, y: Array) -> Array:
    check_inputs(logits_fn, x, y)
    init_key, loop_key = jax.random.split(key)
    f = objective(logits_fn, x, y)
    grad_fn = jax.grad(lambda d, k: jnp.sum(f(k, perturbation.apply(x, d))))
    delta = perturbation.project(init(init_key, x), x)

    def body(i, delta):
      grad_key, update_key = jax.random.split(jax.random.fold_in(loop_key, i))
      grad = grad_fn(delta, grad_key)
      base = perturbation.identity(x) if from_clean else delta
      return perturbation.project(_tree_update(update, update_key, base, grad), x)

    delta = jax.lax.fori_loop(0, steps, body, delta)
    return jax.lax.stop_gradient(perturbation.apply(x, delta))

  return sample


def _loop(perturbation: PerturbationSet | None, *, start_kind: str, init_std: float,
          objective: ObjectiveBuilder, update: Callable[[str], Update], steps: int, norm: str,
          eps: float, init: Init | None = None, from_clean: bool = False) -> Sampler:
  """The loop of a named sampler: in input space for the ``(norm, eps)`` ball, over
  the parameters of ``perturbation`` otherwise. ``update(norm)`` builds the step;
  ``init``, when given, replaces the ``start_kind`` rule (in the loop's own space)."""
  validation.one_of("start", start_kind, STARTS)
  threat.check_threat(norm, eps)
  if perturbation is None:
    if init is None:
      init = {"identity": lambda: init_identity, "gaussian": lambda: init_gaussian(init_std),
              "uniform": lambda: init_uniform(norm, eps)}[start_kind]()
    return ascent(init=init, objective=objective, update=update(norm), steps=steps, norm=norm,
                  eps=eps, from_clean=from_clean)
  return ascent_over(perturbation, init=init or start(start_kind, perturbation, init_std),
                     objective=objective, update=update(perturbation.norm), steps=steps,
                     from_clean=from_clean)


def couples_examples(config: Mapping[str, Any]) -> bool:
  """Whether the sampler of a config section draws one decision for its whole batch (the
  fork's batch-level worst-of-k and Metropolis-Hastings), so that its batch must not be
  cut into chunks (:func:`in_chunks`)."""
  name = config.get("name")
  return ((name == "worst_of_k" and config.get("select", "example") == "batch") or
          (name == "metropolis_hastings" and not config.get("per_example", True)))


def in_chunks(sampler: Sampler, chunk_size: int, groups: int = 1) -> Sampler:
  """Runs ``sampler`` on chunks of ``chunk_size`` examples, one chunk after another.

  The gradient samplers ascend a sum of per-example objectives with the model in
  eval mode, so example ``i``'s perturbation depends on example ``i`` alone and
  chunking leaves the perturbations' law unchanged (not so for the samplers that
  :func:`couples_examples` names, which training does not chunk) (chunk ``c`` draws with
  ``split(key)[c]``; with noise off the result is the whole-batch one). What
  changes is the working set: on a CPU a chunk's activations stay in cache
  through all the sampler's steps. On a GPU or TPU a whole batch is faster.

  ``groups`` > 1 keeps a batch that is split over ``groups`` devices split:
  chunk ``c`` takes ``chunk_size / groups`` examples from each device's rows.
  A batch whose size ``chunk_size`` does not divide (or no larger than it) is
  sampled whole.
  """
  _check_count("chunk_size", chunk_size, 1)
  _check_count("groups", groups, 1)
  validation.require(chunk_size % groups == 0, "chunk_size", f"divisible by groups={groups}",
                     chunk_size)

  def sample(key, logits_fn, x, y):
    n = x.shape[0]
    if n <= chunk_size or n % chunk_size:
      return sampler(key, logits_fn, x, y)
    chunks = n // chunk_size

    def split(a):  # (n, ...) -> (chunks, chunk_size, ...), rows of a group stay together.
      a = a.reshape((groups, chunks, chunk_size // groups) + a.shape[1:])
      return jnp.swapaxes(a, 0, 1).reshape((chunks, chunk_size) + a.shape[3:])

    def merge(a):
      a = a.reshape((chunks, groups, chunk_size // groups) + a.shape[2:])
      return jnp.swapaxes(a, 0, 1).reshape((n,) + a.shape[3:])

    keys = jax.random.split(key, chunks)
    out = jax.lax.map(lambda args: sampler(args[0], logits_fn, args[1], args[2]),
                      (keys, split(x), split(y)))
    return jax.lax.stop_gradient(merge(out))

  return sample


def with_restarts(
    sampler: Sampler, restarts: int, score: Callable[[Array, Array], Array] = potentials.cross_entropy
) -> Sampler:
  """Runs ``sampler`` ``restarts`` times and keeps, per example, the highest ``score``.

  Restart ``r`` uses ``fold_in(key, r)``; with ``restarts = 1`` the sampler is
  returned unchanged.
  """
  _check_count("restarts", restarts, 1)
  if restarts == 1:
    return sampler

  def sample(key, logits_fn, x, y):
    def run(r):
      x_adv = sampler(jax.random.fold_in(key, r), logits_fn, x, y)
      return x_adv, score(logits_fn(x_adv), y)

    def body(r, carry):
      best_x, best_score = carry
      x_adv, s = run(r)
      better = s > best_score
      mask = better.reshape((-1,) + (1,) * (x.ndim - 1))
      return jnp.where(mask, x_adv, best_x), jnp.where(better, s, best_score)

    best = jax.lax.fori_loop(1, restarts, body, run(0))[0]
    return jax.lax.stop_gradient(best)

  return sample


# ----------------------------------------------------------------------------
# The samplers advbench and the paper use.


def _potential(name: str) -> Callable[[Array, Array], Array]:
  valid = ("cross_entropy", "log_one_minus_p", "margin")
  validation.one_of("potential", name, valid)
  return potentials.POTENTIALS[name]


def langevin_gaussian(
    *,
    eps: float,
    step_size: float,
    steps: int,
    noise_scale: float,
    norm: str = "linf",
    init_std: float = 0.001,
    potential: str = "log_one_minus_p",
    start: str = "gaussian",
    init: Init | None = None,
    perturbation: PerturbationSet | None = None,
) -> Sampler:
  """advbench's Langevin-Gaussian sampler (Gaussian_DALE):

  start at ``x + init_std * N(0, I)``, then
  ``x' <- P(x' + eta * sign(grad log(1 - p_y)) + c * N(0, I))``.
  ``start`` picks another start (``identity``: ``x``; ``uniform``: in the ball), or
  ``init`` gives the rule itself (an :data:`Init`; over a ``perturbation``, one
  that returns its ``delta``, see :func:`start`).
  """
  return _loop(perturbation, start_kind=start, init_std=init_std,
               objective=potential_objective(_potential(potential)),
               update=lambda n: signed_step(step_size, n, noise_scale),
               steps=steps, norm=norm, eps=eps, init=init)


def langevin_laplacian(
    *,
    eps: float,
    step_size: float,
    steps: int,
    noise_scale: float,
    mean_over: int = 1,
    norm: str = "linf",
    init_std: float = 0.001,
    potential: str = "log_one_minus_p",
    perturbation: PerturbationSet | None = None,
) -> Sampler:
  """advbench's Langevin-Laplacian sampler (Laplacian_DALE, and DALE: the paper's
  Algorithm 1 as the authors' code takes its signed Langevin step):

  start at ``x + init_std * N(0, I)``, then ``x' <- P(x' + eta * sign(grad U + c * xi))``,
  ``xi ~ Laplace(0, 1)``, ``U`` the batch mean of ``log(1 - p_y)`` over ``mean_over``
  examples (:func:`laplace_signed_step`; the configs set it to the batch size, as
  advbench's ``LMC_Laplacian_Linf`` averages over its batch).
  """
  return _loop(perturbation, start_kind="gaussian", init_std=init_std,
               objective=potential_objective(_potential(potential)),
               update=lambda n: laplace_signed_step(step_size, n, noise_scale, mean_over),
               steps=steps, norm=norm, eps=eps)


def langevin(
    *,
    eps: float,
    step_size: float,
    steps: int,
    temperature: float = 1.0,
    norm: str = "linf",
    init_std: float = 0.0,
    potential: str = "log_one_minus_p",
    perturbation: PerturbationSet | None = None,
) -> Sampler:
  """Unsigned Langevin steps on ``(1/T) log g``, for research (DALE takes signed steps:
  :func:`langevin_laplacian`).

  ``delta <- P(delta + eta * grad (1/T) log g + sqrt(2 eta) N(0, I))`` with
  ``log g = log(1 - p_y)`` by default, from ``delta = 0``: the textbook Langevin
  update, and the authors' first DALE sampler (arobey1/advbench 0ea7d35, replaced by
  signed steps in 80fc180, "working better with sign(grad)"). The noise
  ``sqrt(2 eta)`` per step does not shrink with the drift ``eta / T``: unless
  ``|grad| / T`` is large against ``sqrt(2 / eta)`` the chain mostly diffuses.
  """
  return _loop(perturbation, start_kind="gaussian", init_std=init_std,
               objective=potential_objective(_potential(potential)),
               update=lambda n: langevin_step(step_size, temperature),
               steps=steps, norm=norm, eps=eps)


def pgd(
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = False,
    restarts: int = 1,
    potential: str = "cross_entropy",
    perturbation: PerturbationSet | None = None,
) -> Sampler:
  """Projected gradient ascent on cross-entropy: :func:`langevin_gaussian` with zero noise.

  Starts at ``x`` (advbench) or, with ``random_start``, uniformly in the ball
  (Madry et al.); with ``restarts > 1`` keeps each example's highest-loss run.
  """
  sampler = langevin_gaussian(
      eps=eps,
      step_size=step_size,
      steps=steps,
      noise_scale=0.0,
      norm=norm,
      potential=potential,
      start="uniform" if random_start else "identity",
      perturbation=perturbation,
  )
  return with_restarts(sampler, restarts, _potential(potential))


def fgsm(
    *, eps: float, norm: str = "linf", random_start: bool = False, step_size: float | None = None,
    perturbation: PerturbationSet | None = None,
) -> Sampler:
  """FGSM: one PGD step of size ``eps`` from ``x``.

  With ``random_start`` it is "fast adversarial training" (Wong et al. 2020):
  a uniform start in the ball and one step of ``1.25 eps`` unless ``step_size``
  is given. Over a geometric ``perturbation`` (radius 1 in its units) the step
  is 1, or 1.25 from a random start.
  """
  threat.check_threat(norm, eps)  # before eps is used as the step size and blamed as one
  radius = eps if perturbation is None else 1.0
  if step_size is None:
    step_size = 1.25 * radius if random_start else radius
  return pgd(eps=eps, step_size=step_size, steps=1, norm=norm, random_start=random_start,
             perturbation=perturbation)


def trades_kl(
    *, eps: float, step_size: float, steps: int, norm: str = "linf", init_std: float = 0.001,
    perturbation: PerturbationSet | None = None,
) -> Sampler:
  """TRADES' attack: from ``x + 0.001 N``, sign steps on ``KL(p(x) || p(x'))``."""
  return _loop(perturbation, start_kind="gaussian", init_std=init_std, objective=kl_objective(),
               update=lambda n: signed_step(step_size, n), steps=steps, norm=norm, eps=eps)


def smooth_adv(
    *,
    eps: float,
    step_size: float,
    steps: int,
    sigma: float,
    num_samples: int,
    from_clean: bool = True,
    norm: str = "linf",
    perturbation: PerturbationSet | None = None,
) -> Sampler:
  """SmoothAdv (Salman et al. 2019): sign steps on ``-log mean_k softmax_y(f(x' + sigma
  xi_k))`` from ``x``.

  ``from_clean=True`` is advbench's ``SmoothAdv``: each step starts again from ``x``
  (``x' <- P(x + eta sign(grad))``), so the output is one step of ``eta`` from ``x``
  along the last gradient; ``False`` accumulates the steps up to ``eps`` (Salman et
  al.'s PGD).
  """
  validation.boolean("from_clean", from_clean)
  return _loop(perturbation, start_kind="identity", init_std=0.0,
               objective=smoothed_objective(sigma, num_samples),
               update=lambda n: signed_step(step_size, n), steps=steps, norm=norm, eps=eps,
               from_clean=from_clean)


def uniform(*, eps: float, norm: str = "linf",
            perturbation: PerturbationSet | None = None) -> Sampler:
  """One uniform draw in the eps-ball, clipped to ``[0, 1]`` (CVaR, data augmentation),
  or from ``perturbation``."""
  threat.check_threat(norm, eps)

  def sample(key, logits_fn, x, y):
    check_inputs(logits_fn, x, y)
    if perturbation is None:
      return jax.lax.stop_gradient(threat.uniform(key, x, norm=norm, eps=eps))
    return jax.lax.stop_gradient(perturbation.apply(x, perturbation.uniform(key, x)))

  return sample


WORST_OF_K_SELECT = ("example", "batch")


def worst_of_k(
    *,
    eps: float,
    k: int,
    norm: str = "linf",
    potential: str = "cross_entropy",
    select: str = "example",
    perturbation: PerturbationSet | None = None,
) -> Sampler:
  r"""Worst-of-k (Engstrom et al. 2019): ``k`` uniform draws (:func:`uniform`), draw
  ``j`` from ``fold_in(key, j)`` (over a set, ``perturbation.uniform(fold_in(key, j),
  x)``), each scored by ``L_ij = potential(f(x_ij), y_i)``. It keeps

  * ``select="example"``: each example's own worst draw (:func:`with_restarts` of one
    uniform draw),

    .. math:: j_i = \arg\max_j L_{ij};

  * ``select="batch"``: one draw index for the whole batch, the one with the highest
    mean,

    .. math:: j^* = \arg\max_j \frac{1}{B} \sum_i L_{ij}, \qquad x'_i = x_{i j^*}.

  Ties keep the earlier draw. One forward pass per draw, no gradient. With
  ``select="batch"`` the batch is whatever the sampler is given: a device's share of
  it, or a chunk (:func:`in_chunks`).

  ``select="batch"`` is the advbench fork's ``Worst_Of_K`` (constrainedlearning/advbench
  31c09cb, ``advbench/attacks.py``, its loop since 86b25e1) with the fork's default
  ``batched=0``: the loop keeps the draw whose ``classifier.loss`` (cross-entropy, mean
  reduction) is highest, ``k = worst_of_k_steps``. Its ``batched=1`` path meant each
  example's worst draw, but indexes the ``(B k)`` draws with ``argmax`` values in
  ``[0, k)``, so every example gets one of example 0's draws; that is not reproduced.
  Its draws are its sets' ``delta_init``: for Translation and SE ``clamp(2 eps randn -
  eps)`` (see :func:`metropolis_hastings`), which has no counterpart here.
  """
  _check_count("k", k, 1)
  validation.one_of("select", select, WORST_OF_K_SELECT)
  score = _potential(potential)
  draw = uniform(eps=eps, norm=norm, perturbation=perturbation)
  if select == "example":
    return with_restarts(draw, k, score)

  def sample(key, logits_fn, x, y):
    def run(j):
      x_adv = draw(jax.random.fold_in(key, j), logits_fn, x, y)
      return x_adv, jnp.mean(score(logits_fn(x_adv), y).astype(jnp.float32))

    def body(j, carry):
      x_adv, s = run(j)
      better = s > carry[1]
      return jnp.where(better, x_adv, carry[0]), jnp.where(better, s, carry[1])

    return jax.lax.stop_gradient(jax.lax.fori_loop(1, k, body, run(0))[0])

  return sample


MH_PROPOSALS = ("gaussian", "laplace")
MH_ACCEPTANCES = ("density", "loss_ratio")
MH_OUTSIDE = ("reject", "project")


def metropolis_hastings(
    *,
    eps: float,
    steps: int,
    proposal_std: float,
    temperature: float = 1.0,
    norm: str = "linf",
    potential: str = "log_one_minus_p",
    proposal: str = "gaussian",
    radius_scaled: bool = False,
    acceptance: str = "density",
    per_example: bool = True,
    outside: str = "reject",
    perturbation: PerturbationSet | None = None,
) -> Sampler:
  r"""Random-walk Metropolis-Hastings over the perturbation set: per-example chains on
  ``exp(U / T)`` (the defaults), or the advbench fork's ``MH`` (the fields below).

  A chain starts from a uniform draw on the set ``Delta`` and takes ``steps`` steps.
  Each proposes

  .. math:: \delta' = \delta + s \odot \xi, \qquad \xi \sim N(0, I)\ (\texttt{proposal="gaussian"})
     \ \text{or}\ \mathrm{Laplace}(0, 1)\ (\texttt{"laplace"}),

  with ``s = proposal_std`` (the Gaussian's std, or the Laplace law's scale) in the
  set's units: fractions of each radius for a geometric set. With ``radius_scaled``,
  ``s_i = proposal_std * r_i`` in those units, i.e. ``proposal_std * r_i^2`` in
  degrees, pixels or intensity, ``r_i`` the radius of parameter ``i`` (``eps`` for the
  ``(norm, eps)`` ball; the additive part of a composed set, which the fork has no
  counterpart of, is not rescaled). A proposal outside ``Delta`` is rejected
  (``outside="reject"``) or first projected onto it (``"project"``: ``delta' <-
  P(delta')``, no longer a symmetric proposal). It is then accepted with probability

  * ``acceptance="density"``: for the target ``pi(delta) ∝ exp(U(delta) / T)`` on
    ``Delta``, ``U = potential(f(apply(x, delta)), y)`` (with ``U = log(1 - p_y)``, the
    paper's ``(1 - p_y)^{1/T}``),

    .. math:: \alpha = \min\left(1, \exp\left(\frac{U(\delta') - U(\delta)}{T}\right)\right);

  * ``acceptance="loss_ratio"``: for the target ``L(delta)^{1/T}``, ``L`` the
    cross-entropy (``potential`` must be ``cross_entropy``),

    .. math:: \alpha = \min\left(1, \left(\frac{L(\delta')}{L(\delta)}\right)^{1/T}\right),

  and ``alpha = 0`` for a rejected outside proposal. With ``per_example`` each example
  runs its own chain. Without, one chain runs over the whole batch: one ``alpha`` and
  one uniform draw decide for every example, from ``sum_i U_i`` (density) or the batch
  mean ``(1/B) sum_i L_i`` (loss_ratio), and a proposal is inside only if every
  example's is. That chain couples the examples of whatever batch the sampler is
  given: a device's share of it, or a chunk (:func:`in_chunks`). Returns the state
  after ``steps`` steps, applied to ``x``. One forward pass per step, no gradient.

  The advbench fork's ``MH`` (constrainedlearning/advbench 31c09cb,
  ``advbench/attacks.py``, class ``MH``, its proposal as of 751c1f5) is
  ``proposal="laplace"`` with ``radius_scaled`` (``delta + eps * Laplace(0,
  mh_dale_scale * eps)``: ``eps`` applied twice), ``proposal_std = mh_dale_scale``,
  ``steps = mh_dale_n_steps``, ``acceptance="loss_ratio"`` with ``temperature=1`` and
  ``potential="cross_entropy"``, and ``per_example=False``: its ``classifier.loss`` is
  ``F.cross_entropy`` with the mean reduction, so ``last_loss`` is a scalar and
  ``torch.bernoulli`` draws one decision for the batch. Its Translation and SE
  ``clamp_delta`` clip the proposal in place, so its ``allclose`` in-set test always
  passes: ``outside="project"``; its Rotation's returns a copy and a proposal outside
  skips the whole batch's step: ``outside="reject"``. Without a counterpart here: its
  start, ``clamp(2 eps * randn - eps)`` for Translation and SE (``randn`` where its
  Rotation, and every set before d320265, draws ``rand``; clamped, half the chains
  start at ``-eps``), here a uniform draw; and its Linf ball, on which its ``MH``
  cannot be built (``Linf.dim`` is ``None`` until an image is seen, and
  ``torch.zeros(None)`` raises).
  """
  _check_count("steps", steps, 0)
  _check_positive("proposal_std", proposal_std)
  _check_positive("temperature", temperature)
  validation.one_of("potential", potential, ("cross_entropy", "log_one_minus_p", "margin"))
  validation.one_of("proposal", proposal, MH_PROPOSALS)
  validation.boolean("radius_scaled", radius_scaled)
  validation.one_of("acceptance", acceptance, MH_ACCEPTANCES)
  validation.boolean("per_example", per_example)
  validation.one_of("outside", outside, MH_OUTSIDE)
  validation.require(acceptance != "loss_ratio" or potential == "cross_entropy", "potential",
                     "'cross_entropy' with acceptance='loss_ratio' (a ratio of positive losses)",
                     potential)
  pset = perturbations_lib.lp_ball(norm, eps) if perturbation is None else perturbation
  target = _potential(potential)
  noise = jax.random.normal if proposal == "gaussian" else jax.random.laplace
  scales = _proposal_scales(pset, eps, proposal_std, radius_scaled)

  def log_alpha(current, proposed, inside):
    """``log alpha``, ``(batch,)`` per example or ``()`` for the batch's one chain."""
    if not per_example:
      reduce = jnp.sum if acceptance == "density" else jnp.mean
      current, proposed, inside = reduce(current), reduce(proposed), jnp.all(inside)
    if acceptance == "density":
      log_ratio = (proposed - current) / temperature
    else:  # L' >= L accepts, also when both are 0; otherwise L > L' >= 0.
      log_ratio = jnp.where(proposed >= current, 0.0,
                            (jnp.log(proposed) - jnp.log(current)) / temperature)
    return jnp.where(inside, log_ratio, -jnp.inf)

  def sample(key, logits_fn, x, y):
    check_inputs(logits_fn, x, y)
    value_of = lambda d: target(logits_fn(pset.apply(x, d)), y).astype(jnp.float32)
    start_key, chain_key = jax.random.split(key)
    delta = pset.uniform(start_key, x)

    def body(i, carry):
      delta, value = carry
      prop_key, accept_key = jax.random.split(jax.random.fold_in(chain_key, i))
      leaves, tree = jax.tree.flatten(delta)
      keys = jax.random.split(prop_key, len(leaves))
      proposed = jax.tree.unflatten(tree, [
          d + s * noise(k, d.shape, d.dtype) for k, d, s in zip(keys, leaves, scales)])
      if outside == "project":
        proposed, inside = pset.project(proposed, x), jnp.ones(value.shape, bool)
      else:
        inside = _inside(pset, proposed, x)
      value_proposed = value_of(proposed)
      log_a = log_alpha(value, value_proposed, inside)
      accept = jnp.log(jax.random.uniform(accept_key, log_a.shape)) < log_a
      accept = jnp.broadcast_to(accept, value.shape)
      delta = jax.tree.map(
          lambda p, d: jnp.where(accept.reshape((-1,) + (1,) * (d.ndim - 1)), p, d),
          proposed, delta)
      return delta, jnp.where(accept, value_proposed, value)

    delta, _ = jax.lax.fori_loop(0, steps, body, (delta, value_of(delta)))
    return jax.lax.stop_gradient(pset.apply(x, delta))

  return sample


def _proposal_scales(pset: PerturbationSet, eps: float, proposal_std: float,
                     radius_scaled: bool) -> list:
  """The proposal's scale for each leaf of ``delta`` (one, or two for a composed set),
  in the set's units (see :func:`metropolis_hastings`): ``proposal_std``, or times each
  radius ``r_i``."""
  if not radius_scaled:
    return [proposal_std, proposal_std]
  if not pset.parametric:  # the (norm, eps) ball, delta in intensity: proposal_std * eps^2
    return [proposal_std * eps * eps]
  # A geometric set's parameters are in units of their radii; a composed set's
  # additive part (the second leaf) keeps proposal_std.
  return [proposal_std * np.asarray(pset.radii, np.float32), proposal_std]


def _inside(pset: PerturbationSet, delta, x: Array) -> Array:
  """``(batch,)``: whether ``delta`` lies in the set (its projection moves it by < 1e-6)."""
  moved = jax.tree.map(lambda p, d: jnp.max(jnp.abs(p - d).reshape(d.shape[0], -1), axis=1),
                       pset.project(delta, x), delta)
  return jnp.max(jnp.stack(jax.tree.leaves(moved)), axis=0) < 1e-6


SAMPLERS: Mapping[str, Callable[..., Sampler]] = {
    "pgd": pgd,
    "fgsm": fgsm,
    "langevin_gaussian": langevin_gaussian,
    "langevin_laplacian": langevin_laplacian,
    "langevin": langevin,
    "trades_kl": trades_kl,
    "smooth_adv": smooth_adv,
    "uniform": uniform,
    "worst_of_k": worst_of_k,
    "metropolis_hastings": metropolis_hastings,
}


def make_sampler(config: Mapping[str, Any],
                 perturbation: PerturbationSet | None = None) -> Sampler:
  """Builds a sampler from a config section ``{name: ..., **hyperparameters}``.

  ``perturbation`` is the set it runs over (:func:`dale_jax.perturbations.make_perturbation`
  of the config's ``perturbation`` section); ``None``: the section's ``(norm, eps)`` ball.

  Raises:
    ValueError: for an unknown ``name`` (listing the valid ones) or a field the
      sampler does not take (naming it and listing the accepted ones).
  """
  config = dict(config)
  name = config.pop("name", None)
  if name not in SAMPLERS:
    raise validation.InvalidArgument("sampler.name", f"one of {sorted(SAMPLERS)}", name)
  factory = SAMPLERS[name]
  accepted = [p for p in inspect.signature(factory).parameters
              if p not in ("perturbation", "init")]
  unknown = sorted(set(config) - set(accepted))
  if unknown:
    raise validation.InvalidArgument(
        f"sampler.{unknown[0]}", rest=f"is not a field of sampler {name!r}; accepted: {accepted}")
  with validation.prefixed("sampler"):
    return factory(**config, perturbation=perturbation)
