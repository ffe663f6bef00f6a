"""advbench's mnist defaults for any algorithm.

Run::

  dale-train --config=experiments/configs/mnist.py:Gaussian_DALE_PD --workdir=runs/mnist_dale

The argument after the colon is the algorithm name (default Gaussian_DALE_PD).
The dataset must be prepared once with internet (see dale_jax/data.py).
"""

from dale_jax import configs


def get_config(algorithm: str = "Gaussian_DALE_PD"):
  return configs.base_config("mnist", algorithm or "Gaussian_DALE_PD")
