"""Flax models: NHWC images in, float32 logits out.

Every model is called as ``model.apply(variables, x, train=bool)``; in training, models
with BatchNorm need ``mutable=['batch_stats']`` and models with dropout
``rngs={'dropout': key}``::

  model = get_model("resnet18", num_classes=10, dtype=jnp.bfloat16)
  variables = init_variables(model, key, (32, 32, 3))
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": dropout_key})
  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}

The BatchNorm models take ``dtype`` (compute dtype; parameters stay float32) and
``axis_name`` (average batch statistics over that named axis inside ``jax.shard_map``
or ``jax.vmap``; see :mod:`dale_jax.models.resnet`).

:func:`normalized` adds a per-channel input normalisation (:mod:`.normalized`), and
:mod:`dale_jax.models.torch_weights` converts weights to and from PyTorch ``state_dict``s
in the names of the robustness codebases.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dale_jax import validation
from dale_jax.models.mnist_cnn import MnistCNN
from dale_jax.models.normalized import NORMALIZATIONS, Normalized, normalized
from dale_jax.models.preact_resnet import PreActResNet, PreActResNet18
from dale_jax.models.resnet import ResNet, ResNet18
from dale_jax.models.wide_resnet import WideResNet

MODELS = {
    "mnist_cnn": MnistCNN,
    "resnet18": ResNet18,
    "preact_resnet18": PreActResNet18,
    "wrn28_10": functools.partial(WideResNet, depth=28),
    "wrn34_10": WideResNet,  # defaults: depth 34, widen_factor 10
}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the registered model ``name`` with ``num_classes`` logits.

  Args:
    name: a key of ``MODELS``.
    num_classes: number of logits.
    **kwargs: further fields of the model, e.g. ``dtype=jnp.bfloat16``,
      ``axis_name="data"``, or ``depth=28`` for a WideResNet.

  Returns:
    The (unbound) Flax module.

  Raises:
    ValueError: ``name`` is not registered; the message lists the valid names.
  """
  validation.one_of("model", name, MODELS)
  return MODELS[name](num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, key: jax.Array,
                   input_shape: Sequence[int]) -> dict[str, Any]:
  """Initial variables of ``model`` for inputs of shape ``input_shape``.

  Initialises (jitted) on a batch of one zero image in evaluation mode, so no batch statistics are
  computed and nothing reduces over ``axis_name``; wrap in ``jax.eval_shape`` to get
  only shapes and dtypes at no cost.

  Args:
    model: a Flax module called as ``model(x, train=bool)``.
    key: PRNG key for the parameter initialisers.
    input_shape: shape of one example ``(H, W, C)``; a leading batch dimension
      ``(N, H, W, C)`` is accepted and replaced by 1.

  Returns:
    ``{'params': ..., 'batch_stats': ...}``, ``batch_stats`` being ``{}`` for a model
    without BatchNorm.
  """
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 4:
    shape = shape[1:]
  if len(shape) != 3:
    raise validation.InvalidArgument(
        "input_shape", rest=f"must be (H, W, C) or (N, H, W, C), got {input_shape}")
  variables = _init(model, key, shape)
  return {"params": variables["params"],
          "batch_stats": variables.get("batch_stats", {})}


# One compiled program instead of one dispatch per initialiser (slow eagerly), and one
# per (model, shape): Flax modules hash by their fields, so equal models share it.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, key: jax.Array, shape: tuple[int, ...]) -> dict[str, Any]:
  return model.init({"params": key}, jnp.zeros((1,) + shape, jnp.float32), train=False)


__all__ = [
    "MODELS",
    "MnistCNN",
    "NORMALIZATIONS",
    "Normalized",
    "PreActResNet",
    "PreActResNet18",
    "ResNet",
    "ResNet18",
    "WideResNet",
    "get_model",
    "init_variables",
    "normalized",
]
