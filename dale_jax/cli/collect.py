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

import argparse
import os
import sys
from typing import Sequence

from dale_jax.cli import _errors
from dale_jax.research import collect


def _split_list(values: Sequence[str] | None) -> list[str] | None:
  if values is None:
    return None
  return [v for value in values for v in value.split(",") if v]


def add_selection_flags(parser: argparse.ArgumentParser) -> None:
  """Flags shared by ``dale-collect`` and ``dale-plot``."""
  parser.add_argument("--input_dir", required=True,
                      help="a sweep's output_dir, or one run's workdir")
  parser.add_argument("--selection_metric", default=None,
                      help=f"validation metric for model and hparams selection (default "
                      f"{collect.DEFAULT_METRIC}, falling back to {collect.FALLBACK_METRIC})")
  parser.add_argument("--split", default="Test", choices=collect.SPLITS[1:],
                      help="split shown in tables and plots")
  parser.add_argument("--algorithms", nargs="+", default=None,
                      help="algorithms shown, in this order (default: all, alphabetical)")
  parser.add_argument("--include_incomplete", action="store_true",
                      help="also read runs without a 'done' file")


def load(args) -> list[collect.Run]:
  """Loads the runs named by the shared flags, reporting skipped incomplete runs."""
  runs = collect.load_runs(args.input_dir, include_incomplete=args.include_incomplete)
  algorithms = _split_list(args.algorithms)
  if algorithms:
    runs = [r for r in runs if r.algorithm in algorithms]
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


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="dale-collect", allow_abbrev=False,
      description="Tables of a sweep's results after model and hparams selection.")
  add_selection_flags(parser)
  parser.add_argument("--selection", nargs="+", default=list(collect.SELECTION_METHODS),
                      help="model selection methods: LastStep, EarlyStop")
  parser.add_argument("--metrics", nargs="+", default=None,
                      help="table columns (default: every *-Accuracy of the split)")
  parser.add_argument("--format", nargs="+", default=["markdown", "latex"],
                      help="printed formats: markdown, latex")
  parser.add_argument("--precision", type=int, default=1,
                      help="decimals of accuracies (losses get two more)")
  parser.add_argument("--plots", action="store_true",
                      help="also draw figures into <input_dir>/plots (needs matplotlib)")
  parser.add_argument("--plot_selection", default="EarlyStop",
                      choices=collect.SELECTION_METHODS,
                      help="selection method whose choices the plots show")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (without the program name) and collects; returns the exit code."""
  parser = _parser()
  args = parser.parse_args(argv)
  selections = _split_list(args.selection)
  formats = _split_list(args.format)
  for s in selections:
    if s not in collect.SELECTION_METHODS:
      parser.error(f"--selection must name {collect.SELECTION_METHODS}, got {s!r}")
  for f in formats:
    if f not in ("markdown", "latex"):
      parser.error(f"--format must name markdown and/or latex, got {f!r}")
  try:
    runs = load(args)
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
  if not runs:
    print(f"no finished runs (results.jsonl + done) under {args.input_dir}", file=sys.stderr)
    return 1

  rows = []
  for selection in selections:
    try:
      choices = choose(runs, selection, args.selection_metric)
    except ValueError as e:
      parser.error(f"{selection}: {e}")
    rows.extend(collect.summarize(choices))

  tables = collect.make_tables(rows, split=args.split, metrics=_split_list(args.metrics),
                               algorithms=_split_list(args.algorithms))
  markdown = "\n\n".join(collect.to_markdown(t, args.precision) for t in tables)
  latex = "\n\n".join(collect.to_latex(t, args.precision) for t in tables)
  n_runs = len(runs)
  print(f"# {n_runs} run(s) from {args.input_dir}\n")
  if "markdown" in formats:
    print(markdown + "\n")
  if "latex" in formats:
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
    paths = plots.plot_all(choices, os.path.join(args.input_dir, "plots"), split=args.split)
    print(f"# wrote {len(paths)} plot(s):")
    for path in paths:
      print(f"#   {path}")
  return 0


def run() -> None:
  """Console-script entry point."""
  _errors.run_argparse("dale-collect", main)


if __name__ == "__main__":
  run()
