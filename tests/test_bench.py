"""The benchmark's building blocks: the CPU-friendly MNIST CNN equals the plain Flax one,
FLOPs are counted through loops, the PyTorch reference computes the JAX step, and
``dale-bench`` runs and prints one JSON object per framework."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import require

from dale_jax import host_memory
from dale_jax import experiment
from dale_jax import steps as steps_lib
from dale_jax.bench import flops
from dale_jax.bench import profile
from dale_jax.bench import runner
from dale_jax.models import init_variables
from dale_jax.models.mnist_cnn import MnistCNN, max_pool_2x2


class _PlainMnistCNN(nn.Module):
  """The textbook formulation: ``nn.Conv`` and ``nn.max_pool`` (reduce_window)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv1")(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128, name="fc1")(x))
    return nn.Dense(10, name="fc2")(x)


def _digits_like(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Images with a blank border, like MNIST: max-pool windows there are exact ties."""
  rng = np.random.default_rng(seed)
  x = np.zeros((batch, 28, 28, 1), np.float32)
  x[:, 6:22, 8:20] = rng.random((batch, 16, 12, 1), dtype=np.float32)
  return x, rng.integers(0, 10, batch).astype(np.int32)


@pytest.mark.slow
def test_mnist_cnn_equals_conv_and_reduce_window_formulation():
  x, y = _digits_like(4)
  key = jax.random.PRNGKey(0)
  plain, fast = _PlainMnistCNN(), MnistCNN(initializer="lecun")  # Flax's initialisers, as nn.Conv
  variables = plain.init(key, x)
  # Same parameter tree and initial values from the same key.
  jax.tree.map(np.testing.assert_array_equal, variables, fast.init(key, x))
  np.testing.assert_allclose(jax.jit(fast.apply)(variables, x), jax.jit(plain.apply)(variables, x),
                             atol=2e-6)

  def loss(model, params, x):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

  for argnum in (1, 2):  # Parameter and input gradients.
    grad = jax.jit(jax.grad(loss, argnum), static_argnums=0)
    want = grad(plain, variables["params"], x)
    got = grad(fast, variables["params"], x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got, want)


def test_max_pool_gradient_goes_to_the_first_maximum_like_reduce_window():
  x = jnp.asarray(np.random.default_rng(1).integers(0, 3, (2, 6, 8, 3)), jnp.float32)  # Many ties.
  g = jnp.asarray(np.random.default_rng(2).random((2, 3, 4, 3)), jnp.float32)
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
  np.testing.assert_array_equal(jax.vjp(max_pool_2x2, x)[1](g)[0], jax.vjp(reference, x)[1](g)[0])


def test_count_flops_multiplies_loop_bodies_by_their_trip_count():
  w = jnp.ones((8, 8))
  f = lambda x: jax.lax.fori_loop(0, 5, lambda i, x: x @ w, x)
  assert flops.count_flops(f, jnp.ones((4, 8))) == 5 * 2 * 4 * 8 * 8
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # Output 1x3x3x5, each a dot over 3x3 window x 2 input features.
  assert flops.count_flops(conv, jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 5))) == 2 * 45 * 18


@pytest.mark.slow
def test_step_flops_count_every_sampler_step():
  options = runner.Options(algorithm="Gaussian_DALE_PD", batch_size=8)
  config = runner.make_config(options)
  exp = experiment.build(config, num_classes=10)
  step = steps_lib.make_train_step(exp)
  state = experiment.init_state(exp, jax.random.PRNGKey(0), (28, 28, 1))
  batch = {"image": jnp.zeros((8, 28, 28, 1)), "label": jnp.zeros((8,), jnp.int32)}
  total = flops.count_flops(step, state, batch)
  fwd = flops.count_flops(lambda x: MnistCNN().apply({"params": state.params}, x), batch["image"])
  # 7 sampler steps of forward + input gradient, then two training forwards and their
  # backward passes: between 7 * 2 + 2 * 2 = 18 and 7 * 2 + 2 * 3 = 20 forwards.
  assert 18 * fwd < total < 20 * fwd


# ----------------------------------------------------------------------------
# The PyTorch reference against the JAX step.


def _assert_trees_close(got, want, rtol, atol):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w),
                                                       rtol=rtol, atol=atol), got, want)


def _parity_images(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Images uniform in ``[0.3, 0.7]``: the MNIST eps-ball (0.3) never reaches the box.

  The digits-like blank border makes the two float32 implementations disagree on
  where a max-pool window's gradient goes: the jittered start clips half the border
  pixels to 0, so 2x2 pool windows there hold conv outputs computed from nearly
  equal patches. In Gaussian_DALE_PD's first sampler step on ``_digits_like(8)``,
  example 1's window at pooled (5, 11), channel 2, holds 0.06423743 and 0.06423749
  (float64, torch and JAX alike); XLA's float32 convolution rounds both to
  0.06423746, so its gradient goes to the first, torch's to the second. The input
  gradient nearby then differs by 2%, pixel (13, 24) of example 1 gets +4.9e-6 from
  JAX and -1.5e-6 from torch (float64: -1.5e-6), its sign step goes the other way,
  and by the seventh step 438 of that example's pixels differ by up to 0.6. No
  value is clipped or flat here, so no window holds a float32 near-tie.
  """
  rng = np.random.default_rng(seed)
  x = 0.3 + 0.4 * rng.random((batch, 28, 28, 1), dtype=np.float32)
  return x.astype(np.float32), rng.integers(0, 10, batch).astype(np.int32)


def _parity_config(algorithm: str, batch_size: int):
  """advbench's MNIST hyperparameters, noise on, changed where a comparison would
  otherwise decide nothing or be decided by float32 rounding (both sides run it)."""
  config = runner.make_config(runner.Options(algorithm=algorithm, batch_size=batch_size))
  if config.sampler.get("name") == "trades_kl":
    # KL(p(x) || p(x')) is flat at x' = x: its input gradient pulls back p(x') - p(x),
    # a difference of nearly equal probabilities, and from advbench's 0.001 jitter
    # float32 rounding decides many of its signs. From 0.05, 3 of 12 seeds of weights
    # and images still part JAX and torch; from 0.15, 2 of 30, as for the other sign
    # samplers (see _SEED).
    config.sampler.init_std = 0.15
  if config.algorithm.startswith("CVaR"):
    # The draws' CE lie in [2.26, 2.36]: advbench's t-steps of 1 from t = 1 end above
    # them or below, every indicator 1[l > t] the same and t without effect on the
    # update. Five steps of 0.265 end at 2.325, among them (none within 1e-4).
    config.loss.t_step_size = 0.265
  if config.sampler.get("name") == "metropolis_hastings":
    # At the fork's T = 1 a proposal moves the batch-mean CE by ~1e-4 of itself and
    # every one is accepted; at T = 1e-4 six of the thirty are rejected, none within
    # 0.03 of the threshold.
    config.sampler.temperature = 1e-4
  return config


def _nhwc_shape(shape) -> tuple:
  shape = tuple(shape)
  return shape[:-3] + shape[-2:] + shape[-3:-2] if len(shape) >= 4 else shape


def _jax_noise(state, config):
  """The torch reference's ``noise(kind, shape, *, draw, step)`` replaying the draws
  that :func:`dale_jax.steps.train_step` makes from ``state``'s key, in NCHW.

  The keys are derived as in ``train_step`` (the attack key; one per draw when
  ``draws > 1``), :func:`samplers.ascent` (``init_key, loop_key``; step ``i``'s
  ``grad_key, update_key`` from ``fold_in(loop_key, i)``), ``worst_of_k`` (candidate
  ``j`` from ``fold_in(key, j)``) and ``metropolis_hastings`` (``start_key,
  chain_key``; step ``i``'s ``prop_key, accept_key``, one proposal key per leaf).
  """
  import torch

  attack_key = jax.random.split(state.step_key(), 4)[1]
  draw_keys = jax.random.split(attack_key, config.draws) if config.draws > 1 else [attack_key]

  def noise(kind, shape, *, draw=0, step=0):
    key = draw_keys[draw]
    if config.sampler.name == "worst_of_k":
      key = jax.random.fold_in(key, step)
    first, loop_key = jax.random.split(key)
    grad_key, update_key = jax.random.split(jax.random.fold_in(loop_key, step))
    s = _nhwc_shape(shape)
    a = {"start": lambda: jax.random.normal(first, s),
         "gaussian": lambda: jax.random.normal(update_key, s),
         "laplace": lambda: jax.random.laplace(update_key, s),
         "smoothing": lambda: jax.random.normal(grad_key, s),
         "uniform": lambda: jax.random.uniform(key, s),
         "chain_start": lambda: jax.random.uniform(first, s),
         "proposal": lambda: jax.random.laplace(jax.random.split(grad_key, 1)[0], s),
         "accept": lambda: jax.random.uniform(update_key, s)}[kind]()
    a = np.asarray(a, np.float32)
    return torch.from_numpy(np.array(np.moveaxis(a, -1, -3) if len(s) >= 4 else a, order="C"))

  return noise


def _recording(algorithm, seen: dict):
  """``algorithm`` whose sampler also hands each output to the host, keyed by its key
  (the step stays one program; with ``draws > 1`` the sampler runs inside a map)."""
  def sampler(key, logits_fn, x, y):
    x_adv = algorithm.sampler(key, logits_fn, x, y)
    jax.debug.callback(lambda k, a: seen.__setitem__(np.asarray(k).tobytes(), np.asarray(a)),
                       jax.random.key_data(key), x_adv)
    return x_adv

  return algorithm._replace(sampler=sampler)


# The weights' and the images' seed. A sign step whose argument is within float32
# rounding of zero can go either way, and the example's trajectory then parts (over 30
# seeds, PGD's sampler parted JAX from torch in 1, Gaussian DALE's in 3). Run in
# float64 with these draws, every sign argument of every sampler here clears zero by
# 1.9e-6 of the largest one of its step and example; seed 1 came within 2.7e-9 in PGD.
_SEED = 3

# Less LLVM optimisation: compiling the step is most of each comparison's time (3 s,
# 1.4 s with this), running it a fraction of a second either way.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


class _Steps(NamedTuple):
  variables: dict  # the initial weights of both sides
  states: list  # the JAX states, before and after each step
  torch_step: Any
  torch_model: Any
  torch_nu: list  # the torch side's dual variable after each step (None without one)
  jax_adv: list  # per step: the JAX sampler's output, (draws, batch, H, W, C)
  torch_adv: list  # the same from torch


def _both_steps(algorithm: str, precision: str = "float32", images=None, steps: int = 1,
                steps_per_epoch: int = 1, initializer: str = "torch",
                seed: int = _SEED) -> _Steps:
  """``steps`` steps of dale_jax and of the torch reference from the same weights on
  the same batch, torch fed the draws JAX makes (:func:`_jax_noise`); in bfloat16 the
  torch model runs under ``torch.autocast``. Dropout is off: its masks cannot be shared.
  """
  import torch
  from dale_jax.bench import torch_reference as tr

  torch.manual_seed(0)
  config = _parity_config(algorithm, batch_size=8)
  model = MnistCNN(dropout_rates=(0.0, 0.0), dtype=getattr(jnp, precision),
                   initializer=initializer)
  variables = init_variables(model, jax.random.PRNGKey(seed), (28, 28, 1))
  exp = experiment.build(config, num_classes=10, steps_per_epoch=steps_per_epoch)
  state = experiment.init_state(exp, jax.random.PRNGKey(0), (28, 28, 1))
  state = state.replace(params=variables["params"])
  seen = {}
  algo = steps_lib.chunked(exp.algorithm, config)
  if algo.sampler is not None:
    algo = _recording(algo, seen)
  step = jax.jit(functools.partial(steps_lib.train_step, model=model, algorithm=algo),
                 compiler_options=_FAST_COMPILE)
  x, y = images if images is not None else _parity_images(8, seed)
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}

  torch_model = tr.load_flax_variables(tr.MnistCNN(dropout_rates=(0.0, 0.0)), variables).train()
  run = torch_model if precision == "float32" else tr.Autocast(torch_model, torch.bfloat16)
  torch_step = tr.TrainStep(run, config, steps_per_epoch)
  states, jax_adv, torch_adv, torch_nu = [state], [], [], []
  for _ in range(steps):
    out = torch_step(tr.to_nchw(x), torch.from_numpy(y).long(),
                     noise=_jax_noise(states[-1], config))
    torch_nu.append(None if torch_step.nu is None else float(torch_step.nu))
    states.append(jax.block_until_ready(step(states[-1], batch)[0]))
    if out["x_adv"] is not None:
      attack_key = jax.random.split(states[-2].step_key(), 4)[1]
      keys = jax.random.split(attack_key, config.draws) if config.draws > 1 else [attack_key]
      jax_adv.append(np.stack([seen[np.asarray(jax.random.key_data(k)).tobytes()] for k in keys]))
      torch_adv.append(out["x_adv"].numpy().transpose(0, 1, 3, 4, 2))
  return _Steps(variables, states, torch_step, torch_model, torch_nu, jax_adv, torch_adv)


