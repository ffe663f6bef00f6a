"""The paper's tables, regenerated end to end: train, evaluate, report.

An *experiment* (``experiments/paper/<name>.py``: a dataset config, the
algorithms, the number of seeds, the training overrides, the published numbers
to set beside) runs in three stages, each resumable:

* ``train``: the ``dale-sweep`` grid ``<output_dir>/<dataset>/<Algorithm>/h0_t<seed>``
  (default hyperparameters, trial seeds ``0 .. seeds - 1``). Finished runs are
  skipped and interrupted ones resume from their checkpoint.
* ``evaluate``: every finished run is attacked at its evaluation threat model
  with PGD-20 on the test images and AutoAttack (standard: APGD-CE, APGD-T,
  FAB-T, Square) on the first ``aa_examples`` of them; the result goes to
  ``<run>/paper_eval.json``. A run whose file holds the same settings is
  skipped; AutoAttack keeps its finished batches in ``<run>/paper_eval_progress``.
* ``report``: the last epoch of every run (``LastStep``), with the evaluation's
  accuracies added to its test record, gives a table of mean ± std over seeds;
  the page sets it beside the published numbers, draws the clean-vs-AutoAttack
  Pareto front and the primal-dual picture of one run, and says what the
  numbers show.

This module reads and launches runs; only the evaluate stage imports JAX.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from dale_jax import rundir
from dale_jax import validation
from dale_jax.research import collect
from dale_jax.research import plots
from dale_jax.research import sweep

STAGES = ("train", "evaluate", "report")

# The accuracies of the table, in its column order, with their column titles.
# Clean, FGSM and PGD-10 come from the run's own last-epoch test record (advbench's
# evaluators on every test image); PGD-20 and AutoAttack from the evaluate stage.
# PGD-20 runs twice: on every test image, and on AutoAttack's points, so that the two
# attacks are compared on the same images.
COLUMNS = (("Clean-Accuracy", "Clean"), ("FGSM-Accuracy", "FGSM"),
           ("PGD-Accuracy", "PGD-10"), ("PGD-20-Accuracy", "PGD-20"),
           ("PGD-20-AA-Accuracy", "PGD-20, AA's points"),
           ("AutoAttack-Accuracy", "AutoAttack"))
PGD20 = "PGD-20-Accuracy"
PGD20_AA = "PGD-20-AA-Accuracy"
AUTOATTACK = "AutoAttack-Accuracy"
# A run whose clean accuracy ends within this many points of chance (10 classes) did
# not learn: flagged in the table, kept out of the Pareto front and the comparisons.
CHANCE = 10.0
AT_CHANCE_MARGIN = 10.0
# Primal-dual algorithms and their fixed-multiplier counterparts: what the dual adds.
FIXED_MULTIPLIER = {"Gaussian_DALE_PD": "Gaussian_DALE", "DALE": "Laplacian_DALE"}

# The algorithms that solve the constrained problem (DALE and its advbench variants).
DALE_FAMILY = ("Gaussian_DALE_PD", "KL_DALE_PD", "DALE", "Gaussian_DALE_PD_Reverse",
               "MH_DALE_PD", "MH_DALE_PD_Reverse", "Gaussian_DALE", "Laplacian_DALE")
BASELINES = ("PGD", "TRADES", "MART")


@dataclasses.dataclass(frozen=True)
class Published:
  """A table of the paper: accuracies (%) by method and column."""

  caption: str
  columns: tuple[str, ...]
  rows: Mapping[str, tuple[float, ...]]


# From the submission version of the paper (../shared reference notes: the final version
# may differ). DALE-L: L Langevin steps.
PUBLISHED = {
    "mnist": Published(
        "The paper, MNIST (60,000 training images, four-layer CNN, batch 128), eps = 0.3",
        ("Clean", "PGD", "FGSM"),
        {"PGD": (98.1, 93.1, 95.5), "FGSM": (98.3, 0.65, 98.1), "TRADES": (98.9, 94.0, 96.5),
         "MART": (98.9, 93.5, 96.1), "DALE-1": (99.1, 83.7, 97.7),
         "DALE-100": (98.8, 97.1, 99.1)}),
    "cifar10": Published(
        "The paper, CIFAR-10 (ResNet-18, SGD with momentum, lr 0.01 x0.1 at epochs 75 and "
        "90, 100 epochs), eps = 8/255",
        ("Clean", "PGD"),
        {"PGD": (85.7, 52.4), "TRADES": (85.6, 54.0), "MART": (83.8, 55.2),
         "DALE-10": (86.4, 54.9)}),
}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One table to regenerate.

  Attributes:
    name: the experiment's name (``digits``, ``mnist``, ``cifar10``).
    config: the dataset config, ``<config_dir>/<config>.py``.
    algorithms: the table's rows, in order.
    seeds: trial seeds per algorithm.
    overrides: ``--config.<field>=<value>`` flags of every training run.
    aa_examples: AutoAttack on the first N test images (0: all).
    published: key of :data:`PUBLISHED`.
    primal_dual: the algorithm whose first seed's run the primal-dual figure shows.
    setting: one sentence on the data, schedule and model, for the page.
    caveats: what the numbers cannot show, for the page.
    advbench: a ``results.jsonl`` of advbench's own classes trained in the same
      setting (``experiments/fidelity/advbench_digits.py``), set beside the table;
      empty: none.
    advbench_same_start: the same runner's ``results.jsonl`` of advbench's classes
      started from dale_jax's initial weights and batch order of one seed
      (``--start=dale_jax``), each set beside dale_jax's run of that seed; empty: none.
    advbench_remarks: sentences under the advbench table, for the rows whose
      dale_jax default departs from advbench's class on purpose.
  """

  name: str
  config: str
  algorithms: tuple[str, ...]
  seeds: int
  overrides: tuple[str, ...] = ()
  aa_examples: int = 0
  published: str = "mnist"
  primal_dual: str = "Gaussian_DALE_PD"
  setting: str = ""
  caveats: tuple[str, ...] = ()
  advbench: str = ""
  advbench_same_start: str = ""
  advbench_remarks: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What the evaluate stage runs; a run is re-evaluated when its file holds others."""

  test_examples: int = 0   # PGD-20 on the first N test images (0: all)
  aa_examples: int = 0     # AutoAttack on the first N (0: all)
  batch_size: int = 500
  apgd_steps: int | None = None     # None: AutoAttack's standard (attacks.APGD_STEPS)
  square_queries: int | None = None  # None: AutoAttack's standard (attacks.SQUARE_QUERIES)
  seed: int = 0

  @property
  def standard(self) -> bool:
    """Whether AutoAttack runs with its standard budgets (the attacks' defaults)."""
    from dale_jax import attacks  # pylint: disable=import-outside-toplevel  # starts JAX

    return (self.apgd_steps in (None, attacks.APGD_STEPS)
            and self.square_queries in (None, attacks.SQUARE_QUERIES))


def check_experiment(experiment: Experiment, settings: EvalSettings) -> None:
  """Raises ``ValueError`` naming the first field out of range."""
  if not experiment.algorithms:
    raise validation.InvalidArgument("algorithms", rest="must name at least one algorithm")
  for name, value, minimum in (("seeds", experiment.seeds, 1),
                               ("aa_examples", settings.aa_examples, 0),
                               ("test_examples", settings.test_examples, 0),
                               ("batch_size", settings.batch_size, 1),
                               ("apgd_steps", settings.apgd_steps, 1),
                               ("square_queries", settings.square_queries, 1)):
    if value is None and name in ("apgd_steps", "square_queries"):
      continue
    validation.integer(name, value, minimum=minimum)
  validation.one_of("published", experiment.published, PUBLISHED)


def jobs(experiment: Experiment, output_dir: str, *, config_dir: str = sweep.DEFAULT_CONFIG_DIR,
         overrides: Sequence[str] = ()) -> list[sweep.Job]:
  """The training runs of ``experiment`` (default hyperparameters, one per seed)."""
  return sweep.make_jobs(algorithms=experiment.algorithms, datasets=[experiment.config],
                         n_hparams=1, n_trials=experiment.seeds, output_dir=output_dir,
                         config_dir=config_dir,
                         overrides=(*experiment.overrides, *overrides))


# ----------------------------------------------------------------------------- train


def train(job_list: Sequence[sweep.Job], *, n_workers: int = 1, device_env: str | None = None,
          out=None) -> list[sweep.Outcome]:
  """Launches the jobs that are not done; raises ``RuntimeError`` if any fails."""
  sweep.check_not_stale(job_list, os.path.commonpath([j.workdir for j in job_list]))
  todo = sweep.select_jobs(job_list)
  counts = sweep.summarize(job_list)
  _print(out, f"# train: {len(job_list)} runs, {counts[sweep.DONE]} done, "
              f"{counts[sweep.INCOMPLETE]} to resume, {counts[sweep.NOT_LAUNCHED]} to start")
  outcomes = sweep.launch(todo, n_workers=n_workers, device_env=device_env, out=out)
  failed = [o.job.workdir for o in outcomes if not o.ok]
  if failed:
    raise RuntimeError(f"{len(failed)} training run(s) failed; their sweep.log says why: "
                       + ", ".join(failed))
  return outcomes


# ----------------------------------------------------------------------------- evaluate


def read_eval(workdir: str) -> dict | None:
  """The run's ``paper_eval.json``, or ``None``."""
  path = rundir.path(workdir, rundir.PAPER_EVAL)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def machine() -> dict:
  """The machine the evaluation runs on: CPU model, cores, accelerator, versions."""
  import jax  # pylint: disable=import-outside-toplevel
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  device = jax.devices()[0]
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": device.platform,
          "device": device.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__, "python": platform.python_version()}


