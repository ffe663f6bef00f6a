"""The benchmark's building blocks: the CPU-friendly MNIST CNN equals the plain Flax one,
FLOPs are counted through loops, the PyTorch reference computes the JAX step, and
``dale-bench`` runs and prints one JSON object per framework."""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import require

from dale_jax import host_memory
from dale_jax import train
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


def test_mnist_cnn_equals_conv_and_reduce_window_formulation():
  x, y = _digits_like(4)
  key = jax.random.PRNGKey(0)
  plain, fast = _PlainMnistCNN(), MnistCNN()
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


def test_step_flops_count_every_sampler_step():
  options = runner.Options(algorithm="Gaussian_DALE_PD", batch_size=8)
  config = runner.make_config(options)
  step = train.make_train_step(config, 10)
  state = train.create_train_state(config, jax.random.PRNGKey(0), (28, 28, 1), 10)
  batch = {"image": jnp.zeros((8, 28, 28, 1)), "label": jnp.zeros((8,), jnp.int32)}
  total = flops.count_flops(step, state, batch)
  fwd = flops.count_flops(lambda x: MnistCNN().apply({"params": state.params}, x), batch["image"])
  # 7 sampler steps of forward + input gradient, then two training forwards and their
  # backward passes: between 7 * 2 + 2 * 2 = 18 and 7 * 2 + 2 * 3 = 20 forwards.
  assert 18 * fwd < total < 20 * fwd


# ----------------------------------------------------------------------------
# The PyTorch reference against the JAX step.


def _noise_free_config(algorithm: str, batch_size: int, model: str = "mnist_cnn"):
  config = runner.make_config(runner.Options(algorithm=algorithm, model=model,
                                             batch_size=batch_size))
  if "noise_scale" in config.sampler:
    config.sampler.noise_scale = 0.0
  if config.sampler.get("name") == "trades_kl":
    # KL(p(x) || p(x')) is flat at x' = x: from advbench's 0.001 jitter the gradient is
    # so small that a few of its signs depend on float32 summation order (from 0.01 too,
    # on a CPU without AVX-512, whose vector width changes that order).
    config.sampler.init_std = 0.05
  return config


def _jax_sampler_start(state, config, x):
  """The random start ``x + init_std N`` that :func:`train.train_step` draws.

  The KL samplers cannot start noise-free (the KL gradient vanishes at ``x`` and
  its sign would be rounding noise), so the torch side replays this draw. The keys are
  derived as in ``train_step`` and ``samplers.ascent``.
  """
  attack_key = jax.random.split(state.step_key(), 4)[1]
  init_key = jax.random.split(attack_key)[0]
  std = config.sampler.get("init_std", 0.001)
  return np.asarray(x + std * jax.random.normal(init_key, x.shape, x.dtype))


def _assert_trees_close(got, want, rtol, atol):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w),
                                                       rtol=rtol, atol=atol), got, want)


def _both_steps(algorithm: str, precision: str = "float32"):
  """One noise-free step of dale_jax and of the torch reference from the same weights.

  Returns ``(initial variables, jax state before, jax state after, torch step, torch
  model)``; in bfloat16 the torch model runs under ``torch.autocast``.
  """
  import torch
  from dale_jax.bench import torch_reference as tr

  torch.manual_seed(0)
  config = _noise_free_config(algorithm, batch_size=8)
  # Dropout masks cannot be shared.
  model = MnistCNN(dropout_rates=(0.0, 0.0), dtype=getattr(jnp, precision))
  variables = init_variables(model, jax.random.PRNGKey(1), (28, 28, 1))
  state = train.create_train_state(config, jax.random.PRNGKey(0), (28, 28, 1), 10)
  state = state.replace(params=variables["params"])
  step = jax.jit(functools.partial(train.train_step, model=model,
                                   algorithm=train.algorithm_for(config)))
  x, y = _digits_like(8)
  new_state, _ = step(state, {"image": jnp.asarray(x), "label": jnp.asarray(y)})

  torch_model = tr.load_flax_variables(tr.MnistCNN(dropout_rates=(0.0, 0.0)), variables).train()
  run = torch_model if precision == "float32" else tr.Autocast(torch_model, torch.bfloat16)
  torch_step = tr.TrainStep(run, config)
  start = None
  if config.sampler.get("name") in ("langevin_gaussian", "trades_kl"):
    start = tr.to_nchw(_jax_sampler_start(state, config, x))
  torch_step(tr.to_nchw(x), torch.from_numpy(y).long(), start=start)
  return variables, state, new_state, torch_step, torch_model


@pytest.mark.torch
@pytest.mark.parametrize("algorithm",
                         ["ERM", "PGD", "TRADES", "Gaussian_DALE_PD", "KL_DALE_PD"])
def test_torch_reference_step_equals_jax_step(algorithm):
  require("torch")
  from dale_jax.bench import torch_reference as tr

  variables, _, new_state, torch_step, torch_model = _both_steps(algorithm)
  got = tr.flax_variables(torch_model)["params"]
  # One SGD step moves each weight by ~lr * grad; compare the moves, not just the weights.
  delta_want = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new_state.params,
                            variables["params"])
  delta_got = jax.tree.map(lambda a, b: a - np.asarray(b), got, variables["params"])
  _assert_trees_close(delta_got, delta_want, rtol=1e-3, atol=1e-6)
  if torch_step.nu is not None:
    np.testing.assert_allclose(float(torch_step.nu), float(new_state.dual_state.nu), rtol=1e-6)


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
  (relative, measured), the size of bfloat16's effect on the loss.
  """
  require("torch")
  from dale_jax.bench import torch_reference as tr

  variables, state, new_state, torch_step, torch_model = _both_steps(algorithm, "bfloat16")
  if algorithm == "ERM":
    got = tr.flax_variables(torch_model)["params"]
    for g, w, w0 in zip(jax.tree.leaves(got), jax.tree.leaves(new_state.params),
                        jax.tree.leaves(variables["params"])):
      move_got = np.asarray(g, np.float64) - np.asarray(w0)
      move_want = np.asarray(w, np.float64) - np.asarray(w0)
      assert np.linalg.norm(move_got - move_want) < 0.02 * np.linalg.norm(move_want)
  else:
    nu0 = float(state.dual_state.nu)
    np.testing.assert_allclose(float(torch_step.nu) - nu0, float(new_state.dual_state.nu) - nu0,
                               rtol=2e-3)


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


def test_bench_command_prints_one_json_object_per_framework(capsys):
  require("torch")
  from dale_jax.cli import bench

  bench.main(["--framework=jax,torch", "--batch-size=8", "--steps=1", "--repeats=2",
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

  bench.main(["--framework=jax", "--devices=2", "--batch-size=8", "--steps=1", "--repeats=1",
              "--warmup=0", "--json", "--profile=3"])
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
  assert "float32, bfloat16, got 'float16'" in capsys.readouterr().err
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
