"""Every advbench algorithm (and the paper's Algorithm 1) as a sampler plus a pure loss.

An :class:`Algorithm` says which perturbations to draw (``sampler``, ``draws`` per
example, run with the model in eval mode), whether the clean logits are needed,
and how to turn logits into the training loss:

``loss(clean_logits, adv_logits, labels, nu) -> (loss, meters, constraints)``

``adv_logits`` has shape ``(draws, batch, classes)``; ``nu`` is the dual state's
multiplier (``None`` without a dual); ``constraints`` is what the dual update
ascends on (``None`` without one). ``meters`` are advbench's training meters.

Deliberate differences from advbench, each a bug fix or a cost saving that
leaves the estimator unchanged:

* ERM_DataAug averages the CE of the *perturbed* draws (advbench averages the
  clean CE ``M`` times, i.e. trains plain ERM).
* TRADES uses the natural CE term of the TRADES paper by default
  (``loss.ce_on="clean"``); advbench computes it on the adversarial images
  (``ce_on="adv"`` reproduces that).
* CVaR draws its ``M`` perturbations once and optimises ``t`` on those losses;
  advbench redraws and re-forwards all ``M`` draws at each of the ``n_steps``
  t-steps. The t-step is per example (see :func:`losses.cvar_t_subgradient`).
* Worst_Of_K draws, and MH_DALE_PD(_Reverse) start their chains, uniformly on the
  perturbation set; the advbench fork's Translation and SE draw ``clamp(2 eps randn -
  eps)``, ``randn`` for the ``rand`` of its Rotation, which puts half the draws at
  ``-eps`` (a property of the fork's sets that no field reproduces; the rest of its
  ``Worst_Of_K`` and ``MH`` is the default, see :func:`samplers.metropolis_hastings`).

Where advbench's choice is followed by default, a field gives the other one:
ALP and CLP pair log-probabilities on MNIST, whose advbench network returns
``log_softmax`` (``loss.pair_on``); CVaR_SGD_PD constrains the mean CE of its
draws (``loss.constraint="clean"``: the clean CE); RandSmoothing's SmoothAdv
restarts every step from the clean image (``sampler.from_clean``); the Laplacian
noise is relative to the batch-mean gradient (``sampler.mean_over``, the batch
size by default). ``docs/fidelity.md`` lists every algorithm against the authors'
code it follows.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from dale_jax import dual as dual_lib
from dale_jax import losses
from dale_jax import perturbations
from dale_jax import potentials
from dale_jax import samplers
from dale_jax import validation

Array = jax.Array
LossFn = Callable[[Array | None, Array | None, Array, Array | None], tuple]


class Algorithm(NamedTuple):
  name: str
  sampler: samplers.Sampler | None
  draws: int
  needs_clean: bool
  loss: LossFn
  dual: dual_lib.DualTransformation | None


def _ce_each(adv_logits: Array, labels: Array) -> Array:
  """Mean CE over draws and batch of ``(draws, batch, classes)`` logits."""
  return jnp.mean(jax.vmap(potentials.cross_entropy, (0, None))(adv_logits, labels))


def _single(adv_logits: Array) -> Array:
  return adv_logits[0]


# ----------------------------------------------------------------------------
# Loss builders: keyword hyperparameters in, loss function out.


def _erm():
  def loss(clean, adv, y, nu):
    ce = losses.cross_entropy(clean, y)
    return ce, {"Loss": ce}, None

  return loss


def _adversarial_ce():
  def loss(clean, adv, y, nu):
    ce = _ce_each(adv, y)
    return ce, {"Loss": ce}, None

  return loss


def _trades(beta: float, ce_on: str = "clean"):
  validation.nonnegative("loss.beta", beta)
  validation.one_of("loss.ce_on", ce_on, ("clean", "adv"))

  def loss(clean, adv, y, nu):
    adv = _single(adv)
    total = losses.trades(clean, adv, y, beta, ce_on=ce_on)
    ce = losses.cross_entropy(clean if ce_on == "clean" else adv, y)  # shared with total by XLA
    return total, {"Loss": total, "clean loss": ce, "invariance loss": losses.trades_kl(clean, adv)}, None

  return loss


def _logit_pairing(ce_on: str, weight: float = 1.0, pair_on: str = "logits"):
  """CE plus ``weight`` times the pairing norm of the network's outputs: its logits, or
  (``pair_on="log_softmax"``) its log-probabilities, which is what advbench pairs on
  MNIST, where its network returns ``log_softmax``."""
  validation.nonnegative("loss.weight", weight)
  validation.one_of("loss.pair_on", pair_on, ("logits", "log_softmax"))
  outputs = (lambda z: z) if pair_on == "logits" else (
      lambda z: jax.nn.log_softmax(z.astype(jnp.float32)))

  def loss(clean, adv, y, nu):
    adv = _single(adv)
    ce = losses.cross_entropy(adv if ce_on == "adv" else clean, y)
    pairing = losses.logit_pairing(outputs(clean), outputs(adv))
    total = ce + weight * pairing
    name = "robust loss" if ce_on == "adv" else "clean loss"
    return total, {"Loss": total, name: ce, "logit loss": pairing}, None

  return loss


def _mart(beta: float):
  validation.nonnegative("loss.beta", beta)
  def loss(clean, adv, y, nu):
    total = losses.mart(clean, _single(adv), y, beta)
    return total, {"Loss": total}, None

  return loss


def _term(t: float):
  validation.require(validation.is_real(t) and t != 0, "loss.t", "a finite nonzero number",
                     t)  # the tilt divides by t

  def loss(clean, adv, y, nu):
    total = losses.tilted(potentials.cross_entropy(clean, y), t)
    return total, {"Loss": total}, None

  return loss


def _cvar(beta: float, t_step_size: float, n_steps: int, method: str, primal_dual: bool = False,
          constraint: str = "draws"):
  """CVaR_beta of the CE over the ``M`` draws; primal-dual, ``+ nu * constraint`` with the
  constraint the mean CE over the draws (advbench's ``plain_loss / M``) or, with
  ``constraint="clean"``, the clean CE."""
  validation.real("loss.beta", beta, minimum=0, maximum=1, open_min=True)  # divides the tail
  validation.nonnegative("loss.t_step_size", t_step_size)
  # advbench's CVaR_SGD(_PD) back-propagate the bracket their t-loop computed last, at
  # the t before the loop's last update (n_steps - 1 updates); CVaR_SGD_Autograd
  # computes it after the loop, at the t of all n_steps updates.
  subgradient = method == "subgradient"
  validation.integer("loss.n_steps", n_steps, minimum=1 if subgradient else 0)
  updates = n_steps - 1 if subgradient else n_steps
  validation.one_of("loss.constraint", constraint, ("draws", "clean"))

  def loss(clean, adv, y, nu):
    per_draw = jax.vmap(potentials.cross_entropy, (0, None))(adv, y)
    t = losses.optimize_cvar_t(per_draw, beta, t_step_size, updates, method=method)
    cvar = losses.cvar(per_draw, t, beta)
    meters = {"Loss": cvar, "CVaR loss": cvar}
    if not primal_dual:
      return cvar, meters, None
    ce = jnp.mean(per_draw) if constraint == "draws" else losses.cross_entropy(clean, y)
    total = cvar + jax.lax.stop_gradient(nu) * ce
    name = "plain loss" if constraint == "draws" else "clean loss"
    meters.update({"Loss": total, name: ce, "dual variable": nu})
    return total, meters, ce

  return loss


def _dale(nu_fixed: float | None = None, objective: str = "robust", robust: str = "ce"):
  """``objective + nu * constraint`` with clean and robust terms in either role."""
  validation.one_of("loss.objective", objective, ("robust", "clean"))
  if nu_fixed is not None:
    validation.nonnegative("loss.nu_fixed", nu_fixed)

  def loss(clean, adv, y, nu):
    adv = _single(adv)
    clean_loss = losses.cross_entropy(clean, y)
    robust_loss = (
        losses.cross_entropy(adv, y) if robust == "ce" else losses.trades_kl(clean, adv))
    weight = nu_fixed if nu is None else jax.lax.stop_gradient(nu)
    if objective == "robust":
      total, constraint = robust_loss + weight * clean_loss, clean_loss
    else:
      total, constraint = clean_loss + weight * robust_loss, robust_loss
    meters = {"Loss": total, "clean loss": clean_loss, "robust loss": robust_loss}
    if nu is not None:
      meters["dual variable"] = nu
    return total, meters, (constraint if nu is not None else None)

  return loss


# ----------------------------------------------------------------------------
# The registry: name -> (loss builder, needs_clean, uses_sampler, uses_dual).


class _Spec(NamedTuple):
  """An algorithm: its loss builder and what its training step needs.

  ``sampler`` names the training sampler (a key of :data:`dale_jax.samplers.SAMPLERS`
  whose hyperparameters the config's family supplies), ``dual`` the default ``dual``
  section (``None``: no dual variable), ``loss_defaults`` the loss's keyword
  hyperparameters, ``draws`` the perturbations drawn per example.
  """
  loss: Callable[..., LossFn]
  needs_clean: bool | Callable[[Mapping[str, Any]], bool]  # or of the loss section
  sampler: str | None = None
  dual: Mapping[str, Any] | None = None
  loss_defaults: Mapping[str, Any] = MappingProxyType({})
  draws: int = 1

  @property
  def uses_sampler(self) -> bool:
    return self.sampler is not None

  @property
  def uses_dual(self) -> bool:
    return self.dual is not None


# advbench's dual ascent (PrimalDualBase and g_dale_pd_*, arobey1/advbench bd2071d): nu
# from 1.0, margin 0.1, eta_d 0.001, one step per training step.
_STEP_DUAL = MappingProxyType(dict(step_size=0.001, margin=0.1, init_value=1.0, every="step"))
# The paper's Algorithm 1 updates nu once per epoch; the values are advbench's, the step
# per training step (``every="epoch"`` adds up an epoch's steps, see make_algorithm).
_EPOCH_DUAL = MappingProxyType(dict(_STEP_DUAL, every="epoch"))
# The advbench fork's MH_DALE_PD_Reverse (constrainedlearning/advbench 31c09cb: init=0.0,
# g_dale_pd_inv_eta 1e-4, g_dale_pd_inv_margin 0.2). MH_DALE_PD has no class in the fork:
# it takes advbench's _STEP_DUAL.
_FORK_REVERSE_DUAL = MappingProxyType(dict(step_size=1e-4, margin=0.2, init_value=0.0,
                                           every="step"))
_CVAR = MappingProxyType(dict(beta=0.5, t_step_size=1.0, n_steps=5))
_PAIRING = MappingProxyType(dict(weight=1.0, pair_on="logits"))
_FIXED_NU = MappingProxyType(dict(nu_fixed=0.1))

ALGORITHMS: Mapping[str, _Spec] = {
    "ERM": _Spec(_erm, True),
    "ERM_DataAug": _Spec(_adversarial_ce, False, "uniform", draws=20),
    "FGSM": _Spec(_adversarial_ce, False, "fgsm"),
    "PGD": _Spec(_adversarial_ce, False, "pgd"),
    "TRADES": _Spec(_trades, True, "trades_kl",
                    loss_defaults=MappingProxyType(dict(beta=1.0, ce_on="clean"))),
    "ALP": _Spec(lambda **kw: _logit_pairing("adv", **kw), True, "pgd", loss_defaults=_PAIRING),
    "CLP": _Spec(lambda **kw: _logit_pairing("clean", **kw), True, "pgd", loss_defaults=_PAIRING),
    "MART": _Spec(_mart, True, "pgd", loss_defaults=MappingProxyType(dict(beta=5.0))),
    "TERM": _Spec(_term, True, loss_defaults=MappingProxyType(dict(t=2.0))),
    "RandSmoothing": _Spec(_adversarial_ce, False, "smooth_adv"),
    "CVaR_SGD": _Spec(lambda **kw: _cvar(method="subgradient", **kw), False, "uniform",
                      loss_defaults=_CVAR, draws=20),
    "CVaR_SGD_Autograd": _Spec(lambda **kw: _cvar(method="autograd", **kw), False, "uniform",
                               loss_defaults=_CVAR, draws=20),
    "CVaR_SGD_PD": _Spec(lambda **kw: _cvar(method="subgradient", primal_dual=True, **kw),
                         lambda loss: loss.get("constraint", "draws") == "clean",
                         "uniform", dual=_STEP_DUAL,
                         loss_defaults=MappingProxyType(dict(_CVAR, constraint="draws")),
                         draws=20),
    # Without a dual variable the fixed multiplier is required.
    "Gaussian_DALE": _Spec(lambda nu_fixed, **kw: _dale(nu_fixed, **kw), True,
                           "langevin_gaussian", loss_defaults=_FIXED_NU),
    "Laplacian_DALE": _Spec(lambda nu_fixed, **kw: _dale(nu_fixed, **kw), True,
                            "langevin_laplacian", loss_defaults=_FIXED_NU),
    "Gaussian_DALE_PD": _Spec(_dale, True, "langevin_gaussian", dual=_STEP_DUAL),
    "Gaussian_DALE_PD_Reverse": _Spec(lambda **kw: _dale(objective="clean", **kw), True,
                                      "langevin_gaussian", dual=_STEP_DUAL),
    "KL_DALE_PD": _Spec(lambda **kw: _dale(robust="kl", **kw), True, "trades_kl",
                        dual=_STEP_DUAL),
    # The paper's Algorithm 1 as the authors' code samples (signed Langevin steps with
    # Laplace noise inside the sign, LMC_Laplacian_Linf since 80fc180/2ba3eac), with the
    # paper's per-epoch dual update.
    "DALE": _Spec(_dale, True, "langevin_laplacian", dual=_EPOCH_DUAL),
    # The advbench fork's samplers over perturbation sets (constrainedlearning/advbench
    # 31c09cb, its rules and hparams in configs.FAMILIES): the worst of k uniform draws
    # (its Adversarial_Worst_Of_K), and DALE with its Metropolis-Hastings chain in place
    # of the Langevin sampler: the robust loss constrained (no class of the fork's), or,
    # Reverse (its MH_DALE_PD_Reverse), the clean loss under a robust constraint.
    "Worst_Of_K": _Spec(_adversarial_ce, False, "worst_of_k"),
    "MH_DALE_PD": _Spec(_dale, True, "metropolis_hastings", dual=_STEP_DUAL),
    "MH_DALE_PD_Reverse": _Spec(lambda **kw: _dale(objective="clean", **kw), True,
                                "metropolis_hastings", dual=_FORK_REVERSE_DUAL),
}


def check_name(name: str) -> None:
  validation.one_of("algorithm", name, sorted(ALGORITHMS))


def make_algorithm(
    name: str,
    *,
    sampler: Mapping[str, Any] | None = None,
    perturbation: Mapping[str, Any] | None = None,
    loss: Mapping[str, Any] | None = None,
    dual: Mapping[str, Any] | None = None,
    draws: int = 1,
    steps_per_epoch: int = 1,
) -> Algorithm:
  """Assembles algorithm ``name`` from its config sections.

  Args:
    name: one of :data:`ALGORITHMS`.
    sampler: the ``sampler`` section (``name`` + the factory's keyword arguments).
    perturbation: the ``perturbation`` section: the set the sampler runs over
      (:func:`dale_jax.perturbations.make_perturbation`; ``None`` or ``name="lp"``:
      the sampler's own ``(norm, eps)`` ball).
    loss: keyword hyperparameters of the algorithm's loss (e.g. ``beta``).
    dual: ``{step_size, margin, init_value, every}`` with ``every`` ``"step"``
      or ``"epoch"``. ``step_size`` is per training step either way: once per
      epoch, ``nu <- [nu + step_size * sum_t (c_t - margin)]_+`` over the epoch's
      steps, i.e. advbench's per-step ascent projected once per epoch.
    draws: perturbations drawn per example.
    steps_per_epoch: resolves ``dual.every = "epoch"``.
  """
  check_name(name)
  spec = ALGORITHMS[name]
  try:
    loss_fn = spec.loss(**dict(loss or {}))
  except TypeError as e:
    raise validation.InvalidArgument(
        "loss", rest=f"section does not fit algorithm {name!r}: {e}") from None
  pset = perturbations.make_perturbation(perturbation)
  sample = samplers.make_sampler(sampler or {}, pset) if spec.uses_sampler else None
  dual_tx = None
  if spec.uses_dual:
    dual = dict(dual or {})
    every = validation.one_of("dual.every", dual.pop("every", "step"), ("step", "epoch"))
    every = 1 if every == "step" else steps_per_epoch
    if validation.is_real(dual.get("step_size")):
      dual["step_size"] = dual["step_size"] * every  # the mean over the epoch, times its steps
    try:
      dual_tx = dual_lib.dual_ascent(every=every, **dual)
    except TypeError as e:
      raise validation.InvalidArgument(
          "dual", rest=f"section does not fit algorithm {name!r}: {e}") from None
  validation.integer("draws", draws, minimum=1)
  needs_clean = spec.needs_clean
  if callable(needs_clean):
    needs_clean = needs_clean(dict(loss or {}))
  return Algorithm(name, sample, draws if spec.uses_sampler else 0, needs_clean,
                   loss_fn, dual_tx)
