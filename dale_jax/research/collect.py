"""Reads a sweep's runs, applies model selection, and formats result tables.

A *run* is a working directory of ``dale-train`` holding ``config.json`` and
``results.jsonl`` (one JSON object per epoch with advbench's keys: ``Epoch``,
``Train``, ``Validation``, ``Test``, ...). Runs are grouped by
``(dataset, algorithm)``; inside a group they differ by ``hparams_seed`` and
trial ``seed``, and runs averaged together must differ in nothing else
(:func:`check_alike`).

Model selection picks one record (epoch) per run:

* ``LastStep``: the last epoch.
* ``EarlyStop``: the epoch with the best validation metric (highest accuracy,
  or lowest loss for a ``*-Loss`` metric); ties go to the earliest epoch.

Hyperparameter selection (as DomainBed and advbench): for each group, the
``hparams_seed`` whose selected records have the best *mean* validation
metric over trials is kept; ties go to the smallest seed (0 = defaults). The
reported numbers are then mean and sample standard deviation (``ddof=1``;
0 for a single trial) over that seed's trials.

The selection metric defaults to ``PGD-Accuracy`` and falls back to
``Clean-Accuracy`` for a dataset whose validation records have no PGD
evaluation. A dataset without any validation records (a config with
``data.validation_size = 0``, such as ``quickstart``) supports only
``LastStep``, and its hyperparameter seed is then the smallest one present
(0 = the defaults): choosing by test numbers would overstate them.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from dale_jax import rundir
from dale_jax import validation

SELECTION_METHODS = ("LastStep", "EarlyStop")
DEFAULT_METRIC = "PGD-Accuracy"
FALLBACK_METRIC = "Clean-Accuracy"
SPLITS = ("Train", "Validation", "Test")


CSV_FIELDS = ("dataset", "algorithm", "selection", "selection_metric", "hparams_seed",
              "split", "metric", "mean", "std", "n")

# Column order of the tables: the paper's, then anything else alphabetically.
_METRIC_ORDER = ("Clean-Accuracy", "PGD-Accuracy", "FGSM-Accuracy", "Augmented-Accuracy")
_QUANTILE = re.compile(r"^Augmented-([0-9.eE+-]+)-Quantile-Accuracy$")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: where it lives, what it trained, and its per-epoch records."""

  workdir: str
  dataset: str
  algorithm: str
  hparams_seed: int
  trial_seed: int
  config: Mapping
  records: tuple[Mapping, ...]
  done: bool


@dataclasses.dataclass(frozen=True)
class Choice:
  """The outcome of model + hyperparameter selection for one (dataset, algorithm).

  Attributes:
    dataset: the group's dataset.
    algorithm: the group's algorithm.
    selection: ``LastStep`` or ``EarlyStop``.
    metric: validation metric used for selection; ``None`` when the runs have
      no validation records.
    hparams_seed: the selected hyperparameter seed.
    runs: that seed's runs (one per trial seed, sorted by trial seed).
    records: the selected record of each run, same order.
    score: mean validation ``metric`` of ``records`` (NaN when absent).
  """

  dataset: str
  algorithm: str
  selection: str
  metric: str | None
  hparams_seed: int
  runs: tuple[Run, ...]
  records: tuple[Mapping, ...]
  score: float


@dataclasses.dataclass(frozen=True)
class Row:
  """Mean, std and count of one metric over the selected records of a :class:`Choice`.

  ``selection_metric`` is ``""`` when the runs had no validation records.
  """

  dataset: str
  algorithm: str
  selection: str
  selection_metric: str
  hparams_seed: int
  split: str
  metric: str
  mean: float
  std: float
  n: int


# ----------------------------------------------------------------------------- loading


def _by_epoch(records: Sequence[Mapping]) -> list[Mapping]:
  """Sorts by ``Epoch``, keeping the last record of an epoch written twice.

  A run resumed from a checkpoint older than its last record repeats epochs;
  the repeat is the one that matches the final model.
  """
  if not all(isinstance(r.get("Epoch"), int) for r in records):
    return list(records)
  latest = {r["Epoch"]: r for r in records}
  return [latest[e] for e in sorted(latest)]