def evaluate_run(workdir: str, settings: EvalSettings, *, log: Callable[[str], None] | None = None
                 ) -> dict:
  """PGD-20 and AutoAttack (standard) on one finished run; writes and returns its record.

  A run whose ``paper_eval.json`` already holds ``settings`` is not evaluated again.
  """
  existing = read_eval(workdir)
  wanted = dataclasses.asdict(settings)
  if existing is not None and existing.get("settings") == wanted and "pgd20_aa" in existing:
    return existing
  from dale_jax import attacks  # pylint: disable=import-outside-toplevel
  from dale_jax import checkpoint  # pylint: disable=import-outside-toplevel

  start = time.time()
  config, logits_fn, dataset = checkpoint.load_trained(workdir)
  x, y = dataset.test
  if settings.test_examples:
    x, y = x[:settings.test_examples], y[:settings.test_examples]
  n_aa = min(settings.aa_examples or len(y), len(y))
  norm, eps = str(config.eval.norm), float(config.eval.eps)
  common = dict(norm=norm, eps=eps, batch_size=settings.batch_size, seed=settings.seed)
  pgd = attacks.evaluate_robustness(logits_fn, x, y, attacks=("clean", "pgd20"), **common)
  pgd_aa = attacks.evaluate_robustness(logits_fn, x[:n_aa], y[:n_aa], attacks=("clean", "pgd20"),
                                       **common)
  chain = attacks.evaluate_robustness(
      logits_fn, x[:n_aa], y[:n_aa], attacks=("clean",), version="standard",
      settings=attacks.budget_settings(attacks.AUTOATTACK_STANDARD,
                                       apgd_steps=settings.apgd_steps,
                                       square_queries=settings.square_queries),
      progress_dir=rundir.path(workdir, rundir.PAPER_EVAL_PROGRESS), log=log, **common)
  record = {
      "settings": wanted, "norm": norm, "eps": eps,
      "pgd20": {"n_examples": pgd["n_examples"], "clean_accuracy": pgd["clean_accuracy"],
                "accuracy": pgd["per_attack"]["pgd20"]},
      "pgd20_aa": {"n_examples": pgd_aa["n_examples"],
                   "clean_accuracy": pgd_aa["clean_accuracy"],
                   "accuracy": pgd_aa["per_attack"]["pgd20"]},
      "autoattack": {"n_examples": chain["n_examples"],
                     "clean_accuracy": chain["clean_accuracy"],
                     "per_attack": chain["per_attack"],
                     "accuracy": chain["robust_accuracy"],
                     "warnings": chain["warnings"]},
      "seconds": time.time() - start,
      "machine": machine(),
      "date": datetime.date.today().isoformat(),
  }
  rundir.write_json(rundir.path(workdir, rundir.PAPER_EVAL), record, indent=2)
  shutil.rmtree(rundir.path(workdir, rundir.PAPER_EVAL_PROGRESS), ignore_errors=True)
  return record


