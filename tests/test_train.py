"""The training job: data parallelism, resume after SIGKILL, config errors, NaN stop.

Two processes against one: tests/test_layouts.py (the records of a two-process run).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from dale_jax import checkpoint, configs, experiment, rundir, train
from dale_jax import steps as steps_lib

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_step_worker.py")
ROOT = os.path.dirname(HERE)
QUICKSTART = os.path.join(configs.CONFIG_DIR, "quickstart.py")


def _run_worker(out, devices, *extra):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, WORKER, str(out), str(devices), *map(str, extra)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _params(path):
  with np.load(path) as f:
    return int(f["devices"]), {k: f[k] for k in f.files if k != "devices"}


def _assert_same_params(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def one_device_params(tmp_path_factory):
  out = tmp_path_factory.mktemp("one") / "p.npz"
  proc = _run_worker(out, 1)
  log = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, log
  return _params(out)


@pytest.mark.slow
def test_eight_devices_match_one(one_device_params, tmp_path):
  proc = _run_worker(tmp_path / "p.npz", 8)
  log = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, log
  devices, params = _params(tmp_path / "p.npz")
  assert devices == 8 and one_device_params[0] == 1
  _assert_same_params(one_device_params[1], params)


# ----------------------------------------------------------------------------
# Resume.

_TINY = [
    "--config.num_epochs=2", "--config.batch_size=32", "--config.data.max_train_examples=192",
    "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
    "--config.eval.max_examples=100", "--config.eval.evaluators=('Clean','PGD')",
    "--config.sampler.steps=3",
]


def _train_cmd(workdir):
  return [sys.executable, "-m", "dale_jax.cli.train", f"--config={QUICKSTART}:Gaussian_DALE_PD",
          f"--workdir={workdir}", *_TINY]


def _records(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_gives_the_same_results(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  full, killed = tmp_path / "full", tmp_path / "killed"
  subprocess.run(_train_cmd(full), env=env, check=True, capture_output=True, timeout=600)

  # 6 steps per epoch: kill once step 8 (mid epoch 1) is checkpointed.
  proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt = killed / "checkpoints" / "8"
  deadline = time.time() + 600
  while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert ckpt.exists() and not (killed / "done").exists(), "run ended before it could be killed"
  assert [r["Epoch"] for r in _records(killed)] == [0]

  subprocess.run(_train_cmd(killed), env=env, check=True, capture_output=True, timeout=600)
  a, b = _records(full), _records(killed)
  assert [r["Epoch"] for r in b] == [0, 1] and (killed / "done").exists()
  for ra, rb in zip(a, b):
    # Same predictions; losses agree up to the order of XLA:CPU's threaded reductions.
    accuracies = [k for k in ra["Test"] if "Accuracy" in k]
    assert {k: ra["Test"][k] for k in accuracies} == {k: rb["Test"][k] for k in accuracies}
    assert ra["Test"] == pytest.approx(rb["Test"], rel=1e-4)
    assert ra["Train"] == pytest.approx(rb["Train"], rel=1e-4)


# ----------------------------------------------------------------------------
# Bad input.


def _config(**overrides):
  c = configs.base_config("mnist_digits", "Gaussian_DALE_PD")
  for k, v in overrides.items():
    section = c
    *path, leaf = k.split(".")
    for p in path:
      section = section[p]
    section[leaf] = v
  return c


@pytest.mark.parametrize("field,value", [
    ("optimizer.learning_rate", -1.0),
    ("optimizer.momentum", 1.5),
    ("batch_size", 0),
    ("num_epochs", 0),
    ("sampler.eps", -0.1),
    ("sampler.step_size", 0.0),
    ("sampler.steps", -1),
    ("sampler.norm", "l3"),
    ("dual.every", "week"),
    ("model.name", "vgg"),
    ("eval.eps", -1.0),
    ("eval.splits", ("Train",)),
    ("eval.evaluators", ("Clean", "AutoAttackk")),
    ("schedule.scales", (0.1, 0.2)),
    ("sampler_chunk_size", -1),
])
def test_invalid_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=field.split(".")[-1]):
    experiment.check(_config(**{field: value}))


def test_unknown_algorithm_and_dataset_list_the_valid_ones():
  with pytest.raises(ValueError, match="Gaussian_DALE_PD"):
    configs.base_config("mnist", "DALEE")
  with pytest.raises(ValueError, match="cifar10"):
    configs.base_config("imagenet", "PGD")


def test_batch_must_divide_over_devices():
  with pytest.raises(ValueError, match="batch_size.*divisible"):
    experiment.check(_config(batch_size=60), num_devices=8)


@pytest.mark.slow
def test_cli_rejects_unknown_field_before_writing(tmp_path):
  workdir = tmp_path / "run"
  for flag, needle in [("--config.optimizer.lerning_rate=0.1", "lerning_rate"),
                       ("--config.optimizer.learning_rate=-3", "learning_rate")]:
    proc = subprocess.run(_train_cmd(workdir)[:5] + [flag], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode != 0 and needle in proc.stderr
  assert not workdir.exists()


def test_hparams_seed_zero_keeps_defaults_and_others_follow_advbench_ranges():
  c = _config()
  configs.apply_random_hparams(c)
  assert c.batch_size == 64 and c.optimizer.learning_rate == 0.01
  for seed in range(1, 20):
    c = _config(hparams_seed=seed)
    configs.apply_random_hparams(c)
    assert 8 <= c.batch_size < 256
    assert 10**-4.5 <= c.optimizer.learning_rate <= 10**-2.5
    assert 0.8 <= c.optimizer.momentum <= 0.95
    assert 1e-6 <= c.optimizer.weight_decay <= 1e-3
    assert 1e-6 <= c.sampler.noise_scale <= 1e-2
  a, b = _config(hparams_seed=3), _config(hparams_seed=3)
  configs.apply_random_hparams(a)
  configs.apply_random_hparams(b)
  assert a.to_dict() == b.to_dict()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = _config(**{"optimizer.learning_rate": 1e12, "optimizer.momentum": 0.0, "batch_size": 32,
                 "data.max_train_examples": 320, "checkpoint_every_steps": 1,
                 "log_every_steps": 1, "sampler.steps": 1, "num_epochs": 1})
  with pytest.raises(FloatingPointError, match="non-finite"):
    train.train_and_evaluate(c, str(tmp_path))
  steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert steps, "no checkpoint was kept"
  state = experiment.init_state(experiment.build(c), jax.random.key(0), (28, 28, 1))
  restored, sums = checkpoint.restore(checkpoint.manager(str(tmp_path)), state)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
  assert all(np.isfinite(v) for v in sums["sums"].values())


@pytest.mark.slow
def test_dale_train_reports_a_diverged_run_in_one_line_with_exit_status_1(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "DALE_JAX_TRACEBACK"}
  cmd = [sys.executable, "-m", "dale_jax.cli.train", f"--config={QUICKSTART}:ALP",
         f"--workdir={tmp_path}", "--config.optimizer.learning_rate=1e12",
         "--config.optimizer.momentum=0.0", "--config.batch_size=32",
         "--config.data.max_train_examples=320", "--config.checkpoint_every_steps=1",
         "--config.log_every_steps=1", "--config.sampler.steps=1", "--config.num_epochs=1"]
  proc = subprocess.run(cmd, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 1, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("dale-train: error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
  line = errors[0]
  assert re.search(r"non-finite training meters by step \d+ of epoch 0: '[^']+' = -?(nan|inf)", line), line
  assert re.search(r"the last good checkpoint \(step \d+\) in .*checkpoints is kept", line), line
  traced = subprocess.run(cmd, env=dict(env, PYTHONPATH=ROOT, DALE_JAX_TRACEBACK="1"),
                          capture_output=True, text=True, timeout=600)
  assert traced.returncode == 1 and "Traceback" in traced.stderr


@pytest.mark.slow
def test_update_that_overflows_with_a_finite_loss_keeps_the_previous_checkpoint(tmp_path):
  # Epoch 0 trains normally; from epoch 1 the learning rate is 0.01 * 1e300, infinite in
  # float32: the first step of epoch 1 has a finite loss (computed before its update)
  # and infinite new weights.
  c = _config(**{"batch_size": 32, "data.max_train_examples": 64, "checkpoint_every_steps": 1,
                 "log_every_steps": 1, "sampler.steps": 1, "num_epochs": 2,
                 "schedule.boundaries": (1,), "schedule.scales": (1e300,),
                 "eval.max_examples": 20, "eval.evaluators": ("Clean",)})
  with pytest.raises(FloatingPointError, match="non-finite .*params.* after step 1 of epoch 1"):
    train.train_and_evaluate(c, str(tmp_path))
  manager = checkpoint.manager(str(tmp_path))
  assert manager.latest_step() == 2  # the end of epoch 0, not the overflowed step 3
  state = experiment.init_state(experiment.build(c), jax.random.key(0), (28, 28, 1))
  restored, saved = checkpoint.restore(manager, state)
  assert int(restored.step) == 2
  leaves = jax.tree.leaves((restored.params, restored.opt_state, restored.dual_state))
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
  assert all(np.isfinite(v) for v in saved["sums"].values())
  with open(tmp_path / "results.jsonl") as f:
    assert [json.loads(line)["Epoch"] for line in f] == [0]


def _advbench_draw(seed, name, sample):
  """advbench's ``_hparam``: ``random_val_fn(RandomState(misc.seed_hash(seed, name)))``."""
  import hashlib  # pylint: disable=import-outside-toplevel
  h = int(hashlib.md5(str((seed, name)).encode("utf-8")).hexdigest(), 16) % (2**31)
  return sample(np.random.RandomState(h))


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_a_search_seed_draws_what_advbenchs_hparams_registry_draws(dataset):
  # advbench's hparams_registry.py (bd2071d), transcribed: name -> random_val_fn.
  mnist = dataset == "mnist"
  u = lambda lo, hi: (lambda r: r.uniform(lo, hi))
  want = {
      ("PGD", "batch_size"): ("batch_size", lambda r: int(2 ** r.uniform(3, 8))),
      ("PGD", "optimizer.learning_rate"): ("learning_rate", lambda r: 10 ** r.uniform(-4.5, -2.5)),
      ("PGD", "optimizer.momentum"): ("sgd_momentum", u(0.8, 0.95)),
      ("PGD", "optimizer.weight_decay"): ("weight_decay", lambda r: 10 ** r.uniform(-6, -3)),
      ("PGD", "sampler.step_size"): ("pgd_step_size", u(0.05, 0.2) if mnist else lambda r: 0.007),
      ("TRADES", "sampler.steps"): ("trades_n_steps", lambda r: 7 if mnist else 15),
      ("TRADES", "sampler.step_size"): ("trades_step_size", u(0.01, 0.1)),
      ("TRADES", "loss.beta"): ("trades_beta", u(0.1, 10.0)),
      ("MART", "loss.beta"): ("mart_beta", u(0.1, 10.0)),
      ("Gaussian_DALE_PD", "sampler.noise_scale"): (
          "g_dale_noise_coeff", (lambda r: 10 ** r.uniform(-6.0, -2.0)) if mnist else lambda r: 0),
      ("DALE", "sampler.noise_scale"): (
          "l_dale_noise_coeff", (lambda r: 10 ** r.uniform(-6.0, -2.0)) if mnist else lambda r: 1e-2),
      ("CVaR_SGD_PD", "loss.t_step_size"): ("cvar_sgd_t_step_size", lambda r: 0.001),
      ("CVaR_SGD", "loss.beta"): ("cvar_sgd_beta", lambda r: 0.1),
      ("CVaR_SGD_Autograd", "draws"): ("cvar_sgd_M", lambda r: 10),
      ("CVaR_SGD", "loss.n_steps"): ("cvar_sgd_n_steps", lambda r: 10),
      ("TERM", "loss.t"): ("term_t", lambda r: 1.0),
      ("RandSmoothing", "sampler.sigma"): ("rand_smoothing_sigma", lambda r: 0.12),
      ("RandSmoothing", "sampler.steps"): ("rand_smoothing_n_steps", lambda r: 10 if mnist else 7),
      ("RandSmoothing", "sampler.step_size"): ("rand_smoothing_step_size", u(0.01, 0.1)),
      ("RandSmoothing", "sampler.num_samples"): ("rand_smoothing_n_samples", lambda r: 1),
  }
  for seed in (1, 3):
    for (algorithm, field), (name, sample) in want.items():
      config = configs.base_config(dataset, algorithm)
      config.hparams_seed = seed
      resolved = experiment.resolve(config)
      section, _, key = field.rpartition(".")
      got = (resolved[section] if section else resolved)[key]
      assert got == pytest.approx(_advbench_draw(seed, name, sample), rel=1e-12), (
          algorithm, field, seed)
  # Seed 0 keeps the defaults.
  config = configs.base_config(dataset, "TRADES")
  assert experiment.resolve(config).to_dict() == config.to_dict()


