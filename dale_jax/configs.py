"""Experiment configs as plain data: advbench's defaults per dataset and algorithm.

``experiments/configs/<dataset>.py`` call :func:`base_config`; :func:`validate`
checks a (possibly CLI-overridden) config before anything is compiled or
written; :func:`apply_random_hparams` is advbench's seeded random search.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import ml_collections
import numpy as np

from dale_jax import algorithms
from dale_jax import samplers
from dale_jax import threat
from dale_jax.models import MODELS

DATASETS = ("mnist", "cifar10", "svhn", "mnist_digits")

# advbench's training hyperparameters, per dataset family.
_TRAIN = {
    "mnist": dict(
        eps=0.3, pgd_steps=7, pgd_step=0.1, trades_steps=7, trades_step=0.1, trades_beta=1.0,
        mart_beta=5.0, g_dale=(7, 0.1, 0.001), l_dale=(7, 0.1, 0.001),
        smooth=(0.5, 7, 0.1, 10), paper_dale=(7, 1e-3, 1e-2)),
    "cifar": dict(
        eps=0.031, pgd_steps=10, pgd_step=0.007, trades_steps=10, trades_step=2 / 255,
        trades_beta=6.0, mart_beta=5.0, g_dale=(10, 0.007, 0.0), l_dale=(10, 0.007, 0.01),
        smooth=(0.12, 10, 2 / 255, 10), paper_dale=(10, 1e-5, 1e-3)),
}
# advbench's evaluation ("test") hyperparameters.
_EVAL = {
    "mnist": dict(eps=0.3, pgd_steps=10, pgd_step_size=0.1),
    "cifar": dict(eps=8 / 255, pgd_steps=20, pgd_step_size=0.003),
}
_SCHEDULE = {
    "mnist": dict(num_epochs=50, boundaries=(25, 35, 40), scales=(0.1, 0.01, 0.001)),
    "mnist_digits": dict(num_epochs=50, boundaries=(25, 35, 40), scales=(0.1, 0.01, 0.001)),
    "cifar10": dict(num_epochs=115, boundaries=(55, 75, 90), scales=(0.1, 0.01, 0.001)),
    "svhn": dict(num_epochs=115, boundaries=(), scales=()),
}


def _family(dataset: str) -> str:
  return "mnist" if dataset in ("mnist", "mnist_digits") else "cifar"


def sampler_config(algorithm: str, dataset: str) -> dict[str, Any]:
  """The ``sampler`` section: advbench's training sampler for ``algorithm``."""
  h = _TRAIN[_family(dataset)]
  eps = h["eps"]
  if algorithm in ("PGD", "ALP", "CLP", "MART"):
    return dict(name="pgd", eps=eps, step_size=h["pgd_step"], steps=h["pgd_steps"])
  if algorithm == "FGSM":
    return dict(name="fgsm", eps=eps)
  if algorithm in ("TRADES", "KL_DALE_PD"):
    return dict(name="trades_kl", eps=eps, step_size=h["trades_step"], steps=h["trades_steps"])
  if algorithm in ("Gaussian_DALE", "Gaussian_DALE_PD", "Gaussian_DALE_PD_Reverse"):
    steps, step, noise = h["g_dale"]
    return dict(name="langevin_gaussian", eps=eps, step_size=step, steps=steps, noise_scale=noise)
  if algorithm == "Laplacian_DALE":
    steps, step, noise = h["l_dale"]
    return dict(name="langevin_laplacian", eps=eps, step_size=step, steps=steps, noise_scale=noise)
  if algorithm == "DALE":
    steps, step, temperature = h["paper_dale"]
    return dict(name="langevin", eps=eps, step_size=step, steps=steps, temperature=temperature)
  if algorithm == "RandSmoothing":
    sigma, steps, step, n = h["smooth"]
    return dict(name="smooth_adv", eps=eps, step_size=step, steps=steps, sigma=sigma, num_samples=n)
  if algorithm in ("ERM_DataAug", "CVaR_SGD", "CVaR_SGD_Autograd", "CVaR_SGD_PD"):
    return dict(name="uniform", eps=eps)
  return {}


def loss_config(algorithm: str, dataset: str) -> dict[str, Any]:
  """The ``loss`` section: the keyword hyperparameters of ``algorithm``'s loss."""
  h = _TRAIN[_family(dataset)]
  if algorithm == "TRADES":
    return dict(beta=h["trades_beta"], ce_on="clean")
  if algorithm == "MART":
    return dict(beta=h["mart_beta"])
  if algorithm == "TERM":
    return dict(t=2.0)
  if algorithm in ("ALP", "CLP"):
    return dict(weight=1.0)
  if algorithm.startswith("CVaR"):
    return dict(beta=0.5, t_step_size=1.0, n_steps=5)
  if algorithm in ("Gaussian_DALE", "Laplacian_DALE"):
    return dict(nu_fixed=0.1)
  return {}


