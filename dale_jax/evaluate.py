"""Robustness of a finished run or of a PyTorch checkpoint: the report ``dale-eval`` writes.

::

  from dale_jax import evaluate
  result = evaluate.evaluate_run("runs/x", version="standard", n_examples=1000)
  model = evaluate.from_torch_checkpoint("model.pt", "wrn28_10", normalize="cifar10")
  result = evaluate.evaluate_model(model, dataset="cifar10", version="standard",
                                   output_dir="eval/model")

Both attack the points (a split of a dataset, or an ``.npz``) with
:func:`dale_jax.attacks.evaluate_robustness` and write into the output folder
(the run's workdir by default) the files named in :mod:`dale_jax.rundir`:
``robustness.json`` (the report), ``model_info.json`` (RobustBench's model-info
shape, also the report's ``robustbench`` key) and, with ``save_adversarial``,
``adversarial.npz``: ``x_adv`` (the first adversarial example found for every
point, the clean image where none was), ``y``, ``indices`` and ``broken_by`` (the
attack that broke each point). With ``spatial``, the grid and worst-of-k attacks
over rotations, translations or SE(2)
(:func:`dale_jax.attacks.robustness.evaluate_spatial`) run after the Lp ones and
are reported under the report's ``spatial`` key. Progress is kept per attack and batch in
``robustness_progress/``, so a killed evaluation, rerun with the same arguments,
continues where it stopped with the numbers of an uninterrupted run; the folder
is removed once the report is written.

Several processes or hosts evaluate together under ``jax.distributed``
(:func:`dale_jax.parallel.initialize_distributed`, which :func:`evaluate_run` calls
with its ``parallel`` settings, the fields of a config's ``parallel`` section):
every process runs the same call, feeds its own rows of every batch and gets the
same report; process 0 alone writes the files and keeps the progress, so the
output folder need only be on its host, and a resumed run may use another number
of processes as long as the device count stays the same.

Bad input (images of a shape the model does not take, labels it does not know, an
empty split) raises :class:`dale_jax.validation.BadInput` before anything is
compiled or written.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from dale_jax import attacks as attacks_lib
from dale_jax import checkpoint
from dale_jax import configs
from dale_jax import data
from dale_jax import models
from dale_jax import parallel as parallel_lib
from dale_jax import points
from dale_jax import rundir
from dale_jax import validation
from dale_jax.attacks import robustness


class Model(NamedTuple):
  """A model to attack, and what the report says about it.

  Attributes:
    logits_fn: ``x -> logits`` in eval mode on ``[0, 1]`` images, a
      ``jax.tree_util.Partial`` holding the variables.
    num_classes: logits.
    input_shape: ``(H, W, C)`` of the images it takes.
    config: the run's config (``None`` for a PyTorch checkpoint).
    dataset: the run's :class:`dale_jax.data.Dataset`, loaded (``None`` for a checkpoint).
    report: the report's fields that name the model (``model``, ``algorithm``, ...).
    name: RobustBench's model name.
  """
  logits_fn: Any
  num_classes: int
  input_shape: tuple[int, ...]
  config: Any
  dataset: Any
  report: dict
  name: str


def from_run(workdir: str) -> Model:
  """A finished dale-train run's model (latest checkpoint) and its dataset."""
  config, logits_fn, dataset = checkpoint.load_trained(workdir)
  report = {"model": str(config.model.name), "algorithm": str(config.algorithm),
            "workdir": workdir}
  return Model(logits_fn, dataset.num_classes, tuple(dataset.input_shape), config, dataset,
               report, os.path.basename(os.path.normpath(workdir)))


def from_torch_checkpoint(path: str, arch: str, normalize: str = "none") -> Model:
  """A PyTorch ``state_dict`` of ``arch`` as a model on ``[0, 1]`` images.

  ``normalize`` (a key of :data:`dale_jax.models.NORMALIZATIONS`) is the input
  normalisation its training used, put inside the model as RobustBench does.
  """
  from dale_jax.models import torch_weights  # pylint: disable=import-outside-toplevel

  try:
    variables = torch_weights.from_torch(torch_weights.read_checkpoint(path), arch)
  except validation.BadInput as e:
    raise validation.BadInput(f"--torch_checkpoint: {e}") from None
  num_classes = torch_weights.num_classes(variables, arch)
  model = models.normalized(models.get_model(arch, num_classes), normalize)
  logits_fn = jax.tree_util.Partial(functools.partial(model.apply, train=False), variables)
  report = {"model": arch, "checkpoint": os.path.abspath(path), "normalize": normalize}
  return Model(logits_fn, num_classes, torch_weights.input_shape(arch), None, None, report,
               os.path.splitext(os.path.basename(path))[0])


