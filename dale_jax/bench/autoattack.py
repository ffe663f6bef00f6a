"""AutoAttack's standard version in dale_jax against torchattacks, on the same weights and points.

The model (:func:`prepare`) is a finished dale-train run's, or one of the field's
architectures (:data:`dale_jax.models.torch_weights.ARCHS`) with the weights of a
PyTorch ``state_dict`` in RobustBench's/TRADES' names or its initial weights from a
seed. Both sides hold the very same weights: PyTorch builds the architecture's network
(:mod:`dale_jax.bench.torch_reference`) and loads the ``state_dict``, dale_jax its
conversion (:mod:`dale_jax.models.torch_weights`); their logits are compared before
anything is timed, and a difference refuses the comparison. The points are a named
dataset's test split, an ``.npz`` or synthetic (uniform images labelled with the
model's own predictions: then only the times mean something).

The torch side composes torchattacks 3.5.1's APGD, APGDT, FAB (multi-targeted) and Square
with the reference's standard settings (100 iterations, 9 target classes, 5,000 queries,
no rescaled schedule): ``torchattacks.AutoAttack`` itself gives its members 10
iterations. Each attack runs on the points that the previous ones left robust, as in
both references, and is timed on its own (``individual``: on all correctly classified
points). dale_jax is timed once cold (compiling every attack), then warm, interleaved
with torchattacks (:func:`compare`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Mapping, NamedTuple

import numpy as np

from dale_jax import validation

ORDER = ("apgd-ce", "apgd-t", "fab-t", "square")
# AutoAttack standard's budgets: iterations of APGD-CE and APGD-T, of FAB-T, Square's queries.
BUDGETS = {"apgd_steps": 100, "fab_steps": 100, "square_queries": 5000}
PRECISIONS = ("float32", "bfloat16")
# ``dataset`` that asks for uniform images labelled with the model's own predictions.
SYNTHETIC = "synthetic"
# Largest |dale_jax logit - torch logit| accepted, as a share of the largest |logit| (at
# least 1), both sides in full float32; the converter tests hold 1e-4 absolute.
LOGIT_TOLERANCE = 1e-4


def _torch_attacks(torchattacks, net, norm: str, eps: float, n_classes: int,
                   budgets: Mapping[str, int]) -> dict:
  tnorm = {"linf": "Linf", "l2": "L2"}[norm]
  steps, fab_steps = budgets["apgd_steps"], budgets["fab_steps"]
  return {
      "apgd-ce": torchattacks.APGD(net, norm=tnorm, eps=eps, steps=steps, n_restarts=1,
                                   loss="ce", seed=0),
      "apgd-t": torchattacks.APGDT(net, norm=tnorm, eps=eps, steps=steps, n_restarts=1,
                                   n_classes=n_classes, seed=0),
      "fab-t": torchattacks.FAB(net, norm=tnorm, eps=eps, steps=fab_steps, n_restarts=1,
                                multi_targeted=True, n_classes=n_classes, seed=0),
      "square": torchattacks.Square(net, norm=tnorm, eps=eps, n_queries=budgets["square_queries"],
                                    n_restarts=1, seed=0, resc_schedule=False),
  }


def run_torch(net, x: np.ndarray, y: np.ndarray, *, norm: str, eps: float, n_classes: int,
              batch_size: int, budgets: Mapping[str, int] | None = None,
              individual: bool = False) -> dict[str, Any]:
  """The chain in torchattacks, attack by attack on the still-robust points.

  ``net`` runs on its own device (that of its parameters); ``x`` is NHWC in [0, 1].
  ``budgets`` overrides :data:`BUDGETS`; with ``individual`` every attack runs on all
  the points ``net`` classifies correctly, and its accuracy is its own.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import torchattacks  # pylint: disable=import-outside-toplevel

  device = next(net.parameters()).device
  # A contiguous NCHW copy, as a DataLoader gives it: np.array of the transposed view
  # would keep NHWC memory, which torch takes as channels_last and computes differently.
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  with torch.no_grad():
    clean = (net(xt).argmax(-1) == yt).cpu().numpy()
  robust = clean.copy()
  seconds, accuracy = {}, {}
  members = _torch_attacks(torchattacks, net, norm, eps, n_classes, {**BUDGETS, **(budgets or {})})
  for name in ORDER:
    started = time.perf_counter()
    if individual:
      robust = clean.copy()
    idx = np.nonzero(robust)[0]
    for start in range(0, len(idx), batch_size):
      chunk = idx[start:start + batch_size]
      adv = members[name](xt[chunk], yt[chunk])
      with torch.no_grad():
        robust[chunk] = (net(adv).argmax(-1) == yt[chunk]).cpu().numpy()
    seconds[name] = time.perf_counter() - started
    accuracy[name] = 100.0 * robust.mean()
  return {"seconds": seconds, "accuracy": accuracy}


