"""``dale-sweep``: train a grid of algorithms x datasets x hparams seeds x trial seeds.

Example (the built-in MNIST digits, 4 algorithms, 2 trials, 2 processes)::

  dale-sweep --datasets=quickstart --algorithms=ERM,PGD,TRADES,Gaussian_DALE_PD \\
      --n_trials=2 --num_epochs=3 --output_dir=/tmp/sweep --n_workers=2

Runs go to ``<output_dir>/<dataset>/<Algorithm>/h<H>_t<T>``; finished runs (with
a ``done`` file) are skipped, incomplete ones resume from their checkpoint
(``--clean_incomplete`` deletes them instead). ``--dry_run`` prints the commands
as a shell script. Any ``--config.<field>=<value>`` flag is passed to every run.
On GPUs, ``--n_workers=N`` runs N processes, each pinned to one GPU through
``CUDA_VISIBLE_DEVICES`` (``--device_env``, ``--device_ids``).

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

import os
import shlex
import shutil
from typing import Sequence

from absl import flags

from dale_jax.cli import _errors
from dale_jax.cli import _flags
from dale_jax.research import cluster
from dale_jax.research import sweep

PROG = "dale-sweep"
LAUNCHERS = {"local": None, "slurm": "slurm", "submitit-local": "local",
             "submitit-debug": "debug"}

# Old spellings, named in the error when used.
RENAMED = {"devices": "--device_ids", "no-resume_incomplete": "--noresume_incomplete"}
FLAGS = flags.FlagValues()
_SLURM = cluster.SlurmOptions()
_flags.define_name_list("algorithms", None, "Algorithm names, comma-separated (ERM,PGD,...).",
                        FLAGS)
_flags.define_name_list("datasets", None, "Config names, comma-separated: files "
                        "<config_dir>/<name>.py (quickstart, mnist, ...).", FLAGS)
flags.DEFINE_integer("n_hparams", 1, "Hparams seeds 0..N-1; seed 0 = the default "
                     "hyperparameters.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("n_trials", 3, "Trial seeds 0..N-1 per hparams seed.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Root of the runs' workdirs.", flag_values=FLAGS)
flags.DEFINE_integer("num_epochs", None, "Passed as --config.num_epochs (default: the "
                     "config's).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("config_dir", sweep.DEFAULT_CONFIG_DIR, "Folder of the <dataset>.py "
                    "config files (the default is the bundled dale_jax/configs).",
                    flag_values=FLAGS)
flags.DEFINE_integer("n_workers", 1, "Concurrent training processes (one per device on "
                     "GPUs).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_list("device_ids", None, "Device ids, one per worker, comma-separated, each "
                  "exported in --device_env (default: $CUDA_VISIBLE_DEVICES or "
                  "0..n_workers-1).", flag_values=FLAGS)
flags.DEFINE_string("device_env", "auto", "Variable pinning a process to its device: 'auto' "
                    "(CUDA_VISIBLE_DEVICES when n_workers > 1 and nvidia-smi exists), "
                    "'none', or a variable name.", flag_values=FLAGS)
flags.DEFINE_bool("resume_incomplete", True, "Relaunch runs without 'done' in place, so "
                  "that they resume from their checkpoint (--noresume_incomplete skips "
                  "them).", flag_values=FLAGS)
flags.DEFINE_bool("clean_incomplete", False, "Delete runs without 'done' (checkpoints "
                  "included) and rerun them.", flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print the commands as a shell script and exit.",
                  flag_values=FLAGS)
flags.DEFINE_enum("launcher", "local", list(LAUNCHERS), "local: a pool of --n_workers child "
                  "processes; slurm: one Slurm job per run through submitit; "
                  "submitit-local / submitit-debug: submitit's executors without a "
                  "cluster.", flag_values=FLAGS)
flags.DEFINE_string("slurm_partition", None, "Slurm partition of the jobs (default: the "
                    "cluster's).", flag_values=FLAGS)
flags.DEFINE_string("slurm_account", None, "Slurm account charged (default: the user's).",
                    flag_values=FLAGS)
flags.DEFINE_integer("slurm_time_min", _SLURM.time_min, "Time limit of each job in minutes; "
                     "a preempted or timed-out job is requeued and resumes from its "
                     "checkpoint.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("slurm_nodes", _SLURM.nodes, "Nodes per job.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("slurm_tasks_per_node", _SLURM.tasks_per_node, "Processes per node; "
                     "more than one task in all trains each run over all of them "
                     "(--config.parallel.auto=True).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("slurm_gpus_per_node", _SLURM.gpus_per_node, "GPUs per node.",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("slurm_cpus_per_task", None, "CPUs per task (default: the cluster's).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("slurm_mem_gb", None, "Memory per node in GB (default: the cluster's).",
                   lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("slurm_array_parallelism", _SLURM.array_parallelism, "At most this "
                     "many of the sweep's jobs run at once.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_multi_string("slurm_sbatch", [], "A further #SBATCH option KEY=VALUE, e.g. "
                          "qos=high (repeatable).", flag_values=FLAGS)
flags.DEFINE_string("train_command", None, "Command that trains one run (default: "
                    f"'{shlex.join(sweep.DEFAULT_TRAIN_COMMAND)}').", flag_values=FLAGS)
_flags.mark_required(["algorithms", "datasets", "output_dir"], FLAGS)


def _device_env(flag: str, n_workers: int) -> str | None:
  if flag == "none":
    return None
  if flag != "auto":
    return flag
  if n_workers > 1 and shutil.which("nvidia-smi"):
    return "CUDA_VISIBLE_DEVICES"
  return None


def _devices(ids: list[str] | None, device_env: str | None, n_workers: int) -> list[str]:
  if ids:
    return list(ids)
  visible = os.environ.get(device_env or "", "")
  if visible:
    return visible.split(",")
  return [str(i) for i in range(n_workers)]


def _check_algorithms(names: Sequence[str]) -> None:
  from dale_jax import algorithms  # imports JAX, but touches no device

  for name in names:
    try:
      algorithms.check_name(name)
    except ValueError as e:
      _flags.fail(PROG, f"--algorithms={','.join(names)}: {e}")


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (without the program name), runs the sweep; returns the exit code.

  Bad input (a flag, an override, a run's config, a stale output_dir) is one line
  ``dale-sweep: error: ...`` and exit status 2 before anything is written."""
  extra = _flags.parse(PROG, FLAGS, argv, description=__doc__, passthrough="--config.",
                       renamed=RENAMED)
  with _errors.one_line(PROG):
    return _sweep(FLAGS, extra)