def is_named(dataset: str | None) -> bool:
  """Whether ``dataset`` names a dataset (``None``: the run's) rather than an ``.npz`` file."""
  return dataset is None or dataset in data.DATASETS


def select_points(model: Model, *, dataset: str | None = None, split: str = "test",
                  data_dir: str | None = None, n_examples: int = 0,
                  loaded: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, str, str | None]:
  """``(x, y, dataset, split)``: the points to attack, checked against ``model``.

  ``dataset`` names a dataset (default: the run's) whose ``split`` is taken, or an
  ``.npz`` file of points (:func:`dale_jax.points.load_npz`, or its arrays ``loaded``
  already; ``split`` is then ``None``); the first ``n_examples`` (0: all).
  """
  what = (f"the run's model ({model.report['model']})" if model.config is not None
          else f"--arch={model.report['model']}")
  if not is_named(dataset):
    (x, y), name, split = loaded or points.load_npz(dataset, "--dataset"), dataset, None
  else:
    validation.one_of("split", split, ("test", "validation"))
    config = model.config
    if dataset is None and config is None:
      raise validation.BadInput("--dataset is required to evaluate a --torch_checkpoint")
    name = dataset or str(config.dataset)
    if model.dataset is not None and name == model.dataset.name:
      loaded = model.dataset
    else:
      data_dir = data_dir or (config.data.data_dir if config is not None else None)
      loaded = data.load(name, data_dir=data_dir)
      if loaded.num_classes != model.num_classes:
        raise validation.BadInput(f"--dataset={name} has {loaded.num_classes} classes, {what} "
                                  f"{model.num_classes}")
    x, y = getattr(loaded, split)
  if tuple(x.shape[1:]) != tuple(model.input_shape):
    raise validation.BadInput(f"--dataset: images of shape {tuple(x.shape[1:])} (H, W, C); "
                              f"{what} takes {tuple(model.input_shape)}")
  if len(y) and int(y.max()) >= model.num_classes:
    raise validation.BadInput(f"--dataset: label {int(y.max())} is not a class of {what} "
                              f"({model.num_classes} classes)")
  if n_examples:
    x, y = x[:n_examples], y[:n_examples]
  if len(x) == 0:
    raise validation.BadInput(f"the {split} split of {name} is empty")
  return x, y, name, split


def threat_model(model: Model, dataset: str, eps: float | None = None,
                 norm: str | None = None) -> tuple[float, str]:
  """``(eps, norm)``: the arguments, else the run's evaluation threat model, else the
  dataset's Linf radius (8/255 on CIFAR-10 and SVHN, 0.3 on MNIST)."""
  config = model.config
  if config is not None:
    return (eps if eps is not None else float(config.eval.eps), norm or str(config.eval.norm))
  if eps is not None:
    return eps, norm or "linf"
  if not is_named(dataset):
    raise validation.BadInput("--eps is required to evaluate a --torch_checkpoint on an .npz: "
                              "there is no dataset to take the radius from")
  if norm not in (None, "linf"):
    raise validation.BadInput(f"--eps is required with --norm={norm} and a --torch_checkpoint: "
                              "the datasets' default radius is for linf")
  return float(configs.FAMILIES[configs.FAMILY[dataset]]["eval"]["eps"]), "linf"


def spatial_threat(evaluation: Mapping[str, Any] | None,
                   perturbation: Mapping[str, Any] | None = None,
                   grid_points: int | Sequence[int] | None = None,
                   worst_of_k: int | None = None) -> tuple[dict, Any, int]:
  """``(perturbation, grid_points, worst_of_k)`` of the spatial attacks: each argument
  (``perturbation``'s fields override), else ``evaluation``, a run's ``eval`` section
  (``eval.perturbation``, ``eval.grid_points``, ``eval.worst_of_k``), else the
  defaults of :func:`dale_jax.attacks.robustness.check_spatial` (SE(2), 30 degrees,
  3 pixels), 5 points per axis and 10 draws.

  A run's ``eval.grid_points`` written per axis of another set (``(5, 5, 5)`` of
  SE(2) when ``perturbation`` names a rotation) is taken when its counts are equal.
  """
  settings = dict(evaluation["perturbation"]) if evaluation is not None else {}
  settings.update(perturbation or {})
  if grid_points is None:
    grid_points = evaluation["grid_points"] if evaluation is not None else 5
    if not validation.is_integer(grid_points):
      grid_points = tuple(grid_points)
      if len(set(grid_points)) == 1:
        grid_points = grid_points[0]
  if worst_of_k is None:
    worst_of_k = int(evaluation["worst_of_k"]) if evaluation is not None else 10
  return settings, grid_points, worst_of_k