def _int_or(value, default):
  try:
    return int(value)
  except (TypeError, ValueError):
    return default


def _identity(workdir: str, config: Mapping, records: Sequence[Mapping]) -> tuple:
  """(dataset, algorithm, hparams_seed, trial_seed): config.json first, then the path."""
  args = (records[0].get("args") or {}) if records else {}
  parts = os.path.normpath(workdir).split(os.sep)
  leaf = parts[-1]
  path_h, path_t = None, None
  if leaf.startswith("h") and "_t" in leaf:
    path_h, path_t = (_int_or(p, None) for p in leaf[1:].split("_t", 1))
  dataset = config.get("dataset") or args.get("dataset") or (
      parts[-3] if len(parts) >= 3 else None)
  algorithm = config.get("algorithm") or args.get("algorithm") or (
      parts[-2] if len(parts) >= 2 else None)
  hparams_seed = _int_or(config.get("hparams_seed", args.get("hparams_seed", path_h)), 0)
  trial_seed = _int_or(config.get("seed", args.get("trial_seed", path_t)), 0)
  return dataset, algorithm, hparams_seed, trial_seed


def load_runs(input_dir: str, *, include_incomplete: bool = False) -> list[Run]:
  """Finds every run under ``input_dir`` (any depth, ``input_dir`` itself included).

  Args:
    input_dir: a sweep's output directory, or one run's workdir.
    include_incomplete: also read runs without a ``done`` file.

  Returns:
    The runs with at least one record, sorted by (dataset, algorithm,
    hparams seed, trial seed). Dataset, algorithm and seeds are read from
    ``config.json`` (so the quickstart config's runs say ``mnist_digits``, the
    data they trained on), else from the records' ``args``, else from the path
    ``<dataset>/<Algorithm>/h<H>_t<T>``.
  """
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"input_dir {input_dir!r} is not a directory")
  runs = []
  for root, dirs, files in os.walk(input_dir):
    dirs.sort()
    if rundir.RESULTS not in files:
      continue
    done = rundir.DONE in files
    if not (done or include_incomplete):
      continue
    records = _by_epoch(rundir.read_records(rundir.path(root, rundir.RESULTS)))
    if not records:
      continue
    config = {}
    if rundir.CONFIG in files:
      config = rundir.read_config(root)
    dataset, algorithm, hparams_seed, trial_seed = _identity(root, config, records)
    runs.append(Run(root, str(dataset), str(algorithm), hparams_seed, trial_seed, config,
                    tuple(records), done))
  runs.sort(key=lambda r: (r.dataset, r.algorithm, r.hparams_seed, r.trial_seed, r.workdir))
  return runs


def count_incomplete(input_dir: str) -> int:
  """Number of run directories under ``input_dir`` with records but no ``done`` file."""
  return sum(1 for _, _, files in os.walk(input_dir)
             if rundir.RESULTS in files and rundir.DONE not in files)


# ----------------------------------------------------------------------------- selection


def higher_is_better(metric: str) -> bool:
  """Accuracies are maximised, losses (``*-Loss``, ``* loss``) minimised."""
  return "loss" not in metric.lower()


def metric_value(record: Mapping, split: str, metric: str) -> float:
  """``record[split][metric]`` as a float; NaN when absent or not a number."""
  value = (record.get(split) or {}).get(metric)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return math.nan
  return float(value)


def select_record(records: Sequence[Mapping], selection: str, metric: str) -> Mapping:
  """Picks the record of one run that ``selection`` keeps.

  Args:
    records: the run's per-epoch records, in epoch order.
    selection: ``LastStep`` (the last record) or ``EarlyStop`` (best
      ``Validation[metric]``, earliest on ties).
    metric: validation metric for ``EarlyStop``.

  Raises:
    ValueError: unknown ``selection``, no records, or (``EarlyStop``) no record
      with ``Validation[metric]``.
  """
  validation.one_of("selection", selection, SELECTION_METHODS)
  if not records:
    raise validation.InvalidArgument(
        "records", rest="is empty: a run without records cannot be selected from")
  if selection == "LastStep":
    return records[-1]
  values = np.array([metric_value(r, "Validation", metric) for r in records])
  if np.all(np.isnan(values)):
    raise validation.InvalidArgument(
        "selection", rest=f"EarlyStop needs Validation[{metric!r}] in the records")
  sign = 1.0 if higher_is_better(metric) else -1.0
  scores = np.where(np.isnan(values), -np.inf, sign * values)
  return records[int(np.argmax(scores))]  # argmax keeps the first maximum


