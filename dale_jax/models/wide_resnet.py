"""Wide ResNet (Zagoruyko & Komodakis, 2016) as in the TRADES and MART code; WRN-34-10 by
default.

Layout, for 32x32 inputs, with ``n = (depth - 4) / 6`` blocks per group and
``k = widen_factor``::

  conv3x3(16)
  3 groups of n WideBlocks, widths 16k-32k-64k, strides 1-2-2
  BN - ReLU - global average pool (= torch's ``avg_pool2d(out, 8)``) - linear

A WideBlock is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut: the identity
of ``x`` when input and output widths agree, else a 1x1 strided conv (no BN) of
``relu(bn1(x))``, exactly TRADES' ``BasicBlock`` with ``equalInOut``.

TRADES' ``WideResNet`` also builds a ``sub_block1`` that its ``forward`` never calls;
it is left out here, so the parameter count is that of the network actually run
(46,160,474 for WRN-34-10 and 10 classes).

Initialisation follows TRADES: conv kernels ``N(0, 2 / (k * k * out_channels))``
(He, fan-out), BN scale 1 and bias 0, linear bias 0, linear kernel torch's default.
Other conventions as in :mod:`dale_jax.models.resnet`: bias-free convs padded like
torch, BatchNorm momentum 0.9 (torch 0.1) and epsilon 1e-5, ``dtype`` as the compute
dtype with float32 parameters and float32 logits, ``axis_name`` for cross-device
BatchNorm statistics.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dale_jax import validation
from dale_jax.models.resnet import ModuleDef, linear_head, make_conv, make_norm

# TRADES: conv weights N(0, 2 / n), n = kh * kw * out_channels (He init, fan-out).
trades_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class WideBlock(nn.Module):
  """TRADES' pre-activation wide block (see the module docstring)."""

  features: int
  strides: int
  dropout_rate: float
  conv: ModuleDef
  norm: ModuleDef
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a = nn.relu(self.norm(name="bn1")(x))
    if x.shape[-1] == self.features:
      shortcut = x
    else:
      shortcut = self.conv(self.features, 1, self.strides, name="shortcut_conv")(a)
    y = self.conv(self.features, 3, self.strides, name="conv1")(a)
    y = nn.relu(self.norm(name="bn2")(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not self.train)(y)
    y = self.conv(self.features, 3, 1, name="conv2")(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor`` (see the module docstring for the layout).

  Attributes:
    num_classes: number of logits.
    depth: total depth, ``6 n + 4``; 34 (TRADES, MART) or 28. 10 gives one block per
      group, the smallest net with the same code path, for quick tests.
    widen_factor: width multiplier k.
    dropout_rate: dropout between the two convs of each block (0 in TRADES/MART); when
      positive, training needs ``rngs={'dropout': key}``.
    dtype: compute dtype. Parameters are float32, logits float32.
    axis_name: mesh/vmap axis over which BatchNorm averages its batch statistics.
  """

  num_classes: int = 10
  depth: int = 34
  widen_factor: int = 10
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    validation.require(self.depth >= 10 and (self.depth - 4) % 6 == 0, "depth",
                       "6 n + 4 with n >= 1 (10, 16, 22, 28, 34, ...) for a WideResNet",
                       self.depth)
    blocks_per_group = (self.depth - 4) // 6
    conv = make_conv(self.dtype, trades_conv_init)
    norm = make_norm(train, self.dtype, self.axis_name)
    x = conv(16, 3, 1, name="conv1")(x)
    for i in range(3):
      for j in range(blocks_per_group):
        x = WideBlock(
            features=16 * 2**i * self.widen_factor,
            strides=2 if i > 0 and j == 0 else 1,
            dropout_rate=self.dropout_rate,
            conv=conv,
            norm=norm,
            train=train,
            name=f"block{i + 1}_{j}",
        )(x)
    x = nn.relu(norm(name="bn")(x))
    return linear_head(x, self.num_classes, bias_init=nn.initializers.zeros,
                       name="fc")
