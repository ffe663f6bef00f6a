"""Training and evaluation: module-level pure steps and the ``train_and_evaluate`` loop.

``train_step(state, batch, *, model, algorithm)`` runs the whole advbench step in
one program: the sampler loop (model in eval mode), the primal update and the
dual update. :func:`make_train_step` compiles it data-parallel over the
``data`` mesh axis with the state donated. :func:`train_and_evaluate` drives
epochs, evaluators, ``results.jsonl`` records and orbax checkpoints.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from dale_jax import algorithms as algorithms_lib
from dale_jax import configs
from dale_jax import data as data_lib
from dale_jax import dual as dual_lib
from dale_jax import evaluation
from dale_jax import parallel
from dale_jax import rundir
from dale_jax import samplers as samplers_lib
from dale_jax import validation
from dale_jax.models import get_model, init_variables
from dale_jax.train_state import TrainState

Array = jax.Array


# ----------------------------------------------------------------------------
# Construction.


def create_model(config: ml_collections.ConfigDict, num_classes: int, dtype: str | None = None):
  """``config.model`` computing in ``dtype`` (default ``config.model.dtype``).

  The parameters are float32 whatever the compute dtype, so one set of weights
  serves a bfloat16 training step and a float32 evaluation.
  """
  dtype = dtype or config.model.dtype
  kwargs = {} if dtype == "float32" else {"dtype": getattr(jnp, dtype)}
  if "initializer" in config.model:
    kwargs["initializer"] = config.model.initializer
  return get_model(config.model.name, num_classes, **kwargs)


def eval_dtype(config: ml_collections.ConfigDict) -> str:
  """The compute dtype of the evaluators: ``config.eval.dtype``, float32 by default."""
  return config.eval.get("dtype", "float32")


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """``lr * scales[i]`` from epoch ``boundaries[i]`` on (advbench's absolute factors)."""
  lr = config.optimizer.learning_rate
  boundaries = [b * steps_per_epoch for b in config.schedule.boundaries]
  values = [lr] + [lr * s for s in config.schedule.scales]
  return optax.join_schedules([optax.constant_schedule(v) for v in values], boundaries)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """PyTorch's SGD: weight decay added to the gradient, then heavy-ball momentum."""
  o = config.optimizer
  return optax.chain(
      optax.add_decayed_weights(o.weight_decay),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=o.momentum or None,
                nesterov=o.nesterov),
  )


# Examples per CPU device that the sampler perturbs at a time by default: small
# enough that a chunk's activations stay in cache through the sampler's steps, large
# enough for efficient matmuls (docs/performance.md has the measurements).
CPU_SAMPLER_CHUNK = 32


def sampler_chunk_size(config: ml_collections.ConfigDict, platform: str | None = None) -> int:
  """Examples per device that the sampler perturbs at a time (0: the whole batch).

  The config's ``sampler_chunk_size``; where it is ``None`` (the default),
  :data:`CPU_SAMPLER_CHUNK` when ``platform`` (default: JAX's default backend) is
  ``cpu``, where a chunk's activations then stay in cache through the sampler's
  steps, and the whole batch on a GPU or TPU. Chunking leaves the perturbations'
  law unchanged (see :func:`dale_jax.samplers.in_chunks`).
  """
  chunk = config.get("sampler_chunk_size")
  if chunk is not None:
    return chunk
  return CPU_SAMPLER_CHUNK if (platform or jax.default_backend()) == "cpu" else 0


def perturbation_section(config: ml_collections.ConfigDict) -> dict | None:
  """The config's ``perturbation`` section as a dict (``None`` in configs without one)."""
  section = config.get("perturbation")
  return None if section is None else section.to_dict()


def algorithm_for(config: ml_collections.ConfigDict, steps_per_epoch: int = 1,
                  num_devices: int = 1, platform: str | None = None):
  """The config's algorithm, its sampler in chunks of :func:`sampler_chunk_size`.

  ``num_devices`` is how many devices the batch is split over (the chunk size is
  per device), ``platform`` their kind (default: JAX's default backend).
  """
  algorithm = algorithms_lib.make_algorithm(
      config.algorithm, sampler=configs.sampler_section(config),
      perturbation=perturbation_section(config), loss=config.loss.to_dict(),
      dual=config.dual.to_dict(), draws=config.draws, steps_per_epoch=steps_per_epoch)
  chunk = sampler_chunk_size(config, platform)
  if chunk and algorithm.sampler is not None and not samplers_lib.couples_examples(
      config.sampler):
    algorithm = algorithm._replace(sampler=samplers_lib.in_chunks(
        algorithm.sampler, chunk * num_devices, groups=num_devices))
  return algorithm


def create_train_state(config: ml_collections.ConfigDict, key: Array, input_shape, num_classes: int,
                       steps_per_epoch: int = 1) -> TrainState:
  """Initial state: fresh parameters, optimizer and dual state, and the run's key."""
  model = create_model(config, num_classes)
  init_key, run_key = jax.random.split(key)
  variables = init_variables(model, init_key, tuple(input_shape))
  tx = make_optimizer(config, steps_per_epoch)
  algorithm = algorithm_for(config, steps_per_epoch)
  # Without a dual, a fixed zero placeholder keeps the state's structure the same.
  dual_state = (algorithm.dual or dual_lib.dual_ascent(0.0, 0.0, 0.0)).init()
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
      dual_state=dual_state, key=jax.random.key_data(run_key), tx=tx)


