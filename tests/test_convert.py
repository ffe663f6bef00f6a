"""PyTorch checkpoints in dale_jax: the converter (dale_jax.models.torch_weights) and
``dale-eval --torch_checkpoint``.

The PyTorch networks are those of dale_jax.bench.torch_reference, written from the
published code of each architecture (advbench's MNIST network, kuangliu's ResNet-18, Wong
et al.'s and RobustBench's PreActResNet-18, TRADES'/MART's and RobustBench's WideResNet,
the WRN-34-10 with TRADES' unused ``sub_block1``), with random weights and random
BatchNorm statistics, in eval mode: the converted dale_jax model must give their logits,
and the weights must come back bitwise.
"""

from __future__ import annotations

import functools
import json
import os
import re
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from conftest import require, run_module

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


@functools.lru_cache(maxsize=None)
def _torch_nets() -> SimpleNamespace:
  """The PyTorch definitions (dale_jax.bench.torch_reference, the networks the benchmark
  times), looked up once torch is known to import."""
  torch = require("torch")
  from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel

  return SimpleNamespace(
      torch=torch, Normalized=torch_reference.Normalized,
      mnist_cnn=torch_reference.MnistCNN,  # returns log_softmax, as advbench's does
      resnet18=torch_reference.ResNet,
      preact_resnet18=torch_reference.PreActResNet,
      wrn28_10=functools.partial(torch_reference.WideResNet, depth=28),
      wrn34_10=functools.partial(torch_reference.WideResNet, depth=34, sub_block1=True))


def _randomize_batch_norms(net, x, seed: int):
  """``net`` in eval mode with random BatchNorm weights and running statistics near those
  of its activations on ``x`` (NCHW), so that its logits depend on the input.

  One train-mode forward with momentum 1 sets every running mean and variance to its
  batch statistics on ``x``; each is then moved at random (means by 0.2 standard
  deviations, variances by a factor in [0.7, 1.4]), and the affine weights drawn.
  """
  torch = _torch_nets().torch
  norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in norms:
      m.momentum = 1.0
    net.train()(torch.from_numpy(x))
    for m in norms:
      c = m.num_features
      m.momentum = 0.1
      m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn(c, generator=g))
      m.running_var.mul_(0.7 + 0.7 * torch.rand(c, generator=g))
      m.weight.copy_(0.5 + torch.rand(c, generator=g))
      m.bias.copy_(0.2 * torch.randn(c, generator=g))
      m.num_batches_tracked.zero_()
  return net.eval()


# ----------------------------------------------------------------------------
# The converter.

from dale_jax import models  # noqa: E402
from dale_jax.models import torch_weights  # noqa: E402

ARCHS = ("mnist_cnn", "resnet18", "preact_resnet18", "wrn28_10", "wrn34_10")


def _images(arch: str, n: int = 2, seed: int = 0) -> np.ndarray:
  """``n`` random NCHW images in [0, 1] of ``arch``'s input shape, of unequal brightness."""
  h, w, c = torch_weights.input_shape(arch)
  rng = np.random.default_rng(seed)
  x = rng.random((n, c, h, w), dtype=np.float32)
  return x * np.linspace(1.0, 0.4, n, dtype=np.float32)[:, None, None, None]


@pytest.fixture(scope="module")
def torch_net():
  """``torch_net(arch) -> (net, x)``: a random eval-mode torch net of ``arch`` and NCHW
  images, each built once per module (WRN-34-10 has 46M parameters)."""
  built = {}

  def get(arch):
    if arch not in built:
      nets = _torch_nets()
      nets.torch.manual_seed(ARCHS.index(arch))
      x = _images(arch)
      built[arch] = (_randomize_batch_norms(getattr(nets, arch)(), x, ARCHS.index(arch)), x)
    return built[arch]

  return get


def _torch_logits(net, x) -> np.ndarray:
  torch = _torch_nets().torch
  with torch.no_grad():
    return net(torch.from_numpy(x)).numpy()


