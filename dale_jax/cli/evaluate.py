"""``dale-eval``: accuracy of a finished run under FGSM, PGD-20 and AutoAttack.

  dale-eval --workdir=runs/x --version=standard --n_examples=1000 --batch_size=256
  dale-eval --workdir=runs/x --version=custom --attacks=clean,apgd-ce,fab-t
  dale-eval --workdir=runs/x --save_adversarial

Restores the run's latest checkpoint, attacks the first ``n_examples`` test
images (all by default) at the run's evaluation threat model (``--eps`` and
``--norm`` override it), writes ``<workdir>/robustness.json`` and prints a
table. ``--version=standard`` runs AutoAttack's standard chain (APGD-CE, APGD-T,
FAB-T, Square; each only on the points the previous ones did not break) after
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
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from dale_jax import attacks
from dale_jax import host_memory
from dale_jax import rundir
from dale_jax import threat
from dale_jax import validation
from dale_jax.cli import _errors

OUTPUT = rundir.ROBUSTNESS
MODEL_INFO = rundir.MODEL_INFO
ADVERSARIAL = rundir.ADVERSARIAL
PROGRESS = rundir.ROBUSTNESS_PROGRESS

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a finished dale-train run.")
_ATTACKS = flags.DEFINE_list(
    "attacks", ["clean", "pgd20"],
    "Attacks to run, in order: with --version=custom any of "
    f"{', '.join(attacks.ATTACKS)}; otherwise clean, fgsm, pgd20, run before the chain.")
_VERSION = flags.DEFINE_enum(
    "version", "standard", ["standard", "plus", "rand", "custom"],
    "AutoAttack's chain by name (as AutoAttack(version=...)), or custom: --attacks only.")
_N_EXAMPLES = flags.DEFINE_integer("n_examples", 0, "Evaluate the first N examples (0: all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Examples per attack call.")
_EPS = flags.DEFINE_float("eps", None, "Radius of the threat model (default: the run's eval eps).")
_NORM = flags.DEFINE_enum("norm", None, list(threat.NORMS),
                          "Norm of the threat model (default: the run's eval norm).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"], "Split to evaluate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random draw of the attacks.")
_APGD_STEPS = flags.DEFINE_integer("apgd_steps", 100, "Iterations of APGD-CE/APGD-T per run.")
_SQUARE_QUERIES = flags.DEFINE_integer("square_queries", 5000, "Queries of the Square attack.")
_INDIVIDUAL = flags.DEFINE_boolean(
    "individual", False, "Run every ensemble attack on all points and report each alone.")
_SAVE_ADVERSARIAL = flags.DEFINE_boolean(
    "save_adversarial", False, f"Also write the adversarial examples to <workdir>/{ADVERSARIAL}.")
flags.mark_flags_as_required(["workdir"])


def attack_settings(apgd_steps: int, square_queries: int) -> dict:
  """The per-attack overrides that the flags set."""
  return {"apgd-ce": {"steps": apgd_steps}, "apgd-dlr": {"steps": apgd_steps},
          "apgd-t": {"steps": apgd_steps}, "square": {"n_queries": square_queries}}


def table(result: dict) -> str:
  """A Markdown table of a robustness report."""
  title = (f"{result.get('algorithm', '?')} ({result.get('model', '?')}) on "
           f"{result.get('dataset', '?')} {result.get('split', '')}: {result['n_examples']} "
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # checkpoint restores log at INFO
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
  workdir = _WORKDIR.value
  if not rundir.has_config(workdir):
    raise app.UsageError(f"--workdir: {workdir} holds no config.json of a dale-train run")

  host_memory.keep_freed_memory()
  from dale_jax import train  # pylint: disable=import-outside-toplevel
  config, logits_fn, dataset = train.load_trained(workdir)
  x, y = getattr(dataset, _SPLIT.value)
  if _N_EXAMPLES.value:
    x, y = x[:_N_EXAMPLES.value], y[:_N_EXAMPLES.value]
  if len(x) == 0:
    raise app.UsageError(f"the {_SPLIT.value} split of {config.dataset} is empty")
  eps = _EPS.value if _EPS.value is not None else float(config.eval.eps)
  norm = _NORM.value or str(config.eval.norm)
  running = names + (attacks.chain.version(version, norm, eps)[0] if version else ())
  settings = {k: v for k, v in attack_settings(_APGD_STEPS.value, _SQUARE_QUERIES.value).items()
              if k in running}

  progress_dir = rundir.path(workdir, PROGRESS)
  result = attacks.evaluate_robustness(
      logits_fn, x, y, attacks=names, norm=norm, eps=eps, batch_size=_BATCH_SIZE.value,
      seed=_SEED.value, settings=settings, version=version, individual=_INDIVIDUAL.value,
      progress_dir=progress_dir, keep_adversarial=_SAVE_ADVERSARIAL.value,
      log=lambda line: print(f"dale-eval: {line}", file=sys.stderr, flush=True))
  result.update(model=str(config.model.name), dataset=str(config.dataset),
                algorithm=str(config.algorithm), split=_SPLIT.value, workdir=workdir)
  if _SAVE_ADVERSARIAL.value:
    x_adv, broken_by = result.pop("x_adv"), result.pop("broken_by")
    file = rundir.path(workdir, ADVERSARIAL)
    with open(file + ".tmp", "wb") as f:
      np.savez_compressed(f, x_adv=x_adv, y=np.asarray(y), indices=np.arange(len(y)),
                          broken_by=broken_by)
    os.replace(file + ".tmp", file)
  result["robustbench"] = attacks.robustbench_model_info(
      result, dataset=str(config.dataset), architecture=str(config.model.name),
      name=os.path.basename(os.path.normpath(workdir)))
  rundir.write_json(rundir.path(workdir, MODEL_INFO), result["robustbench"], indent=2)
  rundir.write_json(rundir.path(workdir, OUTPUT), result, indent=2)
  shutil.rmtree(progress_dir, ignore_errors=True)
  print(table(result))


def run():
  _errors.run_absl("dale-eval", main)


if __name__ == "__main__":
  run()
