"""The site: every public module is on a reference page, and the strict build passes.

``mkdocs build --strict`` fails on any warning: a docstring section griffe cannot
parse, a parameter documented under a name the signature does not have, a link to a
page or an object that does not exist.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import require

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _public_modules() -> list[str]:
  names = []
  for path in sorted((ROOT / "dale_jax").rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    if any(p.startswith("_") for p in parts):
      continue
    names.append(".".join(parts))
  return names


def test_every_public_module_is_on_a_reference_page():
  pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md"))
  documented = set(re.findall(r"^::: (\S+)", pages, flags=re.M))
  missing = [m for m in _public_modules() if m not in documented]
  assert not missing, (
      f"public modules without a '::: module' line in docs/reference/*.md: {missing}; "
      "add each to the page of its group")


@pytest.mark.slow
def test_site_builds_without_warnings(tmp_path):
  require("mkdocs")
  require("mkdocstrings_handlers.python")
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
  assert result.returncode == 0, "\n".join(warnings) or result.stderr[-4000:]
  assert (tmp_path / "reference" / "building-blocks" / "index.html").exists()
