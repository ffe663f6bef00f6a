"""Experiment configs as plain data: advbench's hyperparameters per dataset family.

The bundled config files (``dale_jax/configs/<name>.py``: ``quickstart``, ``mnist``,
``cifar10``, ``svhn``, ``spatial``) call :func:`base_config` and name what they
change; the command line reaches them by name from any directory
(``--config=quickstart:PGD``, :func:`config_path`); :data:`FAMILIES` holds advbench's values as named fields (one training
sampler per sampler name, the losses' hyperparameters that differ by family, the
evaluation threat model), and each algorithm's registry entry
(:data:`dale_jax.algorithms.ALGORITHMS`) says which sampler, loss defaults, dual
defaults and number of draws it uses. :func:`validate` checks a (possibly
CLI-overridden) config before anything is compiled or written;
:func:`apply_random_hparams` is advbench's seeded random search.
"""

from __future__ import annotations

import ast
import hashlib
import os
from typing import Any, Callable, NamedTuple, Sequence

import ml_collections
import numpy as np

from dale_jax import algorithms
from dale_jax import attacks
from dale_jax import evaluation
from dale_jax import parallel
from dale_jax import perturbations
from dale_jax import rundir
from dale_jax import threat
from dale_jax import validation
from dale_jax.models import MODELS
from dale_jax.models import mnist_cnn

DATASETS = ("mnist", "cifar10", "svhn", "mnist_digits")