def dual_config(algorithm: str) -> dict[str, Any]:
  """The ``dual`` section (empty for algorithms without a dual variable)."""
  if not algorithms.ALGORITHMS[algorithm].uses_dual:
    return {}
  if algorithm == "DALE":  # the paper: nu starts at 0, one dual step per epoch.
    return dict(step_size=1.0, margin=0.1, init_value=0.0, every="epoch")
  return dict(step_size=0.001, margin=0.1, init_value=1.0, every="step")


def base_config(dataset: str, algorithm: str) -> ml_collections.ConfigDict:
  """advbench's defaults for ``algorithm`` on ``dataset``."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
  algorithms.check_name(algorithm)
  family = _family(dataset)
  c = ml_collections.ConfigDict()
  c.algorithm = algorithm
  c.dataset = dataset
  c.seed = 0
  c.hparams_seed = 0
  c.num_epochs = _SCHEDULE[dataset]["num_epochs"]
  c.batch_size = 64
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200

  c.model = ml_collections.ConfigDict(
      dict(name="mnist_cnn" if family == "mnist" else "resnet18", dtype="float32"))
  c.optimizer = ml_collections.ConfigDict(
      dict(learning_rate=0.01, momentum=0.9, weight_decay=3.5e-3, nesterov=False))
  c.schedule = ml_collections.ConfigDict(
      dict(boundaries=tuple(_SCHEDULE[dataset]["boundaries"]),
           scales=tuple(_SCHEDULE[dataset]["scales"])))
  c.sampler = ml_collections.ConfigDict(sampler_config(algorithm, dataset))
  c.draws = 20 if algorithm in ("ERM_DataAug", "CVaR_SGD", "CVaR_SGD_Autograd", "CVaR_SGD_PD") else 1
  # Examples per device that the sampler perturbs at a time; 0: the whole batch;
  # None: train.CPU_SAMPLER_CHUNK on CPUs (the chunk stays in cache), the whole
  # batch on a GPU or TPU (see train.sampler_chunk_size).
  c.sampler_chunk_size = ml_collections.config_dict.placeholder(int)
  c.loss = ml_collections.ConfigDict(loss_config(algorithm, dataset))
  c.dual = ml_collections.ConfigDict(dual_config(algorithm))
  c.data = ml_collections.ConfigDict(dict(
      data_dir=ml_collections.config_dict.placeholder(str),
      validation_size=ml_collections.config_dict.placeholder(int),
      augment=family == "cifar", max_train_examples=0))
  e = _EVAL[family]
  c.eval = ml_collections.ConfigDict(dict(
      evaluators=("Clean", "PGD", "FGSM", "CVaR", "Augmented"),
      splits=("Validation", "Test"),
      batch_size=100, every_epochs=1, max_examples=0, norm="linf",
      eps=e["eps"], pgd_steps=e["pgd_steps"], pgd_step_size=e["pgd_step_size"],
      cvar_t_step_size=0.5, cvar_beta=0.05, cvar_draws=10, cvar_steps=10,
      augmented_draws=100, augmented_betas=(0.1, 0.05, 0.01),
      apgd_steps=100, square_queries=5000))
  c.parallel = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=1, process_id=0))
  return c


# ----------------------------------------------------------------------------
# Random hyperparameter search (advbench's distributions).


def seed_hash(*args: Any) -> int:
  """advbench's ``misc.seed_hash``: an int in ``[0, 2^31)`` from the args."""
  return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def apply_random_hparams(config: ml_collections.ConfigDict) -> None:
  """Overwrites the searched hyperparameters in place when ``config.hparams_seed != 0``.

  Each hyperparameter draws from its own ``RandomState(seed_hash(hparams_seed,
  name))``, so adding one does not shift the others. Seed 0 keeps the defaults.
  """
  seed = config.hparams_seed
  if seed == 0:
    return

  def draw(name, sample):
    return sample(np.random.RandomState(seed_hash(seed, name)))

  config.batch_size = int(2 ** draw("batch_size", lambda r: r.uniform(3, 8)))
  config.optimizer.learning_rate = float(10 ** draw("learning_rate", lambda r: r.uniform(-4.5, -2.5)))
  config.optimizer.momentum = float(draw("sgd_momentum", lambda r: r.uniform(0.8, 0.95)))
  config.optimizer.weight_decay = float(10 ** draw("weight_decay", lambda r: r.uniform(-6, -3)))
  family = _family(config.dataset)
  name = config.sampler.get("name")
  if name == "pgd" and family == "mnist":
    config.sampler.step_size = float(draw("pgd_step_size", lambda r: r.uniform(0.05, 0.2)))
  if name == "trades_kl":
    config.sampler.step_size = float(draw("trades_step_size", lambda r: r.uniform(0.01, 0.1)))
  if config.algorithm == "TRADES":
    config.loss.beta = float(draw("trades_beta", lambda r: r.uniform(0.1, 10.0)))
  if config.algorithm == "MART":
    config.loss.beta = float(draw("mart_beta", lambda r: r.uniform(0.1, 10.0)))
  if name in ("langevin_gaussian", "langevin_laplacian") and family == "mnist":
    config.sampler.noise_scale = float(10 ** draw("dale_noise", lambda r: r.uniform(-6, -2)))


# ----------------------------------------------------------------------------
# Validation.


