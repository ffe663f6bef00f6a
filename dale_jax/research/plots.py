"""Figures of a sweep: accuracy curves, primal-dual dynamics, Pareto front, quantiles, CVaR.

Every function takes :class:`~dale_jax.research.collect.Choice` objects (the
runs kept by model selection) and returns a ``matplotlib.figure.Figure``.
Figures are built without ``pyplot``, so no GUI backend is touched and nothing
global changes; :func:`save` writes PNGs through the Agg canvas.

Curves average the selected hyperparameter seed's trials epoch by epoch
(shaded band: ± one standard deviation); points use the selected records.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from dale_jax.research import collect

CURVE_METRICS = ("Clean-Accuracy", "PGD-Accuracy", "FGSM-Accuracy")
_LABELS = {"Clean-Accuracy": "Clean", "PGD-Accuracy": "PGD", "FGSM-Accuracy": "FGSM",
           "PGD-20-Accuracy": "PGD-20", "AutoAttack-Accuracy": "AutoAttack",
           "clean loss": r"Nominal $\ell_{nom}$", "robust loss": r"Robust $\ell_{ro}$"}


def _figure(width: float, height: float):
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as e:  # matplotlib is an optional dependency
    raise ImportError("plots need matplotlib: pip install 'dale_jax[plots]'") from e
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save(fig, path: str, dpi: int = 120) -> str:
  """Writes ``fig`` as PNG to ``path`` (folders created); returns ``path``."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, format="png", dpi=dpi)
  return path