class Setup(NamedTuple):
  """What both frameworks attack: the same weights and points.

  Attributes:
    logits_fn: the dale_jax model, ``x -> logits`` (a ``jax.tree_util.Partial`` holding
      the variables), float32.
    make_jax: ``dtype -> logits_fn`` of the same weights computing in ``dtype``
      (``None`` for a run: its model computes in its config's dtype).
    net: the PyTorch network holding the same weights, eval mode, on its device.
    x, y: NHWC float32 points in [0, 1] and int32 labels.
    num_classes: logits.
    norm, eps: the threat model.
    info: what the report says about the model, the points and the check.
  """
  logits_fn: Any
  make_jax: Any
  net: Any
  x: np.ndarray
  y: np.ndarray
  num_classes: int
  norm: str
  eps: float
  info: dict


def _jax_model(arch: str, num_classes: int, normalize: str, variables, dtype=None):
  import jax  # pylint: disable=import-outside-toplevel

  from dale_jax import models  # pylint: disable=import-outside-toplevel
  kwargs = {} if dtype is None else {"dtype": dtype}
  model = models.normalized(models.get_model(arch, num_classes, **kwargs), normalize)
  # On the device once, not copied from the host at every attack call.
  return jax.tree_util.Partial(functools.partial(model.apply, train=False),
                               jax.device_put(variables))


def _predict(logits_fn, x: np.ndarray, batch_size: int) -> np.ndarray:
  return np.concatenate([np.asarray(logits_fn(x[i:i + batch_size]))
                         for i in range(0, len(x), batch_size)])


def _torch_logits(net, x: np.ndarray, batch_size: int) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel

  device = next(net.parameters()).device
  out = []
  with torch.no_grad():
    for i in range(0, len(x), batch_size):
      xt = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size].transpose(0, 3, 1, 2)))
      xt = xt.to(device)
      out.append(net(xt).float().cpu().numpy())
  return np.concatenate(out)


