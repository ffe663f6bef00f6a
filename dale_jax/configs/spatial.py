"""Spatial robustness on the built-in digits: training against rigid motions.

Run::

  dale-train --config=spatial:Gaussian_DALE_PD --workdir=runs/spatial_dale
  dale-train --config=spatial:PGD,lp --workdir=runs/spatial_pgd_linf
  dale-train --config=spatial:ERM --workdir=runs/spatial_erm

The argument is ``algorithm[,perturbation]``: the algorithm's sampler runs over
``perturbation`` (default ``se2``: rotations up to 30 degrees and shifts up to 3
pixels, the standard MNIST spatial threat model of Engstrom et al. 2019; ``lp``:
the sampler's own Linf ball of eps 0.3, i.e. ordinary Linf adversarial training).
The quickstart's schedule (8 epochs on 4,000 digits); the 1,000 test digits are
evaluated once, after the last epoch, by the exhaustive grid attack over SE(2)
(31 angles x 5 x 5 shifts = 775 transformations per digit), worst-of-10 uniform
draws, and clean and PGD-10 (Linf, eps 0.3) accuracy. The sampler's step size and
noise are in units of each parameter's radius over SE(2), and over a geometric set it
starts from a uniform draw (``sampler.start=uniform``, PGD's ``random_start``), as
spatial adversarial training does (Engstrom et al. 2019): seven steps of 0.1 radius
from the identity reach only 70% of the range.
"""

from dale_jax import configs

_SE2 = dict(name="se2", angle=30.0, shift=(3.0, 3.0), padding="zeros", linf_eps=0.0)


def get_config(arg: str = "Gaussian_DALE_PD"):
  algorithm, _, perturbation = (arg or "Gaussian_DALE_PD").partition(",")
  config = configs.base_config("mnist_digits", algorithm)
  config.num_epochs = 8
  config.schedule.boundaries = (6,)
  config.schedule.scales = (0.1,)
  config.optimizer.learning_rate = 0.02
  config.data.validation_size = 0
  config.perturbation.update(_SE2)
  config.perturbation.name = perturbation or "se2"
  if config.perturbation.name != "lp":
    if config.sampler.get("name") == "langevin_gaussian":
      config.sampler.start = "uniform"
    elif config.sampler.get("name") == "pgd":
      config.sampler.random_start = True
  config.eval.perturbation.update(_SE2)
  config.eval.grid_points = (31, 5, 5)
  config.eval.evaluators = ("Clean", "PGD", "Grid", "Worst-of-K")
  config.eval.splits = ("Test",)
  config.eval.every_epochs = config.num_epochs
  return config