def evaluate(job_list: Sequence[sweep.Job], settings: EvalSettings, *, out=None) -> list[dict]:
  """:func:`evaluate_run` on every job; raises ``RuntimeError`` if a run is not done."""
  missing = [j.workdir for j in job_list if not rundir.is_done(j.workdir)]
  if missing:
    raise RuntimeError(f"{len(missing)} run(s) are not trained yet (run the train stage): "
                       + ", ".join(missing))
  records = []
  for i, job in enumerate(job_list, 1):
    before = read_eval(job.workdir)
    record = evaluate_run(job.workdir, settings,
                          log=lambda line, name=job.name: _print(out, f"  {name}: {line}"))
    again = before is not None and before == record
    _print(out, f"# evaluate [{i}/{len(job_list)}] {job.name}: "
                f"{'kept' if again else 'done'}: PGD-20 {record['pgd20']['accuracy']:.1f}, "
                f"AutoAttack {record['autoattack']['accuracy']:.1f} "
                f"({record['seconds']:.0f} s)")
    records.append(record)
  return records


# ----------------------------------------------------------------------------- report


def with_evaluation(choice: collect.Choice) -> collect.Choice:
  """``choice`` with PGD-20 and AutoAttack accuracy added to each selected test record."""
  records = []
  for run, record in zip(choice.runs, choice.records):
    evaluation = read_eval(run.workdir)
    if evaluation is None:
      raise RuntimeError(f"run {run.workdir} has no {rundir.PAPER_EVAL}: run the evaluate stage")
    test = dict(record.get("Test") or {})
    test[PGD20] = evaluation["pgd20"]["accuracy"]
    test[PGD20_AA] = evaluation["pgd20_aa"]["accuracy"]
    test[AUTOATTACK] = evaluation["autoattack"]["accuracy"]
    records.append({**record, "Test": test})
  return dataclasses.replace(choice, records=tuple(records))


