"""``dale-eval``: accuracy of a finished run under FGSM, PGD-20 and AutoAttack.

  dale-eval --workdir=runs/x --version=standard --n_examples=1000 --batch_size=256
  dale-eval --workdir=runs/x --version=custom --attacks=clean,apgd-ce,fab-t
  dale-eval --workdir=runs/x --save_adversarial
  dale-eval --torch_checkpoint=model.pt --arch=wrn34_10 --normalize=cifar10 \\
      --dataset=cifar10 --version=standard --output_dir=eval/model
  dale-eval --workdir=runs/x --dataset=points.npz --version=custom --attacks=clean,pgd20
  dale-eval --workdir=runs/x --spatial=grid,worst_of_k --perturbation=se2 --angle=30 \\
      --shift=3 --grid_points=5

Restores the run's latest checkpoint, attacks the first ``n_examples`` test
images (all by default) at the run's evaluation threat model (``--eps`` and
``--norm`` override it), writes ``<workdir>/robustness.json`` (or into
``--output_dir``) and prints a table. ``--version=standard`` runs AutoAttack's
standard chain (APGD-CE, APGD-T, FAB-T, Square; each only on the points the
previous ones did not break) after
the ``--attacks`` (by default clean and PGD-20); ``plus`` is AutoAttack's
"plus" chain; ``rand`` is APGD-CE and APGD-DLR with EOT over 20 draws (meant
for randomised defences; the trained models are deterministic, so it reduces
to APGD-CE and APGD-DLR and says so); ``custom`` runs exactly ``--attacks``.

The report files (``robustness.json``, ``model_info.json`` in RobustBench's
shape, ``adversarial.npz`` with ``--save_adversarial``) and the progress kept per
attack and batch, so that a killed dale-eval rerun with the same flags continues
where it stopped: :mod:`dale_jax.evaluate`, the library this command calls.

Spatial threat models: ``--spatial=grid,worst_of_k`` runs the training evaluators
Grid (every combination of ``--grid_points`` values per parameter, ends included)
and Worst-of-K (``--worst_of_k`` uniform draws per point) over ``--perturbation``
(rotation, translation or se2, with ``--angle``, ``--shift``, ``--padding`` and, for
worst_of_k, ``--linf_eps``), each by default the run's ``eval`` section's. A point
counts as robust when it is classified right clean and at every candidate. The
grid is tried ``--grid_chunk`` points per forward pass (by default as many as
fit); the results go under ``spatial`` in ``robustness.json`` and into a table of
their own.

Several processes or hosts (as dale-train's ``config.parallel``): ``--auto`` reads
them from the cluster, e.g. one ``srun`` task per host or GPU::

  srun --nodes=2 --ntasks-per-node=4 --gpus-per-task=1 \\
      dale-eval --workdir=runs/x --version=standard --auto

or ``--coordinator_address=host:port --num_processes=N --process_id=I`` on each
process. Every process feeds its rows of each batch; process 0 prints the table and
writes the files, which are those of one process on as many devices.

A model trained in PyTorch: ``--torch_checkpoint`` (a ``state_dict`` saved by
``torch.save``, or a checkpoint dict holding one under ``state_dict``,
``model_state_dict`` or ``model``) in the parameter names of ``--arch``
(:mod:`dale_jax.models.torch_weights` lists them), with ``--normalize`` the input
normalisation its training used, put inside the model so that the attacks work
on ``[0, 1]`` images. ``--dataset`` and ``--output_dir`` are then required (the
files above go to ``--output_dir``), and ``--eps`` defaults to the dataset's
evaluation radius (8/255 on CIFAR-10 and SVHN, 0.3 on MNIST; Linf).

``--dataset`` names a dataset (``cifar10``, ...; the run's by default) or an
``.npz`` file of points to evaluate on (:func:`dale_jax.points.load_npz`: ``x``
in ``[0, 1]``, NHWC or NCHW, and integer ``y``); with an ``.npz`` and a
checkpoint ``--eps`` is required. Bad input (a file that does not exist, an
unknown ``--arch``, a ``state_dict`` whose keys are not the architecture's, images
of a shape the model does not take) ends in one line and exit status 2 before
anything is compiled or written.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

from dale_jax import attacks
from dale_jax import data
from dale_jax import evaluate
from dale_jax import host_memory
from dale_jax import models
from dale_jax import parallel
from dale_jax import perturbations
from dale_jax import points
from dale_jax import rundir
from dale_jax import threat
from dale_jax import validation
from dale_jax.attacks import robustness
from dale_jax.cli import _errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a finished dale-train run.")
_TORCH_CHECKPOINT = flags.DEFINE_string(
    "torch_checkpoint", None,
    "A PyTorch state_dict (.pt) to evaluate instead of a run; needs --arch, --dataset and "
    "--output_dir.")
_ARCH = flags.DEFINE_enum("arch", None, list(models.MODELS),
                          "Architecture of --torch_checkpoint (its PyTorch parameter names).")
_NORMALIZE = flags.DEFINE_enum(
    "normalize", "none", list(models.NORMALIZATIONS),
    "Per-channel input normalisation of --torch_checkpoint's model, applied inside it.")
_DATASET = flags.DEFINE_string(
    "dataset", None,
    f"A dataset ({', '.join(data.DATASETS)}) or an .npz of points (x in [0, 1], NHWC or NCHW; "
    "integer y); default: the run's.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data directory of --dataset (default: the run's, or tfds' default).")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where the report goes: default --workdir; required with "
    "--torch_checkpoint.")
_ATTACKS = flags.DEFINE_list(
    "attacks", ["clean", "pgd20"],
    "Attacks to run, in order: with --version=custom any of "
    f"{', '.join(attacks.ATTACKS)} (or their labels: APGD-CE, PGD-20, ...); otherwise "
    "clean, fgsm, pgd20, run before the chain.")
_VERSION = flags.DEFINE_enum(
    "version", "standard", ["standard", "plus", "rand", "custom"],
    "AutoAttack's chain by name (as AutoAttack(version=...)), or custom: --attacks only.")
_N_EXAMPLES = flags.DEFINE_integer("n_examples", 0, "Evaluate the first N examples (0: all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Examples per attack call.")
_EPS = flags.DEFINE_float(
    "eps", None, "Radius of the threat model (default: the run's eval eps, or with "
    "--torch_checkpoint the dataset's Linf eval eps).")
_NORM = flags.DEFINE_enum("norm", None, list(threat.NORMS),
                          "Norm of the threat model (default: the run's eval norm, else linf).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"],
                           "Split of a named --dataset to evaluate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random draw of the attacks.")
_APGD_STEPS = flags.DEFINE_integer("apgd_steps", attacks.APGD_STEPS,
                                   "Iterations of APGD-CE/APGD-DLR/APGD-T per run.")
_SQUARE_QUERIES = flags.DEFINE_integer("square_queries", attacks.SQUARE_QUERIES,
                                       "Queries of the Square attack.")
_INDIVIDUAL = flags.DEFINE_boolean(
    "individual", False, "Run every ensemble attack on all points and report each alone.")
_SAVE_ADVERSARIAL = flags.DEFINE_boolean(
    "save_adversarial", False, f"Also write the adversarial examples to <workdir>/{rundir.ADVERSARIAL}.")
# Several processes or hosts: the fields of dale-train's config.parallel section.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0, with --num_processes > 1 "
    "(config.parallel.coordinator_address).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "Processes evaluating together, each with its own rows of every "
    "batch; process 0 writes the report (config.parallel.num_processes).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", 0, "This process's id, 0 to --num_processes - 1 (config.parallel.process_id).")
_AUTO = flags.DEFINE_boolean(
    "auto", False, "Read the coordinator, the process count and this process's id from the "
    "cluster's environment (an srun task, a Cloud TPU pod, Open MPI) instead "
    "(config.parallel.auto).")
# Spatial attacks: the training evaluators Grid and Worst-of-K, their threat model the
# fields of config.eval (perturbation, grid_points, worst_of_k), the run's by default.
_SPATIAL = flags.DEFINE_list(
    "spatial", [], f"Spatial attacks to run after the Lp ones: {', '.join(robustness.SPATIAL)} "
    "(the training evaluators Grid and Worst-of-K).")
_PERTURBATION = flags.DEFINE_enum(
    "perturbation", None, list(perturbations.NAMES[1:]),
    "The geometric set the spatial attacks search (default: the run's "
    "eval.perturbation.name, else se2).")
_ANGLE = flags.DEFINE_float(
    "angle", None, "Largest rotation either way, degrees (default: the run's "
    "eval.perturbation.angle, else 30).")
_SHIFT = flags.DEFINE_list(
    "shift", None, "Largest shift either way, pixels: one value for both axes or x,y "
    "(default: the run's eval.perturbation.shift, else 3,3).")
_PADDING = flags.DEFINE_enum(
    "padding", None, list(perturbations.PADDINGS),
    "What a warp reads outside the image (default: the run's eval.perturbation.padding, "
    "else zeros).")
_LINF_EPS = flags.DEFINE_float(
    "linf_eps", None, "An additive Linf ball of this radius after the warp, worst_of_k only "
    "(default: the run's eval.perturbation.linf_eps, else 0).")
_GRID_POINTS = flags.DEFINE_list(
    "grid_points", None, "Grid points per axis, ends included: one count for every axis or "
    "one per axis (default: the run's eval.grid_points, else 5).")
_WORST_OF_K = flags.DEFINE_integer(
    "worst_of_k", None, "Uniform draws per point of worst_of_k (default: the run's "
    "eval.worst_of_k, else 10).")
_GRID_CHUNK = flags.DEFINE_integer(
    "grid_chunk", 0, "Grid points per forward pass (0: as many as keep a pass within "
    f"{robustness.SPATIAL_ROWS} images per device).")


def _check_flags() -> tuple[tuple[str, ...], str | None]:
  """The attack flags, checked: ``(names, version)``."""
  try:
    names = tuple(attacks.canonical(name) for name in _ATTACKS.value)
  except validation.InvalidArgument as e:
    raise app.UsageError(f"--attacks: {e}") from None
  version = None if _VERSION.value == "custom" else _VERSION.value
  if version is not None:
    chain = [n for n in names if n not in ("clean", "fgsm", "pgd20")]
    if chain:
      raise app.UsageError(
          f"--attacks names {', '.join(chain)}: with --version={version} the chain is the "
          "version's; use --version=custom to choose every attack")
  for flag in (_N_EXAMPLES,):
    if flag.value < 0:
      raise app.UsageError(f"--{flag.name} must be >= 0, got {flag.value}")
  for flag in (_BATCH_SIZE, _APGD_STEPS, _SQUARE_QUERIES):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  if _EPS.value is not None:
    validation.nonnegative("--eps", _EPS.value)
  parallel.check_distributed(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                             _PROCESS_ID.value, _AUTO.value, prefix="--")
  return names, version


def _spatial_flags() -> dict:
  """The spatial attacks' flags, checked, as :func:`dale_jax.evaluate.evaluate_model`'s
  keyword arguments (``None`` where the run's config or the default decides)."""
  spatial = tuple(_SPATIAL.value)
  for name in spatial:
    validation.one_of("--spatial", name, robustness.SPATIAL)
  given = [f for f in (_PERTURBATION, _ANGLE, _SHIFT, _PADDING, _LINF_EPS, _GRID_POINTS,
                       _WORST_OF_K, _GRID_CHUNK) if f.present]
  if given and not spatial:
    raise app.UsageError(f"--{given[0].name} describes the spatial attacks: add "
                         f"--spatial={','.join(robustness.SPATIAL)} (or one of them)")
  perturbation = {}
  for flag, field in ((_PERTURBATION, "name"), (_PADDING, "padding")):
    if flag.value is not None:
      perturbation[field] = flag.value
  if _ANGLE.value is not None:
    perturbation["angle"] = validation.positive("--angle", _ANGLE.value)
  if _LINF_EPS.value is not None:
    perturbation["linf_eps"] = validation.nonnegative("--linf_eps", _LINF_EPS.value)
  if _SHIFT.value is not None:
    shift = _numbers("--shift", _SHIFT.value, float)
    validation.require(len(shift) in (1, 2) and all(v >= 0 for v in shift) and any(shift),
                       "--shift", "one or two pixel counts >= 0 (x,y), not all 0",
                       ",".join(_SHIFT.value))
    perturbation["shift"] = tuple(shift) * (3 - len(shift))
  grid_points = None
  if _GRID_POINTS.value is not None:
    grid_points = _numbers("--grid_points", _GRID_POINTS.value, int)
    validation.require(len(grid_points) >= 1 and all(n >= 1 for n in grid_points),
                       "--grid_points", "counts >= 1 (one, or one per axis)",
                       ",".join(_GRID_POINTS.value))
    grid_points = grid_points[0] if len(grid_points) == 1 else tuple(grid_points)
  if _WORST_OF_K.value is not None:
    validation.integer("--worst_of_k", _WORST_OF_K.value, minimum=1)
  validation.integer("--grid_chunk", _GRID_CHUNK.value, minimum=0)
  return dict(spatial=spatial, perturbation=perturbation, grid_points=grid_points,
              worst_of_k=_WORST_OF_K.value, grid_chunk=_GRID_CHUNK.value)


def _numbers(field: str, values, kind) -> list:
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise validation.InvalidArgument(field, f"{kind.__name__} values", ",".join(values)) from None


def _check_spatial(spatial: dict) -> None:
  """The spatial threat model, with the run's config filling in what the flags leave."""
  if not spatial["spatial"]:
    return
  evaluation = (rundir.read_config(_WORKDIR.value).get("eval")
                if _WORKDIR.value is not None else None)
  settings, grid_points, worst_of_k = evaluate.spatial_threat(
      evaluation, spatial["perturbation"], spatial["grid_points"], spatial["worst_of_k"])
  try:
    robustness.check_spatial(settings, spatial["spatial"], grid_points, worst_of_k,
                             spatial["grid_chunk"])
  except validation.InvalidArgument as e:  # named as the flag that sets the field
    field = e.field.removeprefix("perturbation.")
    raise validation.InvalidArgument("--" + ("perturbation" if field == "name" else field),
                                     rest=e.rest) from None


def _check_source() -> None:
  """What to evaluate and on which points: the flags checked against each other and the
  files they name, before anything is loaded."""
  workdir, checkpoint, dataset = _WORKDIR.value, _TORCH_CHECKPOINT.value, _DATASET.value
  if (workdir is None) == (checkpoint is None):
    raise app.UsageError("give one of --workdir (a dale-train run) and --torch_checkpoint (a "
                         "PyTorch state_dict)" + (", not both" if workdir else ""))
  if checkpoint is None:
    if _ARCH.value is not None or _NORMALIZE.value != "none":
      raise app.UsageError("--arch and --normalize describe a --torch_checkpoint; a dale-train "
                           "run's model is its config's and takes [0, 1] images")
    if not rundir.has_config(workdir):
      raise app.UsageError(f"--workdir: {workdir} holds no config.json of a dale-train run")
  else:
    if _ARCH.value is None:
      raise app.UsageError(f"--torch_checkpoint needs --arch, one of {', '.join(models.MODELS)}")
    for flag, what in ((_DATASET, "a dataset or an .npz of points"),
                       (_OUTPUT_DIR, "where the report goes")):
      if flag.value is None:
        raise app.UsageError(f"--torch_checkpoint needs --{flag.name} ({what})")
    if not os.path.isfile(checkpoint):
      raise app.UsageError(f"--torch_checkpoint: {checkpoint} does not exist")
    from dale_jax.models import torch_weights  # pylint: disable=import-outside-toplevel
    stats, channels = models.NORMALIZATIONS[_NORMALIZE.value], torch_weights.input_shape(
        _ARCH.value)[-1]
    if stats is not None and len(stats[0]) != channels:
      raise app.UsageError(f"--normalize={_NORMALIZE.value} is for {len(stats[0])} channels; "
                           f"--arch={_ARCH.value} takes {channels}")
  if not evaluate.is_named(dataset):
    if not os.path.isfile(dataset):
      raise app.UsageError(f"--dataset: {dataset} is neither a dataset "
                           f"({', '.join(data.DATASETS)}) nor a file")
    if _SPLIT.present:
      raise app.UsageError("--split chooses a split of a named --dataset, not of an .npz")
    if checkpoint is not None and _EPS.value is None:
      raise app.UsageError("--eps is required to evaluate a --torch_checkpoint on an .npz: "
                           "there is no dataset to take the radius from")
  if checkpoint is not None and _EPS.value is None and _NORM.value not in (None, "linf"):
    raise app.UsageError(f"--eps is required with --norm={_NORM.value} and a --torch_checkpoint: "
                         "the datasets' default radius is for linf")
  output_dir = _OUTPUT_DIR.value
  if output_dir is not None and os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise app.UsageError(f"--output_dir: {output_dir} is a file, not a directory")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # checkpoint restores log at INFO
  names, version = _check_flags()
  spatial = _spatial_flags()
  _check_source()
  _check_spatial(spatial)
  # An .npz is read (and refused, if it is) before the model is: its errors come first.
  loaded = None if evaluate.is_named(_DATASET.value) else points.load_npz(_DATASET.value,
                                                                          "--dataset")
  host_memory.keep_freed_memory()
  parallel.initialize_distributed(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value, auto=_AUTO.value, prefix="--")
  if _TORCH_CHECKPOINT.value is not None:
    model = evaluate.from_torch_checkpoint(_TORCH_CHECKPOINT.value, _ARCH.value, _NORMALIZE.value)
  else:
    model = evaluate.from_run(_WORKDIR.value)
  result = evaluate.evaluate_model(
      model, output_dir=_OUTPUT_DIR.value or _WORKDIR.value, attacks=names, version=version,
      dataset=_DATASET.value, split=_SPLIT.value, data_dir=_DATA_DIR.value,
      n_examples=_N_EXAMPLES.value, batch_size=_BATCH_SIZE.value, eps=_EPS.value,
      norm=_NORM.value, seed=_SEED.value, apgd_steps=_APGD_STEPS.value,
      square_queries=_SQUARE_QUERIES.value, individual=_INDIVIDUAL.value,
      save_adversarial=_SAVE_ADVERSARIAL.value, loaded=loaded, **spatial,
      log=lambda line: print(f"dale-eval: {line}", file=sys.stderr, flush=True))
  if parallel.is_main_process():
    print(evaluate.table(result))


def run():
  _errors.run_absl("dale-eval", main)


if __name__ == "__main__":
  run()