def test_learning_rate_schedule_uses_advbench_absolute_factors():
  c = configs.base_config("mnist", "ERM")
  sched = experiment.learning_rate_schedule(c, steps_per_epoch=10)
  assert float(sched(0)) == pytest.approx(0.01)
  assert float(sched(249)) == pytest.approx(0.01)
  assert float(sched(250)) == pytest.approx(0.001)
  assert float(sched(350)) == pytest.approx(0.0001)
  assert float(sched(400)) == pytest.approx(0.00001)


def test_sampler_chunk_size_is_chosen_per_platform_unless_set():
  config = configs.base_config("mnist", "Gaussian_DALE_PD")
  assert config.sampler_chunk_size is None
  experiment.check(config)
  assert steps_lib.sampler_chunk_size(config, "cpu") == steps_lib.CPU_SAMPLER_CHUNK
  assert steps_lib.sampler_chunk_size(config, "gpu") == 0
  assert steps_lib.sampler_chunk_size(config, "tpu") == 0
  assert steps_lib.sampler_chunk_size(config) == steps_lib.sampler_chunk_size(config,
                                                                      jax.default_backend())
  for chunk in (0, 8):
    config.sampler_chunk_size = chunk
    assert (steps_lib.sampler_chunk_size(config, "cpu")
            == steps_lib.sampler_chunk_size(config, "gpu") == chunk)
  with pytest.raises(ValueError, match="sampler_chunk_size.*None"):
    experiment.check(_config(sampler_chunk_size=-1))


