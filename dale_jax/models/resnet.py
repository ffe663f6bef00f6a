"""ResNet-18, CIFAR variant, as in advbench (kuangliu/pytorch-cifar layout).

Layout, for 32x32 inputs::

  conv3x3(64, stride 1) - BN - ReLU                       (no max-pool)
  4 stages of BasicBlocks, widths 64-128-256-512, strides 1-2-2-2, [2, 2, 2, 2] blocks
  global average pool (= torch's ``avg_pool2d(out, 4)`` on the 4x4 map) - linear

A BasicBlock computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` where the
shortcut is a 1x1 strided conv + BN when the shape changes and the identity otherwise.

Matching torch, so that weights port one to one and training behaves alike:

* convolutions have no bias and pad 1 on every side (Flax's ``"SAME"`` pads a stride-2
  3x3 conv asymmetrically, ``(0, 1)``, and would shift every feature map);
* BatchNorm ``momentum=0.9`` (Flax: ``new = 0.9 * old + 0.1 * batch``, i.e. torch's
  ``momentum=0.1``), ``epsilon=1e-5``, scale 1 and bias 0 at init.  One difference:
  torch updates ``running_var`` with the unbiased batch variance, Flax with the biased
  one (a factor ``n / (n - 1)``, n = batch x height x width; at most 1.0005 for a
  CIFAR batch of 128, on the last 4x4 maps);
* initialisation is torch's default: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for
  conv and linear kernels and for the linear bias.

Mixed precision: ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16`` on GPU/TPU);
parameters and batch statistics stay float32 and BatchNorm reduces in float32.  The
final linear layer runs in float32 so the logits are float32 whatever ``dtype`` is.

Data parallelism: with ``axis_name="data"`` the BatchNorm batch statistics are averaged
over that named axis (``lax.pmean``), so a model applied inside
``jax.shard_map(..., mesh=Mesh(devices, ("data",)))`` (or ``jax.vmap(...,
axis_name="data")``) normalises with the statistics of the global batch, exactly as one
device holding the whole batch would.  Leave it ``None`` under plain ``jax.jit`` with a
sharded batch: there XLA already computes global statistics.  Initialisation and
``train=False`` never reduce over the axis, so they work outside ``shard_map`` too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any

# torch's default init for Conv2d/Linear weights: kaiming_uniform(a=sqrt(5)), which is
# U(-b, b) with b = 1/sqrt(fan_in), i.e. variance 1 / (3 fan_in).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """torch's default Linear/Conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def make_conv(dtype: Any, kernel_init: Callable[..., jax.Array]) -> ModuleDef:
  """A bias-free ``nn.Conv`` with torch's symmetric padding ``k // 2``.

  Returns a constructor ``conv(features, kernel_size, strides=1, name=...)``.
  """

  def conv(features: int, kernel_size: int, strides: int = 1, **kwargs) -> nn.Conv:
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=kernel_init,
        **kwargs,
    )

  return conv


def make_norm(train: bool, dtype: Any, axis_name: str | None) -> ModuleDef:
  """``nn.BatchNorm`` with torch's defaults (momentum 0.1 in torch terms, eps 1e-5).

  Batch statistics in training, running averages in evaluation; statistics are
  averaged over ``axis_name`` when it is given (see the module docstring).
  """
  return functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      axis_name=axis_name,
  )


def linear_head(x: jax.Array, num_classes: int, kernel_init=torch_kernel_init,
                bias_init=None, name: str = "linear") -> jax.Array:
  """Global average pool over H, W, then a float32 linear layer -> float32 logits."""
  x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  if bias_init is None:
    bias_init = torch_bias_init(x.shape[-1])
  return nn.Dense(num_classes, dtype=jnp.float32, kernel_init=kernel_init,
                  bias_init=bias_init, name=name)(x)


class BasicBlock(nn.Module):
  """Post-activation residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut)``."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, 3, self.strides, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, 3, 1, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self.conv(self.features, 1, self.strides, name="shortcut_conv")(x)
      shortcut = self.norm(name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """CIFAR ResNet with BasicBlocks (see the module docstring for the layout).

  Attributes:
    num_classes: number of logits.
    stage_sizes: BasicBlocks per stage; ``(2, 2, 2, 2)`` is ResNet-18.
    width: channels of the stem and first stage; stage ``i`` has ``width * 2**i``.
      64 is ResNet-18; smaller values keep the code path for quick tests.
    dtype: compute dtype. Parameters are float32, logits float32.
    axis_name: mesh/vmap axis over which BatchNorm averages its batch statistics.
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = make_conv(self.dtype, torch_kernel_init)
    norm = make_norm(train, self.dtype, self.axis_name)
    x = conv(self.width, 3, 1, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = BasicBlock(
            features=self.width * 2**i,
            strides=2 if i > 0 and j == 0 else 1,
            conv=conv,
            norm=norm,
            name=f"layer{i + 1}_{j}",
        )(x)
    return linear_head(x, self.num_classes)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet18.__doc__ = "ResNet-18, CIFAR variant (advbench's CIFAR-10/SVHN model)."
