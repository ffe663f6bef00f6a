"""Sweeps, model selection, result tables and plots, on synthetic and (slow) real runs."""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import sys
import textwrap

import numpy as np
import pytest

from conftest import require

from dale_jax import validation
from dale_jax.cli import collect as collect_cli
from dale_jax.cli import sweep as sweep_cli
from dale_jax.research import collect
from dale_jax.research import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
METRICS = ("Clean-Accuracy", "PGD-Accuracy", "FGSM-Accuracy")


# ----------------------------------------------------------------------------- helpers


def _record(epoch, validation, test, train=None):
  return {"Epoch": epoch, "Train": train or {"Loss": 1.0 / (epoch + 1)},
          "Validation": validation, "Test": test, "Epoch-Time": 1.0,
          "Total-Time": float(epoch + 1), "hparams": {}, "args": {}}


def _write_run(root, dataset, algorithm, h, t, records, *, done=True, config=None):
  workdir = pathlib.Path(root) / dataset / algorithm / f"h{h}_t{t}"
  workdir.mkdir(parents=True, exist_ok=True)
  cfg = {"algorithm": algorithm, "dataset": dataset, "seed": t, "hparams_seed": h,
         "num_epochs": len(records)}
  cfg.update(config or {})
  (workdir / "config.json").write_text(json.dumps(cfg))
  (workdir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if done:
    (workdir / "done").write_text("")
  return workdir


def _synthetic_sweep(root, *, algorithms=("ERM", "PGD"), n_hparams=2, n_trials=3,
                     n_epochs=4, seed=0):
  """Writes runs with random metrics; returns raw[(alg, h, t)] = array (epochs, split, metric)."""
  rng = np.random.default_rng(seed)
  raw = {}
  for alg in algorithms:
    for h in range(n_hparams):
      for t in range(n_trials):
        values = np.round(rng.uniform(0, 100, size=(n_epochs, 2, len(METRICS))), 3)
        records = []
        for e in range(n_epochs):
          val = dict(zip(METRICS, values[e, 0].tolist()))
          test = dict(zip(METRICS, values[e, 1].tolist()))
          val["Clean-Loss"] = test["Clean-Loss"] = 1.0 + e
          records.append(_record(e, val, test,
                                 train={"Loss": 1.0, "clean loss": 0.3 / (e + 1),
                                        "robust loss": 0.9 / (e + 1),
                                        "dual variable": 1.0 + 0.01 * e}))
        _write_run(root, "mnist", alg, h, t, records, config={"dual": {"margin": 0.1}})
        raw[(alg, h, t)] = values
  return raw


def _expected(raw, alg, selection, n_hparams, n_trials, metric_index=1):
  """Independent model + hparams selection on the raw array; returns (h, test values)."""
  best = None
  for h in range(n_hparams):
    chosen = []
    for t in range(n_trials):
      v = raw[(alg, h, t)]
      epoch = len(v) - 1 if selection == "LastStep" else int(np.argmax(v[:, 0, metric_index]))
      chosen.append(v[epoch])
    chosen = np.array(chosen)  # (trials, split, metric)
    score = chosen[:, 0, metric_index].mean()
    if best is None or score > best[0]:
      best = (score, h, chosen[:, 1, :])
  return best[1], best[2]


# ----------------------------------------------------------------------------- selection


def test_select_record_last_step_and_early_stop():
  recs = [_record(e, {"PGD-Accuracy": v, "Clean-Loss": l}, {})
          for e, (v, l) in enumerate([(50, 0.9), (70, 0.4), (70, 0.2), (60, 0.4)])]
  assert collect.select_record(recs, "LastStep", "PGD-Accuracy")["Epoch"] == 3
  # Earliest of the tied maxima; losses are minimised.
  assert collect.select_record(recs, "EarlyStop", "PGD-Accuracy")["Epoch"] == 1
  assert collect.select_record(recs, "EarlyStop", "Clean-Loss")["Epoch"] == 2
  with pytest.raises(ValueError, match="EarlyStop needs Validation"):
    collect.select_record(recs, "EarlyStop", "FGSM-Accuracy")
  with pytest.raises(ValueError, match="selection must be one of"):
    collect.select_record(recs, "Oracle", "PGD-Accuracy")


def test_metric_falls_back_to_clean_accuracy_only_by_default(tmp_path):
  recs = [_record(e, {"Clean-Accuracy": 10.0 * (3 - e)}, {"Clean-Accuracy": 1.0 + e})
          for e in range(3)]
  _write_run(tmp_path, "svhn", "ERM", 0, 0, recs)
  runs = collect.load_runs(str(tmp_path))
  assert collect.resolve_metric(runs) == "Clean-Accuracy"
  (choice,) = collect.choose(runs, "EarlyStop")
  assert choice.metric == "Clean-Accuracy" and choice.records[0]["Epoch"] == 0
  with pytest.raises(ValueError, match="'PGD-Accuracy' is in no Validation record"):
    collect.resolve_metric(runs, "PGD-Accuracy")


def test_runs_without_validation_allow_last_step_only(tmp_path, capsys):
  for h in (0, 1):
    recs = [_record(e, None, {"Clean-Accuracy": 50.0 + 10 * h + e}) for e in range(2)]
    for r in recs:
      del r["Validation"]
    _write_run(tmp_path, "mnist_digits", "ERM", h, 0, recs)
  runs = collect.load_runs(str(tmp_path))
  assert collect.resolve_metric(runs) is None
  (choice,) = collect.choose(runs, "LastStep")
  # Seed 1 has the better test accuracy, but test numbers must not pick hparams.
  assert (choice.metric, choice.hparams_seed, choice.records[0]["Epoch"]) == (None, 0, 1)
  with pytest.raises(collect.NoValidationError, match="the mnist_digits runs have none"):
    collect.choose(runs, "EarlyStop")

  assert collect_cli.main([f"--input_dir={tmp_path}", "--format=markdown"]) == 0
  captured = capsys.readouterr()
  assert "EarlyStop left out for mnist_digits" in captured.err
  assert "no validation records: smallest hparams seed" in captured.out
  assert "| ERM | 51.0 ± 0.0 | 0 | 1 |" in captured.out
  (row,) = [r for r in collect.read_csv(str(tmp_path / "results.csv")) if r.split == "Test"]
  assert (row.selection, row.selection_metric, row.mean) == ("LastStep", "", 51.0)


@pytest.mark.parametrize("selection", collect.SELECTION_METHODS)
def test_hparams_selection_and_statistics_match_independent_computation(tmp_path, selection):
  raw = _synthetic_sweep(tmp_path)
  rows = collect.summarize(collect.choose(collect.load_runs(str(tmp_path)), selection))
  for alg in ("ERM", "PGD"):
    h, test = _expected(raw, alg, selection, n_hparams=2, n_trials=3)
    for j, metric in enumerate(METRICS):
      (row,) = [r for r in rows if (r.algorithm, r.split, r.metric) == (alg, "Test", metric)]
      assert row.hparams_seed == h and row.n == 3
      assert row.selection_metric == "PGD-Accuracy"
      np.testing.assert_allclose(row.mean, test[:, j].mean(), rtol=1e-12)
      np.testing.assert_allclose(row.std, test[:, j].std(ddof=1), rtol=1e-12)


def test_records_of_resumed_runs_keep_the_last_copy_of_each_epoch(tmp_path):
  recs = [_record(0, {"PGD-Accuracy": 1.0}, {"PGD-Accuracy": 1.0}),
          _record(1, {"PGD-Accuracy": 2.0}, {"PGD-Accuracy": 2.0}),
          _record(1, {"PGD-Accuracy": 3.0}, {"PGD-Accuracy": 3.0})]
  workdir = _write_run(tmp_path, "mnist", "ERM", 0, 0, recs)
  with open(workdir / "results.jsonl", "a") as f:
    f.write('{"Epoch": 2, "Train": {"Lo')  # killed mid-write
  (run,) = collect.load_runs(str(tmp_path))
  assert [r["Epoch"] for r in run.records] == [0, 1]
  assert run.records[1]["Test"]["PGD-Accuracy"] == 3.0
  (workdir / "results.jsonl").write_text('{"Epoch": 0}\nnot json\n{"Epoch": 1}\n')
  with pytest.raises(ValueError, match="results.jsonl:2 is not JSON"):
    collect.load_runs(str(tmp_path))


def test_incomplete_runs_are_skipped_unless_asked(tmp_path):
  recs = [_record(0, {"PGD-Accuracy": 1.0}, {"PGD-Accuracy": 1.0})]
  _write_run(tmp_path, "mnist", "ERM", 0, 0, recs)
  _write_run(tmp_path, "mnist", "ERM", 0, 1, recs, done=False)
  assert [r.trial_seed for r in collect.load_runs(str(tmp_path))] == [0]
  assert [r.trial_seed for r in
          collect.load_runs(str(tmp_path), include_incomplete=True)] == [0, 1]
  assert collect.count_incomplete(str(tmp_path)) == 1


# ----------------------------------------------------------------------------- dale-collect


def test_collect_cli_writes_csv_and_tables_equal_to_records(tmp_path, capsys):
  raw = _synthetic_sweep(tmp_path, n_hparams=2, n_trials=2)
  assert collect_cli.main([f"--input_dir={tmp_path}"]) == 0
  out = capsys.readouterr().out

  with open(tmp_path / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == collect.CSV_FIELDS
  keys = {(r["algorithm"], r["selection"], r["split"], r["metric"]) for r in rows}
  assert len(keys) == len(rows)  # one row per algorithm, split, metric, selection
  assert {r["split"] for r in rows} == {"Train", "Validation", "Test"}
  for alg in ("ERM", "PGD"):
    for selection in collect.SELECTION_METHODS:
      h, test = _expected(raw, alg, selection, n_hparams=2, n_trials=2)
      for j, metric in enumerate(METRICS):
        (row,) = [r for r in rows if (r["algorithm"], r["selection"], r["split"],
                                      r["metric"]) == (alg, selection, "Test", metric)]
        assert int(row["hparams_seed"]) == h and int(row["n"]) == 2
        np.testing.assert_allclose(float(row["mean"]), test[:, j].mean(), rtol=1e-12)
        np.testing.assert_allclose(float(row["std"]), test[:, j].std(ddof=1), rtol=1e-12)
        cell = f"{test[:, j].mean():.1f} ± {test[:, j].std(ddof=1):.1f}"
        assert cell in out
        mean, std = f"{test[:, j].mean():.1f}", f"{test[:, j].std(ddof=1):.1f}"
        assert (f"${mean} \\pm {std}$" in out) or (f"$\\mathbf{{{mean}}} \\pm {std}$" in out)

  markdown = (tmp_path / "results.md").read_text()
  assert markdown.count("| Algorithm | Clean | PGD | FGSM | hparams | n |") == 2
  assert "**mnist: test metrics" in markdown
  assert "\\begin{tabular}{lccc}" in (tmp_path / "results.tex").read_text()
  assert collect.read_csv(str(tmp_path / "results.csv"))[0].dataset == "mnist"


def test_tables_mark_the_best_mean_per_column():
  rows = [collect.Row("d", a, "LastStep", "PGD-Accuracy", 0, "Test", m, mean, 0.5, 2)
          for a, m, mean in [("A", "PGD-Accuracy", 40.0), ("B", "PGD-Accuracy", 55.0),
                             ("A", "Clean-Loss", 0.2), ("B", "Clean-Loss", 0.3)]]
  (table,) = collect.make_tables(rows, metrics=["PGD-Accuracy", "Clean-Loss"],
                                 algorithms=["B", "A"])
  md = collect.to_markdown(table)
  assert "| B | **55.0 ± 0.5** | 0.300 ± 0.500 | 0 | 2 |" in md
  assert "| A | 40.0 ± 0.5 | **0.200 ± 0.500** | 0 | 2 |" in md
  tex = collect.to_latex(table)
  assert "B & $\\mathbf{55.0} \\pm 0.5$ & $0.300 \\pm 0.500$ \\\\" in tex


def test_collect_cli_rejects_unknown_selection_and_missing_dir(tmp_path):
  with pytest.raises(SystemExit):
    collect_cli.main([f"--input_dir={tmp_path}", "--selection=Oracle"])
  with pytest.raises(SystemExit):
    collect_cli.main([f"--input_dir={tmp_path / 'nowhere'}"])


# ----------------------------------------------------------------------------- plots


def test_pareto_front_matches_brute_force():
  rng = np.random.default_rng(1)
  points = np.round(rng.uniform(0, 10, size=(40, 2)))  # rounding makes ties
  front = set(collect_plots().pareto_front(points).tolist())
  for i, p in enumerate(points):
    dominated = any((q >= p).all() and (q > p).any() for q in points)
    assert (i in front) == (not dominated)


def collect_plots():
  require("matplotlib")
  from dale_jax.research import plots
  return plots


def test_plots_are_written_as_png(tmp_path):
  plots = collect_plots()
  _synthetic_sweep(tmp_path, n_hparams=1, n_trials=2, n_epochs=3)
  # Augmented and CVaR evaluators on one algorithm only.
  run_dir = tmp_path / "mnist" / "PGD" / "h0_t0"
  recs = [json.loads(l) for l in (run_dir / "results.jsonl").read_text().splitlines()]
  for r in recs:
    r["Test"].update({"Augmented-Accuracy": 90.0, "Augmented-0.1-Quantile-Accuracy": 80.0,
                      "Augmented-0.01-Quantile-Accuracy": 60.0, "CVaR-Loss": 1.5})
  (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

  choices = collect.choose(collect.load_runs(str(tmp_path)), "EarlyStop")
  assert plots.quantile_levels(choices) == ["0.1", "0.01"]
  assert plots.margin_of(choices[0].runs[0].config) == 0.1
  paths = plots.plot_all(choices, str(tmp_path / "plots"))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["accuracy_curves.png", "augmented_quantiles.png", "cvar.png", "pareto.png",
                   "primal_dual_ERM.png", "primal_dual_PGD.png"]
  for p in paths:
    data = pathlib.Path(p).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_cli_draws_one_run(tmp_path, capsys):
  collect_plots()
  from dale_jax.cli import plot as plot_cli

  _synthetic_sweep(tmp_path, algorithms=("Gaussian_DALE_PD",), n_hparams=1, n_trials=1)
  run_dir = tmp_path / "mnist" / "Gaussian_DALE_PD" / "h0_t0"
  assert plot_cli.main([f"--input_dir={run_dir}", f"--out_dir={tmp_path / 'figs'}"]) == 0
  written = capsys.readouterr().out.split()
  assert [os.path.basename(p) for p in written] == [
      "accuracy_curves.png", "primal_dual_Gaussian_DALE_PD.png", "pareto.png"]
  assert all(os.path.isfile(p) for p in written)


def test_curve_averages_trials_over_common_epochs(tmp_path):
  plots = collect_plots()
  for t, values in enumerate([(10.0, 20.0, 30.0), (30.0, 40.0)]):
    _write_run(tmp_path, "mnist", "ERM", 0, t,
               [_record(e, {}, {"PGD-Accuracy": v}) for e, v in enumerate(values)])
  epochs, mean, std = plots.curve(collect.load_runs(str(tmp_path)), "Test", "PGD-Accuracy")
  np.testing.assert_array_equal(epochs, [0, 1])
  np.testing.assert_allclose(mean, [20.0, 30.0])
  np.testing.assert_allclose(std, [np.sqrt(200.0)] * 2)


# ----------------------------------------------------------------------------- sweep

_FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir = args["workdir"]
    algorithm = args["config"].rsplit(":", 1)[1]
    if algorithm == os.environ.get("FAKE_FAIL"):
      print("diverged", file=sys.stderr)
      sys.exit(3)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "env.json"), "w") as f:
      json.dump({"device": os.environ.get("FAKE_DEVICE"), "argv": sys.argv[1:],
                 "prealloc": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
                 "resumed": os.path.exists(os.path.join(workdir, "checkpoints"))}, f)
    h, t = int(args["config.hparams_seed"]), int(args["config.seed"])
    with open(os.path.join(workdir, "results.jsonl"), "w") as f:
      for e in range(int(args.get("config.num_epochs", 2))):
        acc = 10.0 * h + t + e
        f.write(json.dumps({"Epoch": e, "Validation": {"Clean-Accuracy": acc},
                            "Test": {"Clean-Accuracy": acc + 0.5}}) + "\\n")
    open(os.path.join(workdir, "done"), "w").close()
""")


@pytest.fixture
def fake_train(tmp_path):
  script = tmp_path / "fake_train.py"
  script.write_text(_FAKE_TRAIN)
  configs = tmp_path / "configs"
  configs.mkdir()
  # A real config: dale-sweep validates every run's config before it launches any.
  (configs / "mnist.py").write_text(
      "from dale_jax import configs\n\n\ndef get_config(algorithm):\n"
      "  return configs.base_config('mnist', algorithm)\n")
  return (sys.executable, str(script)), str(configs)


def test_make_jobs_builds_the_grid_and_commands():
  jobs = sweep.make_jobs(algorithms=["ERM", "PGD"], datasets=["quickstart"], n_hparams=2,
                         n_trials=3, output_dir="out", num_epochs=2,
                         overrides=["--config.batch_size=16"])
  assert len(jobs) == 12
  job = jobs[4]
  assert (job.algorithm, job.hparams_seed, job.trial_seed) == ("ERM", 1, 1)
  assert job.workdir == os.path.join("out", "quickstart", "ERM", "h1_t1")
  assert job.command == (
      sys.executable, "-m", "dale_jax.cli.train",
      "--config=quickstart:ERM",
      f"--workdir={job.workdir}", "--config.hparams_seed=1", "--config.seed=1",
      "--config.num_epochs=2", "--config.batch_size=16")
  for bad in (["--config.seed=3"], ["--lr=1"], ["--config.batch_size"]):
    with pytest.raises(ValueError):
      sweep.make_jobs(algorithms=["ERM"], datasets=["mnist"], n_hparams=1, n_trials=1,
                      output_dir="out", overrides=bad)
  with pytest.raises(ValueError, match="n_trials must be an integer >= 1"):
    sweep.make_jobs(algorithms=["ERM"], datasets=["mnist"], n_hparams=1, n_trials=0,
                    output_dir="out")
  with pytest.raises(ValueError, match=r"lists \['ERM'\] more than once"):
    sweep.make_jobs(algorithms=["ERM", "ERM"], datasets=["mnist"], n_hparams=1, n_trials=1,
                    output_dir="out")


def test_dry_run_prints_a_script_and_launches_nothing(tmp_path, fake_train, capsys):
  command, configs = fake_train
  out_dir = tmp_path / "sweep"
  done = _write_run(out_dir, "mnist", "ERM", 0, 1, [_record(0, {}, {})])
  job = next(j for j in sweep.make_jobs(
      algorithms=["ERM"], datasets=["mnist"], n_hparams=1, n_trials=2, output_dir=str(out_dir),
      config_dir=configs, overrides=["--config.batch_size=8"]) if j.workdir == str(done))
  (done / "config.json").write_text(sweep.job_config(job).to_json_best_effort())  # its config
  (out_dir / "mnist" / "PGD" / "h0_t0").mkdir(parents=True)  # incomplete
  argv = ["--algorithms=ERM,PGD", "--datasets", "mnist", "--n_trials=2",
          f"--output_dir={out_dir}", f"--config_dir={configs}", "--dry_run",
          "--config.batch_size=8"]
  assert sweep_cli.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == "# 4 runs: 1 done, 1 incomplete (resumed), 2 not launched; 3 to launch"
  assert len(lines) == 4 and all("--config.batch_size=8" in l for l in lines[1:])
  assert not (out_dir / "mnist" / "ERM" / "h0_t0").exists()

  assert sweep_cli.main(argv + ["--clean_incomplete"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert sum(l.startswith("rm -rf ") for l in lines) == 1
  assert sweep_cli.main(argv + ["--noresume_incomplete"]) == 0
  assert capsys.readouterr().out.splitlines()[0].endswith("(skipped), 2 not launched; 2 to launch")
  with pytest.raises(SystemExit):
    sweep_cli.main(argv + ["--datasets=cifar10"])  # no such config
  with pytest.raises(SystemExit):  # the real trainer knows no such algorithm
    sweep_cli.main(["--algorithms=ERM,Oracle", "--datasets=quickstart", "--dry_run",
                    f"--output_dir={out_dir}"])
  assert "Oracle" in capsys.readouterr().err


def test_launch_runs_jobs_on_workers_skips_done_and_resumes_incomplete(tmp_path, fake_train,
                                                                      monkeypatch):
  command, configs = fake_train
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  out_dir = tmp_path / "sweep"
  jobs = sweep.make_jobs(algorithms=["ERM", "PGD"], datasets=["mnist"], n_hparams=2,
                         n_trials=2, output_dir=str(out_dir), config_dir=configs,
                         num_epochs=3, train_command=command)
  incomplete = pathlib.Path(jobs[0].workdir)
  (incomplete / "checkpoints").mkdir(parents=True)
  log = io.StringIO()
  outcomes = sweep.launch(sweep.select_jobs(jobs), n_workers=2, devices=["7", "9"],
                          device_env="FAKE_DEVICE", out=log)
  assert len(outcomes) == 8 and all(o.ok for o in outcomes), log.getvalue()
  assert sweep.summarize(jobs) == {sweep.NOT_LAUNCHED: 0, sweep.INCOMPLETE: 0, sweep.DONE: 8,
                                  sweep.STALE: 0}
  envs = [json.loads((pathlib.Path(j.workdir) / "env.json").read_text()) for j in jobs]
  assert {e["device"] for e in envs} == {"7", "9"}
  assert [e["resumed"] for e in envs] == [True] + [False] * 7  # checkpoint kept
  assert {e["prealloc"] for e in envs} == {None}
  assert "[8/8] done" in log.getvalue()
  assert sweep.select_jobs(jobs) == []

  # collect agrees with what the runs wrote: hparams seed 1 wins (acc = 10 h + t + e).
  rows = collect.summarize(collect.choose(collect.load_runs(str(out_dir)), "LastStep"))
  (row,) = [r for r in rows if (r.algorithm, r.split) == ("PGD", "Test")]
  assert (row.hparams_seed, row.mean, row.n) == (1, 10 + 0.5 + 2 + 0.5, 2)


def test_workers_sharing_a_device_do_not_preallocate(tmp_path, fake_train, monkeypatch):
  command, _ = fake_train
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  jobs = sweep.make_jobs(algorithms=["ERM", "PGD"], datasets=["mnist"], n_hparams=1,
                         n_trials=1, output_dir=str(tmp_path / "s"), train_command=command)
  outcomes = sweep.launch(jobs, n_workers=2, devices=["0", "0"], device_env="FAKE_DEVICE",
                          out=io.StringIO())
  assert all(o.ok for o in outcomes)
  for job in jobs:
    env = json.loads((pathlib.Path(job.workdir) / "env.json").read_text())
    assert (env["device"], env["prealloc"]) == ("0", "false")


def test_clean_incomplete_deletes_and_failures_are_reported(tmp_path, fake_train, capsys,
                                                            monkeypatch):
  command, configs = fake_train
  out_dir = tmp_path / "sweep"
  stale = out_dir / "mnist" / "ERM" / "h0_t0" / "checkpoints"
  stale.mkdir(parents=True)
  monkeypatch.setenv("FAKE_FAIL", "PGD")
  argv = ["--algorithms=ERM,PGD", "--datasets=mnist", "--n_trials=1", "--n_workers=2",
          f"--output_dir={out_dir}", f"--config_dir={configs}", "--clean_incomplete",
          "--device_env=none", f"--train_command={' '.join(command)}"]
  assert sweep_cli.main(argv) == 1
  out = capsys.readouterr().out
  assert "FAILED (exit code 3): mnist/PGD/h0_t0" in out and "diverged" in out
  assert "# 1 of 2 runs finished; failed: mnist/PGD/h0_t0" in out
  assert not stale.exists()
  env = json.loads((stale.parent / "env.json").read_text())
  assert env["resumed"] is False and env["device"] is None
  log = (out_dir / "mnist" / "PGD" / "h0_t0" / "sweep.log").read_text()
  assert log.startswith("$ ") and "diverged" in log


def test_a_train_command_that_cannot_start_fails_its_jobs_only(tmp_path):
  jobs = sweep.make_jobs(algorithms=["ERM", "PGD"], datasets=["mnist"], n_hparams=1,
                         n_trials=1, output_dir=str(tmp_path),
                         train_command=[str(tmp_path / "no-such-trainer")])
  log = io.StringIO()
  outcomes = sweep.launch(jobs, n_workers=2, out=log)
  assert [o.returncode for o in outcomes] == [127, 127]
  assert "cannot start" in (pathlib.Path(jobs[0].workdir) / "sweep.log").read_text()
  assert "[2/2] FAILED (exit code 127)" in log.getvalue()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tiny_quickstart_sweep_then_collect_reports_the_records(tmp_path, capsys,
                                                                monkeypatch):
  monkeypatch.chdir(REPO)  # the default --config_dir is relative to the repository
  out_dir = tmp_path / "sweep"
  argv = ["--datasets=quickstart", "--algorithms=ERM,Gaussian_DALE_PD", "--n_trials=1",
          "--num_epochs=1", f"--output_dir={out_dir}", "--n_workers=2",
          "--config.data.max_train_examples=128", "--config.batch_size=16",
          "--config.eval.max_examples=100"]
  assert sweep_cli.main(argv) == 0, capsys.readouterr().out
  assert sweep_cli.main(argv) == 0  # everything done: nothing relaunched
  assert "0 to launch" in capsys.readouterr().out.splitlines()[-1]

  assert collect_cli.main([f"--input_dir={out_dir}", "--plots"]) == 0
  out = capsys.readouterr().out
  rows = collect.read_csv(str(out_dir / "results.csv"))
  assert {r.algorithm for r in rows} == {"ERM", "Gaussian_DALE_PD"}
  for alg in ("ERM", "Gaussian_DALE_PD"):
    workdir = out_dir / "quickstart" / alg / "h0_t0"
    (last,) = [json.loads(l) for l in (workdir / "results.jsonl").read_text().splitlines()]
    assert json.loads((workdir / "config.json").read_text())["num_epochs"] == 1
    test_rows = {r.metric: r for r in rows if (r.algorithm, r.split) == (alg, "Test")}
    assert set(test_rows) == set(last["Test"])
    for metric, value in last["Test"].items():
      row = test_rows[metric]
      assert (row.selection, row.hparams_seed, row.n, row.std) == ("LastStep", 0, 1, 0.0)
      assert row.mean == value
    for metric in ("Clean-Accuracy", "PGD-Accuracy", "FGSM-Accuracy"):
      assert f"{last['Test'][metric]:.1f} ± 0.0" in out
  plots = out_dir / "plots" / "mnist_digits"
  for name in ("accuracy_curves.png", "pareto.png", "primal_dual_Gaussian_DALE_PD.png"):
    assert (plots / name).read_bytes()[:4] == b"\x89PNG"

  # The same runs through submitit (its local executor: a process per job; its debug
  # executor: in this process) write the same records.
  require("submitit")
  for launcher, alg in (("submitit-local", "ERM"), ("submitit-debug", "ERM")):
    other = tmp_path / launcher
    argv_other = [a for a in argv if not a.startswith(("--output_dir", "--algorithms"))]
    assert sweep_cli.main([*argv_other, f"--output_dir={other}", f"--algorithms={alg}",
                           f"--launcher={launcher}"]) == 0, capsys.readouterr().out
    assert "[1/1] done: quickstart/" in capsys.readouterr().out
    got, want = [[{k: r[k] for k in ("Epoch", "Train", "Test", "hparams")} for r in map(
        json.loads, (d / "quickstart" / alg / "h0_t0" / "results.jsonl").read_text().splitlines())]
                 for d in (other, out_dir)]
    assert got == want
    assert sweep_cli.main([*argv_other, f"--output_dir={other}", f"--algorithms={alg}",
                           f"--launcher={launcher}"]) == 0  # done: nothing submitted
    assert "0 to launch" in capsys.readouterr().out


def test_slurm_launcher_writes_the_sbatch_array_of_the_sweep(tmp_path, monkeypatch):
  """``--launcher=slurm``'s job array, submitted to a stand-in ``sbatch`` on PATH."""
  require("submitit")
  from dale_jax.research import cluster

  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
  (bin_dir / "sbatch").write_text(
      f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 4242\n")
  for f in ("srun", "sbatch"):
    (bin_dir / f).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  jobs = sweep.make_jobs(algorithms=["ERM", "PGD"], datasets=["quickstart"], n_hparams=1,
                         n_trials=1, output_dir=str(tmp_path / "sweep"))
  options = cluster.SlurmOptions(partition="gpu", account="lab", time_min=120, nodes=2,
                                 tasks_per_node=4, gpus_per_node=4, cpus_per_task=8,
                                 mem_gb=64, array_parallelism=1, sbatch=("qos=high",))
  handles = cluster.launch(jobs, options, output_dir=str(tmp_path / "sweep"), wait=False,
                           out=io.StringIO())
  assert [h.job_id for h in handles] == ["4242_0", "4242_1"]
  script = (tmp_path / "submitted.sh").read_text()
  folder = tmp_path / "sweep" / cluster.SUBMITIT_DIR
  for line in ("--partition=gpu", "--account=lab", "--time=120", "--nodes=2",
               "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64GB",
               "--array=0-1%1", "--qos=high", "--job-name=dale-sweep",
               f"--output={folder}/%A_%a_0_log.out",
               "--signal=USR2@90"):  # submitit's cue to requeue before the time limit
    assert f"#SBATCH {line}\n" in script, (line, script)
  # Eight tasks per run: each trains with --config.parallel.auto=True.
  assert handles[0].submission().function.command == [
      *jobs[0].command, "--config.parallel.auto=True"]


def test_slurm_options_are_checked_before_anything_is_submitted(tmp_path, capsys):
  with pytest.raises(SystemExit):
    sweep_cli.main(["--datasets=quickstart", "--algorithms=ERM", f"--output_dir={tmp_path}",
                    "--launcher=slurm", "--slurm_time_min=0"])
  assert "--slurm_time_min=0: 0 is not a positive integer" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sweep_cli.main(["--datasets=quickstart", "--algorithms=ERM", f"--output_dir={tmp_path}",
                    "--launcher=slurm", "--slurm_sbatch=qos"])
  assert "--slurm_sbatch must be 'key=value' strings" in capsys.readouterr().err
  assert not (tmp_path / "quickstart").exists()


# ----------------------------------------------------------------------------- a run is its config


def test_config_differences_and_what_a_resume_may_change():
  from dale_jax import rundir
  old = {"num_epochs": 8, "seed": 0, "log_every_steps": 50, "schedule": {"boundaries": (6,)},
         "sampler": {"eps": 0.3}, "parallel": {"num_processes": 1}, "data": {"data_dir": None}}
  new = {**old, "log_every_steps": 10, "parallel": {"num_processes": 2},
         "data": {"data_dir": "/data"}, "schedule": {"boundaries": [6]}}
  assert rundir.config_differences(old, new) == {}  # bookkeeping; a tuple is its JSON list
  assert rundir.resume_changes(old, dict(new, num_epochs=10)) == ({"num_epochs": (8, 10)}, {})
  allowed, refused = rundir.resume_changes(
      old, dict(new, num_epochs=5, sampler={"eps": 0.1, "steps": 7}))
  assert allowed == {} and refused == {"num_epochs": (8, 5), "sampler.eps": (0.3, 0.1),
                                       "sampler.steps": (None, 7)}
  assert rundir.describe_changes(refused, limit=2) == (
      "num_epochs 8 -> 5, sampler.eps 0.3 -> 0.1 and 1 more")


def test_collect_refuses_to_average_runs_of_different_configs(tmp_path, capsys):
  records = [_record(0, {}, {"Clean-Accuracy": 90.0})]
  _write_run(tmp_path, "mnist", "PGD", 0, 0, records)
  _write_run(tmp_path, "mnist", "PGD", 0, 1, records, config={"num_epochs": 2})
  _write_run(tmp_path, "mnist", "ERM", 0, 0, records, config={"log_every_steps": 1})
  _write_run(tmp_path, "mnist", "ERM", 0, 1, records, config={"log_every_steps": 9})
  runs = collect.load_runs(str(tmp_path))
  erm = [r for r in runs if r.algorithm == "ERM"]
  collect.check_alike(erm)  # trials: they differ in seed and bookkeeping only
  with pytest.raises(validation.BadInput, match=r"h0_t0 and .*h0_t1 \(PGD, hparams seed 0\) "
                                                r"differ in num_epochs 1 -> 2"):
    collect.choose(runs, "LastStep")
  with pytest.raises(SystemExit) as exit_info:
    _run_cli(collect_cli, [f"--input_dir={tmp_path}"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("dale-collect: error: runs ") and "num_epochs" in err[0]


def _run_cli(module, argv):
  import unittest.mock
  with unittest.mock.patch.object(sys, "argv", ["prog", *argv]):
    module.run()


def _done_quickstart_run(output_dir, algorithm, **changes):
  """A finished run of the sweep's job, its config.json written as dale-train would,
  with ``changes`` applied (``{"sampler.eps": 0.1}``)."""
  job = sweep.make_jobs(algorithms=[algorithm], datasets=["quickstart"], n_hparams=1,
                        n_trials=1, output_dir=str(output_dir), num_epochs=2)[0]
  config = sweep.job_config(job)
  for field, value in changes.items():
    *sections, leaf = field.split(".")
    section = config
    for s in sections:
      section = section[s]
    section[leaf] = value
  os.makedirs(job.workdir)
  with open(os.path.join(job.workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  for name in ("results.jsonl", "done"):
    pathlib.Path(job.workdir, name).write_text("")
  return job


def test_sweep_counts_a_run_done_only_with_the_config_it_asks_for(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  same = _done_quickstart_run(tmp_path / "a", "PGD")
  assert sweep.job_state(same) == sweep.DONE
  fewer = _done_quickstart_run(tmp_path / "b", "PGD", num_epochs=1)
  assert sweep.job_state(fewer) == sweep.INCOMPLETE  # asked for more epochs: resumed
  other = _done_quickstart_run(tmp_path / "c", "PGD", **{"sampler.eps": 0.1})
  assert sweep.job_state(other) == sweep.STALE
  assert sweep.stale_changes(other) == {"sampler.eps": (0.1, 0.3)}
  assert sweep.select_jobs([other]) == []


def test_sweep_cli_refuses_an_output_dir_of_another_config_in_one_line(tmp_path, capsys,
                                                                       monkeypatch):
  monkeypatch.chdir(REPO)
  _done_quickstart_run(tmp_path, "PGD", num_epochs=5)  # more epochs than asked: stale
  with pytest.raises(SystemExit) as exit_info:
    _run_cli(sweep_cli, ["--algorithms=PGD", "--datasets=quickstart", "--n_hparams=1",
                         "--n_trials=1", "--num_epochs=2", f"--output_dir={tmp_path}",
                         "--dry_run"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("dale-sweep: error: 1 of the 1 runs in ") and (
      "num_epochs 5 -> 2" in err[0]), err[0]
