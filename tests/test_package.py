"""The package's metadata: one version, the license and the citation file it ships with."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re

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
