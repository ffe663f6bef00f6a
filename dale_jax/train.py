"""The training job: ``train_and_evaluate(config, workdir)`` and the run's bookkeeping.

The config becomes its objects once (:func:`dale_jax.experiment.build`) before the
workdir is touched; the jitted steps are :mod:`dale_jax.steps`; the checkpoints
:mod:`dale_jax.checkpoint`. This module drives the epochs, the evaluators, the
``results.jsonl`` records and the checkpoints of one run, and refuses to resume a
workdir trained with another config.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dale_jax import checkpoint
from dale_jax import data as data_lib
from dale_jax import experiment as experiment_lib
from dale_jax import parallel
from dale_jax import rundir
from dale_jax import steps
from dale_jax import validation
from dale_jax.train_state import TrainState


@jax.jit
def _non_finite_parts(tree: dict) -> dict:
  """``{part: True if any entry is NaN or infinite}`` for the float leaves of each part."""
  def bad(part):
    leaves = [jnp.any(~jnp.isfinite(x)) for x in jax.tree.leaves(part)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.any(jnp.stack(leaves)) if leaves else jnp.zeros((), bool)
  return {name: bad(part) for name, part in tree.items()}


def check_finite(state: TrainState, where: str) -> None:
  """Raises ``FloatingPointError`` naming the parts of ``state`` that hold NaN or inf.

  The meters of a step are computed before its update, so an update that overflows
  (finite loss, infinite new weights or dual variable) shows only here; this runs
  before every checkpoint and every evaluation, so what is saved is always finite.
  """
  tree = checkpoint.state_tree(state)
  del tree["step"], tree["key"]
  bad = sorted(k for k, v in jax.device_get(_non_finite_parts(tree)).items() if v)
  if bad:
    raise FloatingPointError(f"non-finite {', '.join(bad)} after {where}")


class _Meters:
  """Sums of the step meters since the epoch began, fetched from the device in groups.

  Steps hand over their meters without a host sync; :meth:`fetch` adds the pending
  ones once per ``log_every_steps`` and refuses non-finite values. The sums (with
  ``_count``) are what a checkpoint keeps, so a resumed epoch reports the same means.
  """

  def __init__(self, sums: dict | None = None):
    self.sums: dict[str, float] = dict(sums or {})
    self._pending: list[dict] = []

  def add(self, meters: dict) -> None:
    self._pending.append(meters)

  def fetch(self, where: str) -> None:
    for m in jax.device_get(self._pending):
      for k, v in m.items():
        self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.sums["_count"] = self.sums.get("_count", 0.0) + len(self._pending)
    self._pending = []
    bad = sorted(k for k, v in self.sums.items() if not math.isfinite(v))
    if bad:
      means = self.means()
      raise FloatingPointError(
          f"non-finite training meters by {where}: "
          + ", ".join(f"{k!r} = {means[k]}" for k in bad))

  def means(self) -> dict[str, float]:
    count = self.sums.get("_count", 1.0)
    return {k: v / count for k, v in self.sums.items() if k != "_count"}


def _training_split(config: ml_collections.ConfigDict, dataset) -> tuple[np.ndarray, np.ndarray]:
  x, y = dataset.train
  if config.data.max_train_examples:
    x, y = x[:config.data.max_train_examples], y[:config.data.max_train_examples]
  if data_lib.num_batches(len(y), config.batch_size) == 0:
    raise validation.InvalidArgument(
        "config.batch_size", f"at most the {len(y)} training examples", config.batch_size)
  return x, y


def _evaluated_splits(config, dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  splits = {"Validation": dataset.validation, "Test": dataset.test}
  out = {}
  for name in map(rundir.split_key, config.eval.splits):
    x, y = splits[name]
    if config.eval.max_examples:
      x, y = x[:config.eval.max_examples], y[:config.eval.max_examples]
    if len(y):
      out[name] = (x, y)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config.algorithm``, evaluating every ``eval.every_epochs`` epochs.

  Resumes from ``workdir/checkpoints`` when present. Each evaluated epoch appends
  one advbench record to ``workdir/results.jsonl``; the finished run writes
  ``workdir/done``. Returns the last record.
  """
  config = experiment_lib.resolve(config)
  parallel.initialize_distributed(config.parallel.coordinator_address,
                                  config.parallel.num_processes, config.parallel.process_id,
                                  auto=config.parallel.get("auto", False))
  validation.require(config.batch_size % jax.device_count() == 0, "config.batch_size",
                     f"divisible by the {jax.device_count()} devices in use", config.batch_size)
  mesh = parallel.make_mesh()
  dataset = data_lib.load(config.dataset, data_dir=config.data.data_dir,
                          validation_size=config.data.validation_size)
  train_x, train_y = _training_split(config, dataset)
  steps_per_epoch = data_lib.num_batches(len(train_y), config.batch_size)
  experiment = experiment_lib.build(config, num_classes=dataset.num_classes,
                                    steps_per_epoch=steps_per_epoch)
  run = _Run(workdir, config)

  state = experiment_lib.init_state(experiment, jax.random.key(config.seed), dataset.input_shape)
  state, sums, elapsed = run.restore(state)
  state = jax.device_put(state, parallel.replicated(mesh))
  train_fn = steps.make_train_step(experiment, mesh)
  eval_fn = steps.make_eval_step(experiment, mesh)
  start = int(state.step)
  record = run.keep_records_before(start // steps_per_epoch)
  meters = _Meters(sums)
  rows = parallel.process_rows(config.batch_size)
  sync = parallel.one_step_at_a_time(mesh)
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  splits = _evaluated_splits(config, dataset)
  run_start = time.time() - elapsed

  for epoch in range(start // steps_per_epoch, config.num_epochs):
    epoch_start = time.time()
    skip = max(start - epoch * steps_per_epoch, 0)  # steps of this epoch already done
    if skip == 0:
      meters = _Meters()
    progress = rundir.Progress(steps_per_epoch, epoch)
    batches = data_lib.batches(train_x, train_y, config.batch_size, seed=config.seed,
                               epoch=epoch, start_step=skip)
    for done, (bx, by) in enumerate(batches, start=skip + 1):
      batch = parallel.shard_batch({"image": bx[rows], "label": by[rows]}, mesh)
      if sync:
        jax.block_until_ready(state)
      state, step_meters = train_fn(state, batch)
      meters.add(step_meters)
      checkpoint_now = done % config.checkpoint_every_steps == 0 and done != steps_per_epoch
      if done % config.log_every_steps == 0 or done == steps_per_epoch or checkpoint_now:
        run.guard(lambda: meters.fetch(f"step {done} of epoch {epoch}"))
        progress.update(done, (done - skip) * config.batch_size,
                        meters.sums["Loss"] / meters.sums["_count"])
      if checkpoint_now:
        run.save(state, meters, run_start, where=f"step {done} of epoch {epoch}")

    run.guard(lambda: check_finite(state, f"epoch {epoch}"))
    record = {"Epoch": epoch, "Train": meters.means()}
    if (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs:
      for name, (x, y) in splits.items():
        record[name] = steps.evaluate_split(eval_fn, state.variables, x, y,
                                      jax.random.fold_in(eval_key, epoch),
                                      batch_size=config.eval.batch_size, mesh=mesh)
    record.update(run.record_fields(epoch_start, run_start))
    run.append(epoch, record)
    run.save(state, meters, run_start)

  run.finish()
  return record


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """The changes of ``config`` from the one ``workdir`` was trained with, if allowed.

  A workdir with records or checkpoints belongs to the config in its ``config.json``:
  resuming it with another config would continue one experiment under another's name.
  More epochs are allowed (returned, and recorded in the next record); bookkeeping
  fields (:data:`dale_jax.rundir.BOOKKEEPING`) do not count.

  Raises:
    validation.BadInput: naming the differing fields, before anything is written.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise validation.BadInput(f"--workdir {workdir} is a file, not a directory")
  started = any(os.path.exists(rundir.path(workdir, name))
                for name in (rundir.RESULTS, rundir.CHECKPOINTS))
  if not (started and rundir.has_config(workdir)):
    return {}
  allowed, refused = rundir.resume_changes(rundir.read_config(workdir), config.to_dict())
  if refused:
    raise validation.BadInput(
        f"workdir {workdir} holds a run of another config ({rundir.describe_changes(refused)}); "
        "rerun it with its own settings, or train this config in another --workdir")
  if allowed:
    logging.info("Resuming %s with %s.", workdir, rundir.describe_changes(allowed))
  return allowed


class _Run:
  """The run directory as training sees it: config, records, checkpoints, writers.

  Files are written by process 0 only; every process checkpoints (orbax
  coordinates the hosts) and keeps the same records in memory.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir, self.config = workdir, config
    self.is_main = jax.process_index() == 0
    self.changes = check_resumable(workdir, config)
    os.makedirs(workdir, exist_ok=True)
    if self.is_main:
      rundir.write_config(workdir, config)
    self.manager = checkpoint.manager(workdir)
    self.records: list[dict] = []
    self.writer = rundir.ScalarWriter(workdir) if self.is_main else None

  def restore(self, state: TrainState) -> tuple[TrainState, dict, float]:
    """The latest checkpoint's state, meter sums and elapsed seconds (or a fresh start)."""
    if self.manager.latest_step() is None:
      return state, {}, 0.0
    state, saved = checkpoint.restore(self.manager, state)
    logging.info("Resumed from step %d.", int(state.step))
    return state, saved["sums"], saved["elapsed"]

  def keep_records_before(self, epoch: int) -> dict:
    """Drops the records of the epochs a resume redoes; returns the last one kept."""
    self.records = [r for r in rundir.read_records(rundir.path(self.workdir, rundir.RESULTS))
                    if r["Epoch"] < epoch]
    if self.is_main:
      rundir.write_records(self.workdir, self.records)
    return self.records[-1] if self.records else {}

  def guard(self, check: Callable[[], None]) -> None:
    """Runs ``check``; a ``FloatingPointError`` stops the run, keeping the last checkpoint."""
    try:
      check()
    except FloatingPointError as e:
      step = self.manager.latest_step()
      kept = (f"the last good checkpoint (step {step}) in {self.workdir}/checkpoints is kept"
              if step is not None else f"no checkpoint had been saved in {self.workdir}")
      raise FloatingPointError(f"{e}. Stopping; {kept}.") from None

  def save(self, state: TrainState, meters: _Meters, run_start: float,
           where: str | None = None) -> None:
    """Checkpoints ``state`` and the meter sums; ``where`` checks the state first."""
    if where is not None:
      self.guard(lambda: check_finite(state, where))
    checkpoint.save(self.manager, state, {"sums": meters.sums, "elapsed": time.time() - run_start})

  def record_fields(self, epoch_start: float, run_start: float) -> dict:
    """The fields every advbench record carries besides the metrics."""
    c = self.config
    fields = {"Epoch-Time": time.time() - epoch_start, "Total-Time": time.time() - run_start,
              "hparams": c.to_dict(),
              "args": {"algorithm": c.algorithm, "dataset": c.dataset, "seed": c.seed,
                       "hparams_seed": c.hparams_seed, "workdir": self.workdir}}
    if self.changes:  # on the first record after a resume that changed the config
      fields["Config-Changes"] = {k: list(v) for k, v in self.changes.items()}
      self.changes = {}
    return fields

  def append(self, epoch: int, record: dict) -> None:
    self.records.append(record)
    if self.is_main:
      rundir.write_records(self.workdir, self.records)
      self.writer.write(epoch, record)
    logging.info("epoch %d: %s", epoch, json.dumps({k: record.get(k) for k in ("Train", "Test")}))

  def finish(self) -> None:
    if self.is_main:
      rundir.mark_done(self.workdir)
