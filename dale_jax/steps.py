"""The jitted steps of a run: the primal-dual training step and the evaluators' step.

``train_step(state, batch, *, model, algorithm)`` runs the whole advbench step in
one program: the sampler loop (model in eval mode), the primal update and the
dual update. :func:`make_train_step` compiles it data-parallel over the ``data``
mesh axis with the state donated, from an :class:`dale_jax.experiment.Experiment`;
:func:`make_eval_step` and :func:`evaluate_split` do the same for the evaluators.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dale_jax import algorithms as algorithms_lib
from dale_jax import data as data_lib
from dale_jax import evaluation
from dale_jax import parallel
from dale_jax import samplers as samplers_lib
from dale_jax.experiment import Experiment
from dale_jax.train_state import TrainState

Array = jax.Array


# ----------------------------------------------------------------------------
# Sampler chunks.


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


def chunked(algorithm: algorithms_lib.Algorithm, config: ml_collections.ConfigDict,
            num_devices: int = 1, platform: str | None = None) -> algorithms_lib.Algorithm:
  """``algorithm`` with its sampler run in chunks of :func:`sampler_chunk_size` per device.

  ``num_devices`` is how many devices the batch is split over (the chunk size is
  per device), ``platform`` their kind (default: JAX's default backend). Samplers
  that couple the examples of a batch (:func:`dale_jax.samplers.couples_examples`)
  run whole.
  """
  chunk = sampler_chunk_size(config, platform)
  if chunk and algorithm.sampler is not None and not samplers_lib.couples_examples(
      config.sampler):
    algorithm = algorithm._replace(sampler=samplers_lib.in_chunks(
        algorithm.sampler, chunk * num_devices, groups=num_devices))
  return algorithm


# ----------------------------------------------------------------------------
# The steps.


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


def make_train_step(experiment: Experiment, mesh=None) -> Callable:
  """``step(state, batch) -> (state, meters)``, jitted over the ``data`` mesh, state donated."""
  mesh = mesh or parallel.make_mesh()
  config = experiment.config
  step = functools.partial(
      train_step, model=experiment.model,
      algorithm=chunked(experiment.algorithm, config, mesh.size, mesh.devices.flat[0].platform),
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


def make_eval_step(experiment: Experiment, mesh=None) -> Callable:
  """``step(variables, batch, key) -> sums``: the experiment's evaluators, jitted over the mesh."""
  mesh = mesh or parallel.make_mesh()
  step = functools.partial(eval_step, model=experiment.eval_model,
                           evaluators=experiment.evaluators)
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