def _validation_metrics(runs: Iterable[Run]) -> set[str]:
  return {k for run in runs for r in run.records for k in (r.get("Validation") or {})}


class NoValidationError(ValueError):
  """``EarlyStop`` was asked for runs without validation records."""


def resolve_metric(runs: Sequence[Run], metric: str | None = None) -> str | None:
  """The validation metric used for ``runs`` (those of one dataset).

  ``None`` asks for ``PGD-Accuracy``, falling back to ``Clean-Accuracy`` when
  no validation record has it. An explicit metric must be present.

  Returns:
    The metric, or ``None`` when no run has validation records at all.

  Raises:
    ValueError: naming the metric and the available ones, when missing.
  """
  available = _validation_metrics(runs)
  if not available:
    return None
  if metric is None:
    if DEFAULT_METRIC in available or FALLBACK_METRIC not in available:
      metric = DEFAULT_METRIC
    else:
      metric = FALLBACK_METRIC
  if metric not in available:
    raise validation.InvalidArgument(
        "selection metric", rest=f"{metric!r} is in no Validation record; "
        f"available: {sorted(available)}")
  return metric


def choose(runs: Sequence[Run], selection: str, metric: str | None = None) -> list[Choice]:
  """Model and hyperparameter selection for every (dataset, algorithm) in ``runs``.

  Args:
    runs: runs of any number of datasets and algorithms.
    selection: ``LastStep`` or ``EarlyStop``.
    metric: validation metric; ``None`` = ``PGD-Accuracy`` with fallback to
      ``Clean-Accuracy``, resolved per dataset.

  Returns:
    One :class:`Choice` per (dataset, algorithm), sorted by dataset then algorithm.

  Raises:
    NoValidationError: ``EarlyStop`` for a dataset without validation records.
    ValueError: an explicit ``metric`` that the validation records lack.
  """
  by_dataset: dict[str, list[Run]] = {}
  for run in runs:
    by_dataset.setdefault(run.dataset, []).append(run)
  choices = []
  for dataset in sorted(by_dataset):
    dataset_runs = by_dataset[dataset]
    used_metric = resolve_metric(dataset_runs, metric)
    if used_metric is None and selection == "EarlyStop":
      raise NoValidationError(
          f"EarlyStop needs validation records, and the {dataset} runs have none "
          "(config data.validation_size = 0 or eval.splits without 'Validation')")
    sign = 1.0 if used_metric is None or higher_is_better(used_metric) else -1.0
    groups: dict[str, dict[int, list[Run]]] = {}
    for run in dataset_runs:
      groups.setdefault(run.algorithm, {}).setdefault(run.hparams_seed, []).append(run)
    for algorithm in sorted(groups):
      best = None
      for hparams_seed in sorted(groups[algorithm]):
        seed_runs = sorted(groups[algorithm][hparams_seed], key=lambda r: r.trial_seed)
        check_alike(seed_runs)
        records = [select_record(r.records, selection, used_metric) for r in seed_runs]
        values = [metric_value(r, "Validation", used_metric) for r in records
                  ] if used_metric else []
        values = [v for v in values if not math.isnan(v)]
        score = float(np.mean(values)) if values else math.nan
        rank = sign * score if values else -math.inf
        if best is None or rank > best[0]:
          best = (rank, hparams_seed, seed_runs, records, score)
      _, hparams_seed, seed_runs, records, score = best
      choices.append(Choice(dataset, algorithm, selection, used_metric, hparams_seed,
                            tuple(seed_runs), tuple(records), score))
  return choices


