"""The sweep's jobs on a Slurm cluster, submitted through ``submitit``.

:func:`launch` submits one Slurm job per run (as one job array), waits for them and
returns the same :class:`~dale_jax.research.sweep.Outcome` list as the local pool
(:func:`dale_jax.research.sweep.launch`), so ``dale-sweep``'s bookkeeping is the
same whatever runs the jobs: finished runs (with ``done``) are skipped before
anything is submitted, incomplete ones resume from their checkpoints, and
``clean_incomplete`` deletes them first.

Each Slurm job runs the run's ``dale-train`` command as a child process, its
output appended to ``<workdir>/sweep.log``; submitit's own files (the sbatch
script, pickles, stdout/stderr of each job) go to ``<output_dir>/slurm/``. A job
is :class:`submitit.helpers.Checkpointable`: when Slurm preempts it or its time
limit nears, submitit requeues it, and the requeued job reruns the same command,
which resumes from the run's last checkpoint.

With more than one task per job (``nodes`` x ``tasks_per_node``) every task runs
the command with ``--config.parallel.auto=True``: the tasks of one training run
find each other through Slurm's environment (``jax.distributed.initialize()``).

``cluster="local"`` (submitit's local executor: each job a local process) and
``"debug"`` (in this process, one after another) run the same code path without
a cluster; the tests use them. The workdirs must be on a filesystem that every
node shares, and the datasets prepared there once.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from typing import Sequence, TextIO

from dale_jax import rundir
from dale_jax import validation
from dale_jax.research import sweep

CLUSTERS = ("slurm", "local", "debug")
SUBMITIT_DIR = "slurm"


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  """The executor parameters of every job (submitit's names in brackets).

  Attributes:
    partition: Slurm partition (``slurm_partition``); ``None``: the cluster's default.
    account: account to charge (``slurm_account``).
    time_min: time limit of one job in minutes (``timeout_min``).
    nodes: nodes per job (``nodes``).
    tasks_per_node: processes per node (``tasks_per_node``); more than one task in
      all makes each job one multi-process training run.
    gpus_per_node: GPUs per node (``gpus_per_node``); 0 for CPU jobs.
    cpus_per_task: CPU cores per task (``cpus_per_task``).
    mem_gb: memory per node in GB (``mem_gb``); ``None``: the partition's default.
    array_parallelism: at most this many jobs of the array run at once
      (``slurm_array_parallelism``).
    sbatch: further ``#SBATCH`` options as ``key=value`` strings, e.g.
      ``("qos=high", "constraint=a100")`` (``slurm_additional_parameters``).
  """

  partition: str | None = None
  account: str | None = None
  time_min: int = 60
  nodes: int = 1
  tasks_per_node: int = 1
  gpus_per_node: int = 0
  cpus_per_task: int | None = None
  mem_gb: float | None = None
  array_parallelism: int = 256
  sbatch: tuple[str, ...] = ()

  def validate(self) -> None:
    for name in ("time_min", "nodes", "tasks_per_node", "array_parallelism"):
      validation.integer(name, getattr(self, name), minimum=1)
    validation.integer("gpus_per_node", self.gpus_per_node, minimum=0)
    if self.cpus_per_task is not None:
      validation.integer("cpus_per_task", self.cpus_per_task, minimum=1)
    if self.mem_gb is not None:
      validation.positive("mem_gb", self.mem_gb)
    for option in self.sbatch:
      validation.require(isinstance(option, str) and "=" in option.strip("="), "sbatch",
                         "'key=value' strings, e.g. 'qos=high'", option)

  @property
  def num_tasks(self) -> int:
    return self.nodes * self.tasks_per_node

  def executor_parameters(self) -> dict:
    """The ``update_parameters`` arguments of a ``submitit.AutoExecutor``."""
    params = dict(timeout_min=self.time_min, nodes=self.nodes,
                  tasks_per_node=self.tasks_per_node, slurm_array_parallelism=self.array_parallelism)
    if self.gpus_per_node:
      params["gpus_per_node"] = self.gpus_per_node
    if self.cpus_per_task is not None:
      params["cpus_per_task"] = self.cpus_per_task
    if self.mem_gb is not None:
      params["mem_gb"] = self.mem_gb
    if self.partition:
      params["slurm_partition"] = self.partition
    if self.account:
      params["slurm_account"] = self.account
    if self.sbatch:
      params["slurm_additional_parameters"] = dict(o.split("=", 1) for o in self.sbatch)
    return params


def _submitit():
  try:
    import submitit  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise validation.BadInput("the Slurm launcher needs submitit: pip install -e '.[cluster]'") \
        from None
  return submitit


def _task_rank() -> int:
  try:
    return _submitit().JobEnvironment().global_rank
  except RuntimeError:  # not inside a submitit job (the debug executor)
    return 0


class TrainRun:
  """One run's command as a submitit job: requeued as it is when preempted or timed out."""

  def __init__(self, command: Sequence[str], workdir: str):
    self.command, self.workdir = list(command), workdir

  def __call__(self) -> int:
    rank = _task_rank()
    name = sweep.LOG_FILE if rank == 0 else f"{sweep.LOG_FILE}.task{rank}"
    os.makedirs(self.workdir, exist_ok=True)
    with open(os.path.join(self.workdir, name), "a") as log:
      log.write(f"$ {subprocess.list2cmdline(self.command)}\n")
      log.flush()
      return subprocess.run(self.command, stdout=log, stderr=subprocess.STDOUT,
                            check=False).returncode

  def checkpoint(self, *args, **kwargs):
    """Called by submitit before a preemption or a timeout: resubmit the same run."""
    return _submitit().helpers.DelayedSubmission(type(self)(self.command, self.workdir))


def _command(job: sweep.Job, options: SlurmOptions) -> list[str]:
  command = list(job.command)
  if options.num_tasks > 1:
    command.append("--config.parallel.auto=True")
  return command


def make_executor(folder: str, options: SlurmOptions, cluster: str = "slurm"):
  """A ``submitit.AutoExecutor`` with ``options``; its files go to ``folder``."""
  validation.one_of("cluster", cluster, CLUSTERS)
  options.validate()
  submitit = _submitit()
  executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
  executor.update_parameters(name="dale-sweep", **options.executor_parameters())
  return executor


def launch(jobs: Sequence[sweep.Job], options: SlurmOptions, *, output_dir: str,
           cluster: str = "slurm", clean_incomplete: bool = False, wait: bool = True,
           out: TextIO | None = None, poll_seconds: float | None = None):
  """Submits ``jobs`` (one job array) and, with ``wait``, returns their outcomes.

  Without ``wait`` returns the submitted ``submitit`` jobs (``job.job_id``).
  ``poll_seconds``: how often the jobs' states are read (default 10 s on Slurm, whose
  ``sacct`` should not be queried often, 0.2 s otherwise).
  """
  if poll_seconds is None:
    poll_seconds = 10.0 if cluster == "slurm" else 0.2
  out = sys.stdout if out is None else out
  executor = make_executor(os.path.join(output_dir, SUBMITIT_DIR), options, cluster)
  for job in jobs:
    if clean_incomplete and os.path.exists(job.workdir):
      shutil.rmtree(job.workdir)
    os.makedirs(job.workdir, exist_ok=True)
  started = time.monotonic()
  with executor.batch():
    submitted = [executor.submit(TrainRun(_command(job, options), job.workdir)) for job in jobs]
  for job, handle in zip(jobs, submitted):
    print(f"[submitted] {job.name}: job {handle.job_id}", file=out, flush=True)
  if not wait:
    return submitted
  outcomes, remaining = [], dict(zip(submitted, jobs))
  while remaining:
    for handle in [h for h in remaining if h.done()]:
      job = remaining.pop(handle)
      try:
        returncode = handle.result()  # task 0's exit code
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {job.name}: {type(e).__name__}: {str(e)[-2000:]}", file=out, flush=True)
        returncode = 1
      outcome = sweep.Outcome(job, returncode, time.monotonic() - started,
                              rundir.is_done(job.workdir))
      outcomes.append(outcome)
      status = "done" if outcome.ok else f"FAILED (exit code {returncode})"
      print(f"[{len(outcomes)}/{len(jobs)}] {status}: {job.name} (job {handle.job_id}); "
            f"log: {os.path.join(job.workdir, sweep.LOG_FILE)}", file=out, flush=True)
    if remaining:
      time.sleep(poll_seconds)
  return outcomes
