"""Throughput of the dale_jax training step against a faithful PyTorch implementation.

``dale-bench`` (:mod:`dale_jax.cli.bench`) is the command; :mod:`.runner` times
the frameworks, :mod:`.torch_reference` is the PyTorch step (needs the ``bench``
extra, ``pip install dale_jax[bench]``), :mod:`.flops` counts model FLOPs and
:mod:`.profile` lists where the XLA step spends its time.
"""

# The algorithms both sides implement (kept here so that the JAX side can be
# benchmarked without torch installed).
ALGORITHMS = ("ERM", "PGD", "TRADES", "Gaussian_DALE", "Gaussian_DALE_PD", "KL_DALE_PD")
