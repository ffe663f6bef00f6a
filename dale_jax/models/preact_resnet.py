"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks",
2016), CIFAR variant as used by Wong et al. ("Fast is better than free", 2020) and
RobustBench.

Layout, for 32x32 inputs::

  conv3x3(64, stride 1)                                   (no BN/ReLU on the stem)
  4 stages of PreActBlocks, widths 64-128-256-512, strides 1-2-2-2, [2, 2, 2, 2] blocks
  BN - ReLU                                              (``final_norm``)
  global average pool - linear

A PreActBlock computes, with ``a = relu(bn1(x))``::

  conv2(relu(bn2(conv1(a)))) + shortcut

where the shortcut is a 1x1 strided conv of ``a`` (no BN) when the shape changes and
``x`` itself otherwise.

``final_norm=True`` (default) keeps the BN-ReLU after the last block that the
pre-activation design needs (the last block's sum is otherwise never normalised); this is
Wong et al.'s and RobustBench's ``PreActResNet18`` (11,172,170 parameters for 10
classes).  ``final_norm=False`` is kuangliu/pytorch-cifar's ``PreActResNet18``, which
pools the raw sum (11,171,146 parameters).

Conventions shared with :mod:`dale_jax.models.resnet`: bias-free convs padded like torch,
BatchNorm momentum 0.9 (torch 0.1) and epsilon 1e-5, torch's default initialisation,
``dtype`` as the compute dtype with float32 parameters and float32 logits, and
``axis_name`` for cross-device BatchNorm statistics (see that module's docstring).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dale_jax.models.resnet import ModuleDef, linear_head, make_conv, make_norm
from dale_jax.models.resnet import torch_kernel_init


class PreActBlock(nn.Module):
  """Pre-activation residual block: ``conv(relu(bn(conv(relu(bn(x)))))) + shortcut``."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a = nn.relu(self.norm(name="bn1")(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self.conv(self.features, 1, self.strides, name="shortcut_conv")(a)
    y = self.conv(self.features, 3, self.strides, name="conv1")(a)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.features, 3, 1, name="conv2")(y)
    return y + shortcut


class PreActResNet(nn.Module):
  """CIFAR pre-activation ResNet (see the module docstring for the layout).

  Attributes:
    num_classes: number of logits.
    stage_sizes: PreActBlocks per stage; ``(2, 2, 2, 2)`` is PreActResNet-18.
    width: channels of the stem and first stage; stage ``i`` has ``width * 2**i``.
    final_norm: BN-ReLU after the last block (Wong et al., RobustBench) or not
      (kuangliu/pytorch-cifar).
    dtype: compute dtype. Parameters are float32, logits float32.
    axis_name: mesh/vmap axis over which BatchNorm averages its batch statistics.
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  final_norm: bool = True
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = make_conv(self.dtype, torch_kernel_init)
    norm = make_norm(train, self.dtype, self.axis_name)
    x = conv(self.width, 3, 1, name="conv1")(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = PreActBlock(
            features=self.width * 2**i,
            strides=2 if i > 0 and j == 0 else 1,
            conv=conv,
            norm=norm,
            name=f"layer{i + 1}_{j}",
        )(x)
    if self.final_norm:
      x = nn.relu(norm(name="bn")(x))
    return linear_head(x, self.num_classes)


PreActResNet18 = functools.partial(PreActResNet, stage_sizes=(2, 2, 2, 2))
