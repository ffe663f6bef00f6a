"""experiments/fidelity/advbench_digits.py without advbench: its flags, the torchvision
stub, the weight conversion check, the schedule and the resumable results file.

The authors' checkout is not needed (nor available on CI): a fake advbench folder
stands in where the script only imports it, and torch_reference's ``MnistCNN`` (the
same layers under the same names as advbench's ``MNISTNet``) where it converts weights.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import require

pytestmark = [pytest.mark.slow, pytest.mark.torch]

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = _ROOT / "experiments" / "fidelity" / "advbench_digits.py"


@pytest.fixture(scope="module")
def runner():
  spec = importlib.util.spec_from_file_location("advbench_digits", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _refused(runner, capsys, argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    runner.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


@pytest.mark.parametrize("flag,value", [("--num_epochs", "0"), ("--max_train_examples", "-3"),
                                        ("--seeds", "0,-1"), ("--seeds", "1,1"),
                                        ("--algorithms", ",")])
def test_bad_counts_and_lists_are_refused_in_one_line_naming_the_flag(runner, capsys, tmp_path,
                                                                      flag, value):
  argv = [f"--advbench={tmp_path}", "--algorithms=PGD", f"--output_dir={tmp_path}", f"{flag}={value}"]
  assert flag in _refused(runner, capsys, argv)


def test_a_folder_that_is_not_an_advbench_checkout_is_refused(runner, capsys, tmp_path):
  err = _refused(runner, capsys, [f"--advbench={tmp_path}", "--algorithms=PGD",
                                  f"--output_dir={tmp_path / 'out'}"])
  assert "--advbench" in err and "advbench/algorithms.py" in err
  assert not (tmp_path / "out").exists()


_FAKE_ALGORITHMS = """
import torchvision.models as models  # as advbench's networks.py
from torchvision.datasets import MNIST  # as advbench's datasets.py

ALGORITHMS = ["ERM", "PGD"]

class Algorithm:
  def step(self, imgs, labels):
    raise NotImplementedError

class ERM(Algorithm):
  def step(self, imgs, labels):
    pass

class PGD(ERM):
  pass

class MART(Algorithm):
  def step(self, imgs, labels):
    pass

class MMA(Algorithm):
  pass
