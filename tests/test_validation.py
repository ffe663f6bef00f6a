"""Every config field refuses a bad value by name; every console script says so in one line.

The table holds one bad value for every field of every algorithm's config; a test
checks that the table covers every field the configs have, so a new field without a
check fails here. Values are set on a ConfigDict without type safety, as a notebook or
a hand-written config would pass them; the CLI's typed flags refuse fewer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from dale_jax import algorithms, configs, experiment, validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(configs.CONFIG_DIR, "quickstart.py")

BAD = {
    "algorithm": "DALEE", "dataset": "imagenet", "seed": -1, "hparams_seed": 1.5,
    "num_epochs": 0, "batch_size": 0, "log_every_steps": 0, "checkpoint_every_steps": True,
    "draws": 0, "sampler_chunk_size": -1,
    "model.name": "vgg", "model.dtype": "int8", "model.initializer": "xavier",
    "optimizer.learning_rate": 0.0, "optimizer.momentum": 1.0,
    "optimizer.weight_decay": -1.0, "optimizer.nesterov": "yes",
    "schedule.boundaries": (35, 25, 40), "schedule.scales": (0.1, -0.01, 0.001),
    "sampler.name": "apgd", "sampler.eps": -0.1, "sampler.step_size": 0.0, "sampler.steps": -1,
    "sampler.noise_scale": float("nan"), "sampler.temperature": 0.0, "sampler.sigma": -1.0,
    "sampler.num_samples": 0, "sampler.norm": "l3", "sampler.k": 0, "sampler.proposal_std": 0.0,
    "sampler.mean_over": 0, "sampler.from_clean": "yes", "sampler.select": "draw",
    "sampler.proposal": "cauchy", "sampler.radius_scaled": "yes", "sampler.acceptance": "ratio",
    "sampler.potential": "hinge", "sampler.per_example": 1, "sampler.outside": "clip",
    "perturbation.name": "shear", "perturbation.angle": -5.0, "perturbation.shift": (3.0,),
    "perturbation.padding": "wrap", "perturbation.linf_eps": -0.1,
    "eval.perturbation.name": "lp2", "eval.perturbation.angle": 0.0,
    "eval.perturbation.shift": (0.0, 0.0), "eval.perturbation.padding": "reflect",
    "eval.perturbation.linf_eps": float("nan"), "eval.grid_points": (5, 5), "eval.worst_of_k": 0,
    "loss.beta": -1.0, "loss.ce_on": "both", "loss.t": 0.0, "loss.weight": -1.0,
    "loss.pair_on": "probabilities", "loss.constraint": "robust",
    "loss.nu_fixed": -0.1, "loss.t_step_size": -1.0, "loss.n_steps": -1,
    "dual.step_size": -1.0, "dual.margin": -0.1, "dual.init_value": float("inf"),
    "dual.every": "week",
    "data.data_dir": 3, "data.validation_size": -1, "data.augment": "no",
    "data.max_train_examples": -1,
    "eval.evaluators": ("Clean", "AutoAttackk"), "eval.splits": ("Train",),
    "eval.batch_size": 0, "eval.every_epochs": 0, "eval.max_examples": -1, "eval.norm": "l3",
    "eval.eps": -1.0, "eval.pgd_steps": 0, "eval.pgd_step_size": -3.0,
    "eval.cvar_t_step_size": -1.0, "eval.cvar_beta": 0.0, "eval.cvar_draws": 0,
    "eval.cvar_steps": -1, "eval.augmented_draws": 0, "eval.augmented_betas": (0.1, 1.0),
    "eval.apgd_steps": 0, "eval.square_queries": 0, "eval.dtype": "float16",
    "parallel.coordinator_address": 5, "parallel.num_processes": 0, "parallel.process_id": -1,
    "parallel.auto": "yes",
}


def _leaves(d: dict, prefix: str = "") -> list[str]:
  out = []
  for k, v in d.items():
    if isinstance(v, dict):
      out += _leaves(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def _untyped(algorithm: str, dataset: str = "mnist_digits") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(configs.base_config(dataset, algorithm).to_dict(),
                                   type_safe=False)


def _set(config, path, value):
  *sections, leaf = path.split(".")
  for s in sections:
    config = config[s]
  config[leaf] = value


def test_the_table_covers_every_field_of_every_config():
  fields = {f for a in algorithms.ALGORITHMS for d in ("mnist_digits", "cifar10")
            for f in _leaves(configs.base_config(d, a).to_dict())}
  assert fields - BAD.keys() == set(), "fields without a bad value in the table"


def _cases():
  """``(algorithm, field)``: every field of Gaussian_DALE_PD, and every algorithm's own
  sampler, loss and dual fields."""
  for field in _leaves(configs.base_config("mnist_digits", "Gaussian_DALE_PD").to_dict()):
    yield "Gaussian_DALE_PD", field
  for algorithm in algorithms.ALGORITHMS:
    for field in _leaves(configs.base_config("mnist_digits", algorithm).to_dict()):
      if field.split(".")[0] in ("sampler", "loss", "dual") and algorithm != "Gaussian_DALE_PD":
        yield algorithm, field


@pytest.mark.parametrize("algorithm,field", list(_cases()))
def test_every_bad_value_is_refused_naming_the_full_field(algorithm, field):
  config = _untyped(algorithm)
  _set(config, field, BAD[field])
  with pytest.raises(validation.InvalidArgument) as info:
    experiment.check(config)
  assert str(info.value).startswith(f"config.{field} "), str(info.value)


def test_coordinator_without_a_port_is_refused_for_several_processes():
  config = _untyped("PGD")
  config.parallel.num_processes, config.parallel.coordinator_address = 2, "localhost"
  with pytest.raises(validation.InvalidArgument, match=r"^config\.parallel\.coordinator_address"):
    experiment.check(config)


def test_auto_and_explicit_multi_host_fields_are_refused_together():
  config = _untyped("PGD")
  config.parallel.update(auto=True, num_processes=2, coordinator_address="localhost:1234")
  with pytest.raises(validation.InvalidArgument, match=r"^config\.parallel\.auto must be False"):
    experiment.check(config)


def test_the_default_configs_are_valid():
  for algorithm in algorithms.ALGORITHMS:
    for dataset in configs.DATASETS:
      experiment.check(configs.base_config(dataset, algorithm))


def test_numpy_scalars_are_numbers_and_bools_are_not():
  for value in (3, np.int64(3), np.int32(3)):
    assert validation.integer("n", value, minimum=1) == 3
  for value in (0.5, np.float32(0.5), np.float64(0.5), 1):
    assert validation.positive("x", value) == pytest.approx(value)
  for bad in (True, 2.0, "3", None):
    with pytest.raises(validation.InvalidArgument, match=r"^n must be an integer >= 1"):
      validation.integer("n", bad, minimum=1)
  for bad in (True, float("nan"), float("inf"), "0.5", 0.0, -1):
    with pytest.raises(validation.InvalidArgument, match=r"^x must be a finite number > 0"):
      validation.positive("x", bad)
  # The same value is judged the same way by the config and by the sampler factory.
  config = _untyped("PGD")
  config.sampler.steps = np.int64(3)
  experiment.check(config)


# ----------------------------------------------------------------------------- console scripts


def _script(module, *args, env=None):
  return subprocess.run([sys.executable, "-m", f"dale_jax.cli.{module}", *args],
                        capture_output=True, text=True, timeout=300, check=False,
                        env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))


_TRAIN = [f"--config={QUICKSTART}:Gaussian_DALE_PD"]


@pytest.mark.slow
@pytest.mark.parametrize("module,prog,args,needle", [
    ("train", "dale-train", _TRAIN + ["--config.sampler.eps=-1.0"],
     "config.sampler.eps must be a finite number >= 0, got -1.0"),
    ("train", "dale-train", _TRAIN + ["--config.eval.pgd_step_size=-3"],
     "config.eval.pgd_step_size must be a finite number > 0, got -3.0"),
    ("train", "dale-train", _TRAIN + ["--config.optimizer.lerning_rate=0.1"],
     "no field 'lerning_rate' (--config.optimizer.lerning_rate); did you mean"),
    ("train", "dale-train", [f"--config={QUICKSTART}:DALEE"], "algorithm must be one of"),
    ("train", "dale-train", _TRAIN + ["--config.batch_size=abc"], "--config.batch_size=abc"),
    ("train", "dale-train", _TRAIN + ["--config.batch_size=5000"],
     "config.batch_size must be at most the 4000 training examples"),
    ("train", "dale-train", ["--config=mnist:PGD",
                             "--config.data.data_dir=/nonexistent/tfds"],
     "is not prepared as ArrayRecord"),
    ("train", "dale-train", [f"--config={QUICKSTART}:ERM", "--config.sampler.eps=0.1"],
     "ERM has no sampler (config.sampler is empty), so --config.sampler.eps does not apply"),
    ("evaluate", "dale-eval", ["--attacks=clean,pgd99"], "--attacks: attack must be one of clean"),
    ("evaluate", "dale-eval", ["--attacks=clean,fab-t"], "use --version=custom"),
    ("sweep", "dale-sweep", ["--algorithms=PGD", "--datasets=quickstart", "--dry_run",
                             "--config.eval.eps=-1.0"], "config.eval.eps must be"),
    ("collect", "dale-collect", ["--input_dir=/nonexistent/sweep"], "is not a directory"),
    ("bench", "dale-bench", ["--frameworks=jax", "--simulated_devices=3", "--batch_size=64"],
     "--batch_size=64 must be divisible by every --simulated_devices, got 3"),
    ("bench", "dale-bench", ["--task=autoattack", "--workdir=/nonexistent/run"],
     "--task=autoattack needs --workdir of a finished dale-train run"),
])
def test_console_scripts_print_one_line_and_exit_2(tmp_path, module, prog, args, needle):
  if module in ("train", "evaluate"):
    args = args + [f"--workdir={tmp_path / 'run'}"]
  if module == "sweep":
    args = args + [f"--output_dir={tmp_path / 'sweep'}"]
  out = _script(module, *args)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{prog}: error: ") and needle in last, out.stderr[-2000:]
  assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_the_traceback_is_there_when_asked_for(tmp_path):
  out = _script("train", *_TRAIN, "--config.sampler.eps=-1.0", f"--workdir={tmp_path}",
                env={"DALE_JAX_TRACEBACK": "1"})
  assert out.returncode == 2 and "Traceback" in out.stderr
  assert "dale-train: error: config.sampler.eps" in out.stderr


@pytest.mark.slow
def test_dale_eval_on_a_workdir_without_a_checkpoint(tmp_path):
  (tmp_path / "config.json").write_text(configs.base_config("mnist_digits", "PGD").to_json())
  out = _script("evaluate", f"--workdir={tmp_path}")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("dale-eval: error: no checkpoint in")
  assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("field", ["sampler.eps", "eval.eps", "perturbation.linf_eps",
                                   "eval.perturbation.linf_eps"])
def test_an_linf_radius_above_1_is_refused_as_pixel_levels(field):
  config = _untyped("PGD")
  _set(config, field, 8)
  with pytest.raises(validation.InvalidArgument) as info:
    configs.validate(config)
  message = str(info.value)
  assert message.startswith(f"config.{field} is 8, an Linf radius on images in [0, 1]")
  assert "8 means 8 pixel levels; did you mean 8/255 = 0.0314?" in message
  _set(config, field, 1.0)  # the whole range: large, but a radius
  configs.validate(config)


def test_an_l2_radius_has_no_such_bound():
  config = _untyped("PGD")
  config.sampler.norm, config.sampler.eps = "l2", 3.0
  config.eval.norm, config.eval.eps = "l2", 8.0
  configs.validate(config)
  config.eval.norm = "linf"  # the same number as an Linf radius
  with pytest.raises(validation.InvalidArgument, match=r"^config\.eval\.eps is 8"):
    configs.validate(config)


def test_linf_radius_and_schedule_checks_are_pure_functions():
  validation.linf_radius("eps", 0.5)
  validation.linf_radius("eps", 1)
  validation.linf_radius("eps", "not a number")  # the type is another check's
  with pytest.raises(validation.InvalidArgument, match=r"^eps is 300, .* 300/255 = 1\.1765\?$"):
    validation.linf_radius("eps", 300)
  assert validation.schedule_past_end((6,), 8) is None
  assert validation.schedule_past_end((), 8) is None
  assert validation.schedule_past_end((6, 8, 100), 8) == (
      "config.schedule.boundaries (8, 100) >= config.num_epochs=8: that learning-rate "
      "decay never happens in this run")


def test_a_schedule_boundary_past_the_last_epoch_is_one_warning_line(caplog):
  config = _untyped("PGD")
  config.num_epochs, config.schedule.boundaries, config.schedule.scales = 8, (6,), (0.1,)
  with caplog.at_level("WARNING", logger="dale_jax"):
    configs.validate(config)
  assert not caplog.records
  config.schedule.boundaries = (100,)  # legitimate (a short run of a long schedule): no error
  with caplog.at_level("WARNING", logger="dale_jax"):
    configs.validate(config)
  (record,) = caplog.records
  assert record.levelname == "WARNING" and "\n" not in record.getMessage()
  assert record.getMessage().startswith("config.schedule.boundaries (100,) >= config.num_epochs=8")
