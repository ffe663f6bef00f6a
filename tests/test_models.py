"""Models: parameter counts of the torch references, forward passes against float64
NumPy re-implementations of the torch layouts, BatchNorm modes, dtypes, axis_name."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from dale_jax.models import (MODELS, MnistCNN, PreActResNet18, ResNet, ResNet18, WideResNet,
                             get_model, init_variables)
from dale_jax.models.resnet import torch_bias_init, torch_kernel_init
from dale_jax.models.wide_resnet import trades_conv_init

CIFAR = (32, 32, 3)


def _num(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract(model, shape=CIFAR):
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))


def _random_variables(model, shape=CIFAR, seed=0):
  """Variables with the model's structure, drawn on the host.

  Avoids compiling the initialisers (seconds of threefry code on CPU) and gives
  BatchNorm non-trivial scales, biases and running statistics.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
    elif name in ("scale", "var"):
      value = np.exp(rng.normal(0.0, 0.2, leaf.shape))
    else:  # bias, mean
      value = rng.normal(0.0, 0.2, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, _abstract(model, shape))


def _images(n, shape=CIFAR, seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n,) + shape), jnp.float32)


# --- float64 NumPy references of the torch modules ----------------------------------


def _relu(x):
  return np.maximum(x, 0.0)


def _conv(x, kernel, stride=1):
  """torch Conv2d(bias=False, padding=k // 2) on NHWC with an HWIO kernel."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = (x.shape[1] + 2 * pad - k) // stride + 1
  wo = (x.shape[2] + 2 * pad - k) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
  for dy in range(k):
    for dx in range(k):
      patch = xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
      out += patch @ kernel[dy, dx]
  return out


class _Ref:
  """Walks a variables dict by torch-style layer names, in float64."""

  def __init__(self, variables, train):
    to64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
    self.params = to64(variables["params"])
    self.stats = to64(variables["batch_stats"])
    self.new_stats = jax.tree.map(lambda a: a, self.stats)
    self.train = train

  @staticmethod
  def _get(tree, path):
    for name in path:
      tree = tree[name]
    return tree

  def conv(self, x, *path, stride=1):
    return _conv(x, self._get(self.params, path)["kernel"], stride)

  def bn(self, x, *path):
    """torch BatchNorm2d(momentum=0.1, eps=1e-5); running var from the biased variance."""
    p, s = self._get(self.params, path), self._get(self.stats, path)
    if self.train:
      mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
      new = self._get(self.new_stats, path)
      new["mean"] = 0.9 * s["mean"] + 0.1 * mean
      new["var"] = 0.9 * s["var"] + 0.1 * var
    else:
      mean, var = s["mean"], s["var"]
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]

  def head(self, x, name):
    p = self.params[name]
    return x.mean(axis=(1, 2)) @ p["kernel"] + p["bias"]


def _resnet_ref(net, x, stage_sizes, width):
  x = _relu(net.bn(net.conv(x, "conv1"), "bn1"))
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      b, planes, stride = f"layer{i + 1}_{j}", width * 2**i, (2 if i > 0 and j == 0 else 1)
      y = _relu(net.bn(net.conv(x, b, "conv1", stride=stride), b, "bn1"))
      y = net.bn(net.conv(y, b, "conv2"), b, "bn2")
      if stride != 1 or x.shape[-1] != planes:
        x = net.bn(net.conv(x, b, "shortcut_conv", stride=stride), b, "shortcut_bn")
      x = _relu(y + x)
  return net.head(x, "linear")


def _preact_ref(net, x, stage_sizes, width, final_norm):
  x = net.conv(x, "conv1")
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      b, planes, stride = f"layer{i + 1}_{j}", width * 2**i, (2 if i > 0 and j == 0 else 1)
      a = _relu(net.bn(x, b, "bn1"))
      y = _relu(net.bn(net.conv(a, b, "conv1", stride=stride), b, "bn2"))
      y = net.conv(y, b, "conv2")
      if stride != 1 or x.shape[-1] != planes:
        x = net.conv(a, b, "shortcut_conv", stride=stride)
      x = y + x
  if final_norm:
    x = _relu(net.bn(x, "bn"))
  return net.head(x, "linear")


def _wrn_ref(net, x, depth, widen_factor):
  x = net.conv(x, "conv1")
  for i in range(3):
    for j in range((depth - 4) // 6):
      b, planes, stride = f"block{i + 1}_{j}", 16 * 2**i * widen_factor, (2 if i > 0 and j == 0 else 1)
      a = _relu(net.bn(x, b, "bn1"))
      y = _relu(net.bn(net.conv(a, b, "conv1", stride=stride), b, "bn2"))
      y = net.conv(y, b, "conv2")
      x = y + (x if x.shape[-1] == planes else net.conv(a, b, "shortcut_conv", stride=stride))
  return net.head(_relu(net.bn(x, "bn")), "fc")


# Small widths/depths that keep every code path: identity and 1x1-conv shortcuts, stride 2.
REFERENCE_CASES = {
    "resnet18": (ResNet18(num_classes=10, width=4),
                 functools.partial(_resnet_ref, stage_sizes=(2, 2, 2, 2), width=4)),
    "preact_resnet18": (PreActResNet18(num_classes=10, width=4),
                        functools.partial(_preact_ref, stage_sizes=(2, 2, 2, 2), width=4,
                                          final_norm=True)),
    # widen_factor 2 makes the first group's first block a stride-1 conv shortcut, as in
    # WRN-34-10 (16 -> 160 channels).
    "wrn10_2": (WideResNet(num_classes=10, depth=10, widen_factor=2),
                functools.partial(_wrn_ref, depth=10, widen_factor=2)),
}


# --- tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs,expected", [
    ("mnist_cnn", {}, 1_199_882),
    ("resnet18", {}, 11_173_962),
    ("preact_resnet18", {}, 11_172_170),                     # Wong et al., RobustBench
    ("preact_resnet18", {"final_norm": False}, 11_171_146),  # kuangliu/pytorch-cifar
    ("wrn34_10", {}, 46_160_474),
])
def test_parameter_counts_equal_torch_references(name, kwargs, expected):
  shape = (28, 28, 1) if name == "mnist_cnn" else CIFAR
  variables = _abstract(get_model(name, 10, **kwargs), shape)
  assert _num(variables["params"]) == expected
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def test_parameter_counts_scale_with_num_classes():
  # Only the last layer depends on num_classes: 512 weights + 1 bias per class.
  small = _num(_abstract(get_model("resnet18", 10))["params"])
  large = _num(_abstract(get_model("resnet18", 100))["params"])
  assert large - small == 90 * 513


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_forward_matches_numpy_reference(case):
  model, reference = REFERENCE_CASES[case]
  variables = _random_variables(model)
  x, x_other = _images(2), _images(2, seed=2)

  @jax.jit
  def forward(variables, x):
    train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    # Without `mutable`, Flax raises if evaluation tried to write batch statistics.
    return train_logits, updates["batch_stats"], model.apply(variables, x, train=False)

  train_logits, new_stats, eval_logits = forward(variables, x)
  for logits in (train_logits, eval_logits):
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32

  net = _Ref(variables, train=True)
  np.testing.assert_allclose(train_logits, reference(net, np.asarray(x, np.float64)),
                             rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               new_stats, net.new_stats)
  changed = jax.tree.map(lambda a, b: bool(np.all(a != b)), new_stats, variables["batch_stats"])
  assert all(jax.tree.leaves(changed))  # every running mean and var moved
  np.testing.assert_allclose(eval_logits,
                             reference(_Ref(variables, train=False), np.asarray(x, np.float64)),
                             rtol=1e-4, atol=1e-4)
  # Faint images: the first BatchNorm's batch variance is far below epsilon, so the
  # logits pin epsilon = 1e-5.
  faint = x * 1e-3
  np.testing.assert_allclose(forward(variables, faint)[0],
                             reference(_Ref(variables, train=True), np.asarray(faint, np.float64)),
                             rtol=1e-4, atol=1e-4)

  # Training uses batch statistics, so example 0's logits depend on example 1;
  # evaluation uses the running averages, so they do not, and repeat exactly.
  x_mixed = x.at[1].set(x_other[1])
  train_mixed, _, eval_mixed = forward(variables, x_mixed)
  assert not np.allclose(train_mixed[0], train_logits[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(eval_mixed[0], eval_logits[0])
  np.testing.assert_array_equal(forward(variables, x)[2], eval_logits)


def test_init_variables_and_mnist_cnn_apply():
  model = get_model("mnist_cnn", 10)
  variables = init_variables(model, jax.random.key(0), (28, 28, 1))
  assert set(variables) == {"params", "batch_stats"} and variables["batch_stats"] == {}
  assert _num(variables["params"]) == 1_199_882
  x = _images(2, (28, 28, 1))
  apply = jax.jit(model.apply, static_argnames="train")
  logits_a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  logits_b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert logits_a.shape == (2, 10) and logits_a.dtype == jnp.float32
  assert not np.allclose(logits_a, logits_b)  # dropout is on in training
  np.testing.assert_array_equal(apply(variables, x, train=False),
                                apply(variables, x, train=False))


def test_init_variables_input_shapes():
  model = WideResNet(num_classes=10, depth=10, widen_factor=1)
  variables = _abstract(model)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
  # A leading batch dimension is accepted and ignored.
  with_batch = _abstract(model, (16,) + CIFAR)
  assert jax.tree.map(jnp.shape, with_batch) == jax.tree.map(jnp.shape, variables)
  with pytest.raises(ValueError, match="input_shape"):
    init_variables(model, jax.random.key(0), (32, 32))


def test_jit_equals_no_jit():
  model = WideResNet(num_classes=10, depth=10, widen_factor=1)
  variables = _random_variables(model)
  apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  x = _images(2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               apply(variables, x), jax.jit(apply)(variables, x))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = ResNet(num_classes=10, stage_sizes=(1, 1), width=4, dtype=jnp.bfloat16)
  abstract = _abstract(model)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
  variables = _random_variables(model)
  x = _images(2)
  logits, updates = jax.jit(functools.partial(model.apply, train=True,
                                              mutable=["batch_stats"]))(variables, x)
  assert logits.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
  reference = _resnet_ref(_Ref(variables, train=True), np.asarray(x, np.float64),
                          stage_sizes=(1, 1), width=4)
  error = np.abs(np.asarray(logits, np.float64) - reference).max()
  # bfloat16 has an 8-bit mantissa: clearly not float32 arithmetic, yet close.
  assert 1e-4 * np.abs(reference).max() < error < 0.1 * np.abs(reference).max()


def _bf16(a):
  """``a`` rounded to bfloat16 (round to nearest even), as float64."""
  return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


def _conv3x3_np(x, kernel):
  """VALID 3x3 convolution, NHWC x HWIO, float64."""
  h, w = x.shape[1] - 2, x.shape[2] - 2
  return sum(np.einsum("bhwc,co->bhwo", x[:, i:i + h, j:j + w], kernel[i, j])
             for i in range(3) for j in range(3))


def _mnist_cnn_np(params, x, r):
  """advbench's MNIST CNN in float64; ``r`` rounds the operands of every layer."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in layer.items()} for k, layer in params.items()}
  h = r(_relu(_conv3x3_np(r(x), r(p["conv1"]["kernel"])) + p["conv1"]["bias"]))
  h = r(_relu(_conv3x3_np(h, r(p["conv2"]["kernel"])) + p["conv2"]["bias"]))
  b, hh, ww, c = h.shape
  h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4)).reshape(b, -1)
  h = r(_relu(h @ r(p["fc1"]["kernel"]) + p["fc1"]["bias"]))
  return h @ r(p["fc2"]["kernel"]) + p["fc2"]["bias"]


