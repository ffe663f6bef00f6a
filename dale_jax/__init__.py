"""dale_jax: DALE (Dual Adversarial LEarning) and the advbench baselines in JAX/Flax.

The public API::

  from dale_jax import samplers, potentials, losses, dual, threat   # pure building blocks
  from dale_jax import perturbations                                # rotations, shifts, SE(2)
  from dale_jax import algorithms, models, data, evaluation         # what a run is made of
  from dale_jax import attacks                                      # APGD, FAB, Square, AutoAttack
  from dale_jax import configs, experiment                          # config -> objects, once
  from dale_jax import steps, checkpoint, train                     # the training job
  from dale_jax import evaluate                                     # robustness of a finished run
  dale_jax.evaluate_run(workdir, version="standard")                # what dale-eval runs

The submodules are imported when first used (PEP 562), so that ``import dale_jax``
and the modules that launch and read runs (:mod:`dale_jax.research`,
:mod:`dale_jax.validation`, :mod:`dale_jax.rundir`) do not start JAX.
"""

import importlib
from typing import Any

__version__ = "0.2.0.dev0"  # the one place the version is written (setup.cfg reads it)

_SUBMODULES = (
    "algorithms", "attacks", "checkpoint", "configs", "data", "dual", "evaluate", "evaluation",
    "experiment", "losses", "models", "perturbations", "potentials", "samplers", "steps",
    "threat", "train", "train_state",
)
# Names re-exported from a submodule: {name: (module, attribute)}.
_EXPORTS = {
    "DualState": ("dual", "DualState"),
    "dual_ascent": ("dual", "dual_ascent"),
    "make_sampler": ("samplers", "make_sampler"),
    "TrainState": ("train_state", "TrainState"),
    "Experiment": ("experiment", "Experiment"),
    "build": ("experiment", "build"),
    "evaluate_run": ("evaluate", "evaluate_run"),
}

__all__ = [*_SUBMODULES, *_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"dale_jax.{name}")
  if name in _EXPORTS:
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(f"dale_jax.{module}"), attribute)
  raise AttributeError(f"module 'dale_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(__all__)
