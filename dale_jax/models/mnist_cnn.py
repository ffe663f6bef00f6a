"""advbench's MNIST CNN, returning logits.

The layers are those of advbench's network (and of ``flax.linen.Conv`` /
``max_pool``), but two of them are written for XLA:CPU, where this model trains
most often. With ``nn.Conv`` and ``nn.max_pool`` a Gaussian-DALE step (7 sampler
steps of forward + input gradient, then the training update) is led by the input
gradient of ``conv2`` (a generic convolution kernel), the forward ``conv2`` (whose
kernel allocates a fresh patch buffer on every call), the kernel gradients and the
max-pool gradient (``select_and_scatter``); docs/performance.md has the figures.

* **Convolutions as im2col matmuls.** ``y = patches(x) @ K.reshape(9 C_in, C_out)``
  with ``patches`` the 3x3 windows stacked on the channel axis (row-major window
  order, matching the ``HWIO`` kernel). The forward pass, the input gradient
  (``g @ K^T`` then a sum of nine shifted slices) and the kernel gradient
  (``patches^T @ g``) are then dense matmuls, XLA:CPU's fastest kernels, and the
  patch buffer lives in the step's preallocated temporaries.
* **2x2 max-pool as a maximum of four strided slices** with a custom gradient.
  XLA's ``reduce_window`` gradient is ``select_and_scatter``, which XLA:CPU runs
  as index arithmetic plus a scatter. Here the gradient is elementwise: it goes,
  as in ``select_and_scatter`` and in torch's ``max_pool2d``, to the *first*
  maximal element of each window in row-major order. (A plain ``jnp.max`` or
  ``jnp.maximum`` would split it between tied elements, and ties are common: on
  MNIST's blank background whole windows hold the same value, so the input
  gradient would differ from torch's there.)

The parameters are ``flax.linen.Conv``/``Dense``'s (``conv1``, ``conv2``, ``fc1``,
``fc2``; ``kernel`` ``HWIO`` and ``bias``; initialised as advbench's network, by
PyTorch's defaults, or with ``initializer="lecun"`` by Flax's), the flatten before ``fc1`` is in ``(h, w, c)`` order as before,
and the outputs equal the ``lax.conv`` / ``reduce_window`` formulation up to float
rounding (``tests/test_bench.py`` checks both, gradients included).

**Mixed precision.** With ``dtype=jnp.bfloat16`` the parameters stay float32; the
convolutions and dense layers round their input and kernel to bfloat16, multiply
them with float32 accumulation and add the bias in float32 (:func:`_mixed_conv`,
:func:`_mixed_matmul`, whose gradients are bfloat16 products accumulated in float32
too); the activations between layers are stored in bfloat16 and the logits are
float32, so softmax and the losses are computed in float32. bfloat16 has float32's
exponent range: no loss scaling is needed.
"""

from __future__ import annotations

import functools

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dale_jax import validation
from dale_jax.models.resnet import torch_bias_init, torch_kernel_init


def _patches(x: jax.Array, size: int) -> jax.Array:
  """``(b, h, w, c) -> (b, h - size + 1, w - size + 1, size * size * c)``, VALID windows.

  The shifted windows are stacked on new axes in front of the channels, a row of
  ``size`` windows at a time and then the ``size`` rows, before a free reshape.
  XLA:CPU fuses a concatenate with its operands only along a non-minor axis and
  with at most 8 operands; one concatenate of the nine windows on the channel
  axis is run instead as nine slice kernels, each writing its window to a buffer
  of its own, then a copy of all of them. Stacked this way the patches are a
  single loop fusion that also computes the producer (bias + ReLU) in place: the
  Gaussian-DALE step at batch 64 went from 0.78x to 0.88x of PyTorch eager's
  speed (same runs, 2-core Xeon).
  """
  b, h, w, c = x.shape
  ho, wo = h - size + 1, w - size + 1
  rows = [jnp.stack([x[:, i:i + ho, j:j + wo, :] for j in range(size)], axis=3)
          for i in range(size)]
  return jnp.stack(rows, axis=3).reshape(b, ho, wo, size * size * c)


