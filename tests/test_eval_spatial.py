"""Spatial attacks in dale-eval: the grid and worst-of-k over rotations, translations, SE(2).

The accuracies of :func:`dale_jax.attacks.robustness.evaluate_spatial` are checked against a
reference that walks the grid one point at a time in NumPy (the angles and shifts
written out in degrees and pixels, each warped image classified on its own), for
every number of grid points per forward pass; the worst-of-k draws against the
same draws made one example at a time.
"""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from conftest import run_module

from dale_jax import perturbations
from dale_jax import rundir
from dale_jax.attacks import robustness

SIZE = 10


def _model():
  """A fixed random linear classifier of 10x10 images, and images it classifies."""
  rng = np.random.RandomState(0)
  w = rng.randn(SIZE * SIZE, 4).astype(np.float32)
  # Smooth blobs, so that small warps change the logits a little, large ones a lot.
  rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
  centres = rng.uniform(2, SIZE - 3, size=(24, 2))
  x = np.exp(-((rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2) / 6.0)
  x = x[..., None].astype(np.float32)

  def logits_fn(params, images):
    return images.reshape(images.shape[0], -1) @ params

  fn = jax.tree_util.Partial(logits_fn, jnp.asarray(w))
  y = np.argmax(np.asarray(fn(jnp.asarray(x))), -1).astype(np.int32)
  y[:3] = (y[:3] + 1) % 4  # three points misclassified clean
  return fn, x, y


def _classified(fn, images, y):
  return np.argmax(np.asarray(fn(jnp.asarray(images))), -1) == y


def _grid_reference(fn, x, y, angle, shift, counts):
  """Right at every grid point, one point at a time (and clean), in NumPy."""
  values = [np.linspace(-r, r, n) if n > 1 else np.zeros(1)
            for r, n in zip((angle, shift[0], shift[1]), counts)]
  right = _classified(fn, x, y)
  for a, sx, sy in itertools.product(*values):
    n = len(x)
    warped = perturbations.warp(jnp.asarray(x), jnp.full(n, a), jnp.full(n, sx), jnp.full(n, sy))
    right &= _classified(fn, np.clip(np.asarray(warped), 0, 1), y)
  return 100.0 * right.mean(), len(list(itertools.product(*values)))


@pytest.mark.slow
def test_grid_is_the_worst_case_over_its_points_for_every_chunk():
  fn, x, y = _model()
  angle, shift, counts = 40.0, (2.0, 1.0), (5, 3, 2)
  expected, points = _grid_reference(fn, x, y, angle, shift, counts)
  assert 0 < expected < 100 - 3 * 100 / len(x)  # the grid breaks some points, not all
  settings = {"name": "se2", "angle": angle, "shift": shift}
  for chunk, batch_size in ((1, 24), (4, 8), (7, 24), (0, 5)):  # 30 points: 4 and 7 pad
    out = robustness.evaluate_spatial(fn, x, y, perturbation=settings, searches=("grid",),
                                   grid_points=counts, batch_size=batch_size, grid_chunk=chunk)
    assert out["per_attack"] == {"grid": pytest.approx(expected, abs=1e-6)}, chunk
    assert out["candidates"] == {"grid": points} and out["grid_points"] == list(counts)
    assert out["clean_accuracy"] == pytest.approx(100 * 21 / 24)
    assert out["grid_chunk"] == (chunk or points)
  assert out["perturbation"] == {"name": "se2", "angle": 40.0, "shift": [2.0, 1.0],
                                 "padding": "zeros", "linf_eps": 0.0}


@pytest.mark.slow
def test_worst_of_k_draws_per_example_whatever_the_batch():
  fn, x, y = _model()
  k, seed = 6, 3
  pset = perturbations.rotation(45.0)
  search_key = jax.random.fold_in(jax.random.key(seed), (1 << 21) + 1)
  right = _classified(fn, x, y)
  for i in range(len(x)):
    example_key = jax.random.fold_in(search_key, i)
    # Draw j of example i: from its own key, as if it were alone in its batch.
    angles = np.array([float(pset.uniform(jax.random.fold_in(example_key, j),
                                          jnp.asarray(x[i:i + 1]))[0, 0]) for j in range(k)])
    assert np.all(np.abs(angles) <= 1) and len(set(angles)) == k
    warped = perturbations.warp(jnp.asarray(np.repeat(x[i:i + 1], k, 0)), angles * 45.0,
                                jnp.zeros(k), jnp.zeros(k))
    right[i] &= _classified(fn, np.clip(np.asarray(warped), 0, 1), y[i]).all()
  expected = 100.0 * right.mean()
  assert 0 < expected < 100 * 21 / 24
  for batch_size in (24, 7):
    out = robustness.evaluate_spatial(fn, x, y, perturbation={"name": "rotation", "angle": 45.0},
                                   searches=("worst_of_k",), worst_of_k=k, seed=seed,
                                   batch_size=batch_size)
    assert out["per_attack"] == {"worst_of_k": pytest.approx(expected, abs=1e-6)}
    assert out["candidates"] == {"worst_of_k": k} and out["grid_points"] is None


def test_automatic_chunk_fills_a_forward_pass():
  assert robustness.spatial_chunk(0, 125, 8) == 125
  assert robustness.spatial_chunk(0, 125, robustness.SPATIAL_ROWS // 10) == 10
  assert robustness.spatial_chunk(0, 125, 4 * robustness.SPATIAL_ROWS) == 1
  assert robustness.spatial_chunk(7, 125, 8) == 7 and robustness.spatial_chunk(200, 125, 8) == 125


@pytest.mark.parametrize("kwargs,field", [
    (dict(searches=("grid", "pgd")), "spatial"),
    (dict(perturbation={"name": "lp"}), "perturbation.name"),
    (dict(perturbation={"name": "se2", "linf_eps": 0.1}), "perturbation.linf_eps"),  # no grid
    (dict(grid_points=(5, 5)), "grid_points"),
    (dict(perturbation={"name": "rotation", "angle": -1.0}), "perturbation.angle"),
    (dict(worst_of_k=0), "worst_of_k"),
])
def test_bad_spatial_settings_name_the_field(kwargs, field):
  args = dict(perturbation={"name": "se2"}, searches=("grid", "worst_of_k"), grid_points=3,
              worst_of_k=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=rf"^{field}"):
    robustness.check_spatial(**args)


@pytest.fixture(scope="module")
def finished_run(pgd_tiny_run):
  return pgd_tiny_run


def _dale_eval(*args):
  return run_module("dale_jax.cli.evaluate", *args)


@pytest.mark.slow
def test_dale_eval_reports_the_spatial_attacks(finished_run, tmp_path):
  out = _dale_eval(f"--workdir={finished_run}", f"--output_dir={tmp_path}", "--version=custom",
                   "--attacks=clean", "--n_examples=24", "--batch_size=8",
                   "--spatial=grid,worst_of_k", "--perturbation=se2", "--angle=20", "--shift=2",
                   "--grid_points=3,3,2", "--worst_of_k=4", "--grid_chunk=5")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / rundir.ROBUSTNESS) as f:
    report = json.load(f)
  spatial = report["spatial"]
  assert spatial["perturbation"] == {"name": "se2", "angle": 20.0, "shift": [2.0, 2.0],
                                     "padding": "zeros", "linf_eps": 0.0}
  assert spatial["candidates"] == {"grid": 18, "worst_of_k": 4} and spatial["n_examples"] == 24
  assert spatial["grid_points"] == [3, 3, 2] and spatial["grid_chunk"] == 5
  assert spatial["clean_accuracy"] == report["clean_accuracy"]
  for acc in spatial["per_attack"].values():
    assert 0 <= acc <= report["clean_accuracy"]
  assert f"| grid | {spatial['per_attack']['grid']:.2f} | 18 grid points (3 x 3 x 2) |" \
      in out.stdout, out.stdout
  assert "| worst_of_k |" in out.stdout and "se2: angle 20" in out.stdout
  assert not os.path.exists(tmp_path / rundir.ROBUSTNESS_PROGRESS)

  # The run's eval section is the default: se2, 30 degrees, 3 pixels, (5, 5, 5), k = 10.
  out = _dale_eval(f"--workdir={finished_run}", f"--output_dir={tmp_path}", "--version=custom",
                   "--attacks=clean", "--n_examples=8", "--spatial=grid,worst_of_k")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / rundir.ROBUSTNESS) as f:
    spatial = json.load(f)["spatial"]
  assert spatial["perturbation"]["angle"] == 30.0 and spatial["perturbation"]["shift"] == [3, 3]
  assert spatial["candidates"] == {"grid": 125, "worst_of_k": 10}


