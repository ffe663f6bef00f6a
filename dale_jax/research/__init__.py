"""Research workflow around ``dale-train``: sweeps, result tables, model selection, plots.

* :mod:`dale_jax.research.sweep` builds the grid of training runs
  (algorithms x datasets x hyperparameter seeds x trial seeds) and launches it
  locally, one process per device.
* :mod:`dale_jax.research.collect` reads the runs' records, applies model
  selection (``LastStep``, ``EarlyStop``) and hyperparameter selection, and
  formats Markdown / LaTeX tables and a CSV file.
* :mod:`dale_jax.research.plots` draws accuracy curves, the primal-dual picture,
  the clean-vs-robust Pareto front and the Augmented quantile / CVaR plots.
* :mod:`dale_jax.research.paper` regenerates a results page: a sweep, PGD-20 and
  AutoAttack on every run, the table beside the paper's and its figures.

These modules launch and read runs; only the paper's evaluate stage imports JAX
(when it runs).
"""

from dale_jax.research import collect
from dale_jax.research import sweep

__all__ = ["collect", "sweep"]
