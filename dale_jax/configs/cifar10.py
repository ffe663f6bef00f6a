"""advbench's cifar10 defaults for any algorithm.

Run::

  dale-train --config=cifar10:Gaussian_DALE_PD --workdir=runs/cifar10_dale

The argument after the colon is the algorithm name (default Gaussian_DALE_PD).
The dataset must be prepared once with internet (see dale_jax/data.py).
advbench's values, each named: ``dale_jax.configs.FAMILIES["cifar"]`` (training
samplers, loss overrides, evaluation threat model), ``configs.SCHEDULES["cifar10"]``
(epochs and learning-rate schedule), and the algorithm's entry in
``dale_jax.algorithms.ALGORITHMS`` (its sampler, loss and dual defaults, draws).
"""

from dale_jax import configs


def get_config(algorithm: str = "Gaussian_DALE_PD"):
  return configs.base_config("cifar10", algorithm or "Gaussian_DALE_PD")