@jax.custom_vjp
def _mixed_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` of low-precision operands (e.g. bfloat16), accumulated and returned in float32.

  ``a``'s last axis is contracted with the 2-D ``b``. The gradients are computed the
  same way: the float32 cotangent is rounded to the operands' dtype, the products
  accumulate in float32, and each gradient is returned in its operand's dtype.
  (Autodiff of ``jnp.matmul(..., preferred_element_type=float32)`` would multiply
  the float32 cotangent with the bfloat16 operand in float32.) XLA:CPU runs a
  bfloat16 matmul with a float32 result on its bfloat16 units, about twice its
  float32 rate, but one with a bfloat16 result as a slower float32 emulation.
  """
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(a, b):
  return _mixed_matmul(a, b), (a, b)


def _mixed_matmul_bwd(residuals, g):
  a, b = residuals
  g = g.astype(a.dtype)
  k, n = b.shape
  da = jnp.matmul(g, b.T, preferred_element_type=jnp.float32)
  db = jnp.matmul(a.reshape(-1, k).T, g.reshape(-1, n), preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_conv(x: jax.Array, kernel: jax.Array, size: int) -> jax.Array:
  """``patches(x) @ kernel`` of low-precision ``x`` and 2-D ``kernel``; float32 result.

  As :func:`_mixed_matmul`, except that the input gradient sums the patches'
  gradient over the windows in float32 and rounds once at the end. XLA:CPU has no
  bfloat16 arithmetic for that sum: it computes every slice, pad and add of a
  bfloat16 array in float32 between two conversions, so a bfloat16 sum costs
  more than a float32 one (docs/performance.md).
  """
  return jnp.matmul(_patches(x, size), kernel, preferred_element_type=jnp.float32)


def _mixed_conv_fwd(x, kernel, size):
  patches = _patches(x, size)
  return jnp.matmul(patches, kernel, preferred_element_type=jnp.float32), (x, patches, kernel)


def _mixed_conv_bwd(size, residuals, g):
  x, patches, kernel = residuals
  g = g.astype(x.dtype)
  d_patches = jnp.matmul(g, kernel.T, preferred_element_type=jnp.float32)
  _, patches_vjp = jax.vjp(lambda z: _patches(z, size), jnp.zeros(x.shape, jnp.float32))
  dx = patches_vjp(d_patches)[0]
  dk = jnp.matmul(patches.reshape(-1, patches.shape[-1]).T, g.reshape(-1, kernel.shape[1]),
                  preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_mixed_conv.defvjp(_mixed_conv_fwd, _mixed_conv_bwd)


INITS = ("torch", "lecun")


def _initializers(init: str, fan_in: int):
  """``(kernel_init, bias_init)``: torch's defaults for ``Conv2d``/``Linear`` (advbench's
  network: kaiming-uniform with ``a = sqrt(5)``, i.e. ``U(+-1/sqrt(fan_in))``, and
  ``U(+-1/sqrt(fan_in))`` biases) or Flax's (lecun-normal kernels, zero biases)."""
  if init == "torch":
    return torch_kernel_init, torch_bias_init(fan_in)
  return nn.initializers.lecun_normal(), nn.initializers.zeros_init()


class _Conv(nn.Module):
  """``nn.Conv(features, (size, size), padding="VALID")`` computed as one matmul.

  With a ``dtype`` other than float32 the input and the kernel are rounded to
  ``dtype`` and multiplied with float32 accumulation (:func:`_mixed_conv`); the
  bias is added to the float32 result, which is returned.
  """

  features: int
  size: int = 3
  dtype: Any = jnp.float32
  initializer: str = "torch"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.size, self.size, x.shape[-1], self.features)
    kernel_init, bias_init = _initializers(self.initializer, self.size * self.size * x.shape[-1])
    kernel = self.param("kernel", kernel_init, shape)
    bias = self.param("bias", bias_init, (self.features,))
    kernel = kernel.reshape(-1, self.features)
    if jnp.dtype(self.dtype) == jnp.float32:
      return _patches(x, self.size) @ kernel + bias
    return _mixed_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.size) + bias


class _Dense(nn.Module):
  """``nn.Dense(features)`` (same parameters), mixed as :class:`_Conv` in ``dtype``."""

  features: int
  dtype: Any = jnp.float32
  initializer: str = "torch"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_init, bias_init = _initializers(self.initializer, x.shape[-1])
    kernel = self.param("kernel", kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", bias_init, (self.features,))
    if jnp.dtype(self.dtype) == jnp.float32:
      return x @ kernel + bias
    return _mixed_matmul(x.astype(self.dtype), kernel.astype(self.dtype)) + bias


def _window_slices(x: jax.Array) -> tuple[jax.Array, ...]:
  """The four elements of every 2x2 window, in row-major window order."""
  return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """``nn.max_pool(x, (2, 2), strides=(2, 2))`` for NHWC ``x`` with even H and W.

  The gradient goes to the first maximal element of each window (row-major), as
  in ``select_and_scatter`` and torch's ``max_pool2d``.
  """
  a, b, c, d = _window_slices(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_fwd(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_bwd(residuals, g):
  x, y = residuals
  taken = jnp.zeros(y.shape, bool)
  grads = []
  for v in _window_slices(x):
    first = (v == y) & ~taken
    taken = taken | first
    grads.append(jnp.where(first, g, 0.0).astype(g.dtype))
  ga, gb, gc, gd = grads
  top = jnp.stack([ga, gb], axis=3)     # (b, h/2, w/2, 2, c)
  bottom = jnp.stack([gc, gd], axis=3)
  return (jnp.stack([top, bottom], axis=2).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class MnistCNN(nn.Module):
  """conv3x3(32) - ReLU - conv3x3(64) - ReLU - maxpool2 - dropout(0.25) - dense(128) - ReLU
  - dropout(0.5) - dense(num_classes).

  Same layers as advbench's MNIST model (which returns ``log_softmax``; this one
  returns logits, so ``log_softmax`` of the output equals advbench's output).

  Attributes:
    num_classes: number of logits.
    dropout_rates: rates of the two dropout layers (advbench: 0.25 and 0.5);
      zeros make the training forward deterministic.
    dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``). Parameters and
      logits are float32 either way.
    initializer: ``"torch"`` (advbench's: PyTorch's default initialisers) or ``"lecun"``
      (Flax's ``nn.Conv``/``nn.Dense`` defaults).
  """

  num_classes: int = 10
  dropout_rates: Sequence[float] = (0.25, 0.5)
  dtype: Any = jnp.float32
  initializer: str = "torch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    # Activations are stored in ``dtype``; every layer returns float32 (the logits too).
    validation.one_of("initializer", self.initializer, INITS)
    layer = dict(dtype=self.dtype, initializer=self.initializer)
    x = nn.relu(_Conv(32, **layer, name="conv1")(x)).astype(self.dtype)
    x = nn.relu(_Conv(64, **layer, name="conv2")(x)).astype(self.dtype)
    x = max_pool_2x2(x)
    x = nn.Dropout(self.dropout_rates[0], deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(_Dense(128, **layer, name="fc1")(x)).astype(self.dtype)
    x = nn.Dropout(self.dropout_rates[1], deterministic=not train)(x)
    return _Dense(self.num_classes, **layer, name="fc2")(x)