def _nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@functools.lru_cache(maxsize=None)
def _eval_apply(model):
  return jax.jit(functools.partial(model.apply, train=False))


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("arch", ARCHS)
def test_converted_model_gives_the_torch_logits(arch, torch_net):
  net, x = torch_net(arch)
  want = _torch_logits(net, x)
  # DataParallel's names, as RobustBench's checkpoints have them.
  state_dict = {"module." + k: v for k, v in net.state_dict().items()}
  variables = torch_weights.from_torch(state_dict, arch)
  assert torch_weights.num_classes(variables, arch) == 10
  got = np.asarray(_eval_apply(models.get_model(arch, 10))(variables, _nhwc(x)))
  if arch == "mnist_cnn":  # advbench's network returns log_softmax
    got = np.asarray(jax.nn.log_softmax(got))
  diff = float(np.abs(got - want).max())
  print(f"{arch}: max |logit difference| {diff:.2e}, logits in [{want.min():.2f}, "
        f"{want.max():.2f}]")
  # The logits depend on the image and on the class, 100 times the tolerance or more.
  assert np.ptp(want, axis=0).max() > 1e-2 and np.ptp(want, axis=1).min() > 1e-2
  assert diff <= 1e-4


@pytest.mark.slow
@pytest.mark.torch
def test_normalization_is_inside_the_converted_model(torch_net):
  nets = _torch_nets()
  net, x = torch_net("preact_resnet18")
  want = _torch_logits(nets.Normalized(net, CIFAR10_MEAN, CIFAR10_STD).eval(), x)
  variables = torch_weights.from_torch(net.state_dict(), "preact_resnet18")
  model = models.normalized(models.get_model("preact_resnet18", 10), "cifar10")
  assert isinstance(model, models.Normalized) and model.mean == CIFAR10_MEAN
  got = np.asarray(_eval_apply(model)(variables, _nhwc(x)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  # The wrapper adds no variables and nests none: the same weights serve both models.
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), (32, 32, 3)))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  unnormalized = np.asarray(_eval_apply(models.get_model("preact_resnet18", 10))(
      variables, _nhwc(x)))
  assert np.abs(unnormalized - want).max() > 1e-2


def _bits(t):
  return t.reshape(-1).view(_torch_nets().torch.uint8)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bitwise(arch, torch_net):
  torch = _torch_nets().torch
  net, _ = torch_net(arch)
  original = net.state_dict()
  # TRADES' WRN-34-10 carries the unused sub_block1: it is read past and written back as
  # a copy of block1, so that TRADES' class loads the result with strict=True.
  sub_block1 = any(k.startswith("sub_block1.") for k in original)
  assert sub_block1 == (arch == "wrn34_10")
  back = torch_weights.to_torch(torch_weights.from_torch(original, arch), arch,
                                sub_block1=sub_block1)
  assert set(back) == set(original)
  for key, value in original.items():
    source = "block1." + key.split(".", 1)[1] if key.startswith("sub_block1.") else key
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    assert torch.equal(_bits(back[key]), _bits(original[source])), key
  with torch.device("meta"):  # TRADES' class itself takes the result, strictly
    fresh = getattr(_torch_nets(), arch)()
  fresh.load_state_dict(back, strict=True, assign=True)


def _state_dict_of(torch_net, arch):
  return torch_net(arch)[0].state_dict()


@pytest.mark.slow
@pytest.mark.torch
def test_state_dicts_of_another_architecture_are_named(torch_net):
  # WRN-28-10 has four blocks a group, WRN-34-10 five.
  with pytest.raises(torch_weights.WeightsMismatch,
                     match=r"arch 'wrn34_10'.*missing block1\.layer\.4\..*\(30 in all\)"):
    torch_weights.from_torch(_state_dict_of(torch_net, "wrn28_10"), "wrn34_10")
  # ResNet-18 and PreActResNet-18: the stem BN and the shortcut BNs differ.
  with pytest.raises(torch_weights.WeightsMismatch,
                     match=r"missing bn\.bias.*; unexpected bn1\.weight, bn1\.bias"):
    torch_weights.from_torch(_state_dict_of(torch_net, "resnet18"), "preact_resnet18")
  with pytest.raises(torch_weights.WeightsMismatch,
                     match=r"linear\.bias has shape \(10,\), resnet18 has \(100,\) there"):
    torch_weights.from_torch(_state_dict_of(torch_net, "resnet18"), "resnet18", num_classes=100)
  with pytest.raises(ValueError, match=r"arch must be one of \['mnist_cnn', 'resnet18'.*"
                                       r"'wrn28_10', 'wrn34_10'\], got 'resnet50'"):
    torch_weights.from_torch({}, "resnet50")
  variables = torch_weights.from_torch(_state_dict_of(torch_net, "mnist_cnn"), "mnist_cnn")
  with pytest.raises(torch_weights.WeightsMismatch, match="need params/linear/kernel, its last"):
    torch_weights.to_torch(variables, "resnet18")
  del variables["params"]["conv2"]["bias"]
  with pytest.raises(torch_weights.WeightsMismatch, match="mnist_cnn': missing params/conv2/bias"):
    torch_weights.to_torch(variables, "mnist_cnn")
  with pytest.raises(ValueError, match="sub_block1 is for a WideResNet"):
    torch_weights.to_torch(variables, "mnist_cnn", sub_block1=True)