def test_mnist_cnn_bfloat16_rounds_operands_and_accumulates_in_float32():
  """bfloat16 MnistCNN = the float64 network whose layer inputs and kernels are rounded
  to bfloat16 (products summed exactly, bias added unrounded), up to float32 sums."""
  model = MnistCNN(dtype=jnp.bfloat16)
  x = _images(3, (28, 28, 1))
  variables = init_variables(model, jax.random.key(0), (28, 28, 1))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  logits = jax.jit(model.apply)(variables, x)
  assert logits.dtype == jnp.float32
  x64 = np.asarray(x, np.float64)
  rounded = _mnist_cnn_np(variables["params"], x64, _bf16)
  exact = _mnist_cnn_np(variables["params"], x64, lambda a: a)
  scale = np.abs(exact).max()
  # float32 accumulation can move an activation across a bfloat16 rounding boundary,
  # one 2^-8 step at a few places; the rounding itself moves the logits ~50x more.
  error = np.abs(np.asarray(logits, np.float64) - rounded).max()
  assert error < 2e-4 * scale
  assert np.abs(rounded - exact).max() > 20 * error


@pytest.mark.slow
def test_mixed_precision_gradients_are_bfloat16_products_of_the_rounded_cotangent():
  """The custom VJPs: ``da = r(g) r(b)^T``, ``db = r(a)^T r(g)`` and the conv's input
  gradient (transposed window sum) against float64, each rounded once to bfloat16."""
  from dale_jax.models.mnist_cnn import _mixed_conv, _mixed_matmul

  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 5, 48)), rng.normal(size=(48, 16))
  g = rng.normal(size=(4, 5, 16))
  bf = lambda v: jnp.asarray(v, jnp.bfloat16)
  out, vjp = jax.vjp(_mixed_matmul, bf(a), bf(b))
  da, db = vjp(jnp.asarray(g, jnp.float32))
  assert out.dtype == jnp.float32 and da.dtype == db.dtype == jnp.bfloat16
  np.testing.assert_allclose(out, _bf16(a) @ _bf16(b), rtol=1e-5, atol=1e-5)
  # One bfloat16 rounding of the float64 value: a relative error of at most 2^-9.
  tol = dict(rtol=2**-8, atol=1e-5)
  np.testing.assert_allclose(np.asarray(da, np.float64), _bf16(_bf16(g) @ _bf16(b).T), **tol)
  np.testing.assert_allclose(np.asarray(db, np.float64),
                             _bf16(_bf16(a).reshape(-1, 48).T @ _bf16(g).reshape(-1, 16)), **tol)

  x, kernel = rng.normal(size=(2, 8, 8, 3)), rng.normal(size=(3, 3, 3, 4))
  g = rng.normal(size=(2, 6, 6, 4))
  out, vjp = jax.vjp(lambda x, k: _mixed_conv(x, k, 3), bf(x), bf(kernel.reshape(27, 4)))
  dx, dk = vjp(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(out, _conv3x3_np(_bf16(x), _bf16(kernel)), rtol=1e-5, atol=1e-5)
  rg, rk = _bf16(g), _bf16(kernel)
  want_dx = np.zeros_like(x)
  for i in range(3):
    for j in range(3):
      want_dx[:, i:i + 6, j:j + 6] += np.einsum("bhwo,co->bhwc", rg, rk[i, j])
  want_dk = np.stack([np.einsum("bhwc,bhwo->co", _bf16(x)[:, i:i + 6, j:j + 6], rg)
                      for i in range(3) for j in range(3)]).reshape(27, 4)
  np.testing.assert_allclose(np.asarray(dx, np.float64), _bf16(want_dx), **tol)
  np.testing.assert_allclose(np.asarray(dk, np.float64), _bf16(want_dk), **tol)


@pytest.mark.slow
def test_mnist_cnn_bfloat16_gradients_follow_float32():
  """Parameter and input gradients of the bfloat16 model: float32 and near the float32
  model's. Rounding the cotangent at every layer moves them by 0.1% (fc2) to 10% (the
  input) in norm here, as much as torch's autocast does (``tests/test_bench.py``
  compares the two); a wrong custom VJP (a transposed kernel, a missing window) is
  off by O(1)."""
  x = _images(4, (28, 28, 1))
  y = jnp.arange(4) % 10
  variables = init_variables(MnistCNN(), jax.random.key(0), (28, 28, 1))

  def grads(dtype):
    def loss(params, x):
      logits = MnistCNN(dtype=dtype).apply({"params": params}, x)
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).sum()
    return jax.jit(jax.grad(loss, (0, 1)))(variables["params"], x)

  got, want = grads(jnp.bfloat16), grads(jnp.float32)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64).ravel(), np.asarray(w, np.float64).ravel()
    assert np.linalg.norm(g - w) < 0.2 * np.linalg.norm(w)