@pytest.mark.slow
def test_bad_spatial_flags_are_one_line_before_anything_runs(finished_run, tmp_path):
  for flags, message in (
      (["--spatial=grid,rotate"], "--spatial"),
      (["--spatial=grid", "--perturbation=rotation", "--grid_points=5,5"], "--grid_points"),
      (["--spatial=grid", "--grid_points=5,x"], "--grid_points"),
      (["--spatial=grid", "--angle=-3"], "--angle"),
      (["--spatial=grid", "--shift=1,2,3"], "--shift"),
      (["--spatial=grid", "--linf_eps=0.1"], "--linf_eps must be 0 for the grid"),
      (["--spatial=worst_of_k", "--worst_of_k=0"], "--worst_of_k"),
      (["--grid_chunk=4"], "--grid_chunk"),
  ):
    out = _dale_eval(f"--workdir={finished_run}", f"--output_dir={tmp_path}", *flags)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("dale-eval: error: ") and message in lines[0], lines
  assert os.listdir(tmp_path) == []


def test_a_rerun_loads_the_finished_spatial_batches(tmp_path):
  fn, x, y = _model()
  kw = dict(perturbation={"name": "translation", "shift": (2.0, 2.0)}, grid_points=3,
            worst_of_k=2, batch_size=8, progress_dir=str(tmp_path))
  first = robustness.evaluate_spatial(fn, x, y, **kw)
  stored = sorted(f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".npz"))
  assert len(stored) == 6  # 21 points right clean: three batches of each search
  lines = []
  again = robustness.evaluate_spatial(fn, x, y, log=lines.append, **kw)
  assert lines == [lines[0]] and "6 spatial batches already done" in lines[0]
  assert again["per_attack"] == first["per_attack"]
  assert again["attack_seconds"] == first["attack_seconds"]  # loaded, not recomputed
