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

import dataclasses
import shlex
import shutil
import sys
import time
from typing import Sequence

from absl import flags

from dale_jax import validation
from dale_jax.cli import _errors
from dale_jax.cli import _flags
from dale_jax.research import paper
from dale_jax.research import sweep


def flag_values(experiment: paper.Experiment, doc: str) -> flags.FlagValues:
  """The command's flags, with this experiment's defaults."""
  fv = flags.FlagValues()
  flags.DEFINE_string("output_dir", f"runs/paper_{experiment.name}",
                      "Root of the runs' workdirs.", flag_values=fv)
  flags.DEFINE_string("doc", doc, "Where the Markdown page goes (figures in "
                      "results/<name>/ beside it).", flag_values=fv)
  _flags.define_enum_list("stages", list(paper.STAGES), paper.STAGES,
                          "Stages to run, comma-separated.", fv)
  _flags.define_name_list("algorithms", list(experiment.algorithms), "The table's rows, "
                          "comma-separated.", fv)
  flags.DEFINE_integer("seeds", experiment.seeds, "Trial seeds per algorithm.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("aa_examples", experiment.aa_examples, "AutoAttack on the first N "
                       "test images (0: all).", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("test_examples", 0, "PGD-20 on the first N test images (0: all).",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("batch_size", paper.EvalSettings.batch_size, "Examples per attack "
                       "call.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("apgd_steps", None, "APGD-CE / APGD-T iterations (default: "
                       "AutoAttack's standard, 100).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("square_queries", None, "Square's queries (default: AutoAttack's "
                       "standard, 5000).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("n_workers", 1, "Concurrent training processes (one per GPU).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_string("config_dir", sweep.DEFAULT_CONFIG_DIR, "Folder of the <dataset>.py "
                      "config files (the default is the bundled dale_jax/configs).",
                      flag_values=fv)
  return fv


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
  """Parses ``argv`` (without the program name) and runs the stages; returns the exit code.

  Bad input is one line ``<prog>: error: ...`` and exit status 2 before anything runs.
  The ``--config.<field>=<value>`` overrides are not this command's flags: they pass
  through to every training run (and are checked against the run's config first)."""
  prog = f"experiments/paper/{experiment.name}.py"
  argv = list(sys.argv[1:] if argv is None else argv)
  args = flag_values(experiment, doc)
  description = (f"The {experiment.name} results page: train, evaluate, report. Rerunning "
                 "continues where it stopped.\n\n" + (__doc__ or ""))
  extra = _flags.parse(prog, args, argv, description=description, passthrough="--config.")
  with _errors.one_line(prog):
    return _run(prog, experiment, args, extra, argv)


def _run(prog: str, experiment: paper.Experiment, args: flags.FlagValues,
         extra: list[str], argv: list[str]) -> int:
  stages = args.stages
  experiment = dataclasses.replace(experiment, algorithms=tuple(args.algorithms),
                                   seeds=args.seeds)
  settings = paper.EvalSettings(
      test_examples=args.test_examples, aa_examples=args.aa_examples,
      batch_size=args.batch_size, apgd_steps=args.apgd_steps,
      square_queries=args.square_queries)
  config_dir = args.config_dir
  try:
    sweep.check_overrides(extra)
    paper.check_experiment(experiment, settings)
    job_list = paper.jobs(experiment, args.output_dir, config_dir=config_dir, overrides=extra)
    sweep.check_configs(job_list, config_dir)
    _check_ready(experiment, stages, job_list)
  except validation.BadInput:
    raise  # one line, as every console script's
  except (ValueError, FileNotFoundError) as e:
    _flags.fail(prog, e)

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
      flags_ = [a for a in argv if not a.startswith("--stages")]
      command = " ".join([f"python experiments/paper/{experiment.name}.py",
                          shlex.join(flags_)]).strip()
      paper.report(experiment, args.output_dir, settings, doc=args.doc, command=command)
  except RuntimeError as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return 1
  print(f"# {','.join(stages)}: {time.time() - start:.0f} s")
  return 0


def run(experiment: paper.Experiment, doc: str) -> None:
  """Entry point of ``experiments/paper/<name>.py``."""
  _errors.run_main(lambda: main(experiment, doc))
