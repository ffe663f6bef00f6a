"""``dale-eval``: accuracy of a finished run under FGSM, PGD-20 and AutoAttack.

  dale-eval --workdir=runs/x --version=standard --n_examples=1000 --batch_size=256
  dale-eval --workdir=runs/x --version=custom --attacks=clean,apgd-ce,fab-t
  dale-eval --workdir=runs/x --save_adversarial
  dale-eval --torch_checkpoint=model.pt --arch=wrn34_10 --normalize=cifar10 \\
      --dataset=cifar10 --version=standard --output_dir=eval/model
  dale-eval --workdir=runs/x --dataset=points.npz --version=custom --attacks=clean,pgd20

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

The report also holds the result in RobustBench's model-info shape (key
``robustbench``, and ``<workdir>/model_info.json``). ``--save_adversarial``
writes ``<workdir>/adversarial.npz``: ``x_adv`` (the first adversarial example
found for every point, the clean image where none was), ``y``, ``indices``
(positions in the split) and ``broken_by`` (the attack that broke each point).

Progress is kept per attack and batch in ``<workdir>/robustness_progress/``: a
killed dale-eval, rerun with the same flags, continues where it stopped and
ends with the numbers of an uninterrupted run. The folder is removed once the
report is written.

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

import functools
import os
import shutil
import sys
from typing import Any, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from dale_jax import attacks
from dale_jax import configs
from dale_jax import data
from dale_jax import host_memory
from dale_jax import models
from dale_jax import points
from dale_jax import rundir
from dale_jax import threat
from dale_jax import validation
from dale_jax.cli import _errors

OUTPUT = rundir.ROBUSTNESS
MODEL_INFO = rundir.MODEL_INFO
ADVERSARIAL = rundir.ADVERSARIAL
PROGRESS = rundir.ROBUSTNESS_PROGRESS

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
    f"{', '.join(attacks.ATTACKS)}; otherwise clean, fgsm, pgd20, run before the chain.")
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
_APGD_STEPS = flags.DEFINE_integer("apgd_steps", 100, "Iterations of APGD-CE/APGD-T per run.")
_SQUARE_QUERIES = flags.DEFINE_integer("square_queries", 5000, "Queries of the Square attack.")
_INDIVIDUAL = flags.DEFINE_boolean(
    "individual", False, "Run every ensemble attack on all points and report each alone.")
_SAVE_ADVERSARIAL = flags.DEFINE_boolean(
    "save_adversarial", False, f"Also write the adversarial examples to <workdir>/{ADVERSARIAL}.")


def attack_settings(apgd_steps: int, square_queries: int) -> dict:
  """The per-attack overrides that the flags set."""
  return {"apgd-ce": {"steps": apgd_steps}, "apgd-dlr": {"steps": apgd_steps},
          "apgd-t": {"steps": apgd_steps}, "square": {"n_queries": square_queries}}


def table(result: dict) -> str:
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
  for w in result["warnings"]:
    lines.append(f"WARNING: {w}")
  return "\n".join(lines)


class _Evaluated(NamedTuple):
  """The model that dale-eval attacks, and what the report says about it."""
  logits_fn: Any  # a jax.tree_util.Partial holding the variables
  num_classes: int
  input_shape: tuple[int, ...]
  config: Any  # the run's ConfigDict; None for a PyTorch checkpoint
  run_dataset: Any  # the run's data.Dataset, already loaded; None for a checkpoint
  report: dict  # fields of the report that name the model
  name: str  # RobustBench's model name


def _check_flags() -> tuple[tuple[str, ...], str | None]:
  """The attack flags, checked: ``(names, version)``."""
  names = tuple(_ATTACKS.value)
  for name in names:
    if name not in attacks.ATTACKS:
      raise app.UsageError(f"--attacks: unknown attack {name!r}; known: {attacks.ATTACKS}")
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
  return names, version


def _is_named(dataset: str | None) -> bool:
  return dataset is None or dataset in data.DATASETS


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
  if not _is_named(dataset):
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


def _load_checkpoint(path: str, arch: str, normalize: str) -> _Evaluated:
  """A PyTorch checkpoint as a model in [0, 1] pixel space."""
  from dale_jax.models import torch_weights  # pylint: disable=import-outside-toplevel
  try:
    variables = torch_weights.from_torch(torch_weights.read_checkpoint(path), arch)
  except validation.BadInput as e:
    raise app.UsageError(f"--torch_checkpoint: {e}") from None
  num_classes = torch_weights.num_classes(variables, arch)
  model = models.normalized(models.get_model(arch, num_classes), normalize)
  logits_fn = jax.tree_util.Partial(functools.partial(model.apply, train=False), variables)
  report = {"model": arch, "checkpoint": os.path.abspath(path), "normalize": normalize}
  return _Evaluated(logits_fn, num_classes, torch_weights.input_shape(arch), None, None, report,
                    os.path.splitext(os.path.basename(path))[0])


def _load_run(workdir: str) -> _Evaluated:
  """A finished dale-train run's model (and its dataset)."""
  from dale_jax import train  # pylint: disable=import-outside-toplevel
  config, logits_fn, dataset = train.load_trained(workdir)
  report = {"model": str(config.model.name), "algorithm": str(config.algorithm),
            "workdir": workdir}
  return _Evaluated(logits_fn, dataset.num_classes, tuple(dataset.input_shape), config, dataset,
                    report, os.path.basename(os.path.normpath(workdir)))