# ----------------------------------------------------------------------------
# The step.


def _forward(model, params, batch_stats, x, key):
  """Train-mode forward; returns logits and the updated BatchNorm statistics."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    logits, updates = model.apply(variables, x, train=True, rngs={"dropout": key},
                                  mutable=["batch_stats"])
    return logits, updates["batch_stats"]
  return model.apply(variables, x, train=True, rngs={"dropout": key}), batch_stats


def train_step(state: TrainState, batch: dict, *, model, algorithm: algorithms_lib.Algorithm,
               augment: bool = False) -> tuple[TrainState, dict]:
  """One primal-dual step of ``algorithm`` on ``batch = {"image", "label"}``.

  1. perturbations ``x'`` from the sampler, model in eval mode, no gradient;
  2. ``theta <- opt(theta, grad_theta loss(f(x), f(x'), y, nu))`` in train mode;
  3. ``nu <- dual.update(constraint, nu)`` on the same batch's constraint value.

  Returns the new state and the step's meters (scalars, not fetched here).
  """
  aug_key, attack_key, clean_key, adv_key = jax.random.split(state.step_key(), 4)
  x, y = batch["image"], batch["label"]
  if augment:
    x = data_lib.augment(aug_key, x)
  logits_fn = lambda z: model.apply(state.variables, z, train=False)
  nu = state.dual_state.nu if algorithm.dual else None

  x_adv = None
  if algorithm.sampler is not None:
    if algorithm.draws == 1:
      x_adv = algorithm.sampler(attack_key, logits_fn, x, y)[None]
    else:
      draw = lambda k: algorithm.sampler(k, logits_fn, x, y)
      x_adv = jax.lax.map(draw, jax.random.split(attack_key, algorithm.draws))

  def loss_fn(params):
    stats = state.batch_stats
    clean_logits = adv_logits = None
    if algorithm.needs_clean:
      clean_logits, stats = _forward(model, params, stats, x, clean_key)
    if x_adv is not None:
      flat = x_adv.reshape((-1,) + x.shape[1:])
      adv_logits, stats = _forward(model, params, stats, flat, adv_key)
      adv_logits = adv_logits.reshape(x_adv.shape[:2] + adv_logits.shape[-1:])
    loss, meters, constraint = algorithm.loss(clean_logits, adv_logits, y, nu)
    return loss, (meters, constraint, stats)

  grads, (meters, constraint, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  dual_state = state.dual_state
  if algorithm.dual is not None:
    dual_state = algorithm.dual.update(constraint, dual_state)
    meters = dict(meters, **{"dual variable": dual_state.nu})
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, dual_state=dual_state)
  return new_state, meters


def make_train_step(config: ml_collections.ConfigDict, num_classes: int = 10,
                    steps_per_epoch: int = 1, mesh=None) -> Callable:
  """``step(state, batch) -> (state, meters)``, jitted over the ``data`` mesh, state donated."""
  mesh = mesh or parallel.make_mesh()
  step = functools.partial(
      train_step, model=create_model(config, num_classes),
      algorithm=algorithm_for(config, steps_per_epoch, mesh.size,
                               mesh.devices.flat[0].platform),
      augment=bool(config.data.augment))
  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, sharded), out_shardings=(repl, repl),
                 donate_argnums=0)


def eval_step(variables, batch: dict, key: Array, *, model, evaluators: dict) -> dict:
  """Summed evaluator results on one padded batch (``batch["mask"]`` marks real rows)."""
  logits_fn = lambda z: model.apply(variables, z, train=False)
  out = {}
  for i, (name, evaluate) in enumerate(sorted(evaluators.items())):
    out.update(evaluate(jax.random.fold_in(key, i), logits_fn, batch["image"], batch["label"],
                        batch["mask"]))
  return out


def make_eval_step(config: ml_collections.ConfigDict, num_classes: int, mesh=None) -> Callable:
  mesh = mesh or parallel.make_mesh()
  settings = config.eval.to_dict()
  evaluators = {n: evaluation.make_evaluator(n, settings) for n in config.eval.evaluators}
  step = functools.partial(eval_step, model=create_model(config, num_classes, eval_dtype(config)),
                           evaluators=evaluators)
  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(repl, sharded, repl), out_shardings=repl)


def evaluate_split(eval_fn, variables, x: np.ndarray, y: np.ndarray, key: Array, *,
                   batch_size: int, mesh) -> dict[str, float]:
  """Runs ``eval_fn`` over a whole split and returns advbench's result keys.

  Batches hold ``batch_size`` examples, padded with masked rows to a multiple of
  the device count; with several processes each feeds its own rows of the global
  batch. Every process passes the whole split and gets the same result.
  """
  padded = parallel.padded_batch_size(batch_size, mesh)
  rows = parallel.process_rows(padded)
  sync = parallel.one_step_at_a_time(mesh)
  sums: dict[str, Any] = {}
  for i, (bx, by, mask) in enumerate(data_lib.eval_batches(x, y, batch_size, pad_to=padded)):
    batch = parallel.shard_batch({"image": bx[rows], "label": by[rows], "mask": mask[rows]}, mesh)
    if sums and sync:
      jax.block_until_ready(sums)
    out = eval_fn(variables, batch, jax.random.fold_in(key, i))
    sums = out if not sums else jax.tree.map(jnp.add, sums, out)
  return evaluation.finalize(jax.device_get(sums), len(y))


# ----------------------------------------------------------------------------
# Records and checkpoints.


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(rundir.path(workdir, rundir.CHECKPOINTS)),
                               options=options)


def _state_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state, "dual_state": state.dual_state, "key": state.key}


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
  tree = _state_tree(state)
  del tree["step"], tree["key"]
  bad = sorted(k for k, v in jax.device_get(_non_finite_parts(tree)).items() if v)
  if bad:
    raise FloatingPointError(f"non-finite {', '.join(bad)} after {where}")


def _save(manager, state: TrainState, meters: dict) -> None:
  manager.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state_tree(state)), meters=ocp.args.JsonSave(meters)))
  manager.wait_until_finished()


def _restore(manager, state: TrainState) -> tuple[TrainState, dict]:
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_state_tree(state)), meters=ocp.args.JsonRestore()))
  tree = restored["state"]
  return state.replace(**tree), restored["meters"]


def resolve_config(config: ml_collections.ConfigDict,
                   num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Applies the hyperparameter search seed and validates; never mutates ``config``.

  ``num_devices=None`` checks everything but the batch's split over the devices, so
  that a bad config is refused before JAX's backend (or the distributed runtime) starts.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  configs.apply_random_hparams(config)
  configs.validate(config, num_devices=num_devices)
  return config


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
  for name in config.eval.splits:
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
  config = resolve_config(config)
  parallel.initialize_distributed(config.parallel.coordinator_address,
                                  config.parallel.num_processes, config.parallel.process_id,
                                  auto=config.parallel.get("auto", False))
  configs.validate(config, num_devices=jax.device_count())
  mesh = parallel.make_mesh()
  dataset = data_lib.load(config.dataset, data_dir=config.data.data_dir,
                          validation_size=config.data.validation_size)
  train_x, train_y = _training_split(config, dataset)
  steps_per_epoch = data_lib.num_batches(len(train_y), config.batch_size)
  run = _Run(workdir, config)

  state = create_train_state(config, jax.random.key(config.seed), dataset.input_shape,
                             dataset.num_classes, steps_per_epoch)
  state, sums, elapsed = run.restore(state)
  state = jax.device_put(state, parallel.replicated(mesh))
  train_fn = make_train_step(config, dataset.num_classes, steps_per_epoch, mesh)
  eval_fn = make_eval_step(config, dataset.num_classes, mesh)
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
        record[name] = evaluate_split(eval_fn, state.variables, x, y,
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
    self.manager = _checkpoint_manager(workdir)
    self.records: list[dict] = []
    self.writer = rundir.ScalarWriter(workdir) if self.is_main else None

  def restore(self, state: TrainState) -> tuple[TrainState, dict, float]:
    """The latest checkpoint's state, meter sums and elapsed seconds (or a fresh start)."""
    if self.manager.latest_step() is None:
      return state, {}, 0.0
    state, saved = _restore(self.manager, state)
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
    _save(self.manager, state, {"sums": meters.sums, "elapsed": time.time() - run_start})

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


class MissingCheckpointError(validation.BadInput, FileNotFoundError):
  """A workdir without the checkpoint that a command needs."""


def load_trained(workdir: str):
  """Restores a run for evaluation: ``(config, logits_fn, dataset)``.

  ``logits_fn(x)`` is the model in eval mode with the latest checkpoint's weights, a
  ``jax.tree_util.Partial`` whose bound argument is the variables (``logits_fn.args[0]``),
  so that the attacks trace the weights instead of baking them into their programs.
  """
  config = ml_collections.ConfigDict(rundir.read_config(workdir))
  dataset = data_lib.load(config.dataset, data_dir=config.data.data_dir,
                          validation_size=config.data.validation_size)
  state = create_train_state(config, jax.random.key(0), dataset.input_shape, dataset.num_classes)
  manager = None
  if os.path.isdir(rundir.path(workdir, rundir.CHECKPOINTS)):
    manager = _checkpoint_manager(workdir)
  if manager is None or manager.latest_step() is None:
    raise MissingCheckpointError(f"no checkpoint in {workdir}/checkpoints: is it the workdir "
                                 "of a dale-train run that saved one?")
  state, _ = _restore(manager, state)
  model = create_model(config, dataset.num_classes, eval_dtype(config))
  variables = state.variables
  apply = functools.partial(model.apply, train=False)
  return config, jax.tree_util.Partial(apply, variables), dataset