@pytest.mark.slow
def test_sampler_chunks_leave_a_noise_free_step_unchanged():
  config = configs.base_config("mnist_digits", "PGD")  # PGD from x: no random draw.
  config.batch_size = 16
  rng = np.random.RandomState(0)
  batch = {"image": rng.uniform(size=(16, 28, 28, 1)).astype(np.float32),
           "label": rng.randint(0, 10, size=(16,)).astype(np.int32)}
  params = []
  for chunk in (0, 4):
    config.sampler_chunk_size = chunk
    exp = experiment.build(config, num_classes=10)
    state = experiment.init_state(exp, jax.random.key(0), (28, 28, 1))
    state, _ = steps_lib.make_train_step(exp)(state, batch)
    params.append(jax.tree.leaves(state.params))
  for a, b in zip(*params):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# ----------------------------------------------------------------------------
# A run is its config.


def test_a_workdir_resumes_only_with_its_own_config(tmp_path):
  from dale_jax import rundir, validation
  c = configs.base_config("mnist_digits", "PGD")
  assert train.check_resumable(str(tmp_path / "new"), c) == {}
  rundir.write_config(str(tmp_path), c)
  assert train.check_resumable(str(tmp_path), c) == {}  # a config.json alone: nothing trained
  (tmp_path / "results.jsonl").write_text("")
  bookkeeping = configs.base_config("mnist_digits", "PGD")
  bookkeeping.log_every_steps = 7
  assert train.check_resumable(str(tmp_path), bookkeeping) == {}
  more = configs.base_config("mnist_digits", "PGD")
  more.num_epochs = c.num_epochs + 2
  assert train.check_resumable(str(tmp_path), more) == {"num_epochs": (50, 52)}
  other = configs.base_config("mnist_digits", "PGD")
  other.sampler.eps, other.num_epochs = 0.1, 2
  with pytest.raises(validation.BadInput, match=r"holds a run of another config "
                     r"\(num_epochs 50 -> 2, sampler.eps 0.3 -> 0.1\)"):
    train.check_resumable(str(tmp_path), other)
  (tmp_path / "file").write_text("")
  with pytest.raises(validation.BadInput, match="is a file, not a directory"):
    train.check_resumable(str(tmp_path / "file"), c)


