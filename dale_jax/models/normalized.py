"""Per-channel input normalisation inside the model, as RobustBench's models do it.

Models trained in PyTorch usually see ``(x - mean) / std`` of the ``[0, 1]`` image, the
normalisation done by the data pipeline. Put inside the model, it lets every attack keep
working in ``[0, 1]`` pixel space, where the threat model is defined::

  model = Normalized(get_model("wrn34_10", 10), *NORMALIZATIONS["cifar10"])
  logits = model.apply(variables, x, train=False)   # x: NHWC in [0, 1]

:class:`Normalized` shares its scope with the wrapped model, so its variables are the
wrapped model's, unchanged (``{"params", "batch_stats"}`` with the same paths): the
same weights serve the model with and without normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dale_jax import validation

# name -> (mean, std) per channel, or None for no normalisation. CIFAR-10's are the
# statistics of its training images, as Wong et al. and RobustBench's models use them.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}


class Normalized(nn.Module):
  """``model((x - mean) / std, train=train)`` with per-channel ``mean`` and ``std``.

  Computed in float32 as torch computes ``(x - mean) / std`` (a subtraction, then a
  division), so that a converted model sees the same inputs as its PyTorch original.

  Attributes:
    model: the wrapped Flax module, called as ``model(x, train=bool)``.
    mean: one value per input channel (the last axis of the NHWC input).
    std: one positive value per input channel.
  """

  model: nn.Module
  mean: Sequence[float]
  std: Sequence[float]

  def setup(self):
    # The wrapped model's variables live at the top level, not under "model".
    nn.share_scope(self, self.model)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if not len(self.mean) == len(self.std) == x.shape[-1]:
      raise validation.InvalidArgument(
          "Normalized: mean and std", rest=f"need one value per input channel "
          f"({x.shape[-1]}), got mean={tuple(self.mean)} and std={tuple(self.std)}")
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return self.model((x.astype(jnp.float32) - mean) / std, train=train)


def normalized(model: nn.Module, name: str) -> nn.Module:
  """``model`` with the input normalisation ``name`` (a key of :data:`NORMALIZATIONS`).

  Args:
    model: a Flax module called as ``model(x, train=bool)``.
    name: ``"none"`` returns ``model`` itself; another key wraps it in :class:`Normalized`.

  Returns:
    The module to apply to ``[0, 1]`` images.

  Raises:
    validation.InvalidArgument: (a ``ValueError``) ``name`` is not a key of
      :data:`NORMALIZATIONS`; the message lists them.
  """
  validation.one_of("normalize", name, tuple(NORMALIZATIONS))
  stats = NORMALIZATIONS[name]
  return model if stats is None else Normalized(model, *stats)
