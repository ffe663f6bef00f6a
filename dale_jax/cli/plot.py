"""``python -m dale_jax.cli.plot``: figures of one run or of a whole sweep.

Example::

  python -m dale_jax.cli.plot --input_dir=/tmp/sweep
  python -m dale_jax.cli.plot --input_dir=/tmp/sweep/quickstart/Gaussian_DALE_PD/h0_t0

writes PNGs (accuracy curves, primal-dual picture, Pareto front, Augmented
quantiles, CVaR) into ``<out_dir>/<dataset>/`` (default ``<input_dir>/plots``),
for the hyperparameters chosen by ``--selection`` (default EarlyStop on the
validation ``PGD-Accuracy``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from dale_jax.cli import _errors
from dale_jax.cli import collect as collect_cli
from dale_jax.research import collect


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (without the program name) and plots; returns the exit code."""
  parser = argparse.ArgumentParser(prog="dale-plot", allow_abbrev=False,
                                   description="Figures of one run or of a sweep.")
  collect_cli.add_selection_flags(parser)
  parser.add_argument("--selection", default="EarlyStop", choices=collect.SELECTION_METHODS)
  parser.add_argument("--out_dir", default=None, help="default: <input_dir>/plots")
  args = parser.parse_args(argv)
  try:
    runs = collect_cli.load(args)
    choices = collect_cli.choose(runs, args.selection, args.selection_metric,
                                 fallback="LastStep")
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
  if not runs:
    print(f"no finished runs (results.jsonl + done) under {args.input_dir}", file=sys.stderr)
    return 1
  from dale_jax.research import plots  # matplotlib is optional
  out_dir = args.out_dir or os.path.join(args.input_dir, "plots")
  for path in plots.plot_all(choices, out_dir, split=args.split):
    print(path)
  return 0


def run() -> None:
  """Console-script entry point."""
  _errors.run_argparse("dale-plot", main)


if __name__ == "__main__":
  run()
