"""``dale-collect``: result tables of a sweep after model and hyperparameter selection.

Example::

  dale-collect --input_dir=/tmp/sweep --plots

prints, per dataset and selection method (LastStep, EarlyStop), a table of test
accuracies (mean ± std over trials, hparams seed chosen by mean validation
``PGD-Accuracy``, or ``Clean-Accuracy`` when there is no PGD evaluation) as
Markdown and LaTeX, and writes ``results.csv`` (every split and metric),
``results.md`` and ``results.tex`` into ``--input_dir``; ``--plots`` also draws
the figures into ``<input_dir>/plots/<dataset>/``.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags

from dale_jax import rundir
from dale_jax import validation
from dale_jax.cli import _errors
from dale_jax.cli import _flags
from dale_jax.research import collect

PROG = "dale-collect"
SPLITS = rundir.SPLIT_KEYS  # the split flags' values and the record keys they stand for
FORMATS = ("markdown", "latex")


def define_selection_flags(flag_values: flags.FlagValues) -> None:
  """Flags shared by ``dale-collect`` and ``dale-plot``, defined in ``flag_values``."""
  flags.DEFINE_string("input_dir", None, "A sweep's output_dir, or one run's workdir.",
                      flag_values=flag_values)
  flags.DEFINE_string(
      "selection_metric", None, "Validation metric for model and hparams selection "
      f"(default {collect.DEFAULT_METRIC}, falling back to {collect.FALLBACK_METRIC}).",
      flag_values=flag_values)
  flags.DEFINE_enum("split", "test", list(SPLITS), "Split shown in tables and plots.",
                    case_sensitive=False, flag_values=flag_values)
  _flags.define_name_list("algorithms", None, "Algorithms shown, comma-separated, in this "
                          "order (default: all, alphabetical).", flag_values)
  flags.DEFINE_bool("include_incomplete", False, "Also read runs without a 'done' file.",
                    flag_values=flag_values)
  flags.DEFINE_enum(
      "plot_selection", "EarlyStop", list(collect.SELECTION_METHODS), "Selection method "
      "whose choices the plots show (LastStep where a dataset has no validation records).",
      flag_values=flag_values)
  _flags.mark_required(["input_dir"], flag_values)


FLAGS = flags.FlagValues()
define_selection_flags(FLAGS)
_flags.define_enum_list(
    "selection", list(collect.SELECTION_METHODS), collect.SELECTION_METHODS,
    "Model selection methods of the tables, comma-separated.", FLAGS)
_flags.define_name_list("metrics", None, "Table columns, comma-separated (default: every "
                        "*-Accuracy of the split).", FLAGS)
_flags.define_enum_list("format", list(FORMATS), FORMATS, "Printed formats, comma-separated.",
                        FLAGS)
flags.DEFINE_integer("decimals", 1, "Decimals of accuracies (losses get two more).",
                     lower_bound=0, upper_bound=10, flag_values=FLAGS)
flags.DEFINE_bool("plots", False, "Also draw figures into <input_dir>/plots (needs "
                  "matplotlib), for --plot_selection.", flag_values=FLAGS)


def split_key(flag_value: str) -> str:
  """The record key (``Test``) of a ``--split`` value (``test``)."""
  return rundir.split_key(flag_value)


def load(args: flags.FlagValues) -> list[collect.Run]:
  """Loads the runs named by the shared flags, reporting skipped incomplete runs; no
  finished run is bad input."""
  if not os.path.isdir(args.input_dir):
    raise validation.InvalidArgument(f"--input_dir={args.input_dir}: is not a directory")
  runs = collect.load_runs(args.input_dir, include_incomplete=args.include_incomplete)
  if args.algorithms:
    runs = [r for r in runs if r.algorithm in args.algorithms]
  if not args.include_incomplete:
    skipped = collect.count_incomplete(args.input_dir)
    if skipped:
      print(f"# skipped {skipped} incomplete run(s) (no 'done' file); "
            "--include_incomplete reads them", file=sys.stderr)
  return runs


def choose(runs: Sequence[collect.Run], selection: str, metric: str | None,
           fallback: str | None = None) -> list[collect.Choice]:
  """:func:`collect.choose` per dataset; where ``selection`` needs validation records
  that a dataset lacks, ``fallback`` is used instead (or the dataset is left out),
  with a note on stderr."""
  choices = []
  for dataset in sorted({r.dataset for r in runs}):
    group = [r for r in runs if r.dataset == dataset]
    try:
      choices.extend(collect.choose(group, selection, metric))
    except collect.NoValidationError as e:
      if fallback is None:
        print(f"# {selection} left out for {dataset}: {e}", file=sys.stderr)
      else:
        print(f"# {fallback} instead of {selection} for {dataset}: {e}", file=sys.stderr)
        choices.extend(collect.choose(group, fallback, metric))
  return choices


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (without the program name) and collects; returns the exit code.

  Bad input (a flag, a folder without finished runs, runs that must not be averaged)
  is one line ``dale-collect: error: ...`` and exit status 2, and nothing is written."""
  _flags.parse(PROG, FLAGS, argv, description=__doc__,
               renamed={"precision": "--decimals"})
  with _errors.one_line(PROG):
    return _collect(FLAGS)


def _collect(args: flags.FlagValues) -> int:
  split = split_key(args.split)
  try:
    runs = load(args)
  except (FileNotFoundError, ValueError) as e:
    _flags.fail(PROG, e)
  if not runs:
    _flags.fail(PROG, f"--input_dir={args.input_dir}: no finished runs (results.jsonl + done)"
                + ("" if args.include_incomplete else "; --include_incomplete reads the others"))

  rows = []
  for selection in args.selection:
    try:
      choices = choose(runs, selection, args.selection_metric)
    except ValueError as e:
      _flags.fail(PROG, f"{selection}: {e}")
    rows.extend(collect.summarize(choices))

  tables = collect.make_tables(rows, split=split, metrics=args.metrics,
                               algorithms=args.algorithms)
  markdown = "\n\n".join(collect.to_markdown(t, args.decimals) for t in tables)
  latex = "\n\n".join(collect.to_latex(t, args.decimals) for t in tables)
  n_runs = len(runs)
  print(f"# {n_runs} run(s) from {args.input_dir}\n")
  if "markdown" in args.format:
    print(markdown + "\n")
  if "latex" in args.format:
    print(latex + "\n")

  csv_path = os.path.join(args.input_dir, "results.csv")
  collect.write_csv(rows, csv_path)
  with open(os.path.join(args.input_dir, "results.md"), "w") as f:
    f.write(markdown + "\n")
  with open(os.path.join(args.input_dir, "results.tex"), "w") as f:
    f.write(latex + "\n")
  print(f"# wrote {csv_path}, results.md, results.tex")

  if args.plots:
    from dale_jax.research import plots  # matplotlib is optional
    choices = choose(runs, args.plot_selection, args.selection_metric, fallback="LastStep")
    paths = plots.plot_all(choices, os.path.join(args.input_dir, "plots"), split=split)
    print(f"# wrote {len(paths)} plot(s):")
    for path in paths:
      print(f"#   {path}")
  return 0


def run() -> None:
  """Console-script entry point."""
  _errors.run_main(main)


if __name__ == "__main__":
  run()