def test_axis_name_averages_batch_statistics_over_the_axis():
  """Two groups of 2 under vmap(axis_name='data') == one batch of 4 without the axis."""
  model = ResNet(num_classes=10, stage_sizes=(1, 1), width=4)
  model_ax = ResNet(num_classes=10, stage_sizes=(1, 1), width=4, axis_name="data")
  variables = _random_variables(model)
  x = _images(4)
  train = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  train_ax = functools.partial(model_ax.apply, train=True, mutable=["batch_stats"])
  logits, updates = jax.jit(train)(variables, x)
  logits_ax, updates_ax = jax.jit(
      jax.vmap(train_ax, in_axes=(None, 0), axis_name="data"))(variables, x.reshape((2, 2) + CIFAR))
  np.testing.assert_allclose(logits_ax.reshape(4, 10), logits, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6),
               updates_ax, updates)
  jax.tree.map(lambda a: np.testing.assert_array_equal(a[0], a[1]), updates_ax)

  # The documented use: inside shard_map over a "data" mesh of every local device.
  devices = jax.devices()
  n = len(devices)
  mesh = Mesh(np.array(devices), ("data",))
  sharded = jax.jit(jax.shard_map(train_ax, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=(P("data"), P())))
  x_n = _images(2 * n)
  logits_sm, updates_sm = sharded(variables, x_n)
  logits_1, updates_1 = jax.jit(train)(variables, x_n)
  np.testing.assert_allclose(logits_sm, logits_1, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               updates_sm, updates_1)


