"""The results-page commands: experiments/paper/*.py end to end, and their checks."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import require

from dale_jax import data
from dale_jax import rundir
from dale_jax.cli import paper as paper_cli
from dale_jax.research import collect
from dale_jax.research import paper

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
  path = _ROOT / "experiments" / "paper" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"paper_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_argv(output_dir) -> list[str]:
  """Two algorithms x two seeds, one epoch on 128 digits, a short AutoAttack on 6."""
  return [f"--output_dir={output_dir}", "--algorithms=ERM,Gaussian_DALE_PD", "--seeds=2",
          "--aa_examples=6", "--test_examples=24", "--apgd_steps=3", "--square_queries=8",
          "--n_workers=2", "--config.num_epochs=1", "--config.data.max_train_examples=128",
          "--config.eval.max_examples=24"]


def _table_rows(text: str) -> dict[str, list[str]]:
  """{algorithm: cells} of the page's first table (the digits table)."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| Algorithm |"))
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[cells[0].split(" † ")[0]] = cells[1:]  # the name without its at-chance flag
  return rows


def _expected_cell(values) -> str:
  values = np.asarray(values, np.float64)
  return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


@pytest.mark.slow
def test_digits_command_end_to_end_builds_the_table_from_the_records(tmp_path, capsys):
  require("matplotlib")
  digits = _load("digits")
  out, doc = tmp_path / "runs", tmp_path / "docs" / "results.md"
  argv = _tiny_argv(out)
  assert paper_cli.main(digits.EXPERIMENT, str(doc), argv) == 0
  text = doc.read_text()

  # Every cell is the mean and sample std over the two seeds of the run's own records:
  # the last epoch's test accuracies, then PGD-20 and AutoAttack from paper_eval.json.
  rows = _table_rows(text)
  assert list(rows) == ["ERM", "Gaussian_DALE_PD"]
  for algorithm, cells in rows.items():
    workdirs = [out / "quickstart" / algorithm / f"h0_t{seed}" for seed in (0, 1)]
    last = [json.loads((w / "results.jsonl").read_text().splitlines()[-1]) for w in workdirs]
    evals = [json.loads((w / rundir.PAPER_EVAL).read_text()) for w in workdirs]
    assert all(r["Epoch"] == 0 for r in last)
    expected = [_expected_cell([r["Test"][m] for r in last])
                for m in ("Clean-Accuracy", "FGSM-Accuracy", "PGD-Accuracy")]
    expected.append(_expected_cell([e["pgd20"]["accuracy"] for e in evals]))
    expected.append(_expected_cell([e["pgd20_aa"]["accuracy"] for e in evals]))
    expected.append(_expected_cell([e["autoattack"]["accuracy"] for e in evals]))
    assert cells[:6] == expected, algorithm
    assert cells[6] == "2"
    assert float(cells[7]) == pytest.approx(np.mean([r["Total-Time"] for r in last]) / 60,
                                            abs=0.051)
    for e in evals:
      assert e["pgd20"]["n_examples"] == 24 and e["autoattack"]["n_examples"] == 6
      # PGD-20 again on AutoAttack's points: the two attacks on the same images.
      assert e["pgd20_aa"]["n_examples"] == 6
      assert e["pgd20_aa"]["clean_accuracy"] == e["autoattack"]["clean_accuracy"]
      assert e["settings"]["apgd_steps"] == 3 and e["norm"] == "linf" and e["eps"] == 0.3
      # AutoAttack's chain never reports more than its clean accuracy, nor PGD-20 more
      # than the clean accuracy of the same images.
      assert e["autoattack"]["accuracy"] <= e["autoattack"]["clean_accuracy"]
      assert e["pgd20"]["accuracy"] <= e["pgd20"]["clean_accuracy"]

  # The published table beside it, the reduced AutoAttack named as such, the figures.
  assert "| DALE-100 | 98.8 | 97.1 | 99.1 |" in text
  assert "reduced: 3 APGD steps, 8 Square queries" in text
  assert text.count("Gaussian_DALE_PD −") == 0  # no PGD/TRADES/MART row to compare
  assert "Gaussian_DALE_PD's seed 0 is the README's main job" in text
  assert "On the Pareto front" in text
  for name in ("pareto", "primal_dual"):
    figure = tmp_path / "docs" / "results" / "digits" / f"{name}.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"](results/digits/{name}.png)" in text
  assert "python experiments/paper/digits.py --output_dir=" in text
  csv_rows = collect.read_csv(str(out / "results.csv"))
  aa = {r.algorithm: r for r in csv_rows if r.metric == paper.AUTOATTACK}
  assert f"{aa['ERM'].mean:.1f} ± {aa['ERM'].std:.1f}" == rows["ERM"][5]

  # Rerun = continue: nothing is trained or attacked again, the page is the same.
  stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")
            if p.name in ("results.jsonl", rundir.PAPER_EVAL)}
  assert len(stamps) == 8
  capsys.readouterr()
  assert paper_cli.main(digits.EXPERIMENT, str(doc), argv) == 0
  assert "0 to start" in capsys.readouterr().out
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  assert doc.read_text() == text

  # A run whose evaluation is missing (or was made with other settings) is attacked
  # again, and only that one.
  lost = out / "quickstart" / "ERM" / "h0_t1" / rundir.PAPER_EVAL
  kept = {p: s for p, s in stamps.items() if p != lost}
  lost.unlink()
  assert paper_cli.main(digits.EXPERIMENT, str(doc),
                        [*argv, "--stages=evaluate,report"]) == 0
  assert lost.is_file()
  assert {p: p.stat().st_mtime_ns for p in kept} == kept
  assert _table_rows(doc.read_text()) == rows