# The folder of the bundled config files (this package's own folder).
CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def bundled() -> list[str]:
  """The names of the bundled config files, e.g. ``["cifar10", "mnist", "quickstart", ...]``."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_"))


# Where the bundled configs lived before they moved into the package; commands written
# with that path (``--config=experiments/configs/quickstart.py:PGD``) still run.
_FORMER_CONFIG_DIR = os.path.join("experiments", "configs")


def config_path(spec: str) -> str:
  """``--config``'s value with a bundled config's name made a path: ``quickstart:PGD`` ->
  ``<CONFIG_DIR>/quickstart.py:PGD``. So is the bundled configs' former path,
  ``experiments/configs/<name>.py``, where no such file exists. A path to an existing
  file (or anything else that is not a bundled name) is returned unchanged."""
  name, sep, arg = spec.partition(":")
  if os.path.exists(name):
    return spec
  folder, file = os.path.split(os.path.normpath(name))
  former = folder == _FORMER_CONFIG_DIR or folder.endswith(os.sep + _FORMER_CONFIG_DIR)
  if former and file.endswith(".py"):
    name = file[:-3]
  if name not in bundled():
    return spec
  return os.path.join(CONFIG_DIR, f"{name}.py") + sep + arg


def expand_config_flags(argv: Sequence[str]) -> list[str]:
  """``argv`` with every ``--config=<spec>`` passed through :func:`config_path`."""
  flag = "--config="
  return [flag + config_path(a[len(flag):]) if a.startswith(flag) else a for a in argv]

# The advbench fork's Worst_Of_K and MH settings, the same for every dataset (see FAMILIES).
_FORK_WORST_OF_K = dict(k=10, select="batch")
_FORK_MH = dict(steps=30, proposal="laplace", proposal_std=0.05, radius_scaled=True,
                acceptance="loss_ratio", potential="cross_entropy", temperature=1.0,
                per_example=False, outside="project")

# advbench's hyperparameters by dataset family. ``samplers`` holds the training
# sampler of every sampler name (an algorithm picks one through its registry entry),
# ``losses`` the loss hyperparameters that differ from the registry's defaults.
FAMILIES: dict[str, dict[str, Any]] = {
    "mnist": dict(
        # advbench's network starts from PyTorch's default initialisers.
        model=dict(name="mnist_cnn", dtype="float32", initializer="torch"),
        augment=False,
        samplers=dict(
            pgd=dict(eps=0.3, step_size=0.1, steps=7),
            fgsm=dict(eps=0.3),
            trades_kl=dict(eps=0.3, step_size=0.1, steps=7),
            langevin_gaussian=dict(eps=0.3, step_size=0.1, steps=7, noise_scale=0.001),
            langevin_laplacian=dict(eps=0.3, step_size=0.1, steps=7, noise_scale=0.001),
            # The authors' first, unsigned Langevin step (0ea7d35, one set for every
            # dataset), which they replaced by signed steps two days later (80fc180).
            langevin=dict(eps=0.3, step_size=0.01, steps=7, temperature=0.1),
            smooth_adv=dict(eps=0.3, step_size=0.1, steps=7, sigma=0.5, num_samples=10,
                            from_clean=True),
            uniform=dict(eps=0.3),
            # The advbench fork's Worst_Of_K and MH (constrainedlearning/advbench 31c09cb)
            # with its training hparams (hparams_registry.py, SE, any dataset): batched=0,
            # worst_of_k_steps=10; mh_proposal="Laplace", mh_dale_scale=0.05,
            # mh_dale_n_steps=30; no temperature. See samplers.metropolis_hastings.
            worst_of_k=dict(eps=0.3, **_FORK_WORST_OF_K),
            metropolis_hastings=dict(eps=0.3, **_FORK_MH),
        ),
        # advbench's MNIST network returns log_softmax: ALP and CLP pair log-probabilities.
        losses=dict(TRADES=dict(beta=1.0), ALP=dict(pair_on="log_softmax"),
                    CLP=dict(pair_on="log_softmax")),
        eval=dict(eps=0.3, pgd_steps=10, pgd_step_size=0.1),
    ),
    "cifar": dict(
        model=dict(name="resnet18", dtype="float32"),
        augment=True,
        samplers=dict(
            pgd=dict(eps=0.031, step_size=0.007, steps=10),
            fgsm=dict(eps=0.031),
            trades_kl=dict(eps=0.031, step_size=2 / 255, steps=10),
            langevin_gaussian=dict(eps=0.031, step_size=0.007, steps=10, noise_scale=0.0),
            langevin_laplacian=dict(eps=0.031, step_size=0.007, steps=10, noise_scale=0.01),
            langevin=dict(eps=0.031, step_size=0.01, steps=7, temperature=0.1),
            smooth_adv=dict(eps=0.031, step_size=2 / 255, steps=10, sigma=0.12, num_samples=10,
                            from_clean=True),
            uniform=dict(eps=0.031),
            # The fork's values, as for mnist (its hparams do not depend on the dataset).
            worst_of_k=dict(eps=0.031, **_FORK_WORST_OF_K),
            metropolis_hastings=dict(eps=0.031, **_FORK_MH),
        ),
        losses=dict(TRADES=dict(beta=6.0)),
        eval=dict(eps=8 / 255, pgd_steps=20, pgd_step_size=0.003),
    ),
}
FAMILY = {"mnist": "mnist", "mnist_digits": "mnist", "cifar10": "cifar", "svhn": "cifar"}
# advbench's epochs and learning-rate schedule (absolute factors from each boundary on).
SCHEDULES = {
    "mnist": dict(num_epochs=50, boundaries=(25, 35, 40), scales=(0.1, 0.01, 0.001)),
    "mnist_digits": dict(num_epochs=50, boundaries=(25, 35, 40), scales=(0.1, 0.01, 0.001)),
    "cifar10": dict(num_epochs=115, boundaries=(55, 75, 90), scales=(0.1, 0.01, 0.001)),
    "svhn": dict(num_epochs=115, boundaries=(), scales=()),
}


_PERTURBATION = dict(name="lp", angle=30.0, shift=(3.0, 3.0), padding="zeros", linf_eps=0.0)


def base_config(dataset: str, algorithm: str) -> ml_collections.ConfigDict:
  """advbench's defaults for ``algorithm`` on ``dataset``."""
  validation.one_of("dataset", dataset, DATASETS)
  algorithms.check_name(algorithm)
  family = FAMILIES[FAMILY[dataset]]
  spec = algorithms.ALGORITHMS[algorithm]
  schedule = SCHEDULES[dataset]
  c = ml_collections.ConfigDict()
  c.algorithm = algorithm
  c.dataset = dataset
  c.seed = 0
  c.hparams_seed = 0
  c.num_epochs = schedule["num_epochs"]
  c.batch_size = 64
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200

  c.model = ml_collections.ConfigDict(family["model"])
  c.optimizer = ml_collections.ConfigDict(
      dict(learning_rate=0.01, momentum=0.9, weight_decay=3.5e-3, nesterov=False))
  c.schedule = ml_collections.ConfigDict(
      dict(boundaries=tuple(schedule["boundaries"]), scales=tuple(schedule["scales"])))
  # Every sampler takes the threat model's norm: --config.sampler.norm=l2 (or l1) with
  # --config.sampler.eps (and eval.norm / eval.eps for the evaluation).
  c.sampler = ml_collections.ConfigDict(
      dict(name=spec.sampler, norm="linf", **family["samplers"][spec.sampler])
      if spec.sampler else {})
  if spec.sampler == "langevin_laplacian":
    # None: the batch size (configs.sampler_section); advbench's noise is relative to
    # the gradient of the batch mean.
    c.sampler.mean_over = ml_collections.config_dict.placeholder(int)
  # The set the sampler runs over: "lp" is the sampler's (norm, eps) ball; rotation,
  # translation and se2 sample the transformation's parameters (step sizes and noise
  # then in units of each parameter's radius), linf_eps > 0 adds an Linf ball after
  # the warp. See dale_jax.perturbations.
  c.perturbation = ml_collections.ConfigDict(_PERTURBATION)
  c.draws = spec.draws
  # Examples per device that the sampler perturbs at a time; 0: the whole batch;
  # None: steps.CPU_SAMPLER_CHUNK on CPUs (the chunk stays in cache), the whole
  # batch on a GPU or TPU (see steps.sampler_chunk_size).
  c.sampler_chunk_size = ml_collections.config_dict.placeholder(int)
  c.loss = ml_collections.ConfigDict(
      {**spec.loss_defaults, **family["losses"].get(algorithm, {})})
  c.dual = ml_collections.ConfigDict(dict(spec.dual or {}))
  c.data = ml_collections.ConfigDict(dict(
      data_dir=ml_collections.config_dict.placeholder(str),
      validation_size=ml_collections.config_dict.placeholder(int),
      augment=family["augment"], max_train_examples=0))
  c.eval = ml_collections.ConfigDict(dict(
      evaluators=("Clean", "PGD", "FGSM", "CVaR", "Augmented"),
      splits=("Validation", "Test"),
      batch_size=100, every_epochs=1, max_examples=0, norm="linf",
      **family["eval"],
      cvar_t_step_size=0.5, cvar_beta=0.05, cvar_draws=10, cvar_steps=10,
      augmented_draws=100, augmented_betas=(0.1, 0.05, 0.01),
      apgd_steps=attacks.APGD_STEPS, square_queries=attacks.SQUARE_QUERIES,
      # The Grid and Worst-of-K evaluators: the set they search (a geometric one), the
      # grid's points per axis (one count for all axes, or one per axis) and k.
      perturbation=dict(_PERTURBATION, name="se2"), grid_points=(5, 5, 5), worst_of_k=10,
      # Compute dtype of the evaluation; float32 whatever model.dtype trains in.
      dtype="float32"))
  # Multi-host: auto=True reads the cluster's environment (jax.distributed.initialize()
  # without arguments: Slurm, Cloud TPU, ...); or the three explicit fields.
  c.parallel = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=1, process_id=0, auto=False))
  return c


