"""Potentials: per-example scalar functions of logits that samplers ascend.

Every potential maps ``(logits, labels)`` (and, for KL, the clean logits) to an
array of shape ``(batch,)``. Samplers ascend the *sum* over the batch, so the
gradient with respect to each example depends on that example only and step
sizes do not depend on the batch size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``-log softmax(z)_y``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def log_one_minus_p(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``log(1 - softmax(z)_y)``, DALE's potential, computed stably.

  .. math::
    \\log(1 - p_y) = \\operatorname{logsumexp}_{j \\ne y} z_j - \\operatorname{logsumexp}_j z_j

  which stays finite (and has finite gradient) when ``p_y`` rounds to 1 in
  floating point, where the naive ``log(1 - p_y)`` is ``-inf``.
  """
  logits = logits.astype(jnp.float32)
  is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  others = jnp.where(is_label, -jnp.inf, logits)
  return jax.nn.logsumexp(others, axis=-1) - jax.nn.logsumexp(logits, axis=-1)


def kl_to_clean(logits: jax.Array, clean_logits: jax.Array) -> jax.Array:
  """``KL(softmax(z_clean) || softmax(z))`` (TRADES' divergence), per example."""
  log_p_clean = jax.nn.log_softmax(clean_logits.astype(jnp.float32))
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(log_p_clean) * (log_p_clean - log_p), axis=-1)


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (positive means misclassified)."""
  is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  z_y = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
  z_other = jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)
  return z_other - z_y


POTENTIALS = {
    "cross_entropy": cross_entropy,
    "log_one_minus_p": log_one_minus_p,
    "margin": margin,
    "kl_to_clean": kl_to_clean,
}