def load_choices(experiment: Experiment, output_dir: str) -> list[collect.Choice]:
  """The experiment's runs after ``LastStep`` selection, with their evaluation, in row order."""
  runs = [r for r in collect.load_runs(output_dir) if r.algorithm in experiment.algorithms]
  if not runs:
    raise RuntimeError(f"no finished runs under {output_dir}: run the train stage")
  choices = {c.algorithm: with_evaluation(c) for c in collect.choose(runs, "LastStep")}
  return [choices[a] for a in experiment.algorithms if a in choices]


def _mean_std(choice: collect.Choice, metric: str) -> tuple[float, float]:
  values = [collect.metric_value(r, "Test", metric) for r in choice.records]
  values = [v for v in values if not math.isnan(v)]
  return collect.mean_std(values) if values else (math.nan, math.nan)


def _cell(mean: float, std: float) -> str:
  return "-" if math.isnan(mean) else f"{mean:.1f} ± {std:.1f}"


def at_chance(record: Mapping) -> bool:
  """Whether a run's selected record is within :data:`AT_CHANCE_MARGIN` of chance."""
  clean = collect.metric_value(record, "Test", "Clean-Accuracy")
  return not math.isnan(clean) and clean < CHANCE + AT_CHANCE_MARGIN


def n_at_chance(choice: collect.Choice) -> int:
  return sum(at_chance(r) for r in choice.records)


def _name(choice: collect.Choice) -> str:
  """The row's name; ``† k/n`` when k of its n runs ended at chance."""
  k = n_at_chance(choice)
  return f"{choice.algorithm} † {k}/{len(choice.records)}" if k else choice.algorithm


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table: the first column left-aligned, the others right-aligned."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def results_table(choices: Sequence[collect.Choice]) -> str:
  """The Markdown table: one row per algorithm, mean ± std over its seeds."""
  rows = [[_name(c), *(_cell(*_mean_std(c, metric)) for metric, _ in COLUMNS), str(len(c.runs)),
           f"{np.mean([_train_seconds(r) for r in c.runs]) / 60:.1f}"] for c in choices]
  return _markdown(["Algorithm", *(title for _, title in COLUMNS), "seeds", "train (min/run)"],
                   rows)


def read_advbench(path: str) -> dict[str, list[dict]]:
  """``{algorithm: [run, ...]}`` from the fidelity runner's ``results.jsonl``."""
  runs: dict[str, list[dict]] = {}
  for record in rundir.read_records(path):
    runs.setdefault(record["algorithm"], []).append(record)
  return runs