@pytest.mark.torch
def test_checkpoint_files(torch_net, tmp_path):
  torch = _torch_nets().torch
  net, _ = torch_net("mnist_cnn")
  state_dict = net.state_dict()
  want = torch_weights.from_torch(state_dict, "mnist_cnn")
  for i, stored in enumerate([state_dict, {"epoch": 3, "state_dict": state_dict},
                              {"model_state_dict": state_dict, "optimizer": {}},
                              {"model": {"module." + k: v for k, v in state_dict.items()}}]):
    path = str(tmp_path / f"{i}.pt")
    torch.save(stored, path)
    got = torch_weights.from_torch(torch_weights.read_checkpoint(path), "mnist_cnn")
    jax.tree.map(np.testing.assert_array_equal, got, want)
  # A whole pickled module does not load without running its code; a dict of other things
  # holds no state_dict.
  torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), str(tmp_path / "module.pt"))
  with pytest.raises(torch_weights.CheckpointError, match=r"weights_only=True.*state_dict\(\)"):
    torch_weights.read_checkpoint(str(tmp_path / "module.pt"))
  torch.save({"epoch": 3, "acc": 0.5}, str(tmp_path / "other.pt"))
  with pytest.raises(torch_weights.CheckpointError, match="holds no state_dict: it holds a dict with keys epoch, acc"):
    torch_weights.read_checkpoint(str(tmp_path / "other.pt"))
  with pytest.raises(torch_weights.CheckpointError, match="does not exist"):
    torch_weights.read_checkpoint(str(tmp_path / "missing.pt"))
  # save_torch writes what to_torch returns.
  written = torch_weights.save_torch(want, "mnist_cnn", str(tmp_path / "back.pt"))
  reread = torch_weights.read_checkpoint(str(tmp_path / "back.pt"))
  assert list(reread) == list(written)
  for key, value in state_dict.items():
    assert torch.equal(reread[key], value), key


# ----------------------------------------------------------------------------
# Points from an .npz.