def evaluate_model(model: Model, *, output_dir: str, attacks: Sequence[str] = ("clean", "pgd20"),
                   version: str | None = None, dataset: str | None = None, split: str = "test",
                   data_dir: str | None = None, n_examples: int = 0, batch_size: int = 256,
                   eps: float | None = None, norm: str | None = None, seed: int = 0,
                   apgd_steps: int | None = None, square_queries: int | None = None,
                   individual: bool = False, save_adversarial: bool = False,
                   spatial: Sequence[str] = (), perturbation: Mapping[str, Any] | None = None,
                   grid_points: int | Sequence[int] | None = None,
                   worst_of_k: int | None = None, grid_chunk: int = 0,
                   loaded: tuple[np.ndarray, np.ndarray] | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
  """Attacks ``model`` and writes the report into ``output_dir``; returns the report.

  Args:
    model: from :func:`from_run` or :func:`from_torch_checkpoint`.
    output_dir: where the report files go (created).
    attacks: names from :data:`dale_jax.attacks.ATTACKS`, measured first.
    version: ``None`` or one of AutoAttack's versions (``"standard"``, ``"plus"``,
      ``"rand"``): its chain runs after ``attacks``.
    dataset, split, data_dir, n_examples, loaded: the points (:func:`select_points`).
    batch_size: points per attack call.
    eps, norm: the threat model (:func:`threat_model`).
    seed: of every random draw of the attacks.
    apgd_steps, square_queries: budgets other than the attacks' defaults
      (:func:`dale_jax.attacks.budget_settings`).
    individual: every chain attack on every correctly classified point.
    save_adversarial: also write ``adversarial.npz``.
    spatial: spatial attacks to run after the Lp ones (``"grid"``,
      ``"worst_of_k"``: :func:`dale_jax.attacks.robustness.evaluate_spatial`),
      reported under the report's ``spatial`` key.
    perturbation, grid_points, worst_of_k: their threat model
      (:func:`spatial_threat`).
    grid_chunk: grid points per forward pass (0: as many as fit
      :data:`dale_jax.attacks.robustness.SPATIAL_ROWS` images per device).
    log: called with a line per attack and batch (on process 0 only).

  Under ``jax.distributed`` (initialised before ``model`` is built) every process
  calls this with the same arguments and returns the same report; process 0
  writes the files.
  """
  x, y, dataset, split = select_points(model, dataset=dataset, split=split, data_dir=data_dir,
                                       n_examples=n_examples, loaded=loaded)
  eps, norm = threat_model(model, dataset, eps, norm)
  running = tuple(attacks) + (attacks_lib.version(version, norm, eps)[0] if version else ())
  settings = attacks_lib.budget_settings(running, apgd_steps=apgd_steps,
                                                  square_queries=square_queries)
  if spatial:
    spatial_settings, grid_points, worst_of_k = spatial_threat(
        model.config.eval if model.config is not None else None, perturbation, grid_points,
        worst_of_k)
    robustness.check_spatial(spatial_settings, spatial, grid_points, worst_of_k, grid_chunk)
  main = parallel_lib.is_main_process()
  if main:
    os.makedirs(output_dir, exist_ok=True)
  progress_dir = rundir.path(output_dir, rundir.ROBUSTNESS_PROGRESS)
  result = attacks_lib.evaluate_robustness(
      model.logits_fn, x, y, attacks=tuple(attacks), norm=norm, eps=eps, batch_size=batch_size,
      seed=seed, settings=settings, version=version, individual=individual,
      progress_dir=progress_dir, keep_adversarial=save_adversarial, log=log if main else None)
  if spatial:
    result["spatial"] = robustness.evaluate_spatial(
        model.logits_fn, x, y, perturbation=spatial_settings, searches=tuple(spatial),
        grid_points=grid_points, worst_of_k=worst_of_k, batch_size=batch_size,
        grid_chunk=grid_chunk, seed=seed, progress_dir=progress_dir, log=log if main else None)
  result.update(model.report, dataset=dataset, split=split)
  result["robustbench"] = attacks_lib.robustbench_model_info(
      result, dataset=dataset, architecture=model.report["model"], name=model.name)
  if save_adversarial:
    x_adv, broken_by = result.pop("x_adv"), result.pop("broken_by")
  if not main:
    return result
  if save_adversarial:
    file = rundir.path(output_dir, rundir.ADVERSARIAL)
    with open(file + ".tmp", "wb") as f:
      np.savez_compressed(f, x_adv=x_adv, y=np.asarray(y), indices=np.arange(len(y)),
                          broken_by=broken_by)
    os.replace(file + ".tmp", file)
  rundir.write_json(rundir.path(output_dir, rundir.MODEL_INFO), result["robustbench"], indent=2)
  rundir.write_json(rundir.path(output_dir, rundir.ROBUSTNESS), result, indent=2)
  shutil.rmtree(progress_dir, ignore_errors=True)
  return result


def evaluate_run(workdir: str, *, output_dir: str | None = None,
                 parallel: Mapping[str, Any] | None = None, **kwargs: Any) -> dict:
  """:func:`evaluate_model` on the run in ``workdir``, the report in ``workdir`` by default.

  ``parallel``: :func:`dale_jax.parallel.initialize_distributed`'s arguments
  (``coordinator_address``, ``num_processes``, ``process_id``, ``auto``: a config's
  ``parallel`` section), to evaluate with several processes; default one.

  Raises:
    dale_jax.checkpoint.MissingCheckpointError: ``workdir`` holds no checkpoint.
  """
  if not rundir.has_config(workdir):
    raise validation.BadInput(f"--workdir: {workdir} holds no config.json of a dale-train run")
  if parallel:
    parallel_lib.check_distributed(**parallel)
    parallel_lib.initialize_distributed(**parallel)
  return evaluate_model(from_run(workdir), output_dir=output_dir or workdir, **kwargs)


def table(result: Mapping[str, Any]) -> str:
  """A Markdown table of a robustness report."""
  trained = result.get("algorithm") or os.path.basename(result.get("checkpoint") or "") or "?"
  data_name = " ".join(str(p) for p in (result.get("dataset", "?"), result.get("split")) if p)
  title = (f"{trained} ({result.get('model', '?')}) on {data_name}: {result['n_examples']} "
           f"examples, {result['norm']} eps={result['eps']:.4g}")
  rows = ["| attack | accuracy (%) | measured |", "|---|---|---|"]
  for name, acc in result["per_attack"].items():
    kind = result["per_attack_kind"][name]
    measured = "after the ensemble attacks above" if kind == "cumulative" else "alone"
    rows.append(f"| {name} | {acc:.2f} | {measured} |")
  label = result.get("ensemble")
  if label and result.get("ensemble_accuracy") is not None:
    rows.append(f"| {label} | {result['ensemble_accuracy']:.2f} | ensemble |")
  rows.append(f"| robust (no attack succeeded) | {result['robust_accuracy']:.2f} | all |")
  lines = [title, "", *rows]
  if result.get("spatial"):
    lines += ["", *_spatial_rows(result["spatial"])]
  for w in result["warnings"]:
    lines.append(f"WARNING: {w}")
  return "\n".join(lines)


def _spatial_rows(spatial: Mapping[str, Any]) -> list[str]:
  """The spatial attacks' lines of :func:`table`."""
  p = spatial["perturbation"]
  parts = {"rotation": [f"angle {p['angle']:g} deg"],
           "translation": [f"shift ({p['shift'][0]:g}, {p['shift'][1]:g}) px"],
           "se2": [f"angle {p['angle']:g} deg", f"shift ({p['shift'][0]:g}, {p['shift'][1]:g}) px"]}
  described = ", ".join(parts[p["name"]] + [f"{p['padding']} padding"]
                        + ([f"then Linf {p['linf_eps']:g}"] if p.get("linf_eps") else []))
  rows = [f"Spatial attacks, {p['name']}: {described}, either way", "",
          "| spatial attack | accuracy (%) | candidates per point |", "|---|---|---|"]
  for name, acc in spatial["per_attack"].items():
    count = spatial["candidates"][name]
    what = (f"{count} grid points ({' x '.join(str(c) for c in spatial['grid_points'])})"
            if name == "grid" else f"{count} uniform draws")
    rows.append(f"| {name} | {acc:.2f} | {what} |")
  return rows
