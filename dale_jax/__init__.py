"""dale_jax: DALE (Dual Adversarial LEarning) and the advbench baselines in JAX/Flax."""

from dale_jax import threat

__version__ = "0.1.0"