def check_alike(runs: Sequence[Run]) -> None:
  """Refuses to average runs whose configs differ in anything but the trial ``seed``
  (and bookkeeping: :data:`dale_jax.rundir.BOOKKEEPING`).

  Raises:
    validation.BadInput: naming two unlike runs and the fields that differ.
  """
  with_config = [r for r in runs if r.config]
  for run in with_config[1:]:
    changes = rundir.config_differences(with_config[0].config, run.config,
                                        ignore=rundir.BOOKKEEPING + ("seed",))
    if changes:
      raise validation.BadInput(
          f"runs {with_config[0].workdir} and {run.workdir} ({run.algorithm}, hparams seed "
          f"{run.hparams_seed}) differ in {rundir.describe_changes(changes)}: they are not "
          "trials of one experiment; collect them from separate directories")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value)."""
  values = np.asarray(values, dtype=np.float64)
  std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return float(np.mean(values)), std


def summarize(choices: Iterable[Choice], splits: Sequence[str] = SPLITS) -> list[Row]:
  """One :class:`Row` per choice, split and numeric metric found in its selected records."""
  rows = []
  for c in choices:
    for split in splits:
      metrics = sorted({k for r in c.records for k in (r.get(split) or {})})
      for metric in metrics:
        values = [metric_value(r, split, metric) for r in c.records]
        values = [v for v in values if not math.isnan(v)]
        if not values:
          continue
        mean, std = mean_std(values)
        rows.append(Row(c.dataset, c.algorithm, c.selection, c.metric or "", c.hparams_seed,
                        split, metric, mean, std, len(values)))
  return rows


# ----------------------------------------------------------------------------- output


def write_csv(rows: Iterable[Row], path: str) -> None:
  """Writes ``rows`` with the columns :data:`CSV_FIELDS` (full float precision)."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_FIELDS)
    for row in rows:
      writer.writerow([getattr(row, name) for name in CSV_FIELDS])


def read_csv(path: str) -> list[Row]:
  """Reads a file written by :func:`write_csv`."""
  with open(path, newline="") as f:
    return [Row(d["dataset"], d["algorithm"], d["selection"], d["selection_metric"],
                int(d["hparams_seed"]), d["split"], d["metric"], float(d["mean"]),
                float(d["std"]), int(d["n"])) for d in csv.DictReader(f)]


def quantile_level(metric: str) -> str | None:
  """The beta of ``Augmented-<beta>-Quantile-Accuracy``, as written; ``None`` for other keys."""
  match = _QUANTILE.match(metric)
  return match.group(1) if match else None


def table_metrics(rows: Iterable[Row], split: str = "Test") -> list[str]:
  """The accuracy metrics of ``split`` in ``rows``, in the paper's column order.

  Clean, PGD, FGSM, Augmented, then the Augmented quantile accuracies by
  decreasing beta, then anything else alphabetically.
  """
  present = {r.metric for r in rows if r.split == split and r.metric.endswith("Accuracy")}
  head = [m for m in _METRIC_ORDER if m in present]
  quantiles = sorted((m for m in present if quantile_level(m)),
                     key=lambda m: -float(quantile_level(m)))
  return head + quantiles + sorted(present - set(head) - set(quantiles))


def _short(metric: str) -> str:
  """Column title: ``PGD`` for ``PGD-Accuracy``, ``Q0.1`` for the 0.1-quantile accuracy."""
  if quantile_level(metric):
    return f"Q{quantile_level(metric)}"
  return metric[:-len("-Accuracy")] if metric.endswith("-Accuracy") else metric


def _digits(metric: str, precision: int) -> int:
  return precision if higher_is_better(metric) else precision + 2


@dataclasses.dataclass(frozen=True)
class Table:
  """One paper-style table: rows = algorithms, columns = metrics of one split."""

  dataset: str
  selection: str
  selection_metric: str
  split: str
  metrics: tuple[str, ...]
  algorithms: tuple[str, ...]
  cells: Mapping[tuple[str, str], Row]  # (algorithm, metric) -> Row

  @property
  def caption(self) -> str:
    how = ("last epoch" if self.selection == "LastStep"
           else f"epoch of best validation {self.selection_metric}")
    hparams = (f"hparams by validation {self.selection_metric}" if self.selection_metric
               else "no validation records: smallest hparams seed")
    return (f"{self.dataset}: {self.split.lower()} metrics, mean ± std over trials "
            f"({self.selection}: {how}; {hparams})")

  def best(self, metric: str) -> float | None:
    means = [self.cells[(a, metric)].mean for a in self.algorithms if (a, metric) in self.cells]
    if not means:
      return None
    return max(means) if higher_is_better(metric) else min(means)


