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
import sys
import time
from typing import Any, Callable, Iterator

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
from dale_jax import evaluation
from dale_jax import parallel
from dale_jax import report
from dale_jax import samplers as samplers_lib
from dale_jax import validation
from dale_jax.models import get_model, init_variables
from dale_jax.train_state import TrainState

Array = jax.Array
RESULTS = "results.jsonl"
CONFIG = "config.json"
DONE = "done"


# ----------------------------------------------------------------------------
# Construction.


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  kwargs = {}
  if config.model.dtype != "float32":
    kwargs["dtype"] = getattr(jnp, config.model.dtype)
  return get_model(config.model.name, num_classes, **kwargs)


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


# Examples per CPU device that the sampler perturbs at a time by default. On a
# 2-core Xeon (MNIST CNN, Gaussian_DALE_PD), speed relative to PyTorch eager in
# the same runs for chunks of 16 / 32 / 64 / the whole batch: 0.91 / 1.00 / 0.93 /
# 0.94 at batch 64; at batch 256, images/s of the JAX step alone: 290 / 288-293 /
# 264 / 238-254.
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


def make_algorithm(config: ml_collections.ConfigDict, steps_per_epoch: int = 1,
                   num_devices: int = 1, platform: str | None = None):
  """The config's algorithm, its sampler in chunks of :func:`sampler_chunk_size`.

  ``num_devices`` is how many devices the batch is split over (the chunk size is
  per device), ``platform`` their kind (default: JAX's default backend).
  """
  algorithm = algorithms_lib.make_algorithm(
      config.algorithm, sampler=config.sampler.to_dict(), loss=config.loss.to_dict(),
      dual=config.dual.to_dict(), draws=config.draws, steps_per_epoch=steps_per_epoch)
  chunk = sampler_chunk_size(config, platform)
  if chunk and algorithm.sampler is not None:
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
  algorithm = make_algorithm(config, steps_per_epoch)
  # Without a dual, a fixed zero placeholder keeps the state's structure the same.
  dual_state = (algorithm.dual or algorithms_lib.dual_lib.dual_ascent(0.0, 0.0, 0.0)).init()
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
      algorithm=make_algorithm(config, steps_per_epoch, mesh.size,
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
  step = functools.partial(eval_step, model=create_model(config, num_classes),
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


def _read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_records(workdir: str, records: list[dict]) -> None:
  """Rewrites ``results.jsonl`` atomically (used to drop epochs a resume redoes)."""
  path = os.path.join(workdir, RESULTS)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
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


class _Progress:
  """A one-line progress bar on a terminal, periodic log lines otherwise."""

  def __init__(self, total: int, epoch: int):
    self.total, self.epoch, self.start = total, epoch, time.time()
    self.tty = sys.stderr.isatty()

  def update(self, done: int, images: int, loss: float) -> None:
    rate = images / max(time.time() - self.start, 1e-9)
    line = f"epoch {self.epoch} [{done}/{self.total}] loss {loss:.4f} {rate:.0f} img/s"
    if self.tty:
      width = 30
      bar = "#" * int(width * done / max(self.total, 1))
      sys.stderr.write(f"\r{bar:<{width}} {line}")
      sys.stderr.flush()
      if done == self.total:
        sys.stderr.write("\n")
    else:
      logging.info(line)


# ----------------------------------------------------------------------------
# The loop.


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config.algorithm``, evaluating every ``eval.every_epochs`` epochs.

  Resumes from ``workdir/checkpoints`` when present. Each evaluated epoch appends
  one advbench record to ``workdir/results.jsonl``; the finished run writes
  ``workdir/done``. Returns the last record.
  """
  config = resolve_config(config)
  parallel.initialize_distributed(config.parallel.coordinator_address,
                                  config.parallel.num_processes, config.parallel.process_id)
  configs.validate(config, num_devices=jax.device_count())
  mesh = parallel.make_mesh()
  dataset = data_lib.load(config.dataset, data_dir=config.data.data_dir,
                          validation_size=config.data.validation_size)
  train_x, train_y = dataset.train
  if config.data.max_train_examples:
    train_x, train_y = train_x[:config.data.max_train_examples], train_y[:config.data.max_train_examples]
  steps_per_epoch = data_lib.num_batches(len(train_y), config.batch_size)
  if steps_per_epoch == 0:
    raise validation.InvalidArgument(
        "config.batch_size", f"at most the {len(train_y)} training examples", config.batch_size)

  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, CONFIG), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  key = jax.random.key(config.seed)
  state = create_train_state(config, key, dataset.input_shape, dataset.num_classes, steps_per_epoch)
  manager = _checkpoint_manager(workdir)
  meter_sums: dict[str, float] = {}
  elapsed = 0.0
  if manager.latest_step() is not None:
    state, saved = _restore(manager, state)
    meter_sums, elapsed = saved["sums"], saved["elapsed"]
    logging.info("Resumed from step %d.", int(state.step))
  state = jax.device_put(state, parallel.replicated(mesh))

  train_fn = make_train_step(config, dataset.num_classes, steps_per_epoch, mesh)
  eval_fn = make_eval_step(config, dataset.num_classes, mesh)
  start_step = int(state.step)
  first_epoch = start_step // steps_per_epoch
  records = [r for r in _read_records(workdir) if r["Epoch"] < first_epoch]
  if is_main:
    _write_records(workdir, records)
  rows = parallel.process_rows(config.batch_size)
  sync = parallel.one_step_at_a_time(mesh)
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  splits = {"Validation": dataset.validation, "Test": dataset.test}
  t_start = time.time() - elapsed
  record: dict = records[-1] if records else {}
  writer = report.ScalarWriter(os.path.join(workdir, "tensorboard")) if is_main else None

  def checkpoint(sums):
    _save(manager, state, {"sums": sums, "elapsed": time.time() - t_start})

  def stop_if_not_finite(where):
    try:
      check_finite(state, where)
    except FloatingPointError as e:
      raise FloatingPointError(
          f"{e}. Stopping; the last good checkpoint in {workdir}/checkpoints is kept.") from None

  for epoch in range(first_epoch, config.num_epochs):
    epoch_start = time.time()
    skip = start_step - epoch * steps_per_epoch if epoch == first_epoch else 0
    if epoch != first_epoch or skip == 0:
      meter_sums = {}
    progress = _Progress(steps_per_epoch, epoch)
    pending: list[dict] = []
    batches = data_lib.batches(train_x, train_y, config.batch_size, seed=config.seed,
                               epoch=epoch, start_step=skip)
    for i, (bx, by) in enumerate(batches, start=skip):
      batch = parallel.shard_batch({"image": bx[rows], "label": by[rows]}, mesh)
      if sync:
        jax.block_until_ready(state)
      state, meters = train_fn(state, batch)
      pending.append(meters)
      done = i + 1
      if done % config.log_every_steps == 0 or done == steps_per_epoch or (
          done % config.checkpoint_every_steps == 0):
        for m in jax.device_get(pending):
          for k, v in m.items():
            meter_sums[k] = meter_sums.get(k, 0.0) + float(v)
        meter_sums["_count"] = meter_sums.get("_count", 0.0) + len(pending)
        pending = []
        if not all(math.isfinite(v) for v in meter_sums.values()):
          raise FloatingPointError(
              f"non-finite training meters by step {done} of epoch {epoch}: {meter_sums}. "
              f"Stopping; the last good checkpoint in {workdir}/checkpoints is kept.")
        progress.update(done, (done - skip) * config.batch_size,
                        meter_sums["Loss"] / meter_sums["_count"])
        if done % config.checkpoint_every_steps == 0 and done != steps_per_epoch:
          stop_if_not_finite(f"step {done} of epoch {epoch}")
          checkpoint(meter_sums)

    stop_if_not_finite(f"epoch {epoch}")
    count = meter_sums.get("_count", 1.0)
    record = {"Epoch": epoch,
              "Train": {k: v / count for k, v in meter_sums.items() if k != "_count"}}
    if (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs:
      for split in config.eval.splits:
        x, y = splits[split]
        if config.eval.max_examples:
          x, y = x[:config.eval.max_examples], y[:config.eval.max_examples]
        if len(y):
          record[split] = evaluate_split(eval_fn, state.variables, x, y,
                                         jax.random.fold_in(eval_key, epoch),
                                         batch_size=config.eval.batch_size, mesh=mesh)
    record["Epoch-Time"] = time.time() - epoch_start
    record["Total-Time"] = time.time() - t_start
    record["hparams"] = config.to_dict()
    record["args"] = {"algorithm": config.algorithm, "dataset": config.dataset,
                      "seed": config.seed, "hparams_seed": config.hparams_seed,
                      "workdir": workdir}
    records.append(record)
    if is_main:
      _write_records(workdir, records)
      writer.write(epoch, record)
    logging.info("epoch %d: %s", epoch, json.dumps({k: record.get(k) for k in ("Train", "Test")}))
    checkpoint(meter_sums)

  if is_main:
    with open(os.path.join(workdir, DONE), "w") as f:
      f.write(f"{time.time()}\n")
  return record


class MissingCheckpointError(validation.BadInput, FileNotFoundError):
  """A workdir without the checkpoint that a command needs."""


def load_trained(workdir: str):
  """Restores a run for evaluation: ``(config, logits_fn, dataset)``.

  ``logits_fn(x)`` is the model in eval mode with the latest checkpoint's weights.
  """
  with open(os.path.join(workdir, CONFIG)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  dataset = data_lib.load(config.dataset, data_dir=config.data.data_dir,
                          validation_size=config.data.validation_size)
  state = create_train_state(config, jax.random.key(0), dataset.input_shape, dataset.num_classes)
  manager = None
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    manager = _checkpoint_manager(workdir)
  if manager is None or manager.latest_step() is None:
    raise MissingCheckpointError(f"no checkpoint in {workdir}/checkpoints: is it the workdir "
                                 "of a dale-train run that saved one?")
  state, _ = _restore(manager, state)
  model = create_model(config, dataset.num_classes)
  variables = state.variables
  return config, (lambda x: model.apply(variables, x, train=False)), dataset
