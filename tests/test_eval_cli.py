"""dale-eval: restores a finished run, writes robustness.json and prints a table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dale_jax import train
from dale_jax.cli import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "experiments", "configs", "quickstart.py")


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
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(_quickstart_config(), workdir)
  assert os.path.exists(os.path.join(workdir, "done"))
  return workdir


def _dale_eval(*args):
  return subprocess.run([sys.executable, "-m", "dale_jax.cli.evaluate", *args],
                        capture_output=True, text=True, timeout=600, check=False,
                        env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.slow
def test_writes_report_and_prints_table(finished_run):
  out = _dale_eval(f"--workdir={finished_run}", "--version=custom",
                   "--attacks=clean,fgsm,pgd20,apgd-ce", "--n_examples=32", "--batch_size=16", "--eps=0.1", "--apgd_steps=5")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(finished_run, evaluate.OUTPUT)) as f:
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
  path = os.path.join(finished_run, evaluate.OUTPUT)
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