def make_tables(rows: Sequence[Row], *, split: str = "Test",
                metrics: Sequence[str] | None = None,
                algorithms: Sequence[str] | None = None) -> list[Table]:
  """Groups ``rows`` into one :class:`Table` per (dataset, selection method).

  Args:
    rows: :func:`summarize`'s answer.
    split: the split shown.
    metrics: columns (default :func:`table_metrics`).
    algorithms: row order and filter (default: alphabetical).
  """
  tables = []
  keys = sorted({(r.dataset, r.selection) for r in rows},
                key=lambda k: (k[0], SELECTION_METHODS.index(k[1])
                               if k[1] in SELECTION_METHODS else len(SELECTION_METHODS)))
  for dataset, selection in keys:
    group = [r for r in rows if r.dataset == dataset and r.selection == selection]
    cols = tuple(metrics) if metrics else tuple(table_metrics(group, split))
    present = sorted({r.algorithm for r in group})
    order = tuple(a for a in algorithms if a in present) if algorithms else tuple(present)
    cells = {(r.algorithm, r.metric): r for r in group if r.split == split}
    tables.append(Table(dataset, selection, group[0].selection_metric, split, cols, order,
                        cells))
  return tables


def _cell(table: Table, algorithm: str, metric: str, precision: int, *, latex: bool) -> str:
  row = table.cells.get((algorithm, metric))
  if row is None:
    return "--" if latex else "-"
  d = _digits(metric, precision)
  if latex:
    text = f"{row.mean:.{d}f} \\pm {row.std:.{d}f}"
    best = table.best(metric)
    if len(table.algorithms) > 1 and best is not None and f"{row.mean:.{d}f}" == f"{best:.{d}f}":
      text = f"\\mathbf{{{row.mean:.{d}f}}} \\pm {row.std:.{d}f}"
    return f"${text}$"
  text = f"{row.mean:.{d}f} ± {row.std:.{d}f}"
  best = table.best(metric)
  if len(table.algorithms) > 1 and best is not None and f"{row.mean:.{d}f}" == f"{best:.{d}f}":
    text = f"**{text}**"
  return text


def _seeds_and_n(table: Table, algorithm: str) -> tuple[str, str]:
  rows = [r for (a, _), r in table.cells.items() if a == algorithm]
  if not rows:
    return "-", "-"
  return str(rows[0].hparams_seed), str(max(r.n for r in rows))


def to_markdown(table: Table, precision: int = 1) -> str:
  """A GitHub-flavoured Markdown table with a caption line; best means in bold."""
  header = ["Algorithm", *(_short(m) for m in table.metrics), "hparams", "n"]
  lines = [f"**{table.caption}**", "",
           "| " + " | ".join(header) + " |",
           "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
  for a in table.algorithms:
    cells = [_cell(table, a, m, precision, latex=False) for m in table.metrics]
    lines.append("| " + " | ".join([a, *cells, *_seeds_and_n(table, a)]) + " |")
  return "\n".join(lines)


def _latex_escape(text: str) -> str:
  for char in ("&", "%", "$", "#", "_", "{", "}"):
    text = text.replace(char, "\\" + char)
  return text


def to_latex(table: Table, precision: int = 1) -> str:
  """A booktabs ``table`` environment; best means in bold."""
  caption = _latex_escape(table.caption).replace("±", "$\\pm$")
  cols = " & ".join(_latex_escape(_short(m)) for m in table.metrics)
  lines = ["\\begin{table}[t]", "\\centering",
           f"\\caption{{{caption}}}",
           f"\\begin{{tabular}}{{l{'c' * len(table.metrics)}}}",
           "\\toprule", f"Algorithm & {cols} \\\\", "\\midrule"]
  for a in table.algorithms:
    cells = " & ".join(_cell(table, a, m, precision, latex=True) for m in table.metrics)
    lines.append(f"{_latex_escape(a)} & {cells} \\\\")
  lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
  return "\n".join(lines)
