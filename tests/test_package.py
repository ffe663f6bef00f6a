"""The package: one version, the license and citation it ships with, and what importing it costs."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import dale_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_version_is_written_once_and_every_file_agrees():
  assert importlib.metadata.version("dale_jax") == dale_jax.__version__
  cff = (ROOT / "CITATION.cff").read_text()
  assert re.search(rf"^version: {re.escape(dale_jax.__version__)}$", cff, re.M)
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert f"## {dale_jax.__version__}" in changelog


def test_license_and_citation_name_the_software_and_the_paper():
  assert (ROOT / "LICENSE").read_text().startswith("MIT License")
  assert importlib.metadata.metadata("dale_jax")["License"] == "MIT"
  cff = (ROOT / "CITATION.cff").read_text()
  assert "Adversarial Robustness with Semi-Infinite Constrained Learning" in cff
  assert "arXiv:2110.15767" in cff


def test_the_package_and_the_research_tools_import_without_starting_jax():
  # dale_jax's submodules load on first use; what launches and reads runs (the sweep,
  # collect, plot and results-page commands, validation, the run directory) never needs
  # JAX, so a login node or a laptop without an accelerator imports it in a moment.
  modules = ("dale_jax", "dale_jax.validation", "dale_jax.rundir", "dale_jax.research.sweep",
             "dale_jax.research.collect", "dale_jax.research.paper", "dale_jax.cli.sweep",
             "dale_jax.cli.collect", "dale_jax.cli.plot", "dale_jax.cli.paper")
  code = ("import sys, importlib\n"
          f"for m in {modules!r}: importlib.import_module(m)\n"
          "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, check=True).stdout
  assert out.strip() == "[]", out
  # ... and the public names are there when asked for.
  code = ("import dale_jax\n"
          "assert callable(dale_jax.evaluate_run) and callable(dale_jax.build)\n"
          "assert dale_jax.TrainState.__name__ == 'TrainState'\n"
          "assert set(dale_jax.__all__) <= set(dir(dale_jax))")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
