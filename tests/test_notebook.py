"""The example notebook runs top to bottom and shows what it claims.

``experiments/notebooks/compose_a_sampler.ipynb`` is executed in a fresh ``python3``
kernel from the repository root. It must raise nothing, train a model above 90% clean
test accuracy, show that ``pgd`` equals ``langevin_gaussian`` without noise, lower the
accuracy with every sampler at every radius it prints, and draw a figure.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from conftest import require

nbformat = require("nbformat")
nbclient = require("nbclient")
require("ipykernel")
require("matplotlib")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "notebooks" / "compose_a_sampler.ipynb"

# Per cell. The notebook takes about a minute on two idle CPU cores; the margin is for
# a loaded machine.
_CELL_TIMEOUT_S = 600

# "pgd       0.3      0.0%     0.300 [0.00, 1.00]"
_ROW = re.compile(r"^(\w+)\s+(\d\.\d)\s+(\d+\.\d)%", re.MULTILINE)


@pytest.fixture(scope="module")
def executed():
  """The notebook after execution, and the text of all its stream outputs."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs, "commit the notebook with its outputs cleared"
  client = nbclient.NotebookClient(
      nb, timeout=_CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(REPO)}})
  client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
  text = "".join(
      out.get("text", "")
      for cell in nb.cells if cell.cell_type == "code"
      for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")
  return nb, text


@pytest.mark.slow
def test_trains_an_accurate_model(executed):
  _, text = executed
  match = re.search(r"clean test accuracy: (\d+\.\d)%", text)
  assert match, text
  assert float(match.group(1)) > 90.0, text


@pytest.mark.slow
def test_pgd_is_langevin_gaussian_without_noise(executed):
  _, text = executed
  assert "pgd == langevin_gaussian(noise_scale=0): True" in text, text


@pytest.mark.slow
def test_every_sampler_lowers_the_accuracy(executed):
  _, text = executed
  rows = {(name, float(eps)): float(acc) for name, eps, acc in _ROW.findall(text)}
  clean = rows.pop(("clean", 0.0))
  assert clean > 90.0, text
  assert {name for name, _ in rows} == {"pgd", "margin"}, text
  assert {eps for _, eps in rows} == {0.1, 0.3}, text
  for (name, eps), acc in rows.items():
    assert acc < clean, (name, eps, text)
  # An undefended model has almost no accuracy left at the radius MNIST models are
  # trained for.
  assert rows["pgd", 0.3] < 10.0 and rows["margin", 0.3] < 10.0, text


@pytest.mark.slow
def test_draws_a_figure(executed):
  nb, _ = executed
  images = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if "image/png" in out.get("data", {})]
  assert images, "no image/png output"
