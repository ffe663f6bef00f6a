"""dale-eval across processes: two localhost processes over gloo write one process's report.

The two processes hold one CPU device each and the single process two simulated
devices, so that every device computes on the same rows with the same shapes and the
reports agree exactly (the accuracies, each attack's results, the adversarial examples
and the attacks that found them), not merely within rounding. A two-process evaluation
killed mid-way and rerun continues from process 0's progress to the same report.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dale_jax import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two batches per attack (of the 13 points classified right), AutoAttack's APGD-T after
# APGD-CE, and the spatial attacks.
_ARGS = ("--version=custom", "--attacks=clean,fgsm,pgd20,apgd-ce,apgd-t", "--n_examples=36",
         "--batch_size=8", "--eps=0.1", "--apgd_steps=3", "--save_adversarial",
         "--spatial=grid,worst_of_k", "--perturbation=rotation", "--grid_points=3",
         "--worst_of_k=3")


@pytest.fixture(scope="module")
def finished_run(pgd_tiny_run):
  return pgd_tiny_run


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, output_dir, devices, *extra):
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
      [sys.executable, "-m", "dale_jax.cli.evaluate", f"--workdir={workdir}",
       f"--output_dir={output_dir}", *_ARGS, *extra],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(workdir, output_dir):
  address = f"127.0.0.1:{_free_port()}"
  return [_start(workdir, output_dir, 1, "--num_processes=2", f"--process_id={i}",
                 f"--coordinator_address={address}") for i in range(2)]


def _finish(procs):
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
  return outs


def _report(output_dir):
  with open(os.path.join(output_dir, rundir.ROBUSTNESS)) as f:
    report = json.load(f)
  with open(os.path.join(output_dir, rundir.MODEL_INFO)) as f:
    info = json.load(f)
  with np.load(os.path.join(output_dir, rundir.ADVERSARIAL)) as z:
    adversarial = {k: z[k] for k in z.files}
  del report["attack_seconds"], report["spatial"]["attack_seconds"]  # wall time
  return report, info, adversarial


def _assert_same(a, b):
  (report_a, info_a, adv_a), (report_b, info_b, adv_b) = a, b
  assert report_b == report_a and info_b == info_a
  assert adv_b.keys() == adv_a.keys()
  for k in adv_a:
    np.testing.assert_array_equal(adv_b[k], adv_a[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_write_the_report_of_one(finished_run, tmp_path):
  (one_out, _), = _finish([_start(finished_run, tmp_path / "one", 2)])
  one = _report(tmp_path / "one")
  report, _, adversarial = one
  # A report with something in it: points classified, broken by several attacks.
  assert report["n_examples"] == 36 and report["clean_accuracy"] > 30  # 13 points
  assert list(report["per_attack"]) == ["clean", "fgsm", "pgd20", "apgd-ce", "apgd-t"]
  assert len(set(adversarial["broken_by"]) - {"", "clean"}) >= 2, adversarial["broken_by"]
  assert report["spatial"]["candidates"] == {"grid": 3, "worst_of_k": 3}

  outs = _finish(_two_processes(finished_run, tmp_path / "two"))
  _assert_same(one, _report(tmp_path / "two"))
  # Process 0 prints the table (after gloo's line), process 1 no table; no progress left.
  assert outs[0][0].endswith(one_out) and "| attack |" not in outs[1][0]
  assert not os.path.exists(tmp_path / "two" / rundir.ROBUSTNESS_PROGRESS)

  # Killed mid-way, the two processes rerun from process 0's progress to the same report.
  killed = tmp_path / "killed"
  procs = _two_processes(finished_run, killed)
  progress = killed / rundir.ROBUSTNESS_PROGRESS
  deadline = time.monotonic() + 300

  def stored():
    return [f for _, _, files in os.walk(progress) for f in files if f.endswith(".npz")]

  # 13 points classified: two batches for each attack; stop after FGSM's and one of PGD's.
  while len(stored()) < 3 and all(p.poll() is None for p in procs) \
      and time.monotonic() < deadline:
    time.sleep(0.02)
  assert all(p.poll() is None for p in procs), ("dale-eval finished before it could be killed",
                                                [p.communicate()[1][-2000:] for p in procs])
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate()
  done = len(stored())
  outs = _finish(_two_processes(finished_run, killed))
  assert f"{done} attack batches already done" in outs[0][1]
  _assert_same(one, _report(killed))


@pytest.mark.slow
def test_bad_parallel_flags_are_one_line_before_anything_runs(tmp_path):
  for flags, message in (
      (["--num_processes=2"], "--coordinator_address must be 'host:port' when --num_processes > 1"),
      (["--num_processes=2", "--process_id=2", "--coordinator_address=localhost:1234"],
       "--process_id must be"),
      (["--auto", "--num_processes=2", "--coordinator_address=localhost:1234"],
       "--auto must be False when --num_processes"),
  ):
    out = subprocess.run(
        [sys.executable, "-m", "dale_jax.cli.evaluate", f"--workdir={tmp_path}", *flags],
        capture_output=True, text=True, timeout=300, check=False,
        env=dict(os.environ, PYTHONPATH=ROOT))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"dale-eval: error: {message}"), lines
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_auto_without_a_cluster_is_one_line_naming_the_flag(finished_run, tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
  out = subprocess.run(
      [sys.executable, "-m", "dale_jax.cli.evaluate", f"--workdir={finished_run}",
       f"--output_dir={tmp_path / 'out'}", "--auto"], capture_output=True, text=True,
      timeout=300, check=False, env=dict(env, PYTHONPATH=ROOT))
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith("dale-eval: error: --auto found no cluster environment"), lines
  assert "--coordinator_address, --num_processes and --process_id" in lines[0]
  assert not os.path.exists(tmp_path / "out")
