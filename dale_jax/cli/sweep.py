"""``dale-sweep``: train a grid of algorithms x datasets x hparams seeds x trial seeds.

Example (the built-in MNIST digits, 4 algorithms, 2 trials, 2 processes)::

  dale-sweep --datasets=quickstart --algorithms=ERM,PGD,TRADES,Gaussian_DALE_PD \\
      --n_trials=2 --num_epochs=3 --output_dir=/tmp/sweep --n_workers=2

Runs go to ``<output_dir>/<dataset>/<Algorithm>/h<H>_t<T>``; finished runs (with
a ``done`` file) are skipped, incomplete ones resume from their checkpoint
(``--clean_incomplete`` deletes them instead). ``--dry_run`` prints the commands
as a shell script. Any ``--config.<field>=<value>`` flag is passed to every run.
On GPUs, ``--n_workers=N`` runs N processes, each pinned to one GPU through
``CUDA_VISIBLE_DEVICES`` (``--device_env``, ``--devices``).

``--launcher=slurm`` submits the runs to Slurm through submitit instead (one job
array; ``pip install -e .[cluster]``), with the ``--slurm_*`` flags as executor
parameters, and waits for them; see :mod:`dale_jax.research.cluster`. Example::

  dale-sweep --datasets=quickstart --algorithms=ERM,Gaussian_DALE_PD --n_trials=2 \\
      --output_dir=/shared/sweep --launcher=slurm --slurm_partition=gpu \\
      --slurm_gpus_per_node=1 --slurm_time_min=120 --slurm_sbatch=qos=high

``--launcher=submitit-local`` (each job a local process) and ``submitit-debug``
(in this process) run the same path without a cluster.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from typing import Sequence

from dale_jax.cli import _errors
from dale_jax.research import cluster
from dale_jax.research import sweep

LAUNCHERS = {"local": None, "slurm": "slurm", "submitit-local": "local",
             "submitit-debug": "debug"}


def _split_list(values: Sequence[str]) -> list[str]:
  return [v for value in values for v in value.split(",") if v]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="dale-sweep", allow_abbrev=False,
      description="Train a grid of dale-train runs: algorithms x datasets x "
      "hparams seeds x trial seeds. Extra --config.<field>=<value> flags are "
      "passed to every run.")
  parser.add_argument("--algorithms", nargs="+", required=True,
                      help="algorithm names, space- or comma-separated")
  parser.add_argument("--datasets", nargs="+", required=True,
                      help="dataset config names (files <config_dir>/<dataset>.py)")
  parser.add_argument("--n_hparams", type=int, default=1,
                      help="hparams seeds 0..n-1; seed 0 = default hyperparameters")
  parser.add_argument("--n_trials", type=int, default=3, help="trial seeds 0..n-1")
  parser.add_argument("--output_dir", required=True, help="root of the runs' workdirs")
  parser.add_argument("--num_epochs", type=int, default=None,
                      help="passed as --config.num_epochs (default: the config's)")
  parser.add_argument("--config_dir", default=sweep.DEFAULT_CONFIG_DIR,
                      help="folder of the <dataset>.py config files (default: the bundled "
                      "dale_jax/configs)")
  parser.add_argument("--n_workers", type=int, default=1,
                      help="concurrent training processes (one per device on GPUs)")
  parser.add_argument("--devices", default=None,
                      help="comma-separated device ids, one per worker (default: "
                      "$CUDA_VISIBLE_DEVICES or 0..n_workers-1)")
  parser.add_argument("--device_env", default="auto",
                      help="variable pinning a process to its device: 'auto' "
                      "(CUDA_VISIBLE_DEVICES when n_workers > 1 and nvidia-smi "
                      "exists), 'none', or a variable name")
  parser.add_argument("--resume_incomplete", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="relaunch runs without 'done' in place, so that they "
                      "resume from their checkpoint (--no-resume_incomplete skips them)")
  parser.add_argument("--noresume_incomplete", dest="resume_incomplete",
                      action="store_false", help=argparse.SUPPRESS)
  parser.add_argument("--clean_incomplete", action="store_true",
                      help="delete runs without 'done' (checkpoints included) and rerun them")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the commands as a shell script and exit")
  parser.add_argument("--launcher", default="local", choices=list(LAUNCHERS),
                      help="local: a pool of --n_workers child processes; slurm: one Slurm "
                      "job per run through submitit; submitit-local / submitit-debug: "
                      "submitit's executors without a cluster")
  slurm = parser.add_argument_group("Slurm (--launcher=slurm; submitit executor parameters)")
  defaults = cluster.SlurmOptions()
  slurm.add_argument("--slurm_partition", default=None)
  slurm.add_argument("--slurm_account", default=None)
  slurm.add_argument("--slurm_time_min", type=int, default=defaults.time_min,
                     help="time limit of each job in minutes; a preempted or timed-out "
                     "job is requeued and resumes from its checkpoint")
  slurm.add_argument("--slurm_nodes", type=int, default=defaults.nodes)
  slurm.add_argument("--slurm_tasks_per_node", type=int, default=defaults.tasks_per_node,
                     help="processes per node; more than one task in all trains each run "
                     "over all of them (--config.parallel.auto=True)")
  slurm.add_argument("--slurm_gpus_per_node", type=int, default=defaults.gpus_per_node)
  slurm.add_argument("--slurm_cpus_per_task", type=int, default=None)
  slurm.add_argument("--slurm_mem_gb", type=float, default=None)
  slurm.add_argument("--slurm_array_parallelism", type=int,
                     default=defaults.array_parallelism,
                     help="at most this many of the sweep's jobs run at once")
  slurm.add_argument("--slurm_sbatch", action="append", default=[], metavar="KEY=VALUE",
                     help="a further #SBATCH option, e.g. qos=high (repeatable)")
  parser.add_argument("--train_command", default=None,
                      help="command that trains one run (default: "
                      f"'{shlex.join(sweep.DEFAULT_TRAIN_COMMAND)}')")
  return parser


def _device_env(flag: str, n_workers: int) -> str | None:
  if flag == "none":
    return None
  if flag != "auto":
    return flag
  if n_workers > 1 and shutil.which("nvidia-smi"):
    return "CUDA_VISIBLE_DEVICES"
  return None


def _devices(flag: str | None, device_env: str | None, n_workers: int) -> list[str]:
  if flag is not None:
    return _split_list([flag])
  visible = os.environ.get(device_env or "", "")
  if visible:
    return visible.split(",")
  return [str(i) for i in range(n_workers)]


def _check_algorithms(names: Sequence[str]) -> None:
  from dale_jax import algorithms  # imports JAX, but touches no device

  for name in names:
    algorithms.check_name(name)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (without the program name), runs the sweep; returns the exit code."""
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  try:
    sweep.check_overrides(extra)
  except ValueError as e:
    parser.error(str(e))

  config_dir = args.config_dir
  train_command = (shlex.split(args.train_command) if args.train_command
                   else sweep.DEFAULT_TRAIN_COMMAND)
  try:
    if not args.train_command:
      _check_algorithms(_split_list(args.algorithms))
    jobs = sweep.make_jobs(
        algorithms=_split_list(args.algorithms), datasets=_split_list(args.datasets),
        n_hparams=args.n_hparams, n_trials=args.n_trials, output_dir=args.output_dir,
        config_dir=config_dir, num_epochs=args.num_epochs, overrides=extra,
        train_command=train_command)
    sweep.check_configs(jobs, config_dir)
    if not args.train_command:
      sweep.validate_configs(jobs)
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))

  slurm_options = cluster.SlurmOptions(
      partition=args.slurm_partition, account=args.slurm_account,
      time_min=args.slurm_time_min, nodes=args.slurm_nodes,
      tasks_per_node=args.slurm_tasks_per_node, gpus_per_node=args.slurm_gpus_per_node,
      cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb,
      array_parallelism=args.slurm_array_parallelism, sbatch=tuple(args.slurm_sbatch))
  if LAUNCHERS[args.launcher]:
    try:
      slurm_options.validate()
    except ValueError as e:
      parser.error(f"--slurm_{e}")

  sweep.check_not_stale(jobs, args.output_dir)
  counts = sweep.summarize(jobs)
  to_launch = sweep.select_jobs(jobs, resume_incomplete=args.resume_incomplete,
                                clean_incomplete=args.clean_incomplete)
  action = "deleted and rerun" if args.clean_incomplete else (
      "resumed" if args.resume_incomplete else "skipped")
  print(f"# {len(jobs)} runs: {counts[sweep.DONE]} done, {counts[sweep.INCOMPLETE]} "
        f"incomplete ({action}), {counts[sweep.NOT_LAUNCHED]} not launched; "
        f"{len(to_launch)} to launch", flush=True)

  if args.dry_run:
    for job in to_launch:
      command = job.command_str
      if args.clean_incomplete and sweep.job_state(job) == sweep.INCOMPLETE:
        command = f"rm -rf {shlex.quote(job.workdir)} && {command}"
      print(command)
    return 0
  if not to_launch:
    return 0

  if LAUNCHERS[args.launcher]:
    outcomes = cluster.launch(to_launch, slurm_options, output_dir=args.output_dir,
                              cluster=LAUNCHERS[args.launcher],
                              clean_incomplete=args.clean_incomplete)
    return _report(outcomes)
  n_workers = min(args.n_workers, len(to_launch))
  device_env = _device_env(args.device_env, args.n_workers)
  devices = _devices(args.devices, device_env, args.n_workers)
  try:
    outcomes = sweep.launch(to_launch, n_workers=n_workers, devices=devices,
                            device_env=device_env, clean_incomplete=args.clean_incomplete)
  except ValueError as e:
    parser.error(str(e))
  return _report(outcomes)


def _report(outcomes: Sequence[sweep.Outcome]) -> int:
  failed = [o for o in outcomes if not o.ok]
  print(f"# {len(outcomes) - len(failed)} of {len(outcomes)} runs finished"
        + (f"; failed: {', '.join(o.job.name for o in failed)}" if failed else ""))
  return 1 if failed else 0


def run() -> None:
  """Console-script entry point."""
  _errors.run_argparse("dale-sweep", main)


if __name__ == "__main__":
  run()