"""


def _fake_advbench(root: pathlib.Path) -> pathlib.Path:
  package = root / "advbench"
  package.mkdir(parents=True)
  for name in ("attacks", "hparams_registry", "networks", "datasets"):
    (package / f"{name}.py").write_text("")
  (package / "optimizers.py").write_text("class PrimalDualOptimizer:\n  pass\n")
  (package / "algorithms.py").write_text(_FAKE_ALGORITHMS)
  return root


def test_unknown_algorithm_is_refused_listing_advbenchs_trainable_classes(tmp_path):
  """In a fresh process: the fake checkout imports torchvision, which only the stub provides."""
  checkout = _fake_advbench(tmp_path / "checkout")
  proc = subprocess.run(
      [sys.executable, str(_SCRIPT), f"--advbench={checkout}", "--algorithms=ERM,Foo",
       f"--output_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=_ROOT, timeout=120)
  err = proc.stderr.strip()
  assert proc.returncode == 2, err
  assert len(err.splitlines()) == 1 and "--algorithms" in err and "'Foo'" in err, err
  assert "ERM, PGD" in err and "MART" in err  # the list, then the class it leaves out
  assert "MMA" not in err  # a class without a step of its own does not train
  assert not (tmp_path / "out").exists()


def _digits(n: int) -> np.ndarray:
  from dale_jax import data  # pylint: disable=import-outside-toplevel
  return np.asarray(data.load("mnist_digits", validation_size=0).test[0][:n])


def test_conversion_check_passes_the_converted_network_and_fails_a_wrong_conversion(runner):
  torch = require("torch")
  from dale_jax import models  # pylint: disable=import-outside-toplevel
  from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  classifier = torch_reference.MnistCNN()
  with torch.no_grad():  # confident outputs, as after training: log-probabilities far from -log 10
    classifier.fc2.weight.mul_(20.0)
  classifier.train()
  model = models.get_model("mnist_cnn", 10)
  x = _digits(8)
  variables = runner.to_dale_variables(classifier)
  assert runner.check_conversion(classifier, variables, model, x) <= 1e-4
  assert classifier.training  # left in the mode it was in

  # fc1 transposed without reordering its rows from torch's (c, h, w) to Flax's (h, w, c).
  wrong = {"params": dict(variables["params"])}
  wrong["params"]["fc1"] = dict(wrong["params"]["fc1"],
                                kernel=classifier.fc1.weight.detach().numpy().T)
  assert runner.conversion_error(classifier, wrong, model, x) > 1e-2
  with pytest.raises(AssertionError, match="did not convert"):
    runner.check_conversion(classifier, wrong, model, x)


def test_learning_rate_per_epoch_is_dale_jaxs_schedule(runner):
  from dale_jax import experiment  # pylint: disable=import-outside-toplevel

  config = runner.quickstart_config("PGD")
  steps_per_epoch = 62
  schedule = experiment.learning_rate_schedule(config, steps_per_epoch)
  rates = [runner.learning_rate(config, e) for e in range(config.num_epochs)]
  assert rates == pytest.approx([float(schedule(e * steps_per_epoch))
                                 for e in range(config.num_epochs)])
  assert rates[0] == pytest.approx(0.02) and rates[-1] == pytest.approx(0.002)


def test_results_file_resumes_its_own_setting_and_refuses_another(runner, tmp_path):
  from dale_jax import validation  # pylint: disable=import-outside-toplevel

  setting = {"advbench_commit": "bd2071d", "num_epochs": 8, "train_examples": 4000}
  path = tmp_path / "results.jsonl"
  assert runner.finished_runs(str(path), setting) == set()
  lines = [{"algorithm": "PGD", "seed": 0, "setting": setting},
           {"algorithm": "ERM", "seed": 1, "setting": setting}]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  assert runner.finished_runs(str(path), setting) == {("PGD", 0), ("ERM", 1)}
  with pytest.raises(validation.InvalidArgument, match=r"--output_dir .*num_epochs 8, now 1"):
    runner.finished_runs(str(path), dict(setting, num_epochs=1))
  path.write_text("not json\n")
  with pytest.raises(validation.InvalidArgument, match="line 1"):
    runner.finished_runs(str(path), setting)


class _Meter:
  def __init__(self):
    self.reset()

  def reset(self):
    self.val, self.sum, self.count, self.avg = 0.0, 0.0, 0, 0.0

  def update(self, val, n=1):
    self.val, self.sum, self.count = val, self.sum + val * n, self.count + n
    self.avg = self.sum / self.count


def _mnist_net(torch):
  """advbench's MNISTNet's layers under its names, in a class of its own (not the
  project's torch_reference.MnistCNN), as the runner meets it."""

  class MNISTNet(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1, self.conv2 = torch.nn.Conv2d(1, 32, 3, 1), torch.nn.Conv2d(32, 64, 3, 1)
      self.dropout1, self.dropout2 = torch.nn.Dropout(0.25), torch.nn.Dropout(0.5)
      self.fc1, self.fc2 = torch.nn.Linear(9216, 128), torch.nn.Linear(128, 10)

  return MNISTNet()


def _recording_algorithm(torch, nan_at_step: int | None):
  """An advbench-shaped algorithm that records its batches and learning rates, and whose
  loss meter turns NaN (with NaN weights) at step ``nan_at_step``."""

  class Recording(torch.nn.Module):
    def __init__(self, input_shape, num_classes, hparams, device):
      super().__init__()
      assert input_shape == (1, 28, 28) and num_classes == 10 and device == "cpu"
      self.classifier = _mnist_net(torch)
      self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=hparams["learning_rate"])
      self.meters = {"Loss": _Meter()}
      self.seen, self.rates, self.modes, self.draws = [], [], [], []

    def step(self, imgs, labels):
      self.seen.append(labels.clone())
      self.draws.append(torch.rand(()).item())  # as dropout and the attacks draw
      self.rates.append(self.optimizer.param_groups[0]["lr"])
      self.modes.append(self.training)
      loss = 1.0
      if len(self.seen) - 1 == nan_at_step:
        loss = float("nan")
        with torch.no_grad():
          self.classifier.fc2.weight.fill_(float("nan"))
      self.meters["Loss"].update(loss, n=imgs.size(0))

    def reset_meters(self):
      for m in self.meters.values():
        m.reset()

  return Recording


def _train(runner, torch, nan_at_step=None, seed=0, n=200, epochs=8):
  import types  # pylint: disable=import-outside-toplevel
  from dale_jax import data  # pylint: disable=import-outside-toplevel

  x, y = data.load("mnist_digits", validation_size=0).train
  fake = types.SimpleNamespace(algorithms=types.SimpleNamespace(
      Recording=_recording_algorithm(torch, nan_at_step)))
  config = runner.quickstart_config("ERM")
  hparams = {"learning_rate": config.optimizer.learning_rate, "batch_size": config.batch_size}
  return runner.train_advbench(fake, "Recording", hparams, config, x[:n], y[:n],
                               num_classes=10, seed=seed, num_epochs=epochs)


def test_training_drops_the_last_batch_sets_the_rate_per_epoch_and_shuffles_by_seed(runner):
  torch = require("torch")
  run = _train(runner, torch)
  model = run["algorithm"]
  assert [len(b) for b in model.seen] == [64] * 3 * 8  # 200 digits: 3 full batches an epoch
  assert model.rates == pytest.approx([0.02] * 18 + [0.002] * 6)
  assert all(model.modes)
  assert [e["meters"] for e in run["epochs"]] == [{"Loss": 1.0}] * 8
  assert not run["diverged_at"] and not run["non_finite_weights"]
  epoch0, epoch1 = torch.cat(model.seen[:3]), torch.cat(model.seen[3:6])
  assert not torch.equal(epoch0, epoch1)  # a new order every epoch
  again = _train(runner, torch, seed=0)["algorithm"].seen
  other = _train(runner, torch, seed=1)["algorithm"].seen
  assert all(torch.equal(a, b) for a, b in zip(model.seen, again))
  assert not all(torch.equal(a, b) for a, b in zip(model.seen, other))


def test_a_non_finite_meter_stops_training_and_is_flagged(runner):
  torch = require("torch")
  run = _train(runner, torch, nan_at_step=4)
  assert run["diverged_at"] == {"epoch": 1, "step": 1, "non_finite": ["Loss"]}
  assert len(run["algorithm"].seen) == 5 and len(run["epochs"]) == 2
  assert run["epochs"][1]["meters"] == {"Loss": None}  # NaN is written as null, not hidden
  assert run["non_finite_weights"] == ["fc2.weight"]


def test_start_from_dale_jax_takes_its_initial_weights_and_batch_order(runner):
  torch = require("torch")
  from dale_jax import data  # pylint: disable=import-outside-toplevel
  from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel

  config = runner.quickstart_config("PGD")
  x, y = data.load("mnist_digits").train
  x, y = x[:200], y[:200]
  advbench = types.SimpleNamespace(
      algorithms=types.SimpleNamespace(PGD=_recording_algorithm(torch, None)))
  run = runner.train_advbench(advbench, "PGD", {"batch_size": 64, "learning_rate": 0.02},
                              config, x, y, num_classes=10, seed=3, num_epochs=2,
                              start="dale_jax")
  model = run["algorithm"]
  # The batches are dale-train's: the labels of data.batches for seed 3, epochs 0 and 1.
  want = [by for e in range(2) for _, by in data.batches(x, y, 64, seed=3, epoch=e)]
  assert [b.tolist() for b in model.seen] == [w.tolist() for w in want]
  # The weights (untouched by the recording step) are dale-train's initial ones for seed 3,
  # which differ from seed 4's.
  params = runner.dale_initial_variables(config, 3)["params"]
  expected = torch_reference.MnistCNN()
  torch_reference.load_flax_variables(expected, {"params": params})
  for name, tensor in expected.state_dict().items():
    torch.testing.assert_close(model.classifier.state_dict()[name], tensor, rtol=0, atol=0)
  other = runner.dale_initial_variables(config, 4)["params"]
  assert not np.array_equal(np.asarray(other["fc2"]["kernel"]),
                            np.asarray(params["fc2"]["kernel"]))


def test_the_torch_seed_offset_reseeds_torchs_draws_alone_from_dale_jaxs_start(runner):
  torch = require("torch")
  from dale_jax import data  # pylint: disable=import-outside-toplevel

  config = runner.quickstart_config("PGD")
  x, y = data.load("mnist_digits").train

  def train(seed, offset):
    advbench = types.SimpleNamespace(
        algorithms=types.SimpleNamespace(PGD=_recording_algorithm(torch, None)))
    return runner.train_advbench(advbench, "PGD", {"batch_size": 64, "learning_rate": 0.02},
                                 config, x[:200], y[:200], num_classes=10, seed=seed,
                                 num_epochs=1, start="dale_jax",
                                 torch_seed_offset=offset)["algorithm"]

  base, moved, seed1 = train(3, 0), train(3, 1), train(4, 0)
  # The same batches and initial weights (dale_jax's seed 3); torch's own draws are
  # those of torch seed 4, i.e. seed 4's with no offset.
  assert [b.tolist() for b in moved.seen] == [b.tolist() for b in base.seen]
  for name, tensor in base.classifier.state_dict().items():
    torch.testing.assert_close(moved.classifier.state_dict()[name], tensor, rtol=0, atol=0)
  assert moved.draws != base.draws and moved.draws == seed1.draws
  # An offset is part of the results file's setting, so runs with and without one never
  # share a file; without one the setting is as before.
  advbench = types.SimpleNamespace(commit="bd2071d")
  plain = runner.run_setting(advbench, config, 200, 100, "dale_jax")
  assert "torch_seed_offset" not in plain
  assert runner.run_setting(advbench, config, 200, 100, "dale_jax", 1) == dict(
      plain, torch_seed_offset=1)