def test_npz_points_nhwc_or_nchw_by_the_channel_axis(tmp_path):
  from dale_jax import points  # pylint: disable=import-outside-toplevel
  from dale_jax import validation  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  nhwc = rng.random((2, 28, 28, 1), dtype=np.float32)
  np.savez(tmp_path / "nchw.npz", x=nhwc.transpose(0, 3, 1, 2), y=np.array([3, 1], np.uint8))
  np.savez(tmp_path / "nhwc.npz", x=nhwc.astype(np.float64), y=[3, 1])
  for name in ("nchw", "nhwc"):
    x, y = points.load_npz(str(tmp_path / f"{name}.npz"))
    assert x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x, nhwc)
    np.testing.assert_array_equal(y, [3, 1])
  bad = {
      "ambiguous": (dict(x=rng.random((2, 3, 3, 3), dtype=np.float32), y=[0, 1]),
                    r"x of shape \(2, 3, 3, 3\) is ambiguous"),
      "flat": (dict(x=nhwc.reshape(2, -1), y=[0, 1]), r"x must be a batch of images"),
      "no_channels": (dict(x=nhwc.reshape(2, 14, 56), y=[0, 1]), r"must be a batch of images"),
      "five_channels": (dict(x=np.zeros((2, 8, 8, 5), np.float32), y=[0, 1]),
                        r"has no channel axis: axis 3 \(NHWC\) or axis 1 \(NCHW\) must be 1 or 3"),
      "bytes": (dict(x=(255 * nhwc).astype(np.uint8), y=[0, 1]), r"floats in \[0, 1\].*uint8"),
      "range": (dict(x=2 * nhwc, y=[0, 1]), r"x must be in \[0, 1\], got values in \[0"),
      "labels": (dict(x=nhwc, y=[0.0, 1.0]), r"y must be integer labels.*float64"),
      "count": (dict(x=nhwc, y=[0, 1, 2]), r"one per image \(2,\).*shape \(3,\)"),
      "negative": (dict(x=nhwc, y=[0, -1]), r"y must be >= 0, got -1"),
      "no_y": (dict(x=nhwc), r"must hold arrays 'x' \(images\) and 'y' \(labels\), found \['x'\]"),
  }
  for name, (arrays, message) in bad.items():
    np.savez(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(validation.InvalidArgument, match=message):
      points.load_npz(str(tmp_path / f"{name}.npz"), "--dataset")
  with pytest.raises(validation.InvalidArgument, match="--dataset: .*missing.npz does not exist"):
    points.load_npz(str(tmp_path / "missing.npz"), "--dataset")
  np.save(tmp_path / "array.npy", nhwc)
  with pytest.raises(validation.InvalidArgument, match="array.npy is not an .npz file"):
    points.load_npz(str(tmp_path / "array.npy"), "--dataset")


# ----------------------------------------------------------------------------
# dale-eval --torch_checkpoint.


_command = run_module


_dale_eval = functools.partial(_command, "dale_jax.cli.evaluate")
_export = functools.partial(_command, "dale_jax.cli.export_torch")


@pytest.mark.slow
@pytest.mark.torch
def test_dale_eval_of_a_torch_checkpoint_on_npz_points(torch_net, tmp_path):
  """A RobustBench-style checkpoint (DataParallel names, under "state_dict", trained on
  normalised inputs) on four NCHW points: the report's clean accuracy is the torch
  model's own."""
  import copy  # pylint: disable=import-outside-toplevel
  nets = _torch_nets()
  torch = nets.torch
  net = copy.deepcopy(torch_net("preact_resnet18")[0])
  x = _images("preact_resnet18", n=4, seed=1)
  wrapped = nets.Normalized(net, CIFAR10_MEAN, CIFAR10_STD).eval()
  with torch.no_grad():  # centre each logit over the points: the predictions then differ
    net.linear.bias.sub_(torch.from_numpy(_torch_logits(wrapped, x)).mean(0))
  predicted = _torch_logits(wrapped, x).argmax(1)
  assert len(set(predicted.tolist())) > 1
  y = predicted.copy()
  y[1:3] = (y[1:3] + 1) % 10  # two of the four points misclassified
  torch_accuracy = 100.0 * np.mean(predicted == y)
  np.savez(tmp_path / "points.npz", x=x, y=y)
  torch.save({"epoch": 200, "state_dict": {"module." + k: v for k, v in net.state_dict().items()}},
             tmp_path / "model.pt")
  out = _dale_eval(f"--torch_checkpoint={tmp_path / 'model.pt'}", "--arch=preact_resnet18",
                   "--normalize=cifar10", f"--dataset={tmp_path / 'points.npz'}",
                   f"--output_dir={tmp_path / 'out'}", "--eps=0.03", "--version=custom",
                   "--attacks=clean,fgsm", "--batch_size=4")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "out" / "robustness.json") as f:
    report = json.load(f)
  assert report["clean_accuracy"] == torch_accuracy == 50.0
  assert report["per_attack"]["clean"] == torch_accuracy and report["n_examples"] == 4
  assert report["model"] == "preact_resnet18" and report["normalize"] == "cifar10"
  assert report["checkpoint"] == str(tmp_path / "model.pt") and report["split"] is None
  assert report["eps"] == 0.03 and report["norm"] == "linf"
  assert report["robust_accuracy"] <= report["clean_accuracy"]
  with open(tmp_path / "out" / "model_info.json") as f:
    info = json.load(f)
  assert info["name"] == "model" and info["architecture"] == "preact_resnet18"
  assert info["clean_acc"] == "50.00"
  assert "model.pt (preact_resnet18) on" in out.stdout and "| clean | 50.00 |" in out.stdout