@pytest.mark.slow
def test_dale_train_refuses_to_resume_a_workdir_with_other_flags_and_writes_nothing(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run(_train_cmd(tmp_path), env=env, check=True, capture_output=True, timeout=600)
  before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  proc = subprocess.run(_train_cmd(tmp_path) + ["--config.sampler.eps=0.1"], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  err = proc.stderr.strip().splitlines()
  assert err[-1].startswith("dale-train: error: workdir ") and (
      "sampler.eps 0.3 -> 0.1" in err[-1]), proc.stderr
  assert not any(line.startswith("Traceback") for line in err)
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
  # More epochs continue the same run, and the record says so.
  subprocess.run(_train_cmd(tmp_path) + ["--config.num_epochs=3"], env=env, check=True,
                 capture_output=True, timeout=600)
  records = _records(tmp_path)
  assert [r["Epoch"] for r in records] == [0, 1, 2]
  assert records[2]["Config-Changes"] == {"num_epochs": [2, 3]}
  assert "Config-Changes" not in records[1]


def test_the_bundled_configs_former_path_still_names_them(tmp_path):
  bundled = os.path.join(configs.CONFIG_DIR, "quickstart.py") + ":DALE"
  assert configs.config_path("experiments/configs/quickstart.py:DALE") == bundled
  assert configs.config_path("/any/checkout/experiments/configs/quickstart.py:DALE") == bundled
  # Anywhere else a missing file is the user's own, reported as missing by ml_collections.
  assert configs.config_path("my/configs/quickstart.py:DALE") == "my/configs/quickstart.py:DALE"
  assert configs.config_path("experiments/configs/nope.py:DALE") == (
      "experiments/configs/nope.py:DALE")
  # A file that exists at the former path is read, not replaced.
  own = tmp_path / "experiments" / "configs" / "quickstart.py"
  own.parent.mkdir(parents=True)
  own.write_text("")
  assert configs.config_path(f"{own}:DALE") == f"{own}:DALE"


@pytest.mark.slow
def test_print_config_shows_every_field_with_its_source_and_writes_nothing(tmp_path):
  assert configs.bundled() == ["cifar10", "mnist", "quickstart", "spatial", "svhn"]
  assert configs.config_path("quickstart:PGD") == os.path.join(configs.CONFIG_DIR,
                                                               "quickstart.py") + ":PGD"
  assert configs.config_path("my/own.py:PGD") == "my/own.py:PGD"
  proc = subprocess.run(
      # A bundled config by name, from a directory outside the checkout.
      [sys.executable, "-m", "dale_jax.cli.train", "--config=quickstart:DALE",
       "--print_config", "--config.sampler.eps=0.2", "--config.hparams_seed=3"],
      cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = {line.split(" = ")[0]: line for line in proc.stdout.splitlines()[1:]}
  c = configs.base_config("mnist_digits", "DALE")
  assert len(lines) == len(rundir.flatten(c.to_dict()))
  assert lines["sampler.eps"].endswith("# --config.sampler.eps") and " 0.2 " in lines["sampler.eps"]
  assert lines["optimizer.learning_rate"].endswith("# random search (hparams_seed=3)")
  assert lines["num_epochs"].split(" = ")[1].startswith("8 ") and (
      lines["num_epochs"].endswith("# the config file"))
  assert lines["sampler.steps"].endswith("# configs.FAMILIES['mnist']['samplers']")
  assert lines["dual.every"].endswith("# algorithms.ALGORITHMS['DALE'].dual")
  assert lines["eval.pgd_steps"].endswith("# configs.FAMILIES['mnist']['eval']")
  assert lines["eval.apgd_steps"].endswith("# configs.base_config")
  assert list(tmp_path.iterdir()) == []
  bad = subprocess.run(
      [sys.executable, "-m", "dale_jax.cli.train", f"--config={QUICKSTART}:DALE",
       "--print_config", "--config.sampler.eps=-1.0"], cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
      "dale-train: error: config.sampler.eps")


def test_eval_splits_take_the_commands_lowercase_spelling_and_record_advbenchs_keys():
  dataset = SimpleNamespace(validation=(np.zeros((3, 28, 28, 1)), np.zeros(3)),
                            test=(np.ones((5, 28, 28, 1)), np.ones(5)))
  for spelling in (("validation", "test"), ("Validation", "Test")):
    config = _config(**{"eval.splits": spelling})
    experiment.check(config)
    splits = train._evaluated_splits(config, dataset)  # pylint: disable=protected-access
    assert list(splits) == ["Validation", "Test"] and len(splits["Test"][1]) == 5
  with pytest.raises(ValueError, match="eval.splits"):
    experiment.check(_config(**{"eval.splits": ("train",)}))