def _sweep(args: flags.FlagValues, extra: list[str]) -> int:
  try:
    sweep.check_overrides(extra)
  except ValueError as e:
    _flags.fail(PROG, e)
  if args.device_ids and len(args.device_ids) < args.n_workers:
    _flags.fail(PROG, f"--device_ids={','.join(args.device_ids)}: expected one device id per "
                f"worker (--n_workers={args.n_workers})")

  config_dir = args.config_dir
  train_command = (shlex.split(args.train_command) if args.train_command
                   else sweep.DEFAULT_TRAIN_COMMAND)
  try:
    if not args.train_command:
      _check_algorithms(args.algorithms)
    jobs = sweep.make_jobs(
        algorithms=args.algorithms, datasets=args.datasets,
        n_hparams=args.n_hparams, n_trials=args.n_trials, output_dir=args.output_dir,
        config_dir=config_dir, num_epochs=args.num_epochs, overrides=extra,
        train_command=train_command)
    sweep.check_configs(jobs, config_dir)
    if not args.train_command:
      sweep.validate_configs(jobs)
  except (ValueError, FileNotFoundError) as e:
    _flags.fail(PROG, e)

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
      _flags.fail(PROG, f"--slurm_{e}")

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
  devices = _devices(args.device_ids, device_env, args.n_workers)
  try:
    outcomes = sweep.launch(to_launch, n_workers=n_workers, devices=devices,
                            device_env=device_env, clean_incomplete=args.clean_incomplete)
  except ValueError as e:
    _flags.fail(PROG, e)
  return _report(outcomes)


def _report(outcomes: Sequence[sweep.Outcome]) -> int:
  failed = [o for o in outcomes if not o.ok]
  print(f"# {len(outcomes) - len(failed)} of {len(outcomes)} runs finished"
        + (f"; failed: {', '.join(o.job.name for o in failed)}" if failed else ""))
  return 1 if failed else 0


def run() -> None:
  """Console-script entry point."""
  _errors.run_main(main)


if __name__ == "__main__":
  run()
