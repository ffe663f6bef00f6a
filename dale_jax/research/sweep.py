"""A grid of ``dale-train`` runs, launched locally.

The grid is algorithms x datasets x hyperparameter seeds x trial seeds. Every
run gets its own working directory::

  <output_dir>/<dataset>/<Algorithm>/h<hparams_seed>_t<trial_seed>

and the command::

  python -m dale_jax.cli.train \\
      --config=<dataset>:<Algorithm> \\
      --workdir=<output_dir>/<dataset>/<Algorithm>/h<H>_t<T> \\
      --config.hparams_seed=H --config.seed=T [--config.num_epochs=E] [overrides]

Hyperparameter seed 0 is the algorithm's default hyperparameters; seeds > 0
are random-search draws (made by the trainer from the seed). The trial seed
drives initialisation, data order and attack noise.

A run is *done* when its working directory holds the file ``done`` (written by
the trainer at the very end) and its ``config.json`` is the config the sweep asks
for; done runs are skipped, so a sweep can be relaunched after an interruption. A
run trained with another config is *stale*: the sweep refuses to start while any
is present (a rerun in place would be refused by the trainer too), except for more
epochs, which resume the same run (:func:`dale_jax.rundir.resume_changes`). A working directory without ``done`` is an
*incomplete* run: by default it is relaunched in place, and the trainer resumes
from its last checkpoint; ``clean_incomplete=True`` deletes it first (advbench's
behaviour, which loses the checkpoints).

Jobs run as child processes, at most ``n_workers`` at a time. Worker ``i`` owns
``devices[i]``; when ``device_env`` is set (e.g. ``CUDA_VISIBLE_DEVICES``), every
process it launches sees only that device. With one worker and no
``device_env``, each run uses every local device (the trainer is data
parallel). Each child's output goes to ``<workdir>/sweep.log``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence, TextIO

from dale_jax import rundir
from dale_jax import validation

NOT_LAUNCHED = "not launched"
INCOMPLETE = "incomplete"
DONE = "done"
STALE = "stale"

LOG_FILE = "sweep.log"

DEFAULT_TRAIN_COMMAND = (sys.executable, "-m", "dale_jax.cli.train")
# The bundled config files (dale_jax/configs/<dataset>.py), named on the command line.
DEFAULT_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "configs")


@dataclasses.dataclass(frozen=True)
class Job:
  """One training run of the sweep.

  Attributes:
    dataset: dataset config name (``<config_dir>/<dataset>.py``).
    algorithm: algorithm name, the config argument after ``:``.
    hparams_seed: 0 for default hyperparameters, > 0 for a random-search draw.
    trial_seed: the run's ``config.seed``.
    workdir: the run's working directory.
    command: the argv that trains it.
  """

  dataset: str
  algorithm: str
  hparams_seed: int
  trial_seed: int
  workdir: str
  command: tuple[str, ...]

  @property
  def name(self) -> str:
    return f"{self.dataset}/{self.algorithm}/h{self.hparams_seed}_t{self.trial_seed}"

  @property
  def command_str(self) -> str:
    return shlex.join(self.command)


def run_name(hparams_seed: int, trial_seed: int) -> str:
  """The leaf directory name of a run: ``h<hparams_seed>_t<trial_seed>``."""
  return f"h{hparams_seed}_t{trial_seed}"


def _config_arg(config_dir: str, dataset: str) -> str:
  """A bundled config by its name (the command reads the same anywhere), else its path."""
  if os.path.abspath(config_dir) == DEFAULT_CONFIG_DIR:
    return dataset
  return os.path.join(config_dir, f"{dataset}.py")


def check_overrides(overrides: Sequence[str]) -> None:
  """Raises ``ValueError`` unless every override reads ``--config.<field>=<value>``."""
  for arg in overrides:
    if not (arg.startswith("--config.") and "=" in arg):
      raise validation.InvalidArgument(
          "passthrough overrides", rest=f"must read --config.<field>=<value>, got {arg!r}")
    field = arg[len("--config."):].split("=", 1)[0]
    if field in ("seed", "hparams_seed"):
      raise validation.InvalidArgument(
          f"--config.{field}", rest="is set by the sweep for every run; use --n_trials / "
          "--n_hparams")


def make_jobs(
    *,
    algorithms: Sequence[str],
    datasets: Sequence[str],
    n_hparams: int,
    n_trials: int,
    output_dir: str,
    config_dir: str = DEFAULT_CONFIG_DIR,
    num_epochs: int | None = None,
    overrides: Sequence[str] = (),
    train_command: Sequence[str] = DEFAULT_TRAIN_COMMAND,
) -> list[Job]:
  """Returns the sweep's jobs, dataset-major, then algorithm, hparams seed, trial seed.

  Args:
    algorithms: algorithm names (config arguments).
    datasets: dataset config names.
    n_hparams: hyperparameter seeds ``0 .. n_hparams - 1`` (0 = defaults).
    n_trials: trial seeds ``0 .. n_trials - 1``.
    output_dir: root of the sweep's working directories.
    config_dir: folder holding ``<dataset>.py``.
    num_epochs: when given, passed as ``--config.num_epochs``.
    overrides: extra ``--config.<field>=<value>`` flags, passed to every run.
    train_command: the argv prefix that trains one run.

  Raises:
    ValueError: for an empty grid, counts < 1, or malformed overrides.
  """
  if not algorithms:
    raise validation.InvalidArgument("algorithms", rest="must name at least one algorithm")
  if not datasets:
    raise validation.InvalidArgument("datasets", rest="must name at least one dataset")
  validation.integer("n_hparams", n_hparams, minimum=1)
  validation.integer("n_trials", n_trials, minimum=1)
  if num_epochs is not None:
    validation.integer("num_epochs", num_epochs, minimum=1)
  for name, values in (("algorithms", algorithms), ("datasets", datasets)):
    duplicates = sorted(v for v, c in collections.Counter(values).items() if c > 1)
    if duplicates:
      raise validation.InvalidArgument(name, rest=f"lists {duplicates} more than once")
  check_overrides(overrides)

  jobs = []
  for dataset in datasets:
    for algorithm in algorithms:
      for hparams_seed in range(n_hparams):
        for trial_seed in range(n_trials):
          workdir = os.path.join(output_dir, dataset, algorithm,
                                 run_name(hparams_seed, trial_seed))
          command = [
              *train_command,
              f"--config={_config_arg(config_dir, dataset)}:{algorithm}",
              f"--workdir={workdir}",
              f"--config.hparams_seed={hparams_seed}",
              f"--config.seed={trial_seed}",
          ]
          if num_epochs is not None:
            command.append(f"--config.num_epochs={int(num_epochs)}")
          command.extend(overrides)
          jobs.append(Job(dataset, algorithm, hparams_seed, trial_seed, workdir,
                          tuple(command)))
  return jobs


def check_configs(jobs: Sequence[Job], config_dir: str) -> None:
  """Raises ``FileNotFoundError`` naming every dataset whose config file is missing."""
  missing = sorted({j.dataset for j in jobs
                    if not os.path.isfile(os.path.join(config_dir, f"{j.dataset}.py"))})
  if missing:
    available = sorted(p.stem for p in pathlib.Path(config_dir).glob("*.py")
                       if not p.stem.startswith("_"))
    raise FileNotFoundError(
        f"no config for datasets {missing} in {config_dir!r}; available: {available}")


def validate_configs(jobs: Sequence[Job]) -> None:
  """Builds and validates every distinct config of ``jobs`` as ``dale-train`` would.

  Each job's ``--config=...`` and ``--config.<field>=...`` arguments are parsed by
  ml_collections and checked by :func:`dale_jax.configs.validate` (after the
  hyperparameter seed's draws), so that a bad override is refused before any run
  starts. Raises :class:`dale_jax.validation.InvalidArgument` naming the run.
  """
  seen = set()
  for job in jobs:
    args = tuple(a for a in job.command if a.startswith("--config") and
                 not a.startswith("--config.seed="))
    if args not in seen:
      seen.add(args)
      job_config(job)


def job_config(job: Job):
  """The config ``dale-train`` builds for ``job``, resolved and validated.

  Raises :class:`dale_jax.validation.InvalidArgument` naming the run.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from dale_jax import configs  # pylint: disable=import-outside-toplevel
  from dale_jax import experiment  # pylint: disable=import-outside-toplevel

  argv = configs.expand_config_flags(
      ["dale-train", *(a for a in job.command if a.startswith("--config"))])
  values = flags.FlagValues()
  # sys_argv: the override flags are defined from the command line they come in.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)
    config = experiment.resolve(values.config)
    experiment.build(config)
    return config
  except (LookupError, AttributeError) as e:  # an override of no field
    raise validation.InvalidArgument(
        f"run {job.workdir}: {configs.unknown_field_message(e, argv)}") from e
  except (flags.Error, ValueError, OSError) as e:
    text = " ".join(str(e).split())
    raise validation.InvalidArgument(f"run {job.workdir}: {text}") from e


@functools.lru_cache(maxsize=None)
def _resolved(job: Job) -> dict:
  return job_config(job).to_dict()


def stale_changes(job: Job) -> dict[str, tuple]:
  """``{field: (trained, asked)}``: how the config ``job.workdir`` was trained with differs
  from the one ``job`` asks for, in fields that a resume cannot change; ``{}`` when it
  does not differ or the workdir has no ``config.json``."""
  if job.command[:len(DEFAULT_TRAIN_COMMAND)] != DEFAULT_TRAIN_COMMAND or not (
      rundir.has_config(job.workdir)):
    return {}
  return rundir.resume_changes(rundir.read_config(job.workdir), _resolved(job))[1]


def job_state(job: Job) -> str:
  """``not launched`` (no workdir), ``stale`` (trained with another config: see
  :func:`stale_changes`), ``done`` (``done`` file present, same config) or
  ``incomplete`` (otherwise, e.g. a done run asked for more epochs)."""
  if not os.path.exists(job.workdir):
    return NOT_LAUNCHED
  if stale_changes(job):
    return STALE
  more_epochs = (rundir.has_config(job.workdir) and
                 job.command[:len(DEFAULT_TRAIN_COMMAND)] == DEFAULT_TRAIN_COMMAND and
                 rundir.resume_changes(rundir.read_config(job.workdir), _resolved(job))[0])
  if rundir.is_done(job.workdir) and not more_epochs:
    return DONE
  return INCOMPLETE


def check_not_stale(jobs: Sequence[Job], where: str) -> None:
  """Refuses a grid whose output directory (``where``) holds runs of another config.

  Raises:
    validation.BadInput: naming how many, the first one and what differs.
  """
  stale = [j for j in jobs if job_state(j) == STALE]
  if stale:
    raise validation.BadInput(
        f"{len(stale)} of the {len(jobs)} runs in {where} were trained with another config "
        f"({stale[0].workdir}: {rundir.describe_changes(stale_changes(stale[0]))}); use another "
        "output directory, or remove those runs")


def summarize(jobs: Sequence[Job]) -> dict[str, int]:
  """Counts jobs per state."""
  counts = {NOT_LAUNCHED: 0, INCOMPLETE: 0, DONE: 0, STALE: 0}
  for job in jobs:
    counts[job_state(job)] += 1
  return counts


def select_jobs(jobs: Sequence[Job], *, resume_incomplete: bool = True,
                clean_incomplete: bool = False) -> list[Job]:
  """Returns the jobs to launch: every unlaunched one, plus the incomplete ones if asked.

  Incomplete jobs are relaunched when ``resume_incomplete`` or
  ``clean_incomplete`` is set (the latter deletes their workdir in
  :func:`launch`); otherwise they are left alone.
  """
  selected = []
  for job in jobs:
    state = job_state(job)
    if state == NOT_LAUNCHED or (state == INCOMPLETE and (resume_incomplete or clean_incomplete)):
      selected.append(job)
  return selected


@dataclasses.dataclass
class Outcome:
  """What became of one launched job."""

  job: Job
  returncode: int
  seconds: float
  done: bool

  @property
  def ok(self) -> bool:
    return self.returncode == 0 and self.done


def _tail(path: str, n_lines: int) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(collections.deque(f, maxlen=n_lines))
  except OSError:
    return ""


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def launch(
    jobs: Sequence[Job],
    *,
    n_workers: int = 1,
    devices: Sequence[str] | None = None,
    device_env: str | None = None,
    clean_incomplete: bool = False,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    poll_seconds: float = 0.1,
    popen: Callable[..., subprocess.Popen] = subprocess.Popen,
) -> list[Outcome]:
  """Runs ``jobs`` as child processes, at most ``n_workers`` at a time, and reports progress.

  Args:
    jobs: what to run (typically :func:`select_jobs`'s answer).
    n_workers: number of concurrent processes.
    devices: ``devices[i]`` is the device of worker ``i`` (default ``0 .. n_workers-1``).
    device_env: environment variable that pins a process to its worker's
      device, e.g. ``CUDA_VISIBLE_DEVICES``; ``None`` leaves the environment alone.
      When workers share a device (``devices`` repeats an id), the children
      also get ``XLA_PYTHON_CLIENT_PREALLOCATE=false``.
    clean_incomplete: delete a job's existing workdir (checkpoints included)
      before launching it.
    env: base environment of the children (default ``os.environ``).
    out: where progress lines go (default ``sys.stdout``).
    poll_seconds: how often finished children are looked for.
    popen: process factory (``subprocess.Popen``'s signature).

  Returns:
    One :class:`Outcome` per job, in completion order. A job succeeded when it
    exited with 0 and left its ``done`` file.
  """
  validation.integer("n_workers", n_workers, minimum=1)
  devices = [str(d) for d in (devices if devices is not None else range(n_workers))]
  if len(devices) < n_workers:
    raise validation.InvalidArgument(
        "devices", rest=f"lists {len(devices)} devices for n_workers={n_workers}")
  base_env = dict(os.environ if env is None else env)
  if device_env and len(set(devices[:n_workers])) < n_workers:
    # Workers share a device: JAX must not grab 75% of its memory per process.
    base_env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  out = sys.stdout if out is None else out

  pending = collections.deque(jobs)
  free_slots = list(range(n_workers))[::-1]
  running = {}  # slot -> (job, process, log file, start time)
  outcomes = []
  total = len(jobs)
  sweep_start = time.monotonic()

  def start(job: Job, slot: int):
    if clean_incomplete and os.path.exists(job.workdir):
      shutil.rmtree(job.workdir)
    os.makedirs(job.workdir, exist_ok=True)
    child_env = dict(base_env)
    if device_env:
      child_env[device_env] = devices[slot]
    log = open(os.path.join(job.workdir, LOG_FILE), "a")
    device_note = f" ({device_env}={devices[slot]})" if device_env else ""
    log.write(f"$ {job.command_str}{device_note}\n")
    log.flush()
    started = time.monotonic()
    try:
      process = popen(list(job.command), stdout=log, stderr=subprocess.STDOUT,
                      env=child_env)
    except OSError as e:  # e.g. a train command that does not exist
      log.write(f"cannot start: {e}\n")
      running[slot] = (job, None, log, started)
      finish(slot, 127)
      return
    running[slot] = (job, process, log, started)
    print(f"[start] {job.name}{device_note}", file=out, flush=True)

  def finish(slot: int, returncode: int):
    job, _, log, started = running.pop(slot)
    log.close()
    free_slots.append(slot)
    outcome = Outcome(job, returncode, time.monotonic() - started,
                      rundir.is_done(job.workdir))
    outcomes.append(outcome)
    n_ok = sum(o.ok for o in outcomes)
    elapsed = time.monotonic() - sweep_start
    eta = elapsed / len(outcomes) * (total - len(outcomes))
    status = "done" if outcome.ok else (
        f"FAILED (exit code {returncode})" if returncode else "FAILED (no 'done' file)")
    print(f"[{len(outcomes)}/{total}] {status}: {job.name} in "
          f"{_format_seconds(outcome.seconds)}; {n_ok} ok, {len(outcomes) - n_ok} failed, "
          f"elapsed {_format_seconds(elapsed)}, eta {_format_seconds(eta)}",
          file=out, flush=True)
    if not outcome.ok:
      log_path = os.path.join(job.workdir, LOG_FILE)
      print(f"  log: {log_path}; last lines:\n{_tail(log_path, 20)}", file=out, flush=True)

  try:
    while pending or running:
      while pending and free_slots:
        start(pending.popleft(), free_slots.pop())
      for slot in list(running):
        returncode = running[slot][1].poll()
        if returncode is not None:
          finish(slot, returncode)
      if running:
        time.sleep(poll_seconds)
  except BaseException:
    # Interrupted: stop the children too, so no process outlives the sweep.
    for _, process, _, _ in running.values():
      process.terminate()
    for _, process, log, _ in running.values():
      try:
        process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
      log.close()
    raise
  return outcomes