def _require(ok: bool, field: str, accepted: str, value: Any) -> None:
  if not ok:
    raise ValueError(f"config.{field} must be {accepted}, got {value!r}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ``ValueError`` naming the first invalid field and what it accepts.

  Checks names, types and ranges of every section, that the sampler section
  builds, and that the global batch splits evenly over ``num_devices``.
  """
  _require(config.algorithm in algorithms.ALGORITHMS, "algorithm",
           f"one of {sorted(algorithms.ALGORITHMS)}", config.algorithm)
  _require(config.dataset in DATASETS, "dataset", f"one of {DATASETS}", config.dataset)
  for field in ("seed", "hparams_seed"):
    _require(_is_int(config[field]) and config[field] >= 0, field, "an integer >= 0", config[field])
  for field in ("num_epochs", "batch_size", "log_every_steps", "checkpoint_every_steps", "draws"):
    _require(_is_int(config[field]) and config[field] >= 1, field, "an integer >= 1", config[field])
  _require(config.batch_size % num_devices == 0, "batch_size",
           f"divisible by the {num_devices} devices in use", config.batch_size)
  chunk = config.get("sampler_chunk_size")
  _require(chunk is None or (_is_int(chunk) and chunk >= 0), "sampler_chunk_size",
           "None (chosen per platform) or an integer >= 0 (0: the whole batch)", chunk)
  _require(config.model.name in MODELS, "model.name", f"one of {sorted(MODELS)}", config.model.name)
  _require(config.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
           "'float32', 'bfloat16' or 'float16'", config.model.dtype)
  _require(config.model.name != "mnist_cnn" or config.model.dtype == "float32", "model.dtype",
           "'float32' for mnist_cnn (its im2col layers compute in float32)", config.model.dtype)
  o = config.optimizer
  _require(_is_num(o.learning_rate) and o.learning_rate > 0, "optimizer.learning_rate",
           "a number > 0", o.learning_rate)
  _require(_is_num(o.momentum) and 0 <= o.momentum < 1, "optimizer.momentum", "in [0, 1)", o.momentum)
  _require(_is_num(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay",
           "a number >= 0", o.weight_decay)
  s = config.schedule
  _require(len(s.boundaries) == len(s.scales), "schedule.scales",
           f"as long as schedule.boundaries ({len(s.boundaries)})", s.scales)
  _require(all(_is_int(b) and b > 0 for b in s.boundaries)
           and list(s.boundaries) == sorted(s.boundaries), "schedule.boundaries",
           "increasing positive epoch numbers", s.boundaries)
  _require(all(_is_num(v) and v > 0 for v in s.scales), "schedule.scales", "numbers > 0", s.scales)
  spec = algorithms.ALGORITHMS[config.algorithm]
  if spec.uses_sampler:
    try:
      samplers.make_sampler(config.sampler.to_dict())
    except (ValueError, TypeError) as e:
      raise ValueError(f"config.sampler: {e}") from None
  try:
    algorithms.make_algorithm(config.algorithm, sampler=config.sampler.to_dict(),
                              loss=config.loss.to_dict(), dual=config.dual.to_dict(),
                              draws=config.draws)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config: {e}") from None
  e = config.eval
  from dale_jax import evaluation  # Evaluators register themselves there.

  for name in e.evaluators:
    _require(name in evaluation.EVALUATORS, "eval.evaluators",
             f"names from {sorted(evaluation.EVALUATORS)}", name)
  for split in e.splits:
    _require(split in ("Validation", "Test"), "eval.splits", "'Validation' and/or 'Test'", split)
  try:
    threat.check_threat(e.norm, e.eps)
  except ValueError as err:
    raise ValueError(f"config.eval: {err}") from None
  for field in ("batch_size", "every_epochs", "pgd_steps", "cvar_draws", "augmented_draws"):
    _require(_is_int(e[field]) and e[field] >= 1, f"eval.{field}", "an integer >= 1", e[field])
  _require(_is_int(e.max_examples) and e.max_examples >= 0, "eval.max_examples",
           "an integer >= 0 (0 = all)", e.max_examples)
  _require(all(_is_num(b) and 0 < b < 1 for b in e.augmented_betas), "eval.augmented_betas",
           "numbers in (0, 1)", e.augmented_betas)
  _require(_is_num(e.cvar_beta) and 0 < e.cvar_beta <= 1, "eval.cvar_beta", "in (0, 1]", e.cvar_beta)
  d = config.data
  _require(_is_int(d.max_train_examples) and d.max_train_examples >= 0, "data.max_train_examples",
           "an integer >= 0 (0 = all)", d.max_train_examples)
  p = config.parallel
  _require(_is_int(p.num_processes) and p.num_processes >= 1, "parallel.num_processes",
           "an integer >= 1", p.num_processes)
  _require(_is_int(p.process_id) and 0 <= p.process_id < p.num_processes, "parallel.process_id",
           f"in [0, {p.num_processes})", p.process_id)
  _require(p.num_processes == 1 or bool(p.coordinator_address), "parallel.coordinator_address",
           "'host:port' when parallel.num_processes > 1", p.coordinator_address)