_ADVBENCH_METRICS = ("Clean-Accuracy", "PGD-Accuracy")


def _advbench_cell(values: Sequence[float]) -> str:
  """advbench's runs of one cell: mean ± std; one seed alone (no spread); none "diverged"."""
  if len(values) > 1:
    return _cell(*collect.mean_std(values))
  return f"{values[0]:.1f}" if values else "diverged"


def advbench_rows(choices: Sequence[collect.Choice], advbench: Mapping[str, list[dict]]
                  ) -> list[list[str]]:
  """One row per algorithm advbench ran: dale_jax's and advbench's clean and PGD-10."""
  rows = []
  for c in choices:
    runs = advbench.get(c.algorithm)
    if not runs:
      continue
    cells = []
    for metric in _ADVBENCH_METRICS:
      cells += [_cell(*_mean_std(c, metric)),
                _advbench_cell([r["Test"][metric] for r in runs if r.get("Test")])]
    rows.append([c.algorithm, *cells, str(len(runs))])
  return rows


_PAIR_HEADER = ("dale_jax Clean", "advbench Clean", "dale_jax PGD-10", "advbench PGD-10")
_ADVBENCH_HEADER = ("Algorithm", *_PAIR_HEADER, "advbench seeds")
_SAME_START_HEADER = ("Algorithm", "seed", *_PAIR_HEADER)


def advbench_table(choices: Sequence[collect.Choice], advbench: Mapping[str, list[dict]]) -> str:
  """The table's rows beside advbench's own classes in the same setting (clean, PGD-10)."""
  return _markdown(_ADVBENCH_HEADER, advbench_rows(choices, advbench))


def same_start_rows(choices: Sequence[collect.Choice], advbench: Mapping[str, list[dict]]
                    ) -> list[list[str]]:
  """advbench's runs from dale_jax's start, each beside dale_jax's run of that seed."""
  rows = []
  for c in choices:
    ours = {run.trial_seed: record for run, record in zip(c.runs, c.records)}
    for theirs in sorted(advbench.get(c.algorithm, ()), key=lambda r: r["seed"]):
      if theirs["seed"] not in ours:
        continue
      cells = []
      for metric in _ADVBENCH_METRICS:
        cells += [f"{collect.metric_value(ours[theirs['seed']], 'Test', metric):.1f}",
                  _advbench_cell([theirs["Test"][metric]] if theirs.get("Test") else [])]
      rows.append([c.algorithm, str(theirs["seed"]), *cells])
  return rows


def same_start_table(choices: Sequence[collect.Choice],
                     advbench: Mapping[str, list[dict]]) -> str:
  """:func:`same_start_rows` as a Markdown table."""
  return _markdown(_SAME_START_HEADER, same_start_rows(choices, advbench))


def published_table(published: Published) -> str:
  """The paper's table in Markdown."""
  return _markdown(["Method", *published.columns],
                   [[method, *(f"{v:g}" for v in values)]
                    for method, values in published.rows.items()])


def _train_seconds(run: collect.Run) -> float:
  return float(run.records[-1].get("Total-Time", math.nan))


def _learned_runs(choice: collect.Choice) -> collect.Choice:
  """``choice`` without its runs at chance."""
  keep = [i for i, r in enumerate(choice.records) if not at_chance(r)]
  return dataclasses.replace(choice, runs=tuple(choice.runs[i] for i in keep),
                             records=tuple(choice.records[i] for i in keep))


def _by_seed(choice: collect.Choice, metric: str) -> dict[int, float]:
  return {run.trial_seed: collect.metric_value(record, "Test", metric)
          for run, record in zip(choice.runs, choice.records) if not at_chance(record)}


def paired(a: collect.Choice, b: collect.Choice, metric: str) -> tuple[float, float, int, int]:
  """``a - b`` over the seeds both ran (neither at chance): mean, sample std, how many
  seeds ``a`` is higher on, and how many seeds."""
  x, y = _by_seed(a, metric), _by_seed(b, metric)
  diffs = [x[s] - y[s] for s in sorted(x.keys() & y.keys())
           if not (math.isnan(x[s]) or math.isnan(y[s]))]
  if not diffs:
    return math.nan, math.nan, 0, 0
  mean, std = collect.mean_std(diffs)
  return mean, std, sum(d > 0 for d in diffs), len(diffs)