# Every algorithm the torch reference implements: all of dale_jax's (checked below).
_PARITY = ("ERM", "ERM_DataAug", "FGSM", "PGD", "TRADES", "ALP", "CLP", "MART", "TERM",
           "RandSmoothing", "CVaR_SGD", "CVaR_SGD_Autograd", "CVaR_SGD_PD", "Gaussian_DALE",
           "Laplacian_DALE", "Gaussian_DALE_PD", "Gaussian_DALE_PD_Reverse", "KL_DALE_PD",
           "DALE", "Worst_Of_K", "MH_DALE_PD", "MH_DALE_PD_Reverse")


def test_parity_covers_every_algorithm():
  from dale_jax import algorithms

  assert sorted(_PARITY) == sorted(algorithms.ALGORITHMS)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("algorithm", _PARITY)
def test_torch_reference_step_equals_jax_step(algorithm):
  """One training step (two for DALE, whose dual moves once per two-step epoch here) of
  the torch reference fed the very draws of the JAX step: the sampler's perturbed
  images agree to float32 rounding, the weight moves to 1e-3, the dual variable to
  1e-6 (and DALE's stays put mid-epoch on both sides)."""
  require("torch")
  from dale_jax.bench import torch_reference as tr

  steps, per_epoch = (2, 2) if algorithm == "DALE" else (1, 1)
  r = _both_steps(algorithm, steps=steps, steps_per_epoch=per_epoch)
  for got, want in zip(r.torch_adv, r.jax_adv):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  got = tr.flax_variables(r.torch_model)["params"]
  # One SGD step moves each weight by ~lr * grad; compare the moves, not just the weights.
  delta_want = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), r.states[-1].params,
                            r.variables["params"])
  delta_got = jax.tree.map(lambda a, b: a - np.asarray(b), got, r.variables["params"])
  _assert_trees_close(delta_got, delta_want, rtol=1e-3, atol=1e-6)
  if r.torch_step.nu is not None:
    nu = [float(s.dual_state.nu) for s in r.states]
    assert nu[-1] != nu[0]
    if algorithm == "DALE":
      assert nu[1] == nu[0] == r.torch_nu[0]  # mid-epoch: not moved yet, on either side
    np.testing.assert_allclose(r.torch_nu[-1], nu[-1], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("algorithm", ["ERM", "Gaussian_DALE_PD"])
def test_torch_autocast_step_agrees_with_jax_bfloat16_step(algorithm):
  """dale_jax's bfloat16 step against torch's under ``autocast(bfloat16)``.

  Both round the inputs and weights of every convolution and matmul to bfloat16 and
  accumulate in float32; autocast also rounds each layer's output (with its bias)
  to bfloat16, where dale_jax adds the bias in float32 and then rounds. For ERM that
  extra rounding per layer leaves the two SGD moves 0.5% apart in norm (measured),
  while each is 10% from its own float32 move: the 2% bound tells the same bfloat16
  arithmetic from a merely nearby one. With a sampler the moves are not compared: its
  sign steps flip on the near-zero input gradients of the blank border, so the
  perturbations differ by whole steps there. The dual update sees only the clean loss
  of the pre-update model, a forward pass: its two moves of ``nu`` are 3e-4 apart
  (relative, measured), the size of bfloat16's effect on the loss. The weights are
  Flax's lecun-normal draws, as when these were measured: from PyTorch's initialisers
  the logits are ten times smaller, each bfloat16 move is under 1% from its float32
  move, and the bound no longer tells the two arithmetics apart.
  """
  require("torch")
  from dale_jax.bench import torch_reference as tr

  r = _both_steps(algorithm, "bfloat16", images=_digits_like(8), initializer="lecun", seed=1)
  variables, (state, new_state), torch_step = r.variables, r.states, r.torch_step
  if algorithm == "ERM":
    got = tr.flax_variables(r.torch_model)["params"]
    for g, w, w0 in zip(jax.tree.leaves(got), jax.tree.leaves(new_state.params),
                        jax.tree.leaves(variables["params"])):
      move_got = np.asarray(g, np.float64) - np.asarray(w0)
      move_want = np.asarray(w, np.float64) - np.asarray(w0)
      assert np.linalg.norm(move_got - move_want) < 0.02 * np.linalg.norm(move_want)
  else:
    nu0 = float(state.dual_state.nu)
    np.testing.assert_allclose(float(torch_step.nu) - nu0, float(new_state.dual_state.nu) - nu0,
                               rtol=2e-3)


@pytest.mark.slow
@pytest.mark.torch
def test_torch_weights_round_trip_and_give_the_same_logits():
  torch = require("torch")
  from dale_jax.bench import torch_reference as tr
  from dale_jax.models import ResNet

  x, _ = _digits_like(3)
  model = MnistCNN()
  variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  torch_model = tr.load_flax_variables(tr.MnistCNN(), variables).eval()
  _assert_trees_close(tr.flax_variables(torch_model), variables, rtol=0, atol=0)
  with torch.no_grad():
    logits = torch_model(tr.to_nchw(x)).numpy()
  want = jax.nn.log_softmax(model.apply(variables, x))
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)

  # One block per stage: every kind of layer (strided, projection shortcut) at little cost.
  resnet = ResNet(10, stage_sizes=(1, 1, 1, 1), width=4)
  images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
  variables = init_variables(resnet, jax.random.PRNGKey(0), (32, 32, 3))
  variables["batch_stats"] = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])
  torch_resnet = tr.load_flax_variables(
      tr.make_model("resnet18", 10, stage_sizes=(1, 1, 1, 1), width=4), variables).eval()
  _assert_trees_close(tr.flax_variables(torch_resnet), variables, rtol=0, atol=0)
  with torch.no_grad():
    logits = torch_resnet(tr.to_nchw(images)).numpy()
  want = jax.jit(functools.partial(resnet.apply, train=False))(variables, images)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# The command.


