"""dale-eval: restores a finished run, writes robustness.json and prints a table."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_module

from dale_jax import attacks
from dale_jax import checkpoint
from dale_jax import configs
from dale_jax import train
from dale_jax import evaluate
from dale_jax import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(configs.CONFIG_DIR, "quickstart.py")


def _quickstart_config():
  spec = importlib.util.spec_from_file_location("quickstart_config", QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # An algorithm with a dual variable, so that every part of the train state is saved.
  config = module.get_config("Gaussian_DALE_PD")
  config.num_epochs = 1
  config.batch_size = 32
  config.data.max_train_examples = 96
  config.sampler.steps = 1
  config.eval.max_examples = 32
  config.eval.evaluators = ("Clean",)
  # Flax's initialisers: after these few steps the model classifies most test digits (from
  # PyTorch's, about 11 %), so the attacks have points to work on across several batches.
  config.model.initializer = "lecun"
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(_quickstart_config(), workdir)
  assert os.path.exists(os.path.join(workdir, "done"))
  return workdir


def _dale_eval(*args):
  return run_module("dale_jax.cli.evaluate", *args)


@pytest.mark.slow
def test_writes_report_and_prints_table(finished_run):
  out = _dale_eval(f"--workdir={finished_run}", "--version=custom",
                   "--attacks=clean,fgsm,pgd20,apgd-ce", "--n_examples=32", "--batch_size=16", "--eps=0.1", "--apgd_steps=5")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(finished_run, rundir.ROBUSTNESS)) as f:
    report = json.load(f)
  assert report["dataset"] == "mnist_digits" and report["model"] == "mnist_cnn"
  assert report["algorithm"] == "Gaussian_DALE_PD" and report["split"] == "test"
  assert report["n_examples"] == 32 and report["eps"] == 0.1 and report["norm"] == "linf"
  assert list(report["per_attack"]) == ["clean", "fgsm", "pgd20", "apgd-ce"]
  assert report["attack_settings"]["apgd-ce"]["steps"] == 5
  assert report["ensemble"].startswith("custom ensemble: apgd-ce")
  for acc in report["per_attack"].values():
    assert 0.0 <= acc <= 100.0 and (acc * 32 / 100) == pytest.approx(round(acc * 32 / 100))
  assert report["robust_accuracy"] <= min(report["per_attack"].values())
  assert isinstance(report["warnings"], list)
  assert "| apgd-ce |" in out.stdout and "robust (no attack succeeded)" in out.stdout


@pytest.mark.slow
def test_bad_flags_fail_before_touching_the_report(finished_run):
  path = os.path.join(finished_run, rundir.ROBUSTNESS)
  with open(path, "w") as f:
    f.write('{"kept": true}\n')
  out = _dale_eval(f"--workdir={finished_run}", "--attacks=clean,fab-t")
  assert out.returncode != 0 and "fab-t" in out.stderr
  out = _dale_eval(f"--workdir={finished_run}/missing")
  assert out.returncode != 0 and "config.json" in out.stderr
  with open(path) as f:
    assert json.load(f) == {"kept": True}


def test_table_names_the_ensemble_and_the_warnings():
  result = {
      "per_attack": {"clean": 99.0, "pgd20": 80.0, "apgd-ce": 75.0, "apgd-t": 74.5},
      "per_attack_kind": {"clean": "individual", "pgd20": "individual",
                          "apgd-ce": "individual", "apgd-t": "cumulative"},
      "ensemble": "custom ensemble: apgd-ce, apgd-t", "ensemble_accuracy": 74.5,
      "robust_accuracy": 74.0, "n_examples": 1000, "norm": "linf", "eps": 0.3,
      "warnings": ["something looks off"], "model": "mnist_cnn", "dataset": "mnist",
      "algorithm": "PGD", "split": "test",
  }
  text = evaluate.table(result)
  assert "PGD (mnist_cnn) on mnist test: 1000 examples, linf eps=0.3" in text
  assert "| apgd-t | 74.50 | after the ensemble attacks above |" in text
  assert "| custom ensemble: apgd-ce, apgd-t | 74.50 | ensemble |" in text
  assert "| robust (no attack succeeded) | 74.00 | all |" in text
  assert "WARNING: something looks off" in text


def _report_numbers(report):
  return {k: report[k] for k in ("per_attack", "clean_accuracy", "robust_accuracy",
                                 "ensemble", "ensemble_accuracy", "attack_settings")}


@pytest.mark.slow
def test_killed_dale_eval_resumes_to_the_uninterrupted_numbers(finished_run, tmp_path):
  """SIGKILL mid-evaluation, rerun: it loads the finished batches and ends with the same report."""
  args = [f"--workdir={finished_run}", "--version=custom", "--attacks=clean,pgd20,apgd-ce,apgd-t",
          "--n_examples=64", "--batch_size=8", "--eps=0.1", "--apgd_steps=4", "--save_adversarial"]
  out = _dale_eval(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(finished_run, rundir.ROBUSTNESS)) as f:
    uninterrupted = json.load(f)
  with np.load(os.path.join(finished_run, rundir.ADVERSARIAL)) as z:
    adv_uninterrupted = {k: z[k] for k in z.files}
  progress = os.path.join(finished_run, rundir.ROBUSTNESS_PROGRESS)
  assert not os.path.exists(progress)  # removed once the report is written

  proc = subprocess.Popen([sys.executable, "-m", "dale_jax.cli.evaluate", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  deadline = time.monotonic() + 300

  def batches(attack=None):
    """Stored batches (of one attack, or of all)."""
    return [f for folder, _, files in os.walk(progress) for f in files
            if f.endswith(".npz") and (attack is None or folder.endswith("-" + attack))]

  while len(batches("apgd-ce")) < 2 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, "dale-eval finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(batches())
  assert done >= 2

  out = _dale_eval(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"{done} attack batches already done" in out.stderr
  with open(os.path.join(finished_run, rundir.ROBUSTNESS)) as f:
    resumed = json.load(f)
  assert _report_numbers(resumed) == _report_numbers(uninterrupted)
  with np.load(os.path.join(finished_run, rundir.ADVERSARIAL)) as z:
    for k in adv_uninterrupted:
      np.testing.assert_array_equal(z[k], adv_uninterrupted[k])


@pytest.mark.slow
def test_adversarial_examples_and_robustbench_record(finished_run):
  out = _dale_eval(f"--workdir={finished_run}", "--version=custom", "--attacks=clean,pgd20,apgd-ce",
                   "--n_examples=48", "--batch_size=16", "--eps=0.15", "--apgd_steps=5",
                   "--save_adversarial")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(finished_run, rundir.ROBUSTNESS)) as f:
    report = json.load(f)
  _, logits_fn, dataset = checkpoint.load_trained(finished_run)
  x, y = (a[:48] for a in dataset.test)
  with np.load(os.path.join(finished_run, rundir.ADVERSARIAL)) as z:
    x_adv, broken_by, indices = z["x_adv"], z["broken_by"], z["indices"]
    np.testing.assert_array_equal(z["y"], y)
  np.testing.assert_array_equal(indices, np.arange(48))
  assert x_adv.shape == x.shape and x_adv.dtype == np.float32
  assert np.all(np.abs(x_adv - x) <= 0.15 + 1e-6) and x_adv.min() >= 0 and x_adv.max() <= 1
  predicted = np.argmax(np.asarray(logits_fn(x_adv)), -1)
  clean_pred = np.argmax(np.asarray(logits_fn(x)), -1)
  assert set(broken_by) <= {"", "clean", "pgd20", "apgd-ce"}
  attacked = np.isin(broken_by, ["pgd20", "apgd-ce"])
  assert attacked.any() and np.all(predicted[attacked] != y[attacked])
  np.testing.assert_array_equal(x_adv[broken_by == ""], x[broken_by == ""])
  assert np.all(clean_pred[broken_by == "clean"] != y[broken_by == "clean"])
  assert 100 * np.mean(broken_by == "") == pytest.approx(report["robust_accuracy"])
  # RobustBench's model-info shape: no AutoAttack (standard) ran, so no autoattack_acc.
  with open(os.path.join(finished_run, rundir.MODEL_INFO)) as f:
    info = json.load(f)
  assert info == report["robustbench"]
  assert info["clean_acc"] == f"{report['clean_accuracy']:.2f}"
  assert info["autoattack_acc"] is None and "custom ensemble" in info["footnote"]
  assert info["threat_model"] == "Linf" and info["eps"] == 0.15 and info["n_examples"] == 48
  assert info["dataset"] == "mnist_digits" and info["architecture"] == "mnist_cnn"


def test_robustbench_record_of_the_standard_version():
  result = {"ensemble": "AutoAttack (standard)", "ensemble_accuracy": 71.0,
            "clean_accuracy": 97.4, "eps": 0.3, "norm": "linf", "n_examples": 500, "seed": 0}
  info = attacks.robustbench_model_info(result, dataset="mnist", architecture="mnist_cnn",
                                        name="run")
  assert info["autoattack_acc"] == "71.00" and info["clean_acc"] == "97.40"
  assert info["autoattack_version"] == "standard" and info["footnote"] is None
  for field in ("link", "name", "authors", "additional_data", "number_forward_passes",
                "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                "autoattack_acc", "footnote"):
    assert field in info  # RobustBench's ModelInfo fields