def _paired_sentence(a: collect.Choice, b: collect.Choice) -> str | None:
  clean, robust = paired(a, b, "Clean-Accuracy"), paired(a, b, AUTOATTACK)
  if not robust[3]:
    return None
  return (f"{a.algorithm} − {b.algorithm}, paired over {robust[3]} seeds: clean "
          f"{clean[0]:+.1f} ± {clean[1]:.1f}, AutoAttack {robust[0]:+.1f} ± {robust[1]:.1f} "
          f"points; AutoAttack higher in {robust[2]} of {robust[3]} seeds.")


def findings(choices: Sequence[collect.Choice], *, primal_dual: str | None = None) -> list[str]:
  """Sentences on what the table does not show at a glance, computed from the runs:
  the Pareto front, paired differences over seeds (the same seed's data order and
  initialisation on both sides), what the dual variable adds, and where AutoAttack
  finds more than PGD-20 on the same points."""
  by_name = {c.algorithm: c for c in choices}
  learned = [c for c in choices if n_at_chance(c) < len(c.records)]
  points = {}
  for c in learned:
    kept = _learned_runs(c)
    points[c.algorithm] = (_mean_std(kept, "Clean-Accuracy")[0], _mean_std(kept, AUTOATTACK)[0])
  names = list(points)
  xy = np.array([points[n] for n in names]) if names else np.zeros((0, 2))
  front = [names[i] for i in plots.pareto_front(xy)] if names else []
  lines = [f"On the Pareto front of clean against AutoAttack accuracy (no other method is "
           f"higher in both; runs at chance left out): {', '.join(front)}."]
  flagged = [f"{c.algorithm} ({n_at_chance(c)} of {len(c.records)} seeds)" for c in choices
             if n_at_chance(c)]
  if flagged:
    lines.append("Ended at chance (clean accuracy below "
                 f"{CHANCE + AT_CHANCE_MARGIN:g} %, marked †; left out of the front and the "
                 f"comparisons): {', '.join(flagged)}.")
  for dale in (n for n in names if n in DALE_FAMILY):
    for base in (n for n in names if n in BASELINES):
      sentence = _paired_sentence(by_name[dale], by_name[base])
      if sentence:
        lines.append(sentence)
  for pd, fixed in FIXED_MULTIPLIER.items():
    if pd in points and fixed in points:
      sentence = _paired_sentence(by_name[pd], by_name[fixed])
      if sentence:
        lines.append("What the dual variable adds over a fixed multiplier (nu = 0.1): "
                     + sentence)
  gaps = []
  for c in learned:
    kept = _learned_runs(c)
    pgd, aa = _mean_std(kept, PGD20_AA)[0], _mean_std(kept, AUTOATTACK)[0]
    if not (math.isnan(pgd) or math.isnan(aa)):
      gaps.append((pgd - aa, c.algorithm))
  if gaps:
    gaps.sort(reverse=True)
    lines.append("AutoAttack below PGD-20 on the same points (what PGD misses; large gaps "
                 "suggest gradient masking): "
                 + ", ".join(f"{name} {gap:.1f}" for gap, name in gaps) + " points.")
  if primal_dual in by_name:
    c = by_name[primal_dual]
    first = [(run, record) for run, record in zip(c.runs, c.records) if run.trial_seed == 0]
    if first:
      test = first[0][1].get("Test") or {}
      lines.append(f"{primal_dual}'s seed 0 is the README's main job (the same command): "
                   f"clean {test.get('Clean-Accuracy', math.nan):.1f}, PGD-10 "
                   f"{test.get('PGD-Accuracy', math.nan):.1f}, FGSM "
                   f"{test.get('FGSM-Accuracy', math.nan):.1f}; the row is the mean over "
                   "seeds.")
  return lines


