"""advbench's MNIST CNN, returning logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MnistCNN(nn.Module):
  """conv3x3(32) - ReLU - conv3x3(64) - ReLU - maxpool2 - dropout(0.25) - dense(128) - ReLU
  - dropout(0.5) - dense(num_classes).

  Same layers as advbench's MNIST model (which returns ``log_softmax``; this one
  returns logits, so ``log_softmax`` of the output equals advbench's output).
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv1")(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dropout(0.25, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128, name="fc1")(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc2")(x).astype(jnp.float32)
