"""The one state pytree of a training run."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import optax

from dale_jax import dual as dual_lib


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step reads and writes, and exactly what is checkpointed.

  Attributes:
    step: global step (the data position is derived from it: ``epoch = step //
      steps_per_epoch``, ``step_in_epoch = step % steps_per_epoch``).
    params: model parameters.
    batch_stats: BatchNorm running statistics (``{}`` for models without BN).
    opt_state: optimizer state of ``tx``.
    dual_state: :class:`dale_jax.dual.DualState` (``nu`` is a zero-size
      placeholder state for algorithms without a dual variable).
    key: raw PRNG key data; step ``k`` uses ``fold_in(key, k)``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  dual_state: dual_lib.DualState
  key: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def variables(self) -> dict:
    """Model variables for ``model.apply`` in eval mode."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}

  def step_key(self) -> jax.Array:
    """This step's key: ``fold_in(key, step)``, so resumes replay the same noise."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.key), self.step)