def figures(choices: Sequence[collect.Choice], experiment: Experiment, folder: str
            ) -> dict[str, str]:
  """Draws the Pareto plot and one run's primal-dual picture; returns {name: path}."""
  evaluation = read_eval(choices[0].runs[0].workdir)
  norm, eps = evaluation["norm"], evaluation["eps"]
  n_clean, n_aa = evaluation["pgd20"]["n_examples"], evaluation["autoattack"]["n_examples"]
  threat = f"{_NORM_NAMES.get(norm, norm)} ε = {eps:g}"
  paths = {"pareto": plots.save(
      plots.pareto(choices, robust=AUTOATTACK,
                   title=f"{experiment.name}: mean ± std over seeds",
                   clean_label=f"Clean accuracy (%, {n_clean} test images)",
                   robust_label=f"AutoAttack accuracy (%, {threat}, first {n_aa} images)"),
      os.path.join(folder, "pareto.png"))}
  dual = [c for c in choices if c.algorithm == experiment.primal_dual and plots.has_dual(c)]
  if dual:
    one_run = dataclasses.replace(dual[0], runs=dual[0].runs[:1], records=dual[0].records[:1])
    paths["primal_dual"] = plots.save(
        plots.primal_dual(one_run, title=f"{experiment.name}: {experiment.primal_dual}, seed "
                                         f"{one_run.runs[0].trial_seed}", threat=threat),
        os.path.join(folder, "primal_dual.png"))
  return paths


_NORM_NAMES = {"linf": "L∞", "l2": "L2", "l1": "L1"}


def _duration(seconds: float) -> str:
  minutes = int(round(seconds / 60))
  return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def page(experiment: Experiment, choices: Sequence[collect.Choice], settings: EvalSettings, *,
         command: str, figure_paths: Mapping[str, str], doc_dir: str) -> str:
  """The Markdown results page."""
  evaluations = [read_eval(r.workdir) for c in choices for r in c.runs]
  host = evaluations[0]["machine"]
  n_pgd = evaluations[0]["pgd20"]["n_examples"]
  n_aa = evaluations[0]["autoattack"]["n_examples"]
  norm, eps = evaluations[0]["norm"], evaluations[0]["eps"]
  train_s = sum(_train_seconds(r) for c in choices for r in c.runs)
  eval_s = sum(e["seconds"] for e in evaluations)
  dates = sorted({e["date"] for e in evaluations})
  published = PUBLISHED[experiment.published]
  budget = ("standard" if settings.standard else
            f"reduced: {settings.apgd_steps} APGD steps, {settings.square_queries} Square queries")
  warnings = sorted({f"{c.algorithm}: {w}" for c in choices for r in c.runs
                     for w in read_eval(r.workdir)["autoattack"]["warnings"]})
  se = 100 * math.sqrt(0.25 / max(n_aa, 1))

  lines = [
      f"# Results: {experiment.name}",
      "",
      "Regenerate this page (training, evaluation, table and figures; rerunning continues "
      "where it stopped):",
      "",
      "```bash",
      command,
      "```",
      "",
      experiment.setting,
      "",
      f"Each cell is the mean ± sample std over {experiment.seeds} seeds of the last "
      f"epoch's model (default hyperparameters, no selection on test data), {norm} "
      f"eps = {eps:g}, in %. Clean, FGSM and PGD-10 are advbench's evaluators on the "
      f"{n_pgd} test images (the run's own last-epoch record); PGD-20 on the same images "
      f"and again on AutoAttack's points; AutoAttack ({budget}: APGD-CE, APGD-T, FAB-T, "
      f"Square, each on the points the previous ones left) on the first {n_aa}, so the last "
      "two columns compare the attacks on the same images. Training time is the run's own "
      "wall clock, which counts any time it shared the cores with other jobs. † k/n: k of "
      "the n runs ended at chance (clean accuracy below "
      f"{CHANCE + AT_CHANCE_MARGIN:g} %): they did not learn, and their numbers are in the "
      "row's mean.",
      "",
      results_table(choices),
      "",
      f"For comparison only: {published.caption}. A different setting (see below): the "
      "numbers are not comparable.",
      "",
      published_table(published),
      "",
      *_advbench_section(experiment, choices),
      "## What the numbers show",
      "",
      *(f"- {line}" for line in findings(choices, primal_dual=experiment.primal_dual)),
      "",
      "## What they cannot show",
      "",
      *(f"- {line}" for line in experiment.caveats),
      f"- AutoAttack runs on {n_aa} images: one model's accuracy there has a standard "
      f"error of up to {se:.1f} points (at 50 %); the seeds' spread is in the table.",
      "",
  ]
  if figure_paths:
    lines += ["## Figures", ""]
    if "pareto" in figure_paths:
      lines += ["Clean against AutoAttack accuracy (mean ± std over seeds) and the Pareto "
                "front:", "", f"![Pareto]({os.path.relpath(figure_paths['pareto'], doc_dir)})",
                ""]
    if "primal_dual" in figure_paths:
      lines += [f"One {experiment.primal_dual} run (seed 0): test accuracy over training, "
                "the nominal and robust training losses with the margin rho, and the dual "
                "variable nu:", "",
                f"![Primal-dual]({os.path.relpath(figure_paths['primal_dual'], doc_dir)})", ""]
  lines += [
      "## Machine and time",
      "",
      f"- {host['cpu']}, {host['cores']} cores; {host['platform']} "
      f"({host['device']}, {host['device_count']} device(s)); JAX {host['jax']}, "
      f"Python {host['python']}; evaluated on {', '.join(dates)}.",
      f"- Training: {_duration(train_s)} in all ({len(evaluations)} runs, each on its own "
      f"clock from its start, without the process's start-up); evaluation: "
      f"{_duration(eval_s)}; together {_duration(train_s + eval_s)}.",
  ]
  if warnings:
    lines += ["- AutoAttack's sanity checks warned:", *(f"  - {w}" for w in warnings)]
  else:
    lines.append("- AutoAttack's sanity checks (gradient masking) raised no warning.")
  return "\n".join(lines) + "\n"