_HLO = """\
  %custom-call.3 = (f32[8,32,32,64]{3,2,1,0}, u8[0]{0}) custom-call(f32[8,32,32,64]{3,2,1,0} %p, f32[3,3,64,64]{3,2,1,0} %k), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/conv1/conv_general_dilated"}
  %fusion.1 = f32[8,32,32,64]{3,2,1,0} fusion(f32[8,32,32,64]{3,2,1,0} %a), kind=kLoop, calls=%fused, metadata={op_name="jit(step)/relu/max"}
  ROOT %while.2 = (s32[], (f32[2]{0}, f32[3]{0})) while((s32[], (f32[2]{0}, f32[3]{0})) %t), condition=%c, body=%b
"""


class _Event:
  def __init__(self, name, ns, hlo_op=None):
    self.name, self.duration_ns = name, ns
    self.stats = [("hlo_module", "jit_step")] + ([("hlo_op", hlo_op)] if hlo_op else [])


class _Line:
  def __init__(self, name, events):
    self.name, self.events = name, events


class _Plane:
  def __init__(self, name, lines):
    self.name, self.lines = name, lines


class _Trace:
  def __init__(self, planes):
    self.planes = planes


def test_profile_parses_tuple_shaped_instructions():
  found = profile.hlo_instructions(_HLO)
  assert found["custom-call.3"] == {
      "opcode": "custom-call", "shape": "(f32[8,32,32,64]{3,2,1,0}, u8[0]{0})",
      "source": "jit(step)/conv1/conv_general_dilated"}
  assert found["fusion.1"]["opcode"] == "fusion" and found["while.2"]["opcode"] == "while"