def curve(runs: Sequence[collect.Run], split: str,
          metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Epochs and the mean / std over ``runs`` of ``records[split][metric]``.

  Only epochs that every run has a value for are kept, so trials of unequal
  length do not bias the mean.

  Returns:
    ``(epochs, mean, std)`` as float64 arrays (std with ``ddof=1``, 0 for one run).
  """
  per_run = []
  for run in runs:
    values = {}
    for i, r in enumerate(run.records):
      v = collect.metric_value(r, split, metric)
      if not math.isnan(v):
        values[r.get("Epoch", i)] = v
    per_run.append(values)
  epochs = sorted(set.intersection(*(set(v) for v in per_run))) if per_run else []
  if not epochs:
    empty = np.zeros((0,))
    return empty, empty, empty
  table = np.array([[v[e] for e in epochs] for v in per_run], dtype=np.float64)
  std = table.std(axis=0, ddof=1) if len(per_run) > 1 else np.zeros(len(epochs))
  return np.asarray(epochs, dtype=np.float64), table.mean(axis=0), std


def _plot_curve(ax, runs, split, metric, label=None, **kwargs) -> bool:
  from matplotlib.ticker import MaxNLocator

  epochs, mean, std = curve(runs, split, metric)
  if epochs.size == 0:
    return False
  (line,) = ax.plot(epochs, mean, marker="o" if epochs.size < 15 else None,
                    label=label or _LABELS.get(metric, metric), gid="curve", **kwargs)
  if np.any(std > 0):
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=line.get_color())
  # Epochs are integers: label each when there are few, else integer ticks only.
  plotted = np.unique(np.concatenate([np.asarray(l.get_xdata(), float)
                                      for l in ax.get_lines() if l.get_gid() == "curve"]))
  if plotted.size <= 12:
    ax.set_xticks(plotted)
  else:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  return True


def accuracy_curves(choices: Sequence[collect.Choice], split: str = "Test",
                    metrics: Sequence[str] = CURVE_METRICS):
  """One panel per algorithm: ``metrics`` of ``split`` against the epoch."""
  n = len(choices)
  cols = min(n, 4) or 1
  rows = max(1, math.ceil(n / cols))
  fig = _figure(3.6 * cols, 3.0 * rows)
  axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
  for ax, c in zip(axes.flat, choices):
    for metric in metrics:
      _plot_curve(ax, c.runs, split, metric)
    ax.set_title(f"{c.algorithm}, {_runs_phrase(len(c.runs))}")
    ax.set_xlabel("Epoch")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[n:]:
    ax.set_visible(False)
  axes[0, 0].set_ylabel(f"{split} accuracy (%)")
  axes[0, 0].legend()
  if choices:
    fig.suptitle(f"{choices[0].dataset}: {split.lower()} accuracy")
  return fig


def margin_of(config: Mapping) -> float | None:
  """The constraint level rho of a run: ``config['dual']['margin']`` when present."""
  dual = config.get("dual")
  if isinstance(dual, Mapping) and isinstance(dual.get("margin"), (int, float)):
    return float(dual["margin"])
  return None


def has_dual(choice: collect.Choice) -> bool:
  """Whether the choice's training records carry a ``dual variable``."""
  return any(not math.isnan(collect.metric_value(r, "Train", "dual variable"))
             for run in choice.runs for r in run.records)


def primal_dual(choice: collect.Choice, split: str = "Test", *, title: str | None = None,
                threat: str | None = None):
  """The primal-dual picture of one algorithm (as the paper's figures).

  Left: ``split`` accuracy (clean, PGD, FGSM; ``threat`` names their radius). Middle:
  training nominal and robust losses with the margin rho (from ``config.json``'s
  ``dual.margin``). Right: the dual variable nu (running mean over each epoch), in a
  colour of its own.
  """
  fig = _figure(13, 3.8)
  ax_acc, ax_loss, ax_nu = fig.subplots(1, 3)
  for metric in CURVE_METRICS:
    _plot_curve(ax_acc, choice.runs, split, metric)
  ax_acc.set(title=f"{split} accuracy" + (f" ({threat})" if threat else ""), xlabel="Epoch",
             ylabel="Accuracy (%)")
  ax_acc.legend()
  for metric in ("clean loss", "robust loss"):
    _plot_curve(ax_loss, choice.runs, "Train", metric)
  margin = margin_of(choice.runs[0].config) if choice.runs else None
  if margin is not None:
    ax_loss.axhline(margin, ls="--", c="red", lw=1.5, label=r"Margin $\rho$")
  ax_loss.set(title="Training loss", xlabel="Epoch", ylabel="Loss")
  ax_loss.legend()
  # Purple: no accuracy or loss curve of the other panels uses it.
  _plot_curve(ax_nu, choice.runs, "Train", "dual variable", label=r"$\nu$", color="C4")
  ax_nu.set(title=r"Dual variable $\nu$", xlabel="Epoch", ylabel=r"$\nu$")
  for ax in (ax_acc, ax_loss, ax_nu):
    ax.grid(alpha=0.3)
  fig.suptitle(title or f"{choice.dataset}: {choice.algorithm}, "
                        f"{_runs_phrase(len(choice.runs))}")
  return fig


def _runs_phrase(n: int) -> str:
  return "one run" if n == 1 else f"mean ± std over {n} runs"


def pareto_front(points: np.ndarray) -> np.ndarray:
  """Indices of the points no other point dominates, both coordinates maximised.

  Point ``j`` dominates ``i`` when ``p_j >= p_i`` in both coordinates and
  ``p_j > p_i`` in at least one. Returns indices sorted by the first coordinate.
  """
  points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
  keep = []
  for i, p in enumerate(points):
    dominated = np.any(np.all(points >= p, axis=1) & np.any(points > p, axis=1))
    if not dominated:
      keep.append(i)
  keep = np.asarray(keep, dtype=np.int64)
  return keep[np.argsort(points[keep, 0], kind="stable")]


def _selected(choice: collect.Choice, split: str, metric: str) -> tuple[float, float]:
  values = [collect.metric_value(r, split, metric) for r in choice.records]
  values = [v for v in values if not math.isnan(v)]
  return collect.mean_std(values) if values else (math.nan, math.nan)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def pareto(choices: Sequence[collect.Choice], split: str = "Test",
           clean: str = "Clean-Accuracy", robust: str = "PGD-Accuracy", *,
           title: str | None = None, clean_label: str | None = None,
           robust_label: str | None = None):
  """Clean vs robust accuracy of the selected models, with the Pareto front.

  Each method has its own colour and marker and is named in the legend (labels
  written beside the points overlap where methods cluster); the legend marks the
  methods on the front.
  """
  fig = _figure(6.5, 4.5)
  ax = fig.subplots()
  names, points, errors = [], [], []
  for c in choices:
    (x, dx), (y, dy) = _selected(c, split, clean), _selected(c, split, robust)
    if not (math.isnan(x) or math.isnan(y)):
      names.append(c.algorithm)
      points.append((x, y))
      errors.append((dx, dy))
  if points:
    pts, err = np.array(points), np.array(errors)
    front = pareto_front(pts)
    for i, name in enumerate(names):
      ax.errorbar(pts[i, 0], pts[i, 1], xerr=err[i, 0], yerr=err[i, 1],
                  fmt=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}", capsize=3, ms=7,
                  label=name + (" (front)" if i in front else ""))
    ax.plot(pts[front, 0], pts[front, 1], ls="--", c="gray", lw=1, label="Pareto front")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  ax.set(xlabel=clean_label or f"{_LABELS.get(clean, clean)} accuracy (%)",
         ylabel=robust_label or f"{_LABELS.get(robust, robust)} accuracy (%)",
         title=title or f"{choices[0].dataset if choices else ''}: {split.lower()} set")
  ax.grid(alpha=0.3)
  return fig