def sampler_section(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The ``sampler`` section as the sampler factory's keyword arguments: a
  ``mean_over`` left at ``None`` becomes the config's ``batch_size`` (the batch that
  advbench's Langevin-Laplacian sampler averages its potential over)."""
  section = config.sampler.to_dict()
  if "mean_over" in section and section["mean_over"] is None:
    section["mean_over"] = config.batch_size
  return section


_SECTION_SOURCES = {
    "model": "configs.FAMILIES[{family!r}]['model']",
    "sampler": "configs.FAMILIES[{family!r}]['samplers']",
    "eval": "configs.FAMILIES[{family!r}]['eval']",
    "loss": "algorithms.ALGORITHMS[{algorithm!r}].loss_defaults and FAMILIES' losses",
    "dual": "algorithms.ALGORITHMS[{algorithm!r}].dual",
    "draws": "algorithms.ALGORITHMS[{algorithm!r}].draws",
    "num_epochs": "configs.SCHEDULES[{dataset!r}]",
    "schedule": "configs.SCHEDULES[{dataset!r}]",
}


def config_sources(config: ml_collections.ConfigDict, resolved: ml_collections.ConfigDict,
                   overrides: Sequence[str] = ()) -> list[tuple[str, Any, str]]:
  """``(field, value, source)`` for every field of the ``resolved`` config.

  The source is the command-line override that set it, the random search
  (``hparams_seed``) when it changed it, the config file when the file's
  ``get_config`` changed advbench's default, or the table the default comes from
  (:data:`FAMILIES`, :data:`SCHEDULES`, the algorithm's registry entry, or
  :func:`base_config` itself).
  """
  overridden = {o.split("=", 1)[0][len("--config."):] for o in overrides
                if o.startswith("--config.")}
  default = rundir.flatten(base_config(resolved.dataset, resolved.algorithm).to_dict())
  given = rundir.flatten(config.to_dict())
  rows = []
  for field, value in rundir.flatten(resolved.to_dict()).items():
    head = field.split(".")[0]
    if field in overridden:
      source = f"--config.{field}"
    elif given.get(field) != value:
      source = f"random search (hparams_seed={resolved.hparams_seed})"
    elif default.get(field) != value:
      source = "the config file"
    else:
      template = _SECTION_SOURCES.get(head, "configs.base_config")
      if head == "eval" and field.split(".")[1] not in FAMILIES[FAMILY[resolved.dataset]]["eval"]:
        template = "configs.base_config"
      source = template.format(family=FAMILY[resolved.dataset], dataset=resolved.dataset,
                               algorithm=resolved.algorithm)
    rows.append((field, value, source))
  return rows


# ----------------------------------------------------------------------------
# Random hyperparameter search (advbench's distributions).


def seed_hash(*args: Any) -> int:
  """advbench's ``misc.seed_hash``: an int in ``[0, 2^31)`` from the args."""
  return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


class _Searched(NamedTuple):
  """One hyperparameter of advbench's random search (``hparams_registry.py``)."""
  name: str  # advbench's name, which seeds its draw
  field: str  # the config field it sets
  sample: Callable[[np.random.RandomState], float]
  applies: Callable[[ml_collections.ConfigDict], bool] = lambda config: True


def _sampler_is(*names: str, family: str | None = None):
  return lambda c: (c.sampler.get("name") in names
                    and (family is None or FAMILY[c.dataset] == family))


def _algorithm_is(*names: str):
  return lambda c: c.algorithm in names


_CVAR_ALGORITHMS = ("CVaR_SGD", "CVaR_SGD_Autograd", "CVaR_SGD_PD")

# advbench's search space (hparams_registry.py at bd2071d: each hyperparameter's
# ``random_val_fn``, under advbench's name, which seeds its draw), each with the configs
# it applies to. Some of advbench's "random" values are constants that differ from the
# defaults (CVaR's, TERM's, RandSmoothing's, TRADES' steps on CIFAR): they are here too,
# so that a search seed gives what advbench gives.
SEARCH_SPACE = (
    _Searched("batch_size", "batch_size", lambda r: int(2 ** r.uniform(3, 8))),
    _Searched("learning_rate", "optimizer.learning_rate",
              lambda r: float(10 ** r.uniform(-4.5, -2.5))),
    _Searched("sgd_momentum", "optimizer.momentum", lambda r: float(r.uniform(0.8, 0.95))),
    _Searched("weight_decay", "optimizer.weight_decay", lambda r: float(10 ** r.uniform(-6, -3))),
    _Searched("pgd_step_size", "sampler.step_size", lambda r: float(r.uniform(0.05, 0.2)),
              _sampler_is("pgd", family="mnist")),
    _Searched("trades_n_steps", "sampler.steps", lambda r: 15,
              _sampler_is("trades_kl", family="cifar")),
    _Searched("trades_step_size", "sampler.step_size", lambda r: float(r.uniform(0.01, 0.1)),
              _sampler_is("trades_kl")),
    _Searched("trades_beta", "loss.beta", lambda r: float(r.uniform(0.1, 10.0)),
              _algorithm_is("TRADES")),
    _Searched("mart_beta", "loss.beta", lambda r: float(r.uniform(0.1, 10.0)),
              _algorithm_is("MART")),
    _Searched("g_dale_noise_coeff", "sampler.noise_scale",
              lambda r: float(10 ** r.uniform(-6.0, -2.0)),
              _sampler_is("langevin_gaussian", family="mnist")),
    _Searched("l_dale_noise_coeff", "sampler.noise_scale",
              lambda r: float(10 ** r.uniform(-6.0, -2.0)),
              _sampler_is("langevin_laplacian", family="mnist")),
    _Searched("cvar_sgd_t_step_size", "loss.t_step_size", lambda r: 0.001,
              _algorithm_is(*_CVAR_ALGORITHMS)),
    _Searched("cvar_sgd_beta", "loss.beta", lambda r: 0.1, _algorithm_is(*_CVAR_ALGORITHMS)),
    _Searched("cvar_sgd_M", "draws", lambda r: 10, _algorithm_is(*_CVAR_ALGORITHMS)),
    _Searched("cvar_sgd_n_steps", "loss.n_steps", lambda r: 10,
              _algorithm_is(*_CVAR_ALGORITHMS)),
    _Searched("term_t", "loss.t", lambda r: 1.0, _algorithm_is("TERM")),
    _Searched("rand_smoothing_sigma", "sampler.sigma", lambda r: 0.12, _sampler_is("smooth_adv")),
    _Searched("rand_smoothing_n_steps", "sampler.steps", lambda r: 10,
              _sampler_is("smooth_adv", family="mnist")),
    _Searched("rand_smoothing_n_steps", "sampler.steps", lambda r: 7,
              _sampler_is("smooth_adv", family="cifar")),
    _Searched("rand_smoothing_step_size", "sampler.step_size",
              lambda r: float(r.uniform(0.01, 0.1)), _sampler_is("smooth_adv")),
    _Searched("rand_smoothing_n_samples", "sampler.num_samples", lambda r: 1,
              _sampler_is("smooth_adv")),
)


def apply_random_hparams(config: ml_collections.ConfigDict) -> None:
  """Overwrites the searched hyperparameters in place when ``config.hparams_seed != 0``.

  Each hyperparameter of :data:`SEARCH_SPACE` that applies to ``config`` draws from
  its own ``RandomState(seed_hash(hparams_seed, name))``, so adding one does not shift
  the others. Seed 0 keeps the defaults.
  """
  seed = config.hparams_seed
  if seed == 0:
    return
  for searched in SEARCH_SPACE:
    if searched.applies(config):
      section, _, field = searched.field.rpartition(".")
      target = config[section] if section else config
      target[field] = searched.sample(np.random.RandomState(seed_hash(seed, searched.name)))


# ----------------------------------------------------------------------------
# Validation.


def unknown_field_message(error: LookupError | AttributeError, argv: Sequence[str]) -> str:
  """One line from ml_collections' error for an override of a field that does not exist:
  ``the config has no field 'x' (--config.a.x); did you mean "y" instead of "x"?``."""
  text = str(error)
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
  name, _, hint = text.partition("\n")
  name = name.strip("'\"")
  flag = next((a.split("=")[0] for a in argv if a.startswith("--") and name in a), None)
  where = f" ({flag})" if flag else ""
  spec = next((a.partition("=")[2] for a in argv if a.startswith("--config=")), "")
  algorithm = spec.rpartition(":")[2] if ":" in spec else ""
  if (flag or "").startswith("--config.sampler.") and algorithm in algorithms.ALGORITHMS \
      and not algorithms.ALGORITHMS[algorithm].uses_sampler:
    return (f"{algorithm} has no sampler (config.sampler is empty), so {flag} does not apply; "
            "the algorithms with one: " + ", ".join(
                n for n, a in algorithms.ALGORITHMS.items() if a.uses_sampler))
  return f"the config has no field {name!r}{where}" + (f"; {hint[0].lower()}{hint[1:]}" if hint else "")


# Compute dtypes of the models. float16 is left out: its 5-bit exponent underflows
# small gradients without loss scaling, where bfloat16 keeps float32's exponent range.
_DTYPES = ("float32", "bfloat16")
# eval.splits: the record keys (advbench's), or the lowercase spelling of the commands.
_SPLITS = (*rundir.SPLIT_KEYS.values(), *rundir.SPLIT_KEYS)


def _names(field: str, values: Any, accepted: Any) -> None:
  """A tuple of distinct names, each one of ``accepted``."""
  v = validation
  v.require(isinstance(values, (tuple, list)) and len(set(map(str, values))) == len(values),
            field, f"a tuple of distinct names from {sorted(accepted)}", values)
  for name in values:
    v.require(name in accepted, field, f"names from {sorted(accepted)}", name)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = 1) -> None:
  """Raises :class:`dale_jax.validation.InvalidArgument` naming the first invalid field.

  Every field of every section is checked for its type and range (the message
  gives the full path, e.g. ``config.eval.pgd_step_size``, and what it accepts),
  and the global batch must split evenly over ``num_devices`` (``None`` skips that
  check, for use before the devices are known). What only the factories know (a
  sampler field, a loss hyperparameter) is checked by building:
  :func:`dale_jax.experiment.build`. Nothing is compiled.
  """
  v = validation
  with v.prefixed("config"):
    v.one_of("algorithm", config.algorithm, sorted(algorithms.ALGORITHMS))
    v.one_of("dataset", config.dataset, DATASETS)
    for field in ("seed", "hparams_seed"):
      v.integer(field, config[field], minimum=0)
    for field in ("num_epochs", "batch_size", "log_every_steps", "checkpoint_every_steps",
                  "draws"):
      v.integer(field, config[field], minimum=1)
    if num_devices is not None:
      v.require(config.batch_size % num_devices == 0, "batch_size",
                f"divisible by the {num_devices} devices in use", config.batch_size)
    chunk = config.get("sampler_chunk_size")
    v.require(chunk is None or (v.is_integer(chunk) and chunk >= 0), "sampler_chunk_size",
              "None (chosen per platform) or an integer >= 0 (0: the whole batch)", chunk)

    m = config.model
    v.one_of("model.name", m.name, sorted(MODELS))
    v.one_of("model.dtype", m.dtype, _DTYPES)
    if "initializer" in m:
      v.one_of("model.initializer", m.initializer, mnist_cnn.INITS)

    o = config.optimizer
    v.positive("optimizer.learning_rate", o.learning_rate)
    v.real("optimizer.momentum", o.momentum, minimum=0, maximum=1, open_max=True)
    v.nonnegative("optimizer.weight_decay", o.weight_decay)
    v.boolean("optimizer.nesterov", o.nesterov)

    s = config.schedule
    v.require(isinstance(s.boundaries, (tuple, list))
              and all(v.is_integer(b) and b > 0 for b in s.boundaries)
              and list(s.boundaries) == sorted(set(s.boundaries)), "schedule.boundaries",
              "a tuple of increasing epoch numbers > 0", s.boundaries)
    v.require(isinstance(s.scales, (tuple, list)) and len(s.scales) == len(s.boundaries),
              "schedule.scales", f"a tuple as long as schedule.boundaries ({len(s.boundaries)})",
              s.scales)
    v.require(all(v.is_real(x) and x > 0 for x in s.scales), "schedule.scales",
              "finite numbers > 0", s.scales)
    v.warn_schedule(config)  # a decay past the last epoch: legitimate, but said
    v.check_linf_radii(config)  # 8 for 8/255

    d = config.data
    v.string("data.data_dir", d.data_dir, allow_none=True)
    if d.validation_size is not None:
      v.integer("data.validation_size", d.validation_size, minimum=0)
    v.boolean("data.augment", d.augment)
    v.integer("data.max_train_examples", d.max_train_examples, minimum=0)

    _validate_eval(config.eval)

    p = config.parallel
    parallel.check_distributed(p.coordinator_address, p.num_processes, p.process_id, p.auto)