@pytest.mark.parametrize("flag,message", [
    ("--seeds=0", "--seeds=0: 0 is not a positive integer"),
    ("--aa_examples=-1", "--aa_examples=-1: -1 is not a non-negative integer"),
    ("--stages=train,plot", "--stages=train,plot: expected distinct names from train, "
     "evaluate, report"),
    ("--algorithms=ERM,Nope", "Nope"),
    ("--config.optimizer.learning_rate=-1", "config.optimizer.learning_rate must be"),
    ("--seed=3", "Unknown command line flag 'seed'"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys, flag, message):
  digits = _load("digits")
  out = tmp_path / "runs"
  with pytest.raises(SystemExit) as info:
    paper_cli.main(digits.EXPERIMENT, str(tmp_path / "r.md"), [f"--output_dir={out}", flag])
  assert info.value.code == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("experiments/paper/digits.py: error: ") and message in line, line
  assert not out.exists() and not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("name,tfds_name", [("mnist", "mnist"), ("cifar10", "cifar10")])
def test_full_dataset_commands_say_how_to_prepare_the_data(tmp_path, capsys, name, tfds_name):
  experiment = _load(name).EXPERIMENT
  assert experiment.config == name and experiment.published == name
  with pytest.raises(SystemExit) as info:
    paper_cli.main(experiment, str(tmp_path / "r.md"),
                   [f"--output_dir={tmp_path / 'runs'}",
                    f"--config.data.data_dir={tmp_path}"])
  assert info.value.code == 2
  assert (f"tfds build {tfds_name} --data_dir={tmp_path} --file_format=array_record"
          in capsys.readouterr().err)
  assert not (tmp_path / "runs").exists()


def test_full_dataset_commands_carry_the_papers_settings():
  cifar = _load("cifar10").EXPERIMENT
  jobs = paper.jobs(cifar, "/tmp/unused")
  from dale_jax.research import sweep  # pylint: disable=import-outside-toplevel
  config = sweep.job_config(jobs[0])
  assert config.num_epochs == 100 and tuple(config.schedule.boundaries) == (75, 90)
  assert config.optimizer.learning_rate == 0.01 and config.model.name == "resnet18"
  assert config.eval.eps == pytest.approx(8 / 255)
  mnist = sweep.job_config(paper.jobs(_load("mnist").EXPERIMENT, "/tmp/unused")[0])
  assert mnist.batch_size == 128 and mnist.eval.eps == 0.3 and mnist.num_epochs == 50
  assert len(jobs) == len(cifar.algorithms) * cifar.seeds


def test_check_prepared_opens_the_splits_without_reading_them(tmp_path):
  data.check_prepared("mnist_digits")
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    data.check_prepared("cifar10", data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotPreparedError, match="tfds build svhn_cropped"):
    data.check_prepared("svhn", data_dir=str(tmp_path))


def _choice(algorithm, clean, robust, pgd=None):
  pgd = pgd or robust
  runs = tuple(collect.Run(f"/r/{algorithm}/{seed}", "d", algorithm, 0, seed, {}, (), True)
               for seed in range(len(clean)))
  records = tuple({"Test": {"Clean-Accuracy": c, paper.AUTOATTACK: r, paper.PGD20_AA: p}}
                  for c, r, p in zip(clean, robust, pgd))
  return collect.Choice("d", algorithm, "LastStep", None, 0, runs, records, float("nan"))


def test_findings_pair_the_seeds_and_flag_runs_at_chance():
  choices = [_choice("PGD", (90.0, 91.0, 92.0), (60.0, 61.0, 59.0)),
             _choice("TRADES", (95.0, 95.0, 94.0), (50.0, 52.0, 51.0)),
             _choice("Gaussian_DALE", (96.0, 96.0, 96.0), (55.0, 57.0, 60.0)),
             _choice("Gaussian_DALE_PD", (94.0, 96.0, 95.0), (62.0, 64.0, 58.0),
                     pgd=(70.0, 70.0, 70.0)),
             _choice("MART", (11.0, 95.0, 12.0), (0.0, 40.0, 0.0)),
             _choice("ERM", (99.0, 99.0, 99.0), (0.0, 0.0, 0.0))]
  lines = paper.findings(choices, primal_dual="Gaussian_DALE_PD")
  # MART's seeds 0 and 2 are at chance: its point is seed 1 alone (95, 40), dominated.
  assert lines[0] == ("On the Pareto front of clean against AutoAttack accuracy (no other "
                      "method is higher in both; runs at chance left out): Gaussian_DALE_PD, "
                      "Gaussian_DALE, ERM.")
  assert lines[1] == ("Ended at chance (clean accuracy below 20 %, marked †; left out of the "
                      "front and the comparisons): MART (2 of 3 seeds).")
  # Paired over seeds: Gaussian_DALE_PD - PGD = (4, 5, 3) clean and (2, 3, -1) AutoAttack.
  d_clean, d_robust = np.array([4.0, 5.0, 3.0]), np.array([2.0, 3.0, -1.0])
  assert (f"Gaussian_DALE_PD − PGD, paired over 3 seeds: clean +{d_clean.mean():.1f} ± "
          f"{d_clean.std(ddof=1):.1f}, AutoAttack +{d_robust.mean():.1f} ± "
          f"{d_robust.std(ddof=1):.1f} points; AutoAttack higher in 2 of 3 seeds.") in lines
  # Against MART only the seed where MART learned counts.
  assert any(line.startswith("Gaussian_DALE_PD − MART, paired over 1 seeds: clean +1.0")
             for line in lines)
  dual = [line for line in lines if line.startswith("What the dual variable adds")]
  assert dual == ["What the dual variable adds over a fixed multiplier (nu = 0.1): "
                  "Gaussian_DALE_PD − Gaussian_DALE, paired over 3 seeds: clean -1.0 ± 1.0, "
                  f"AutoAttack +4.0 ± {np.std([7.0, 7.0, -2.0], ddof=1):.1f} points; "
                  "AutoAttack higher in 2 of 3 seeds."]
  gap = next(line for line in lines if line.startswith("AutoAttack below PGD-20"))
  assert "Gaussian_DALE_PD 8.7" in gap and gap.index("Gaussian_DALE_PD") < gap.index("ERM")
  assert lines[-1].startswith("Gaussian_DALE_PD's seed 0 is the README's main job (the same "
                              "command): clean 94.0, PGD-10 nan")
  assert paper._name(choices[4]) == "MART † 2/3"


def _advbench_record(algorithm, seed, clean, pgd):
  return {"algorithm": algorithm, "seed": seed,
          "Test": {"Clean-Accuracy": clean, "PGD-Accuracy": pgd}}


def _clean_pgd_choice(algorithm, pairs):
  """A choice whose seed-i run ended at ``pairs[i]`` = (clean, PGD-10)."""
  choice = _choice(algorithm, [c for c, _ in pairs], [0.0] * len(pairs))
  return dataclasses.replace(choice, records=tuple(
      {"Test": {"Clean-Accuracy": c, "PGD-Accuracy": p}} for c, p in pairs))


def test_advbench_rows_sit_beside_the_table_and_same_start_runs_beside_their_seed():
  pgd = _clean_pgd_choice("PGD", [(41.4, 21.1), (10.0, 10.0), (23.8, 19.4)])
  erm = _choice("ERM", (95.0,), (0.0,))
  theirs = {"PGD": [_advbench_record("PGD", 0, 60.7, 29.1),
                    _advbench_record("PGD", 1, 72.3, 34.5)],
            "MART": [_advbench_record("MART", 0, 45.9, 18.7)]}
  mart = dataclasses.replace(pgd, algorithm="MART")
  table = paper.advbench_table([erm, pgd], theirs)
  # One advbench seed: its value alone, no spread.
  assert paper.advbench_table([mart], theirs).splitlines()[2].split(" | ")[2] == "45.9"
  clean, robust = np.array([41.4, 10.0, 23.8]), np.array([21.1, 10.0, 19.4])
  # One row per algorithm advbench ran (ERM did not): both sides' mean ± std over seeds.
  assert table.splitlines()[2:] == [
      f"| PGD | {clean.mean():.1f} ± {clean.std(ddof=1):.1f} | 66.5 ± "
      f"{np.std([60.7, 72.3], ddof=1):.1f} | {robust.mean():.1f} ± {robust.std(ddof=1):.1f} "
      f"| 31.8 ± {np.std([29.1, 34.5], ddof=1):.1f} | 2 |"]
  # From the same start: each advbench run beside dale_jax's run of its seed only; a
  # seed dale_jax did not run has no row, and a run without a test record "diverged".
  same = {"PGD": [_advbench_record("PGD", 1, 10.0, 10.0), _advbench_record("PGD", 5, 1, 1),
                  {"algorithm": "PGD", "seed": 0, "Test": None}]}
  assert paper.same_start_table([erm, pgd], same).splitlines()[2:] == [
      "| PGD | 0 | 41.4 | diverged | 21.1 | diverged |",
      "| PGD | 1 | 10.0 | 10.0 | 10.0 | 10.0 |"]


def test_the_advbench_section_gives_its_remarks_and_drops_an_empty_same_start_table(tmp_path):
  pgd = _clean_pgd_choice("PGD", [(41.4, 21.1), (10.0, 10.0)])
  own, same = tmp_path / "own.jsonl", tmp_path / "same.jsonl"
  own.write_text(json.dumps(_advbench_record("PGD", 0, 60.7, 29.1)) + "\n")
  same.write_text(json.dumps(_advbench_record("PGD", 7, 10.0, 10.0)) + "\n")
  experiment = paper.Experiment(name="d", config="quickstart", algorithms=("PGD",), seeds=2,
                                advbench=str(own), advbench_same_start=str(same),
                                advbench_remarks=("PGD: one remark.",))
  lines = paper._advbench_section(experiment, [pgd])
  table = lines.index(paper.advbench_table([pgd], paper.read_advbench(str(own))))
  # The remark follows the table as a bullet; advbench's only same-start run is of a seed
  # dale_jax did not run, so there is no same-start paragraph or table.
  assert lines[table + 1:] == ["", "- PGD: one remark.", ""]
  same.write_text(json.dumps(_advbench_record("PGD", 1, 10.0, 10.0)) + "\n")
  lines = paper._advbench_section(dataclasses.replace(experiment, advbench_remarks=()), [pgd])
  assert lines[table + 1] == "" and lines[table + 2].startswith("From the same start")
  assert lines[-2].splitlines()[2:] == ["| PGD | 1 | 10.0 | 10.0 | 10.0 | 10.0 |"]