def _points(evaluated: _Evaluated, npz: tuple[np.ndarray, np.ndarray] | None
            ) -> tuple[np.ndarray, np.ndarray, str, str | None]:
  """``(x, y, dataset, split)``: the points to attack, checked against the model."""
  what = (f"the run's model ({evaluated.report['model']})" if evaluated.config is not None
          else f"--arch={evaluated.report['model']}")
  if npz is not None:
    (x, y), name, split = npz, _DATASET.value, None
  else:
    config = evaluated.config
    name = _DATASET.value or str(config.dataset)
    if evaluated.run_dataset is not None and name == evaluated.run_dataset.name:
      dataset = evaluated.run_dataset
    else:
      data_dir = _DATA_DIR.value or (config.data.data_dir if config is not None else None)
      dataset = data.load(name, data_dir=data_dir)
      if dataset.num_classes != evaluated.num_classes:
        raise app.UsageError(f"--dataset={name} has {dataset.num_classes} classes, {what} "
                             f"{evaluated.num_classes}")
    split = _SPLIT.value
    x, y = getattr(dataset, split)
  if tuple(x.shape[1:]) != tuple(evaluated.input_shape):
    raise app.UsageError(f"--dataset: images of shape {tuple(x.shape[1:])} (H, W, C); {what} "
                         f"takes {tuple(evaluated.input_shape)}")
  if len(y) and int(y.max()) >= evaluated.num_classes:
    raise app.UsageError(f"--dataset: label {int(y.max())} is not a class of {what} "
                         f"({evaluated.num_classes} classes)")
  if _N_EXAMPLES.value:
    x, y = x[:_N_EXAMPLES.value], y[:_N_EXAMPLES.value]
  if len(x) == 0:
    raise app.UsageError(f"the {split} split of {name} is empty")
  return x, y, name, split


def _threat_model(evaluated: _Evaluated, dataset: str) -> tuple[float, str]:
  """``(eps, norm)``: the flags, else the run's evaluation threat model, else the
  dataset's Linf radius."""
  config = evaluated.config
  if config is not None:
    return (_EPS.value if _EPS.value is not None else float(config.eval.eps),
            _NORM.value or str(config.eval.norm))
  if _EPS.value is not None:
    return _EPS.value, _NORM.value or "linf"
  return float(configs.FAMILIES[configs.FAMILY[dataset]]["eval"]["eps"]), "linf"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # checkpoint restores log at INFO
  names, version = _check_flags()
  _check_source()
  npz = None if _is_named(_DATASET.value) else points.load_npz(_DATASET.value, "--dataset")

  host_memory.keep_freed_memory()
  if _TORCH_CHECKPOINT.value is not None:
    evaluated = _load_checkpoint(_TORCH_CHECKPOINT.value, _ARCH.value, _NORMALIZE.value)
  else:
    evaluated = _load_run(_WORKDIR.value)
  x, y, dataset, split = _points(evaluated, npz)
  eps, norm = _threat_model(evaluated, dataset)
  running = names + (attacks.chain.version(version, norm, eps)[0] if version else ())
  settings = {k: v for k, v in attack_settings(_APGD_STEPS.value, _SQUARE_QUERIES.value).items()
              if k in running}

  output_dir = _OUTPUT_DIR.value or _WORKDIR.value
  os.makedirs(output_dir, exist_ok=True)
  progress_dir = rundir.path(output_dir, PROGRESS)
  result = attacks.evaluate_robustness(
      evaluated.logits_fn, x, y, attacks=names, norm=norm, eps=eps, batch_size=_BATCH_SIZE.value,
      seed=_SEED.value, settings=settings, version=version, individual=_INDIVIDUAL.value,
      progress_dir=progress_dir, keep_adversarial=_SAVE_ADVERSARIAL.value,
      log=lambda line: print(f"dale-eval: {line}", file=sys.stderr, flush=True))
  result.update(evaluated.report, dataset=dataset, split=split)
  if _SAVE_ADVERSARIAL.value:
    x_adv, broken_by = result.pop("x_adv"), result.pop("broken_by")
    file = rundir.path(output_dir, ADVERSARIAL)
    with open(file + ".tmp", "wb") as f:
      np.savez_compressed(f, x_adv=x_adv, y=np.asarray(y), indices=np.arange(len(y)),
                          broken_by=broken_by)
    os.replace(file + ".tmp", file)
  result["robustbench"] = attacks.robustbench_model_info(
      result, dataset=dataset, architecture=evaluated.report["model"], name=evaluated.name)
  rundir.write_json(rundir.path(output_dir, MODEL_INFO), result["robustbench"], indent=2)
  rundir.write_json(rundir.path(output_dir, OUTPUT), result, indent=2)
  shutil.rmtree(progress_dir, ignore_errors=True)
  print(table(result))


def run():
  _errors.run_absl("dale-eval", main)


if __name__ == "__main__":
  run()