def _validate_eval(e: ml_collections.ConfigDict) -> None:
  """The ``eval`` section (field names without the ``config.`` prefix)."""
  v = validation
  _names("eval.evaluators", e.evaluators, evaluation.EVALUATORS)
  _names("eval.splits", e.splits, _SPLITS)
  v.one_of("eval.dtype", e.dtype, _DTYPES)
  with v.prefixed("eval"):
    threat.check_threat(e.norm, e.eps)
  for field in ("batch_size", "every_epochs", "pgd_steps", "cvar_draws", "augmented_draws",
                "apgd_steps", "square_queries"):
    v.integer(f"eval.{field}", e[field], minimum=1)
  v.integer("eval.cvar_steps", e.cvar_steps, minimum=0)
  if "perturbation" in e:  # runs written before the spatial evaluators have none
    v.integer("eval.worst_of_k", e.worst_of_k, minimum=1)
    with v.prefixed("eval"):
      pset = perturbations.make_perturbation(e.perturbation.to_dict())
      if pset is not None and "Grid" in e.evaluators:
        pset.grid(e.grid_points)
      elif pset is not None:
        perturbations.grid_counts(e.grid_points, len(pset.axes))
  v.integer("eval.max_examples", e.max_examples, minimum=0)
  v.positive("eval.pgd_step_size", e.pgd_step_size)
  v.nonnegative("eval.cvar_t_step_size", e.cvar_t_step_size)
  v.real("eval.cvar_beta", e.cvar_beta, minimum=0, maximum=1, open_min=True)
  v.require(isinstance(e.augmented_betas, (tuple, list)) and len(e.augmented_betas) > 0
            and all(v.is_real(b) and 0 < b < 1 for b in e.augmented_betas),
            "eval.augmented_betas", "a non-empty tuple of numbers in (0, 1)", e.augmented_betas)
