"""Research workflow around ``dale-train``: sweeps, result tables, model selection, plots.

* :mod:`dale_jax.research.sweep` builds the grid of training runs
  (algorithms x datasets x hyperparameter seeds x trial seeds) and launches it
  locally, one process per device.
* :mod:`dale_jax.research.collect` reads the runs' records, applies model
  selection (``LastStep``, ``EarlyStop``) and hyperparameter selection, and
  formats Markdown / LaTeX tables and a CSV file.
* :mod:`dale_jax.research.plots` draws accuracy curves, the primal-dual picture,
  the clean-vs-robust Pareto front and the Augmented quantile / CVaR plots.

None of these modules imports JAX: they only launch and read runs.
"""

from dale_jax.research import collect
from dale_jax.research import sweep

__all__ = ["collect", "sweep"]
