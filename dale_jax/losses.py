"""Training losses of the advbench algorithms, as pure functions of logits.

Per-example functions return shape ``(batch,)``; the reduced ones return a scalar
and say how they reduce. Logits are cast to float32 before any softmax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from dale_jax import potentials
from dale_jax import validation

Array = jax.Array


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Mean cross-entropy over the batch."""
  return jnp.mean(potentials.cross_entropy(logits, labels))


def trades_kl(clean_logits: Array, adv_logits: Array) -> Array:
  """TRADES' ``KL(softmax(f(x)) || softmax(f(x')))`` with ``batchmean`` reduction."""
  return jnp.mean(potentials.kl_to_clean(adv_logits, clean_logits))


def trades(clean_logits: Array, adv_logits: Array, labels: Array, beta: float, *,
           ce_on: str = "clean") -> Array:
  """TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(p(x) || p(x'))``.

  ``ce_on="clean"`` is the paper's objective (natural cross-entropy); advbench puts
  the *adversarial* logits in the CE term, ``ce_on="adv"``.
  """
  ce_logits = clean_logits if ce_on == "clean" else adv_logits
  return cross_entropy(ce_logits, labels) + beta * trades_kl(clean_logits, adv_logits)


def logit_pairing(clean_logits: Array, adv_logits: Array) -> Array:
  """``mean_i ||f(x'_i) - f(x_i)||_2`` (ALP and CLP's pairing term).

  The norm's gradient is taken as 0 where the two rows are equal (``optax.safe_norm``,
  the subgradient ``torch.norm`` returns): ``sqrt`` of a sum of squares has a NaN
  gradient there, and one such row would poison the whole update.
  """
  diff = adv_logits.astype(jnp.float32) - clean_logits.astype(jnp.float32)
  return jnp.mean(optax.safe_norm(diff, 0.0, axis=-1))


def mart(clean_logits: Array, adv_logits: Array, labels: Array, beta: float) -> Array:
  """MART (Wang et al. 2020), exactly as its reference code and advbench compute it.

  .. math::
    \\mathrm{BCE} = \\mathrm{CE}(f(x'), y) - \\log(1.0001 - p'_{\\hat y} + 10^{-12}),
    \\quad \\hat y = \\arg\\max_{j \\ne y} p'_j

    L = \\mathrm{BCE} + \\beta \\frac{1}{m} \\sum_i
        \\mathrm{KL}(p(x_i) \\| p'_i + 10^{-12}) (1.0000001 - p_{y_i}(x_i))
  """
  adv_probs = jax.nn.softmax(adv_logits.astype(jnp.float32))
  is_label = jax.nn.one_hot(labels, adv_probs.shape[-1], dtype=bool)
  top_wrong = jnp.argmax(jnp.where(is_label, -jnp.inf, adv_probs), axis=-1)
  p_wrong = jnp.take_along_axis(adv_probs, top_wrong[:, None], axis=-1)[:, 0]
  boosted_ce = cross_entropy(adv_logits, labels) - jnp.mean(jnp.log(1.0001 - p_wrong + 1e-12))
  clean_probs = jax.nn.softmax(clean_logits.astype(jnp.float32))
  log_clean = jax.nn.log_softmax(clean_logits.astype(jnp.float32))
  kl = jnp.sum(clean_probs * (log_clean - jnp.log(adv_probs + 1e-12)), axis=-1)
  p_true = jnp.sum(jnp.where(is_label, clean_probs, 0.0), axis=-1)
  return boosted_ce + beta * jnp.mean(kl * (1.0000001 - p_true))


def tilted(per_example_loss: Array, t: float) -> Array:
  """TERM's tilted loss ``(1/t) log(mean_i exp(t l_i) + 1e-6)``, in log space.

  ``log(mean exp(t l) + c) = logaddexp(logsumexp(t l) - log n, log c)`` is the
  same quantity without overflow for large ``t l``.
  """
  n = per_example_loss.shape[0]
  lse = jax.nn.logsumexp(t * per_example_loss) - math.log(n)
  return jnp.logaddexp(lse, math.log(1e-6)) / t


# ----------------------------------------------------------------------------
# CVaR.


def cvar(losses: Array, t: Array, beta: float) -> Array:
  """Rockafellar-Uryasev estimate of ``CVaR_beta`` averaged over the batch.

  .. math:: \\frac{1}{m} \\sum_i \\Big[t_i + \\frac{1}{\\beta M} \\sum_k (l_{ki} - t_i)_+\\Big]

  Args:
    losses: ``(M, batch)`` losses of ``M`` perturbations of each example.
    t: ``(batch,)`` thresholds.
    beta: tail probability in ``(0, 1]``.
  """
  return jnp.mean(t + jnp.mean(jax.nn.relu(losses - t), axis=0) / beta)


def cvar_t_subgradient(losses: Array, t: Array, beta: float) -> Array:
  """Per-example subgradient of the bracket in :func:`cvar` w.r.t. ``t_i``:
  ``1 - (1/beta) * mean_k 1[l_ki > t_i]``.

  advbench divides this by the batch size (it is the gradient of the batch
  *mean*), which makes its t-step depend on the batch size; each ``t_i`` solves
  its own one-dimensional problem, so the step here is per example.
  """
  return 1.0 - jnp.mean((losses > t).astype(losses.dtype), axis=0) / beta


def optimize_cvar_t(
    losses: Array, beta: float, step_size: float, steps: int, *, method: str = "subgradient",
    t_init: float = 1.0,
) -> Array:
  """Minimises the CVaR bracket over ``t`` by ``steps`` (sub)gradient steps from ``t_init``.

  ``method="subgradient"`` uses :func:`cvar_t_subgradient`; ``"autograd"``
  differentiates :func:`cvar` (times the batch size, so the two agree away from
  ties). The losses are treated as constants.
  """
  validation.one_of("method", method, ("subgradient", "autograd"))
  losses = jax.lax.stop_gradient(losses)
  m = losses.shape[1]
  if method == "subgradient":
    direction = lambda t: cvar_t_subgradient(losses, t, beta)
  else:
    direction = jax.grad(lambda t: m * cvar(losses, t, beta))
  t0 = jnp.full((m,), t_init, losses.dtype)
  return jax.lax.fori_loop(0, steps, lambda _, t: t - step_size * direction(t), t0)