def _advbench_section(experiment: Experiment, choices: Sequence[collect.Choice]) -> list[str]:
  """advbench's own classes in the same setting, when the experiment names their runs."""
  if not experiment.advbench:
    return []
  runs = read_advbench(experiment.advbench)
  if not any(c.algorithm in runs for c in choices):
    return []
  remarks = [f"- {remark}" for remark in experiment.advbench_remarks]
  return ["## advbench's own code in this setting", "",
          "The same rows trained by advbench's classes (the authors' PyTorch code, "
          "arobey1/advbench, run from a local checkout with the same digits, schedule, "
          "batch and epochs) and measured by the same dale_jax evaluators, mean ± std over "
          "its seeds; `docs/fidelity.md` has every algorithm and the commands. A weakness "
          "that both columns share belongs to the method and the budget, not to the port.",
          "", advbench_table(choices, runs), "", *remarks, *([""] if remarks else []),
          *_same_start_section(experiment, choices)]


def _same_start_section(experiment: Experiment, choices: Sequence[collect.Choice]
                        ) -> list[str]:
  if not experiment.advbench_same_start:
    return []
  rows = same_start_rows(choices, read_advbench(experiment.advbench_same_start))
  if not rows:
    return []
  return ["From the same start: advbench's class trained from dale_jax's initial weights "
          "and batch order of one seed (`--start=dale_jax`; only the random draws of dropout "
          "and of an attack's start differ), beside dale_jax's run of that seed. What the "
          "two columns share here is the start's; a gap left is the code's or those "
          "draws'. A run that ended near chance (test loss near ln 10) reads the argmax of "
          "near-uniform outputs, whose clean accuracy moves by tens of points at an "
          "unchanged loss; `docs/fidelity.md` sets the two training curves side by side.",
          "", _markdown(_SAME_START_HEADER, rows), ""]


def report(experiment: Experiment, output_dir: str, settings: EvalSettings, *, doc: str,
           command: str, out=None) -> str:
  """Writes the page to ``doc`` (figures beside it) and the table's rows as CSV; returns it."""
  choices = load_choices(experiment, output_dir)
  doc_dir = os.path.dirname(os.path.abspath(doc))
  folder = os.path.join(doc_dir, "results", experiment.name)
  figure_paths = {k: os.path.abspath(v) for k, v in figures(choices, experiment, folder).items()}
  text = page(experiment, choices, settings, command=command, figure_paths=figure_paths,
              doc_dir=doc_dir)
  os.makedirs(doc_dir, exist_ok=True)
  with open(doc + ".tmp", "w") as f:
    f.write(text)
  os.replace(doc + ".tmp", doc)
  collect.write_csv(collect.summarize(choices, splits=("Test",)),
                    os.path.join(output_dir, "results.csv"))
  _print(out, f"# report: wrote {doc} and {len(figure_paths)} figure(s) in {folder}")
  return text


def _print(out, line: str) -> None:
  print(line, file=out, flush=True)
