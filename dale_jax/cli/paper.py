"""The command of one results page: ``python experiments/paper/<name>.py [flags]``.

Trains the experiment's grid, evaluates every run (PGD-20, AutoAttack) and writes
the page (:mod:`dale_jax.research.paper`). Every stage skips what is finished, so
rerunning the same command continues where it stopped. ``--stages`` runs some of
them (e.g. ``train`` on a GPU machine, then ``evaluate,report``); any
``--config.<field>=<value>`` flag is passed to every training run.

Everything is checked first (the algorithms, every run's config, that the dataset
is prepared and that matplotlib is there for the figures); bad input is one line
and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
import time
from typing import Sequence

from dale_jax import validation
from dale_jax.cli import _errors
from dale_jax.research import paper
from dale_jax.research import sweep


def _split_list(values: Sequence[str]) -> list[str]:
  return [v for value in values for v in value.split(",") if v]


def _parser(experiment: paper.Experiment, doc: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=f"experiments/paper/{experiment.name}.py", allow_abbrev=False,
      description=f"The {experiment.name} results page: train, evaluate, report. "
      "Rerunning continues where it stopped.")
  parser.add_argument("--output_dir", default=f"runs/paper_{experiment.name}",
                      help="root of the runs' workdirs")
  parser.add_argument("--doc", default=doc, help="where the Markdown page goes (figures in "
                      "results/<name>/ beside it)")
  parser.add_argument("--stages", default=",".join(paper.STAGES),
                      help=f"comma-separated, any of {', '.join(paper.STAGES)}")
  parser.add_argument("--algorithms", nargs="+", default=None,
                      help="the table's rows (default: "
                      f"{','.join(experiment.algorithms)})")
  parser.add_argument("--seeds", type=int, default=experiment.seeds,
                      help="trial seeds per algorithm")
  parser.add_argument("--aa_examples", type=int, default=experiment.aa_examples,
                      help="AutoAttack on the first N test images (0: all)")
  parser.add_argument("--test_examples", type=int, default=0,
                      help="PGD-20 on the first N test images (0: all)")
  parser.add_argument("--batch_size", type=int, default=paper.EvalSettings.batch_size,
                      help="examples per attack call")
  parser.add_argument("--apgd_steps", type=int, default=paper.EvalSettings.apgd_steps,
                      help="APGD-CE / APGD-T iterations (100: AutoAttack's standard)")
  parser.add_argument("--square_queries", type=int,
                      default=paper.EvalSettings.square_queries,
                      help="Square's queries (5000: AutoAttack's standard)")
  parser.add_argument("--n_workers", type=int, default=1,
                      help="concurrent training processes (one per GPU)")
  parser.add_argument("--config_dir", default=sweep.DEFAULT_CONFIG_DIR,
                      help="folder of the <dataset>.py config files (default: the bundled "
                      "dale_jax/configs)")
  return parser


def _device_env(n_workers: int) -> str | None:
  return "CUDA_VISIBLE_DEVICES" if n_workers > 1 and shutil.which("nvidia-smi") else None


def _check_ready(experiment: paper.Experiment, stages: Sequence[str],
                 job_list: Sequence[sweep.Job]) -> None:
  """Refuses, before anything runs, what would fail hours later."""
  from dale_jax import algorithms  # pylint: disable=import-outside-toplevel
  from dale_jax import data  # pylint: disable=import-outside-toplevel

  for name in experiment.algorithms:
    algorithms.check_name(name)
  if "train" in stages:
    sweep.validate_configs(job_list)
  if "train" in stages or "evaluate" in stages:
    config = sweep.job_config(job_list[0])
    data.check_prepared(config.dataset, config.data.data_dir)
  if "report" in stages:
    try:
      import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise validation.BadInput(
          "the report's figures need matplotlib: pip install -e '.[plots]'") from e


def main(experiment: paper.Experiment, doc: str, argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (without the program name) and runs the stages; returns the exit code."""
  parser = _parser(experiment, doc)
  args, extra = parser.parse_known_args(argv)
  stages = _split_list([args.stages])
  for stage in stages:
    if stage not in paper.STAGES:
      parser.error(f"--stages must name some of {', '.join(paper.STAGES)}, got {stage!r}")
  if args.algorithms:
    experiment = dataclasses.replace(experiment,
                                     algorithms=tuple(_split_list(args.algorithms)))
  experiment = dataclasses.replace(experiment, seeds=args.seeds)
  settings = paper.EvalSettings(
      test_examples=args.test_examples, aa_examples=args.aa_examples,
      batch_size=args.batch_size, apgd_steps=args.apgd_steps,
      square_queries=args.square_queries)
  if args.n_workers < 1:
    parser.error(f"--n_workers must be >= 1, got {args.n_workers}")
  config_dir = args.config_dir
  try:
    sweep.check_overrides(extra)
    paper.check_experiment(experiment, settings)
    job_list = paper.jobs(experiment, args.output_dir, config_dir=config_dir, overrides=extra)
    sweep.check_configs(job_list, config_dir)
    _check_ready(experiment, stages, job_list)
  except validation.BadInput:
    raise  # one line from run(), as every console script's
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))

  start = time.time()
  try:
    if "train" in stages:
      paper.train(job_list, n_workers=args.n_workers, device_env=_device_env(args.n_workers))
    if "evaluate" in stages:
      from dale_jax import host_memory  # pylint: disable=import-outside-toplevel
      host_memory.keep_freed_memory()
      paper.evaluate(job_list, settings)
    if "report" in stages:
      # The page is the work of every stage: its command is the one that runs them all.
      flags = [a for a in (argv if argv is not None else sys.argv[1:])
               if not a.startswith("--stages")]
      command = " ".join([f"python experiments/paper/{experiment.name}.py",
                          shlex.join(flags)]).strip()
      paper.report(experiment, args.output_dir, settings, doc=args.doc, command=command)
  except RuntimeError as e:
    print(f"{parser.prog}: {e}", file=sys.stderr)
    return 1
  print(f"# {','.join(stages)}: {time.time() - start:.0f} s")
  return 0


def run(experiment: paper.Experiment, doc: str) -> None:
  """Entry point of ``experiments/paper/<name>.py``."""
  _errors.run_argparse(f"experiments/paper/{experiment.name}.py",
                       lambda argv: main(experiment, doc, argv))
