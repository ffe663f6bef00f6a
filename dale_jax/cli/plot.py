"""``python -m dale_jax.cli.plot``: figures of one run or of a whole sweep.

Example::

  python -m dale_jax.cli.plot --input_dir=/tmp/sweep
  python -m dale_jax.cli.plot --input_dir=/tmp/sweep/quickstart/Gaussian_DALE_PD/h0_t0

writes PNGs (accuracy curves, primal-dual picture, Pareto front, Augmented
quantiles, CVaR) into ``<out_dir>/<dataset>/`` (default ``<input_dir>/plots``),
for the hyperparameters chosen by ``--plot_selection`` (default EarlyStop on the
validation ``PGD-Accuracy``).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from dale_jax.cli import _errors
from dale_jax.cli import _flags
from dale_jax.cli import collect as collect_cli

PROG = "dale-plot"
FLAGS = flags.FlagValues()
collect_cli.define_selection_flags(FLAGS)
flags.DEFINE_string("out_dir", None, "Folder of the figures (default: <input_dir>/plots).",
                    flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (without the program name) and plots; returns the exit code.

  Bad input is one line ``dale-plot: error: ...`` and exit status 2, nothing drawn."""
  _flags.parse(PROG, FLAGS, argv, description=__doc__,
               renamed={"selection": "--plot_selection"})
  args = FLAGS
  with _errors.one_line(PROG):
    try:
      runs = collect_cli.load(args)
      choices = collect_cli.choose(runs, args.plot_selection, args.selection_metric,
                                   fallback="LastStep")
    except (FileNotFoundError, ValueError) as e:
      _flags.fail(PROG, e)
    if not runs:
      _flags.fail(PROG, f"--input_dir={args.input_dir}: no finished runs (results.jsonl + "
                  "done)")
    from dale_jax.research import plots  # matplotlib is optional
    out_dir = args.out_dir or os.path.join(args.input_dir, "plots")
    for path in plots.plot_all(choices, out_dir, split=collect_cli.split_key(args.split)):
      print(path)
  return 0


def run() -> None:
  """Console-script entry point."""
  _errors.run_main(main)


if __name__ == "__main__":
  run()