def test_profile_counts_device_kernels_for_their_hlo_op_once():
  instructions = profile.hlo_instructions(_HLO)
  host = _Plane("/host:CPU", [_Line("thunks", [_Event("custom-call.3", 900),
                                               _Event("fusion.1", 900)])])
  gpu = _Plane("/device:GPU:0", [
      _Line("Stream #14", [_Event("sm90_xmma_fprop_implicit_gemm", 50, hlo_op="custom-call.3"),
                           _Event("sm90_xmma_fprop_implicit_gemm", 30, hlo_op="custom-call.3"),
                           _Event("fusion.1", 7),
                           _Event("while.2", 1000)]),
      _Line("XLA Ops", [_Event("custom-call.3", 80)])])
  # A GPU trace: the kernels' device time, attributed by hlo_op; host launches,
  # loops and derived lines not counted.
  assert profile.op_times(_Trace([host, gpu]), instructions) == {"custom-call.3": 80,
                                                                 "fusion.1": 7}
  # A CPU trace has no device plane: the host threads' events count.
  assert profile.op_times(_Trace([host]), instructions) == {"custom-call.3": 900,
                                                            "fusion.1": 900}


@pytest.mark.slow
def test_bench_command_prints_one_json_object_per_framework(capsys):
  require("torch")
  from dale_jax.cli import bench

  bench.main(["--frameworks=jax,torch", "--batch_size=8", "--steps=1", "--repeats=2",
              "--warmup=0", "--json"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["framework"] for r in rows] == ["jax", "torch"]
  for r in rows:
    assert r["images_per_sec"] > 0 and r["step_ms"] > 0 and r["compile_s"] >= 0
    assert r["images_per_sec_min"] <= r["images_per_sec"] <= r["images_per_sec_max"]
    assert 0 < r["share_of_peak"] < 1 and r["peak_rss_mib"] > 0
    # Both workers run with the malloc setting of the command-line tools.
    kept = host_memory._glibc() is not None and os.environ.get(host_memory.ENV_VAR) != "system"
    assert r["malloc"] == ("keep" if kept else "system")
  assert rows[1]["speedup_vs_torch"] == 1.0


@pytest.mark.slow
def test_bench_scales_over_simulated_devices(capsys):
  from dale_jax.cli import bench

  bench.main(["--frameworks=jax", "--simulated_devices=2", "--batch_size=8", "--steps=1",
              "--repeats=1", "--warmup=0", "--json", "--profile=3"])
  (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert row["devices"] == 2 and row["images_per_sec"] > 0
  assert len(row["top_ops"]) == 3 and all(op["ms_per_step"] >= 0 for op in row["top_ops"])


def test_bench_rejects_bad_options_before_starting_workers():
  with pytest.raises(ValueError, match="algorithm"):
    runner.run(runner.Options(algorithm="MART"), ["jax"])
  with pytest.raises(ValueError, match="divisible"):
    runner.run(runner.Options(batch_size=6, devices=4), ["jax"])
  with pytest.raises(ValueError, match="framework"):
    runner.run(runner.Options(), ["tensorflow"])
  with pytest.raises(ValueError, match=r"sampler_chunk must be None .* got -1"):
    runner.run(runner.Options(sampler_chunk=-1), ["jax"])
  with pytest.raises(ValueError, match="warmup must be an integer >= 0, got True"):
    runner.run(runner.Options(warmup=True), ["jax"])
  with pytest.raises(ValueError, match="precision must be one of"):
    runner.run(runner.Options(), ["jax"], precisions=["float32", "float16"])
  for chunk in (None, 0, 16):  # The accepted values.
    runner.Options(sampler_chunk=chunk).validate()


def test_bench_precision_flag_and_table(capsys):
  from dale_jax.cli import bench

  assert bench.parse_args(["--precision=float32,bfloat16"]).precision == ["float32", "bfloat16"]
  with pytest.raises(SystemExit):
    bench.parse_args(["--precision=float16"])
  assert ("dale-bench: error: --precision=float16: expected distinct names from float32, "
          "bfloat16") in capsys.readouterr().err
  row = dict(framework="jax", devices=1, batch_size=64, images_per_sec=200.0,
             images_per_sec_min=190.0, images_per_sec_max=210.0, step_ms=320.0, compile_s=5.0,
             peak_rss_mib=1000.0)
  table = runner.format_table([
      {**row, "precision": "float32", "speedup_vs_torch": 1.0},
      {**row, "precision": "bfloat16", "speedup_vs_torch": 0.78, "speedup_vs_torch_float32": 1.24}])
  lines = table.splitlines()
  assert "vs torch fp32" in lines[0]
  assert lines[2].split()[:2] == ["jax", "float32"] and lines[2].split()[-2:] == ["1.00x", "-"]
  assert lines[3].split()[:2] == ["jax", "bfloat16"] and lines[3].split()[-2:] == ["0.78x", "1.24x"]


# ----------------------------------------------------------------------------
# AutoAttack against torchattacks (dale-bench --task=autoattack).

_ARCHS = ("mnist_cnn", "resnet18", "preact_resnet18", "wrn28_10", "wrn34_10")


def test_bench_names_the_converters_architectures_and_normalisations():
  from dale_jax import bench, models
  from dale_jax.models import torch_weights

  assert bench.ARCHS == torch_weights.ARCHS == _ARCHS
  assert bench.NORMALIZATIONS == tuple(models.NORMALIZATIONS)


# The converter's layouts are those of each architecture's published width (WRN-28-10
# and WRN-34-10 included), so the weights are full-size: all but the MNIST CNN are slow.
@pytest.mark.torch
@pytest.mark.parametrize("arch", [
    a if a == "mnist_cnn" else pytest.param(a, marks=pytest.mark.slow)
    for a in _ARCHS])
def test_autoattack_both_frameworks_hold_the_same_weights(arch):
  """An architecture's initial weights from a seed, written as a state_dict and loaded by
  the PyTorch network, give dale_jax's logits; the loaded tensors are the state_dict's."""
  torch = require("torch")
  from dale_jax.bench import autoattack
  from dale_jax.models import torch_weights

  setup = autoattack.prepare(arch=arch, dataset="synthetic", n_examples=3, batch_size=3,
                             seed=1, device="cpu")
  info = setup.info
  assert info["model"] == arch and info["weights"] == "initial weights, seed 1"
  assert info["synthetic"] and "measures nothing but speed" in info["points"]
  assert info["max_abs_logit_diff"] <= 1e-4 * max(1.0, info["max_abs_logit"])
  assert setup.x.shape == (3, *torch_weights.input_shape(arch))
  assert 0.0 <= setup.x.min() and setup.x.max() <= 1.0
  # Labelled with the model's own predictions: every point starts correctly classified.
  logits = np.asarray(setup.logits_fn(setup.x))
  np.testing.assert_array_equal(setup.y, logits.argmax(-1))
  assert (setup.norm, setup.eps) == ("linf", 0.3 if arch == "mnist_cnn" else 8 / 255)
  want = torch_weights.to_torch(jax.tree.map(np.array, setup.logits_fn.args[0]), arch)
  got = setup.net.state_dict()
  assert set(want) == set(got)
  for key, value in want.items():
    assert torch.equal(got[key], value), key


@pytest.mark.torch
def test_autoattack_reads_a_checkpoint_and_refuses_weights_that_differ(tmp_path, monkeypatch):
  torch = require("torch")
  from dale_jax import validation
  from dale_jax.bench import autoattack
  from dale_jax.bench import torch_reference as tr
  from dale_jax.models import get_model, torch_weights

  variables = init_variables(get_model("mnist_cnn", 10), jax.random.key(3), (28, 28, 1))
  state_dict = torch_weights.to_torch(variables, "mnist_cnn")
  # RobustBench's form: DataParallel names, under "state_dict".
  torch.save({"state_dict": {"module." + k: v for k, v in state_dict.items()}},
             tmp_path / "model.pt")
  x, y = _digits_like(4)
  np.savez(tmp_path / "points.npz", x=x.transpose(0, 3, 1, 2), y=y)
  setup = autoattack.prepare(arch="mnist_cnn", torch_checkpoint=str(tmp_path / "model.pt"),
                             dataset=str(tmp_path / "points.npz"), n_examples=3, batch_size=4,
                             device="cpu")
  np.testing.assert_array_equal(setup.x, x[:3])
  np.testing.assert_array_equal(setup.y, y[:3])
  assert setup.info["weights"] == f"checkpoint {tmp_path / 'model.pt'}"
  assert setup.info["max_abs_logit_diff"] <= 1e-4 * max(1.0, setup.info["max_abs_logit"])
  jax.tree.map(np.testing.assert_array_equal, setup.logits_fn.args[0],
               torch_weights.from_torch(state_dict, "mnist_cnn"))

  with pytest.raises(validation.BadInput, match=r"torch_checkpoint: the state_dict does not "
                                                r"match arch 'resnet18'"):
    autoattack.prepare(arch="resnet18", torch_checkpoint=str(tmp_path / "model.pt"),
                       dataset="synthetic", n_examples=2, batch_size=2, device="cpu")
  with pytest.raises(validation.BadInput, match=r"images of shape \(28, 28, 1\).*takes "
                                                r"\(32, 32, 3\)"):
    torch.save(torch_weights.to_torch(init_variables(get_model("resnet18", 10),
                                                     jax.random.key(0), (32, 32, 3)),
                                      "resnet18"), tmp_path / "resnet.pt")
    autoattack.prepare(arch="resnet18", torch_checkpoint=str(tmp_path / "resnet.pt"),
                       dataset=str(tmp_path / "points.npz"), batch_size=4, device="cpu")

  # A PyTorch network that computes something else (one weight moved) is not timed.
  load = tr.load_state_dict

  def moved(*args, **kwargs):
    net = load(*args, **kwargs)
    with torch.no_grad():
      net.fc2.bias[int(y[0])] += 1.0
    return net

  monkeypatch.setattr(tr, "load_state_dict", moved)
  with pytest.raises(validation.BadInput, match=r"logits differ by up to [0-9.]+ .*nothing timed"):
    autoattack.prepare(arch="mnist_cnn", torch_checkpoint=str(tmp_path / "model.pt"),
                       dataset=str(tmp_path / "points.npz"), batch_size=4, device="cpu")


@pytest.mark.slow
@pytest.mark.torch
def test_autoattack_command_times_both_frameworks_attack_by_attack(capsys):
  """Two synthetic points, every attack on both (``--individual``), tiny budgets."""
  require("torchattacks")
  from dale_jax.bench import autoattack
  from dale_jax.cli import bench

  rows = bench.main(["--task=autoattack", "--arch=mnist_cnn", "--dataset=synthetic",
                     "--n_examples=2", "--batch_size=2", "--repeats=2", "--apgd_steps=2",
                     "--fab_steps=2", "--square_queries=4", "--individual", "--json"])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  setup = lines[0]["setup"]
  assert setup["synthetic"] and setup["individual"] and setup["n_examples"] == 2
  assert setup["budgets"] == {"apgd_steps": 2, "fab_steps": 2, "square_queries": 4}
  assert lines[1:] == rows
  runs = {}
  for r in rows[:-1]:
    runs.setdefault((r["framework"], r["run"]), []).append(r)
  assert list(runs) == [("dale_jax", "cold (compiles)"), ("dale_jax", "warm, median of 2"),
                        ("torchattacks", "eager, median of 2")]
  for run in runs.values():
    assert [r["attack"] for r in run] == [*autoattack.ORDER, "total"]
    *attacks, total = run
    assert all(r["seconds"] > 0 and r["precision"] == "float32" for r in run)
    assert sum(r["share"] for r in attacks) == pytest.approx(100.0)
    assert sum(r["seconds"] for r in attacks) == pytest.approx(total["seconds"])
    assert total["points_per_s"] == pytest.approx(2 / total["seconds"])
    assert all(0.0 <= r["accuracy"] <= 100.0 for r in run)
  speedup = rows[-1]
  assert speedup["framework"] == "dale_jax / torchattacks" and speedup["attack"] == "total"
  assert speedup["speedup"] == pytest.approx(runs["torchattacks", "eager, median of 2"][-1]["seconds"]
                                             / runs["dale_jax", "warm, median of 2"][-1]["seconds"])
  table = autoattack.format_table(rows)
  assert "| dale_jax / torchattacks | median of 2 | float32 | speed-up |" in table
