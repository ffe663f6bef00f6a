"""A run's checkpoints: save, restore, the latest step, and a trained model back.

The checkpoint of a run is its :class:`dale_jax.train_state.TrainState` (params,
batch statistics, optimizer and dual state, step, key) and the training meters of
the epoch in progress, written with orbax under ``<workdir>/checkpoints/<step>``;
the two latest are kept. ::

  manager = checkpoint.manager(workdir)
  checkpoint.save(manager, state, {"sums": {}, "elapsed": 0.0})
  state, meters = checkpoint.restore(manager, state)          # the latest step
  config, logits_fn, dataset = checkpoint.load_trained(workdir)  # a model to attack
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from dale_jax import data as data_lib
from dale_jax import experiment as experiment_lib
from dale_jax import rundir
from dale_jax import validation
from dale_jax.train_state import TrainState

# Checkpoints kept per run: the latest, and the one before in case the latest was cut.
MAX_TO_KEEP = 2


class MissingCheckpointError(validation.BadInput, FileNotFoundError):
  """A workdir without the checkpoint that a command needs."""


def manager(workdir: str) -> ocp.CheckpointManager:
  """The orbax manager of ``<workdir>/checkpoints`` (created if absent; saves synchronous)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(rundir.path(workdir, rundir.CHECKPOINTS)),
                               options=options)


def latest_step(workdir: str) -> int | None:
  """The step of ``workdir``'s latest checkpoint, ``None`` if it has none (nothing created)."""
  if not os.path.isdir(rundir.path(workdir, rundir.CHECKPOINTS)):
    return None
  return manager(workdir).latest_step()


def state_tree(state: TrainState) -> dict[str, Any]:
  """The arrays of ``state`` that a checkpoint holds (everything but the optimizer's code)."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state, "dual_state": state.dual_state, "key": state.key}


def save(mgr: ocp.CheckpointManager, state: TrainState, meters: dict) -> None:
  """Writes ``state`` and the JSON ``meters`` as checkpoint ``state.step``; returns when written."""
  mgr.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state_tree(state)), meters=ocp.args.JsonSave(meters)))
  mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, state: TrainState,
            step: int | None = None) -> tuple[TrainState, dict]:
  """``(state, meters)`` of checkpoint ``step`` (default: the latest).

  ``state`` gives the structure, shapes and dtypes (e.g.
  :func:`dale_jax.experiment.init_state` of the run's config); its arrays are replaced.
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise MissingCheckpointError(f"no checkpoint in {mgr.directory}")
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state_tree(state)), meters=ocp.args.JsonRestore()))
  return state.replace(**restored["state"]), restored["meters"]


def load_trained(workdir: str):
  """Restores a run for evaluation: ``(config, logits_fn, dataset)``.

  ``logits_fn(x)`` is the model in eval mode (``config.eval.dtype``) with the latest
  checkpoint's weights, a ``jax.tree_util.Partial`` whose bound argument is the
  variables (``logits_fn.args[0]``), so that the attacks trace the weights instead of
  baking them into their programs.

  Raises:
    MissingCheckpointError: ``workdir`` has no checkpoint.
  """
  config = ml_collections.ConfigDict(rundir.read_config(workdir))
  if latest_step(workdir) is None:
    raise MissingCheckpointError(f"no checkpoint in {workdir}/checkpoints: is it the workdir "
                                 "of a dale-train run that saved one?")
  dataset = data_lib.load(config.dataset, data_dir=config.data.data_dir,
                          validation_size=config.data.validation_size)
  exp = experiment_lib.build(config, num_classes=dataset.num_classes)
  state = experiment_lib.init_state(exp, jax.random.key(0), dataset.input_shape)
  state, _ = restore(manager(workdir), state)
  apply = functools.partial(exp.eval_model.apply, train=False)
  return config, jax.tree_util.Partial(apply, state.variables), dataset
