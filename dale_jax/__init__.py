"""dale_jax: DALE (Dual Adversarial LEarning) and the advbench baselines in JAX/Flax.

The public API::

  from dale_jax import samplers, potentials, losses, dual, threat   # pure building blocks
  from dale_jax import perturbations                                # rotations, shifts, SE(2)
  from dale_jax import algorithms, models, data, evaluation         # what a run is made of
  from dale_jax import attacks                                      # APGD, Square, AutoAttack-style ensemble
  from dale_jax import train, configs                               # the training job
"""

from dale_jax import algorithms
from dale_jax import attacks
from dale_jax import configs
from dale_jax import data
from dale_jax import dual
from dale_jax import evaluation
from dale_jax import losses
from dale_jax import models
from dale_jax import perturbations
from dale_jax import potentials
from dale_jax import samplers
from dale_jax import threat
from dale_jax.dual import DualState, dual_ascent
from dale_jax.samplers import make_sampler
from dale_jax.train_state import TrainState

__version__ = "0.2.0.dev0"  # the one place the version is written (setup.cfg reads it)