@pytest.mark.slow
@pytest.mark.torch
def test_dale_eval_bad_input_is_one_line_and_exit_2(torch_net, tmp_path):
  torch = _torch_nets().torch
  torch.save(torch_net("mnist_cnn")[0].state_dict(), tmp_path / "mnist.pt")
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "points.npz", x=rng.random((2, 32, 32, 3), dtype=np.float32), y=[0, 1])
  np.savez(tmp_path / "ambiguous.npz", x=rng.random((2, 3, 32, 3), dtype=np.float32), y=[0, 1])
  output_dir = tmp_path / "out"
  ok = dict(torch_checkpoint=tmp_path / "mnist.pt", arch="resnet18",
            dataset=tmp_path / "points.npz", output_dir=output_dir, eps=0.03)
  cases = [
      (dict(torch_checkpoint=tmp_path / "missing.pt"), r"--torch_checkpoint: .*missing\.pt does not exist"),
      (dict(arch="resnet50"), r"--arch=resnet50: value should be one of <mnist_cnn\|resnet18\|"
                              r"preact_resnet18\|wrn28_10\|wrn34_10>"),
      (dict(), r"--torch_checkpoint: the state_dict does not match arch 'resnet18'.*: missing "
               r"bn1\.bias, .*; unexpected conv1\.bias, conv2\.weight, conv2\.bias, \.\.\."),
      (dict(dataset=tmp_path / "ambiguous.npz"),
       r"--dataset ambiguous\.npz: x of shape \(2, 3, 32, 3\) is ambiguous"),
      (dict(output_dir=None), r"--torch_checkpoint needs --output_dir"),
  ]
  for changes, message in cases:
    out = _dale_eval(*(f"--{k}={v}" for k, v in {**ok, **changes}.items() if v is not None))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (changes, out.stderr[-2000:])
    assert lines[0].startswith("dale-eval: error: "), lines
    assert re.search(message, lines[0]), lines[0]
  assert not output_dir.exists()  # nothing written


# ----------------------------------------------------------------------------
# A dale-train run, exported.


@pytest.mark.slow
@pytest.mark.torch
def test_exported_run_loads_into_the_torch_network(tmp_path):
  from dale_jax import checkpoint, configs, train  # pylint: disable=import-outside-toplevel
  torch = _torch_nets().torch
  config = configs.base_config("mnist_digits", "ERM")
  config.num_epochs, config.batch_size = 1, 32
  config.data.max_train_examples, config.data.validation_size = 32, 0
  config.eval.update(evaluators=("Clean",), splits=("Test",), max_examples=32)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)

  out = _export(f"--workdir={workdir}", f"--out={tmp_path / 'model.pt'}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "8 tensors of mnist_cnn" in out.stdout
  net = _torch_nets().mnist_cnn()
  net.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
  _, logits_fn, dataset = checkpoint.load_trained(workdir)
  x = np.asarray(dataset.test[0][:4])
  want = np.asarray(jax.nn.log_softmax(logits_fn(x)))
  np.testing.assert_allclose(_torch_logits(net.eval(), x.transpose(0, 3, 1, 2).copy()), want,
                             rtol=0, atol=1e-5)

  # The same run on points of an .npz (NCHW, as PyTorch users keep them), report elsewhere.
  y = np.asarray(dataset.test[1][:4]).copy()
  y[0] = (np.argmax(want[0]) + 1) % 10  # at least one point misclassified
  np.savez(tmp_path / "points.npz", x=x.transpose(0, 3, 1, 2), y=y)
  out = _dale_eval(f"--workdir={workdir}", f"--dataset={tmp_path / 'points.npz'}",
                   f"--output_dir={tmp_path / 'eval'}", "--version=custom", "--attacks=clean")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "eval" / "robustness.json") as f:
    report = json.load(f)
  assert report["clean_accuracy"] == 100.0 * np.mean(want.argmax(1) == y) < 100.0
  assert report["dataset"] == str(tmp_path / "points.npz") and report["algorithm"] == "ERM"
  assert report["workdir"] == workdir and report["eps"] == 0.3
  assert not os.path.exists(os.path.join(workdir, "robustness.json"))