def logit_difference(logits_fn, net, x: np.ndarray, *, log_softmax: bool = False,
                     batch_size: int = 64) -> tuple[float, float]:
  """``(max |dale_jax logit - torch logit|, max |torch logit|)`` on ``x`` (NHWC).

  Both sides compute in full float32 for the check (JAX's ``highest`` matmul
  precision, torch without TF32), so that the difference measures the weights, not
  the arithmetic. ``log_softmax``: the torch network returns ``log_softmax``
  (advbench's MNIST network); the JAX logits are compared after one.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    theirs = _torch_logits(net, x, batch_size)
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
  with jax.default_matmul_precision("highest"):
    ours = _predict(logits_fn, x, batch_size)
  if log_softmax:
    ours = np.asarray(jax.nn.log_softmax(ours))
  return float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())


def _fail(message: str):
  raise validation.BadInput(message)


def prepare(*, workdir: str | None = None, arch: str | None = None,
            torch_checkpoint: str | None = None, normalize: str = "none", seed: int = 0,
            dataset: str | None = None, n_examples: int = 500, batch_size: int = 500,
            norm: str | None = None, eps: float | None = None,
            device: str | None = None) -> Setup:
  """The model on both sides and the points, checked to give the same logits.

  The model is a finished dale-train run's (``workdir``), or ``arch`` (a name of
  :data:`dale_jax.models.torch_weights.ARCHS`) with the weights of the PyTorch
  ``state_dict`` in ``torch_checkpoint`` (read by
  :func:`dale_jax.models.torch_weights.read_checkpoint`, ``normalize`` the input
  normalisation it was trained with) or, without one, ``arch``'s initial weights
  from ``seed``. The PyTorch network of the architecture
  (:func:`dale_jax.bench.torch_reference.load_state_dict`) loads that very
  ``state_dict`` (the initial weights' through
  :func:`dale_jax.models.torch_weights.to_torch`), dale_jax its conversion.

  ``dataset`` is a named dataset (its test split; default: the run's), an ``.npz``
  (:func:`dale_jax.points.load_npz`) or ``"synthetic"``: ``n_examples`` uniform
  images of the architecture's input shape (from ``seed``) labelled with the model's
  own predictions, so that every point starts correctly classified and the robust
  accuracy says nothing about the model. The first ``n_examples`` points are kept.

  ``norm`` and ``eps`` default to the run's evaluation threat model, else the
  dataset's Linf radius (for an ``.npz`` or synthetic points, that of the datasets of
  the architecture's input shape: 0.3 on MNIST's, 8/255 on CIFAR-10's). torch runs on
  ``device`` (default: CUDA when there is one).

  Raises:
    dale_jax.validation.BadInput: bad arguments, a checkpoint that is not ``arch``'s,
      points the model does not take, or logits that differ by more than
      :data:`LOGIT_TOLERANCE` times the largest one (the frameworks would not attack
      the same function).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from dale_jax import evaluate  # pylint: disable=import-outside-toplevel
  from dale_jax import models  # pylint: disable=import-outside-toplevel
  from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel
  from dale_jax.models import torch_weights  # pylint: disable=import-outside-toplevel

  if (workdir is None) == (arch is None):
    _fail("give one of workdir (a dale-train run) and arch (with a torch_checkpoint or a seed)")
  if norm not in (None, "linf", "l2"):
    _fail(f"norm must be 'linf' or 'l2' for the comparison (torchattacks has no L1 APGD or "
          f"Square), got {norm!r}")
  if workdir is None and eps is None and norm not in (None, "linf"):
    _fail(f"eps is required with norm={norm}: the datasets' default radius is for linf")
  if workdir is None and dataset is None:
    _fail(f"arch needs dataset: a dataset, an .npz of points or {SYNTHETIC!r}")
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  make_jax = None
  if workdir is not None:
    if torch_checkpoint is not None or normalize != "none":
      _fail("torch_checkpoint and normalize go with arch; a run's model is its config's")
    model = evaluate.from_run(workdir)
    name = str(model.config.model.name)
    net = torch_reference.make_model(name, model.num_classes)
    with torch.no_grad():
      torch_reference.load_flax_variables(net, model.logits_fn.args[0])
    net.eval()
    weights = f"run {workdir}"
  else:
    validation.one_of("arch", arch, torch_weights.ARCHS)
    validation.one_of("normalize", normalize, models.NORMALIZATIONS)
    name, shape = arch, torch_weights.input_shape(arch)
    stats = models.NORMALIZATIONS[normalize]
    if stats is not None and len(stats[0]) != shape[-1]:
      _fail(f"normalize={normalize} is for {len(stats[0])} channels; arch={arch} takes "
            f"{shape[-1]}")
    if torch_checkpoint is not None:
      state_dict = torch_weights.read_checkpoint(torch_checkpoint)
      try:
        variables = torch_weights.from_torch(state_dict, arch)
      except torch_weights.WeightsMismatch as e:
        _fail(f"torch_checkpoint: {e}")
      weights = f"checkpoint {torch_checkpoint}"
    else:
      variables = models.init_variables(models.get_model(arch, 10), jax.random.key(seed), shape)
      variables = jax.tree.map(np.array, variables)  # writable: torch shares the memory
      state_dict = torch_weights.to_torch(variables, arch)
      weights = f"initial weights, seed {seed}"
    num_classes = torch_weights.num_classes(variables, arch)
    net = torch_reference.load_state_dict(arch, state_dict, num_classes, stats)
    logits_fn = _jax_model(arch, num_classes, normalize, variables)
    make_jax = functools.partial(_jax_model, arch, num_classes, normalize, variables)
    model = evaluate.Model(logits_fn, num_classes, shape, None, None, {"model": arch},
                           os.path.basename(torch_checkpoint or arch))
  net = net.to(device)
  synthetic = dataset == SYNTHETIC
  if synthetic:
    x = np.random.default_rng(seed).random((n_examples, *model.input_shape), dtype=np.float32)
    # The PyTorch network's predictions: the same as dale_jax's once the logits agree
    # (checked below), without compiling a forward pass that nothing else uses.
    y = _torch_logits(net, x, batch_size).argmax(-1).astype(np.int32)
    points = (f"synthetic: {n_examples} uniform images {tuple(model.input_shape)}, labelled "
              "with the model's own predictions (the robust accuracy measures nothing but "
              "speed)")
  else:
    x, y, points, split = evaluate.select_points(model, dataset=dataset, n_examples=n_examples)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    points = f"{points}{f' ({split} split)' if split else ''}: {len(x)} points"
  radius_of = dataset if evaluate.is_named(dataset) and not synthetic else (
      "mnist" if model.input_shape[-1] == 1 else "cifar10")
  eps, norm = evaluate.threat_model(model, radius_of, eps, norm)
  diff, scale = logit_difference(model.logits_fn, net, x[:batch_size],
                                 log_softmax=name == "mnist_cnn", batch_size=batch_size)
  if not diff <= LOGIT_TOLERANCE * max(1.0, scale):
    _fail(f"dale_jax and PyTorch logits differ by up to {diff:.3g} (largest logit {scale:.3g}, "
          f"tolerance {LOGIT_TOLERANCE:g} of it) on the points: they do not hold the same "
          f"{name} weights; nothing timed")
  info = dict(model=name, weights=weights, normalize=normalize, points=points,
              synthetic=synthetic, n_examples=len(x), max_abs_logit_diff=diff,
              max_abs_logit=scale, jax_device=str(jax.devices()[0].device_kind),
              torch_device=str(device), torch_threads=torch.get_num_threads())
  return Setup(model.logits_fn, make_jax, net, x, y, model.num_classes, norm, float(eps), info)


def compare(setup: Setup, *, batch_size: int, repeats: int = 1, precision: str = "float32",
            budgets: Mapping[str, int] | None = None, individual: bool = False,
            log=print) -> list[dict[str, Any]]:
  """Rows ``{framework, run, precision, attack, seconds, share, accuracy}``, a total per
  run and the speed-up.

  dale_jax runs once cold (compiling), then ``repeats`` times warm, interleaved with
  ``repeats`` torchattacks runs; seconds are medians over the repeats, ``share`` the
  attack's part of its run's total (percent). ``precision="bfloat16"`` computes the
  activations in bfloat16 on both sides (dale_jax's model ``dtype``, torch's
  ``autocast``; weights stay float32). ``budgets`` overrides :data:`BUDGETS`
  (``apgd_steps``, ``fab_steps``, ``square_queries``); ``individual`` runs every
  attack on all correctly classified points instead of the chain's survivors.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from dale_jax import attacks  # pylint: disable=import-outside-toplevel
  from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel

  if precision not in PRECISIONS:
    _fail(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
  budgets = {**BUDGETS, **(budgets or {})}
  unknown = sorted(set(budgets) - set(BUDGETS))
  if unknown:
    _fail(f"budgets: unknown {unknown[0]!r}; known: {', '.join(BUDGETS)}")
  x, y, net, logits_fn = setup.x, setup.y, setup.net, setup.logits_fn
  norm, eps = setup.norm, setup.eps
  if precision == "bfloat16":
    if setup.make_jax is None:
      _fail("precision=bfloat16 needs an arch: a run's model computes in its config's dtype")
    logits_fn = setup.make_jax(jnp.bfloat16)
    net = torch_reference.Autocast(net, _torch_dtype(precision)).eval()
  settings = {"apgd-ce": {"steps": budgets["apgd_steps"]},
              "apgd-t": {"steps": budgets["apgd_steps"]},
              "fab-t": {"steps": budgets["fab_steps"]},
              "square": {"n_queries": budgets["square_queries"]}}
  rows = []

  def add(framework, label, runs):
    """One row per attack (median seconds over ``runs``) and a total (median of the totals)."""
    total = float(np.median([sum(r["seconds"][n] for n in ORDER) for r in runs]))
    for name in ORDER:
      seconds = float(np.median([r["seconds"][name] for r in runs]))
      rows.append(dict(framework=framework, run=label, precision=precision, attack=name,
                       seconds=seconds, share=100.0 * seconds / total if total else 0.0,
                       accuracy=runs[0]["accuracy"][name]))
    rows.append(dict(framework=framework, run=label, precision=precision, attack="total",
                     seconds=total, share=100.0,
                     accuracy=runs[0]["accuracy"][ORDER[-1]], points_per_s=len(x) / total))
    return total

  def ours():
    report = attacks.evaluate_robustness(logits_fn, x, y, attacks=("clean",), version="standard",
                                         norm=norm, eps=eps, batch_size=batch_size,
                                         settings=settings, individual=individual)
    return {"seconds": report["attack_seconds"], "accuracy": report["per_attack"]}

  log(f"dale_jax ({precision}), cold (compiles) ...")
  add("dale_jax", "cold (compiles)", [ours()])
  warm, theirs = [], []
  for r in range(repeats):  # interleaved, so that both see the same machine
    log(f"dale_jax ({precision}), warm, repeat {r + 1} of {repeats} ...")
    warm.append(ours())
    log(f"torchattacks ({precision}), repeat {r + 1} of {repeats} ...")
    theirs.append(run_torch(net, x, y, norm=norm, eps=eps, n_classes=setup.num_classes,
                            batch_size=batch_size, budgets=budgets, individual=individual))
  label = f"median of {repeats}"
  jax_total = add("dale_jax", f"warm, {label}", warm)
  torch_total = add("torchattacks", f"eager, {label}", theirs)
  rows.append(dict(framework="dale_jax / torchattacks", run=label, precision=precision,
                   attack="total", speedup=torch_total / jax_total))
  return rows


def _torch_dtype(precision: str):
  import torch  # pylint: disable=import-outside-toplevel
  return {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]


def describe(setup: Setup, *, batch_size: int,
             budgets: Mapping[str, int] | None = None, individual: bool = False) -> list[str]:
  """The lines above the table: model, weights, points, the logit check, the budgets."""
  i = setup.info
  budgets = {**BUDGETS, **(budgets or {})}
  lines = [
      f"AutoAttack standard, {setup.norm} eps {setup.eps:.6g}, batch {batch_size}: {i['model']} "
      f"({i['weights']}{', normalize ' + i['normalize'] if i['normalize'] != 'none' else ''})",
      f"points: {i['points']}",
      f"same weights: max |dale_jax - torch logit| {i['max_abs_logit_diff']:.2e} "
      f"(largest logit {i['max_abs_logit']:.3g})",
      f"devices: dale_jax {i['jax_device']}, torch {i['torch_device']} "
      f"({i['torch_threads']} threads)",
      "budgets: " + ", ".join(f"{k} {v}" for k, v in budgets.items())
      + ("" if budgets == BUDGETS else " (reduced: not AutoAttack's standard budgets)"),
  ]
  if individual:
    lines.append("individual: every attack runs on all correctly classified points")
  return lines


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| framework | run | precision | attack | seconds | share (%) | robust accuracy (%) "
           "| points/s |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "speedup" in r:
      lines.append(f"| {r['framework']} | {r['run']} | {r['precision']} | speed-up | "
                   f"{r['speedup']:.2f}x | | | |")
      continue
    pps = f"{r['points_per_s']:.2f}" if "points_per_s" in r else ""
    lines.append(f"| {r['framework']} | {r['run']} | {r['precision']} | {r['attack']} | "
                 f"{r['seconds']:.1f} | {r['share']:.0f} | {r['accuracy']:.2f} | {pps} |")
  return "\n".join(lines)