def test_initialisers_match_torch():
  key_a, key_b, key_c = jax.random.split(jax.random.key(0), 3)
  # torch Conv2d(64, 128, 3) default: U(-1/sqrt(576), 1/sqrt(576)).
  kernel = np.asarray(torch_kernel_init(key_a, (3, 3, 64, 128)), np.float64)
  bound = 1.0 / np.sqrt(3 * 3 * 64)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
  np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.02)
  bias = np.asarray(torch_bias_init(512)(key_b, (4096,)), np.float64)
  assert np.abs(bias).max() <= 1.0 / np.sqrt(512) and np.abs(bias).max() > 0.99 / np.sqrt(512)
  # TRADES: N(0, 2 / (3 * 3 * out_channels)).
  kernel = np.asarray(trades_conv_init(key_c, (3, 3, 16, 160)), np.float64)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (3 * 3 * 160)), rtol=0.02)
  assert abs(kernel.mean()) < 0.01 * kernel.std()


@pytest.mark.slow
@pytest.mark.parametrize("initializer", ["torch", "lecun"])
def test_mnist_cnn_initialisers_are_advbench_torch_defaults_or_flax_defaults(initializer):
  params = init_variables(MnistCNN(initializer=initializer), jax.random.key(3),
                          (28, 28, 1))["params"]
  fan_in = {"conv1": 9, "conv2": 9 * 32, "fc1": 9216, "fc2": 128}
  for name, n in fan_in.items():
    kernel = np.asarray(params[name]["kernel"], np.float64)
    bias = np.asarray(params[name]["bias"], np.float64)
    bound = 1.0 / np.sqrt(n)
    if initializer == "torch":  # nn.Conv2d / nn.Linear: U(+-1/sqrt(fan_in)) for both
      assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound, name
      np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.1, err_msg=name)
      assert np.abs(bias).max() > 0.5 * bound, name
    else:  # lecun_normal (truncated normal of variance 1 / fan_in), zero biases
      np.testing.assert_allclose(kernel.std(), bound, rtol=0.1, err_msg=name)
      assert not bias.any(), name


def test_registry_and_unknown_name():
  assert set(MODELS) == {"mnist_cnn", "resnet18", "preact_resnet18", "wrn28_10", "wrn34_10"}
  assert isinstance(get_model("mnist_cnn", 10), MnistCNN)
  wrn = get_model("wrn34_10", 100)
  assert (wrn.depth, wrn.widen_factor, wrn.dropout_rate, wrn.num_classes) == (34, 10, 0.0, 100)
  assert get_model("resnet18", 10, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError) as error:
    get_model("resnet50", 10)
  for name in ("resnet50", "mnist_cnn", "resnet18", "preact_resnet18", "wrn34_10"):
    assert name in str(error.value)


def test_wide_resnet_rejects_bad_depth():
  with pytest.raises(ValueError, match=r"depth must be 6 n \+ 4 .*got 12"):
    _abstract(WideResNet(num_classes=10, depth=12))
