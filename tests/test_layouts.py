"""The records do not depend on the device layout: 1 device, 8 simulated devices, 2 processes.

Each run is a real ``dale-train`` / ``dale-eval`` process (or ``_eval_worker.py``), so
that it can choose its device count (``--xla_force_host_platform_device_count`` must be
set before JAX starts) or join a two-process group over gloo.

Two layouts with the same per-device shapes compute the same numbers bit for bit (two
processes of one device each and one process of two devices do). Layouts with other
per-device shapes round differently inside the matmuls, and a training run's signed
sampler steps amplify that, so the device-count test evaluates one checkpoint on 1 and
on 8 devices instead of training twice.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = "quickstart"  # a bundled config, by name
EVAL_WORKER = os.path.join(ROOT, "tests", "_eval_worker.py")

# 150 test images in eval batches of 100 (the default) leave a padded last batch, and
# 100 rows do not split evenly over 8 devices: both paddings are exercised.
_SMALL = [
    "--config.batch_size=32", "--config.sampler.steps=3", "--config.eval.max_examples=150",
    "--config.eval.evaluators=('Clean','PGD','FGSM','CVaR','Augmented')",
    "--config.eval.augmented_draws=5", "--config.eval.splits=('Test',)",
]


def _env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=ROOT,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _train(workdir, devices, *extra, wait=True):
  cmd = [sys.executable, "-m", "dale_jax.cli.train", f"--config={QUICKSTART}:Gaussian_DALE_PD",
         f"--workdir={workdir}", *_SMALL, *extra]
  proc = subprocess.Popen(cmd, env=_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  log = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, log[-4000:]
  return _last_record(workdir)


def _last_record(workdir) -> dict:
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f][-1]


def _assert_same_split(a: dict, b: dict, rel: float) -> None:
  assert a.keys() == b.keys()
  accuracies = sorted(k for k in a if "Accuracy" in k)
  assert {k: a[k] for k in accuracies} == {k: b[k] for k in accuracies}
  for k in a:
    assert b[k] == pytest.approx(a[k], rel=rel, abs=rel), k


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_write_the_record_of_one_process(tmp_path):
  one = _train(tmp_path / "one", 2, "--config.num_epochs=1", "--config.data.max_train_examples=192")
  address = f"127.0.0.1:{_free_port()}"
  procs = [_train(tmp_path / "two", 1, "--config.num_epochs=1",
                  "--config.data.max_train_examples=192", "--config.parallel.num_processes=2",
                  f"--config.parallel.process_id={i}",
                  f"--config.parallel.coordinator_address={address}", wait=False)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), [log[-3000:] for log in logs]
  two = _last_record(tmp_path / "two")
  # One process on two devices has the same per-device shapes: the same numbers.
  _assert_same_split(one["Test"], two["Test"], rel=1e-6)
  assert two["Train"] == pytest.approx(one["Train"], rel=1e-6)


_AUTO_WORKER = """
import jax
from dale_jax import parallel
parallel.initialize_distributed(auto=True)
from jax.experimental import multihost_utils
ids = multihost_utils.process_allgather(jax.numpy.array([jax.process_index()]))
print("layout", jax.process_count(), jax.process_index(), jax.device_count(), ids.ravel().tolist())
"""


def _slurm_job_id() -> int:
  """A job id whose coordinator port (JAX: ``61440 + id % 4096``) is free here."""
  for job_id in range(4096 * 7 + os.getpid() % 4096, 4096 * 8 + os.getpid() % 4096):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 61440 + job_id % 4096))
      except OSError:
        continue
    return job_id
  raise RuntimeError("no free port in JAX's Slurm range")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_parallel_auto_reads_a_slurm_task_environment():
  """``parallel.auto``: two ``srun`` tasks on one node, faked by their SLURM_* variables,
  find their coordinator and each other over gloo; without them the error names the field."""
  clean = {k: v for k, v in _env(1).items() if not k.startswith("SLURM_")}
  slurm = dict(SLURM_JOB_ID=str(_slurm_job_id()), SLURM_STEP_NODELIST="localhost",
               SLURM_NTASKS="2", SLURM_STEP_NUM_NODES="1")
  procs = [subprocess.Popen([sys.executable, "-c", _AUTO_WORKER], text=True,
                            env=dict(clean, **slurm, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), [log[-3000:] for log in logs]
  layouts = [next(line for line in log.splitlines() if line.startswith("layout")) for log in logs]
  assert layouts == ["layout 2 0 2 [0, 1]", "layout 2 1 2 [0, 1]"]

  alone = subprocess.run([sys.executable, "-c", _AUTO_WORKER], env=clean, text=True,
                         capture_output=True, timeout=300, check=False)
  assert alone.returncode != 0
  assert "InvalidArgument: parallel.auto found no cluster environment" in alone.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A one-device run trained to about 75% clean accuracy, so that few test images
  sit on a decision boundary."""
  workdir = tmp_path_factory.mktemp("run")
  _train(workdir, 1, "--config.num_epochs=2", "--config.data.max_train_examples=640")
  return workdir


def _evaluate(workdir, out, devices, batch_size=100) -> dict:
  proc = subprocess.run([sys.executable, EVAL_WORKER, str(workdir), str(out), str(devices),
                         str(batch_size)], env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  assert result["devices"] == devices
  return result["record"]


@pytest.mark.slow
def test_eight_devices_evaluate_like_one(trained_run, tmp_path):
  # eval.batch_size=100 is no multiple of 8: every batch is padded to 104 rows.
  one = _evaluate(trained_run, tmp_path / "1.json", 1)
  eight = _evaluate(trained_run, tmp_path / "8.json", 8)
  _assert_same_split(one, eight, rel=1e-5)


@pytest.mark.slow
def test_dale_eval_on_eight_devices_matches_one(trained_run):
  reports = []
  for devices in (1, 8):
    out = subprocess.run(
        [sys.executable, "-m", "dale_jax.cli.evaluate", f"--workdir={trained_run}",
         "--version=custom", "--attacks=clean,fgsm,pgd20,apgd-ce,square", "--n_examples=60",
         "--batch_size=25", "--apgd_steps=5", "--square_queries=20"],
        env=_env(devices), capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(trained_run, "robustness.json")) as f:
      reports.append(json.load(f))
  a, b = reports
  assert a["per_attack"] == b["per_attack"]
  assert a["robust_accuracy"] == b["robust_accuracy"]


@pytest.mark.slow
def test_full_quickstart_epoch_on_eight_devices(tmp_path):
  """The deadlock of XLA:CPU's launcher pool (see parallel.one_step_at_a_time) aborted
  2 of 3 such runs after 40 s, within the epoch: a whole quickstart epoch."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "dale_jax.cli.train",
         f"--config={QUICKSTART}:Gaussian_DALE_PD", f"--workdir={workdir}",
         "--config.num_epochs=1", "--config.eval.max_examples=200", "--config.eval.evaluators=('Clean','PGD')"]
  proc = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(workdir / "done")
