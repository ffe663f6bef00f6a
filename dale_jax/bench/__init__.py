"""Throughput of the dale_jax training step against a faithful PyTorch implementation.

``dale-bench`` (:mod:`dale_jax.cli.bench`) is the command; :mod:`.runner` times
the frameworks, :mod:`.torch_reference` is the PyTorch step (needs the ``bench``
extra, ``pip install dale_jax[bench]``), :mod:`.flops` counts model FLOPs and
:mod:`.profile` lists where the XLA step spends its time.
"""

# The algorithms both sides implement (kept here so that the JAX side can be
# benchmarked without torch installed).
ALGORITHMS = ("ERM", "PGD", "TRADES", "Gaussian_DALE", "Gaussian_DALE_PD", "KL_DALE_PD")

# The architectures that ``dale-bench --task=autoattack --arch`` takes (those of
# dale_jax.models.torch_weights.ARCHS) and the input normalisations (the keys of
# dale_jax.models.NORMALIZATIONS), named here so that the command line starts no JAX.
ARCHS = ("mnist_cnn", "resnet18", "preact_resnet18", "wrn28_10", "wrn34_10")
NORMALIZATIONS = ("none", "cifar10")