def quantile_levels(choices: Sequence[collect.Choice], split: str = "Test") -> list[str]:
  """The betas of the ``Augmented-<beta>-Quantile-Accuracy`` keys, as written, by value."""
  levels = {m for c in choices for r in c.records
            for k in (r.get(split) or {}) if (m := collect.quantile_level(k))}
  return sorted(levels, key=float, reverse=True)


def augmented_quantiles(choices: Sequence[collect.Choice], split: str = "Test"):
  """Share of images whose accuracy over random perturbations exceeds (1 - beta) x 100.

  x axis: beta (plus the mean Augmented-Accuracy at the far left), one line
  per algorithm; values from the selected records, with std error bars.
  """
  fig = _figure(6, 4.2)
  ax = fig.subplots()
  levels = quantile_levels(choices, split)
  keys = ["Augmented-Accuracy", *(f"Augmented-{b}-Quantile-Accuracy" for b in levels)]
  labels = ["mean", *(f"β={b}" for b in levels)]
  xs = np.arange(len(keys))
  for c in choices:
    stats = np.array([_selected(c, split, k) for k in keys])
    if np.all(np.isnan(stats[:, 0])):
      continue
    ax.errorbar(xs, stats[:, 0], yerr=stats[:, 1], marker="o", capsize=3, label=c.algorithm)
  ax.set_xticks(xs, labels)
  ax.set(xlabel="Augmented accuracy / beta-quantile accuracy",
         ylabel=f"{split} accuracy (%)",
         title=f"{choices[0].dataset if choices else ''}: accuracy under random "
         "perturbations")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return fig


def cvar(choices: Sequence[collect.Choice], split: str = "Test", metric: str = "CVaR-Loss"):
  """Horizontal bars: CVaR of the loss under random perturbations per algorithm."""
  fig = _figure(6, 0.5 * max(len(choices), 2) + 1.5)
  ax = fig.subplots()
  names, means, stds = [], [], []
  for c in choices:
    mean, std = _selected(c, split, metric)
    if not math.isnan(mean):
      names.append(c.algorithm)
      means.append(mean)
      stds.append(std)
  ys = np.arange(len(names))
  bars = ax.barh(ys, means, xerr=stds, capsize=3, color="C0")
  ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], padding=4, fontsize=8)
  ax.set_yticks(ys, names)
  ax.invert_yaxis()
  ax.set(xlabel=f"{split} {metric}",
         title=f"{choices[0].dataset if choices else ''}: CVaR of the loss")
  ax.grid(alpha=0.3, axis="x")
  return fig


def plot_all(choices: Sequence[collect.Choice], out_dir: str, split: str = "Test") -> list[str]:
  """Draws every figure the records allow, per dataset, under ``out_dir/<dataset>/``.

  Files: ``accuracy_curves.png``, ``primal_dual_<Algorithm>.png`` (algorithms
  with a dual variable), ``pareto.png``, ``augmented_quantiles.png`` and
  ``cvar.png`` (when the records hold those evaluators).

  Returns:
    The paths written.
  """
  paths = []
  for dataset in sorted({c.dataset for c in choices}):
    group = [c for c in choices if c.dataset == dataset]
    folder = os.path.join(out_dir, dataset)
    paths.append(save(accuracy_curves(group, split), os.path.join(folder, "accuracy_curves.png")))
    for c in group:
      if has_dual(c):
        paths.append(save(primal_dual(c, split),
                          os.path.join(folder, f"primal_dual_{c.algorithm}.png")))
    paths.append(save(pareto(group, split), os.path.join(folder, "pareto.png")))
    if any(not math.isnan(_selected(c, split, "Augmented-Accuracy")[0]) for c in group):
      paths.append(save(augmented_quantiles(group, split),
                        os.path.join(folder, "augmented_quantiles.png")))
    if any(not math.isnan(_selected(c, split, "CVaR-Loss")[0]) for c in group):
      paths.append(save(cvar(group, split), os.path.join(folder, "cvar.png")))
  return paths
