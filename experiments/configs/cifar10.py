"""advbench's cifar10 defaults for any algorithm.

Run::

  dale-train --config=experiments/configs/cifar10.py:Gaussian_DALE_PD --workdir=runs/cifar10_dale

The argument after the colon is the algorithm name (default Gaussian_DALE_PD).
The dataset must be prepared once with internet (see dale_jax/data.py).
"""

from dale_jax import configs


def get_config(algorithm: str = "Gaussian_DALE_PD"):
  return configs.base_config("cifar10", algorithm or "Gaussian_DALE_PD")
