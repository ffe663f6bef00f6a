"""A config made into the objects of a run, in one place, once.

::

  config = experiment.resolve(config)                   # random search, every field checked
  exp = experiment.build(config, num_classes=10, steps_per_epoch=62)
  state = experiment.init_state(exp, jax.random.key(0), (28, 28, 1))

:func:`build` is the config's validation: whatever only a factory can tell (a loss
hyperparameter the algorithm does not take, a sampler field of another sampler, an
evaluator setting out of range) is refused there as
:class:`dale_jax.validation.InvalidArgument`, naming the field. Training builds
once, before its workdir is touched, and hands the same :class:`Experiment` to
the steps (:mod:`dale_jax.steps`) and the checkpoints; nothing is rebuilt.

How the sampler is cut into chunks depends on the devices, not the config, and is
done where the step is compiled (:func:`dale_jax.steps.make_train_step`).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from dale_jax import algorithms as algorithms_lib
from dale_jax import configs
from dale_jax import dual as dual_lib
from dale_jax import evaluation
from dale_jax import validation
from dale_jax.models import get_model, init_variables
from dale_jax.train_state import TrainState

Array = jax.Array


class Experiment(NamedTuple):
  """Everything a run is made of, built from one resolved config.

  Attributes:
    config: the resolved config (random search applied, every field checked).
    model: ``config.model`` computing in ``config.model.dtype`` (training).
    eval_model: the same parameters computing in ``config.eval.dtype`` (evaluators).
    optimizer: PyTorch's SGD with the config's schedule (:func:`make_optimizer`).
    algorithm: sampler, loss and dual of ``config.algorithm``, whole-batch sampler.
    evaluators: ``{name: evaluator}`` for ``config.eval.evaluators``.
    num_classes: logits of the model.
    steps_per_epoch: training steps per epoch (the schedule's and the epoch dual's unit).
  """
  config: ml_collections.ConfigDict
  model: nn.Module
  eval_model: nn.Module
  optimizer: optax.GradientTransformation
  algorithm: algorithms_lib.Algorithm
  evaluators: Mapping[str, evaluation.Evaluator]
  num_classes: int
  steps_per_epoch: int


def resolve(config: ml_collections.ConfigDict,
            num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Applies the hyperparameter search seed and checks every field; never mutates ``config``.

  ``num_devices=None`` checks everything but the batch's split over the devices, so
  that a bad config is refused before JAX's backend (or the distributed runtime) starts.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  configs.apply_random_hparams(config)
  configs.validate(config, num_devices=num_devices)
  return config


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 dtype: str | None = None) -> nn.Module:
  """``config.model`` computing in ``dtype`` (default ``config.model.dtype``).

  The parameters are float32 whatever the compute dtype, so one set of weights
  serves a bfloat16 training step and a float32 evaluation.
  """
  dtype = dtype or config.model.dtype
  kwargs: dict[str, Any] = {} if dtype == "float32" else {"dtype": getattr(jnp, dtype)}
  if "initializer" in config.model:
    kwargs["initializer"] = config.model.initializer
  return get_model(config.model.name, num_classes, **kwargs)


def eval_dtype(config: ml_collections.ConfigDict) -> str:
  """The compute dtype of the evaluators: ``config.eval.dtype``, float32 by default."""
  return config.eval.get("dtype", "float32")


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """``lr * scales[i]`` from epoch ``boundaries[i]`` on (advbench's absolute factors)."""
  lr = config.optimizer.learning_rate
  boundaries = [b * steps_per_epoch for b in config.schedule.boundaries]
  values = [lr] + [lr * s for s in config.schedule.scales]
  return optax.join_schedules([optax.constant_schedule(v) for v in values], boundaries)


def make_optimizer(config: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """PyTorch's SGD: weight decay added to the gradient, then heavy-ball momentum."""
  o = config.optimizer
  return optax.chain(
      optax.add_decayed_weights(o.weight_decay),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=o.momentum or None,
                nesterov=o.nesterov),
  )


def perturbation_section(config: ml_collections.ConfigDict) -> dict | None:
  """The config's ``perturbation`` section as a dict (``None`` in configs without one)."""
  section = config.get("perturbation")
  return None if section is None else section.to_dict()


def make_algorithm(config: ml_collections.ConfigDict,
                   steps_per_epoch: int = 1) -> algorithms_lib.Algorithm:
  """``config.algorithm`` from its sections; a factory's complaint names the config.

  Raises:
    validation.InvalidArgument: a section that does not fit the algorithm.
  """
  try:
    with validation.prefixed("config"):
      return algorithms_lib.make_algorithm(
          config.algorithm, sampler=configs.sampler_section(config),
          perturbation=perturbation_section(config), loss=config.loss.to_dict(),
          dual=config.dual.to_dict(), draws=config.draws, steps_per_epoch=steps_per_epoch)
  except validation.InvalidArgument:
    raise
  except (ValueError, TypeError) as e:
    raise validation.InvalidArgument(
        "config", rest=f"does not fit {config.algorithm}: {e}") from None


def make_evaluators(config: ml_collections.ConfigDict) -> dict[str, evaluation.Evaluator]:
  """``{name: evaluator}`` for ``config.eval.evaluators``, each with the ``eval`` section."""
  settings = config.eval.to_dict()
  with validation.prefixed("config"), validation.prefixed("eval"):
    return {name: evaluation.make_evaluator(name, settings) for name in config.eval.evaluators}


def build(config: ml_collections.ConfigDict, *, num_classes: int = 10,
          steps_per_epoch: int = 1) -> Experiment:
  """The objects of a run of ``config`` (resolved by :func:`resolve`), each built once.

  Args:
    config: a config from :func:`resolve` (its fields already checked).
    num_classes: the dataset's classes.
    steps_per_epoch: training steps per epoch; the learning-rate schedule and a
      dual variable updated every epoch count in them.

  Raises:
    validation.InvalidArgument: naming the field that no factory accepts.
  """
  validation.integer("num_classes", num_classes, minimum=2)
  validation.integer("steps_per_epoch", steps_per_epoch, minimum=1)
  return Experiment(
      config=config,
      model=create_model(config, num_classes),
      eval_model=create_model(config, num_classes, eval_dtype(config)),
      optimizer=make_optimizer(config, steps_per_epoch),
      algorithm=make_algorithm(config, steps_per_epoch),
      evaluators=make_evaluators(config),
      num_classes=num_classes,
      steps_per_epoch=steps_per_epoch)


def check(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises :class:`dale_jax.validation.InvalidArgument` unless ``config`` builds.

  Every field (:func:`dale_jax.configs.validate`), then every factory
  (:func:`build`); nothing is compiled or written.
  """
  configs.validate(config, num_devices=num_devices)
  build(config)


def init_state(experiment: Experiment, key: Array, input_shape) -> TrainState:
  """Initial state: fresh parameters, optimizer and dual state, and the run's key."""
  init_key, run_key = jax.random.split(key)
  variables = init_variables(experiment.model, init_key, tuple(input_shape))
  # Without a dual, a fixed zero placeholder keeps the state's structure the same.
  dual_state = (experiment.algorithm.dual or dual_lib.dual_ascent(0.0, 0.0, 0.0)).init()
  tx = experiment.optimizer
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
      dual_state=dual_state, key=jax.random.key_data(run_key), tx=tx)
