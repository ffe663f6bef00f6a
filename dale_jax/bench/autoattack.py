"""AutoAttack's standard version in dale_jax against torchattacks, on the same weights and points.

The torch side composes torchattacks 3.5.1's APGD, APGDT, FAB (multi-targeted) and Square
with the reference's standard settings (100 iterations, 9 target classes, 5,000 queries,
no rescaled schedule): ``torchattacks.AutoAttack`` itself gives its members 10
iterations. Each attack runs on the points that the previous ones left robust, as in
both references, and is timed on its own. dale_jax is timed twice: the first pass
includes compiling every attack, the second is warm.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

ORDER = ("apgd-ce", "apgd-t", "fab-t", "square")


def _torch_attacks(torchattacks, net, norm: str, eps: float, n_classes: int) -> dict:
  tnorm = {"linf": "Linf", "l2": "L2"}[norm]
  return {
      "apgd-ce": torchattacks.APGD(net, norm=tnorm, eps=eps, steps=100, n_restarts=1, loss="ce",
                                   seed=0),
      "apgd-t": torchattacks.APGDT(net, norm=tnorm, eps=eps, steps=100, n_restarts=1,
                                   n_classes=n_classes, seed=0),
      "fab-t": torchattacks.FAB(net, norm=tnorm, eps=eps, steps=100, n_restarts=1,
                                multi_targeted=True, n_classes=n_classes, seed=0),
      "square": torchattacks.Square(net, norm=tnorm, eps=eps, n_queries=5000, n_restarts=1,
                                    seed=0, resc_schedule=False),
  }


def run_torch(net, x: np.ndarray, y: np.ndarray, *, norm: str, eps: float, n_classes: int,
              batch_size: int) -> dict[str, Any]:
  """The chain in torchattacks, attack by attack on the still-robust points."""
  import torch  # pylint: disable=import-outside-toplevel
  import torchattacks  # pylint: disable=import-outside-toplevel

  xt = torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))  # a writable copy
  yt = torch.from_numpy(y.astype(np.int64))
  with torch.no_grad():
    robust = (net(xt).argmax(-1) == yt).numpy()
  seconds, accuracy = {}, {}
  members = _torch_attacks(torchattacks, net, norm, eps, n_classes)
  for name in ORDER:
    started = time.perf_counter()
    idx = np.nonzero(robust)[0]
    for start in range(0, len(idx), batch_size):
      chunk = idx[start:start + batch_size]
      adv = members[name](xt[chunk], yt[chunk])
      with torch.no_grad():
        robust[chunk] = (net(adv).argmax(-1) == yt[chunk]).numpy()
    seconds[name] = time.perf_counter() - started
    accuracy[name] = 100.0 * robust.mean()
  return {"seconds": seconds, "accuracy": accuracy}


def compare(workdir: str, *, n_examples: int, batch_size: int, repeats: int = 1,
            norm: str | None = None, eps: float | None = None, log=print
            ) -> list[dict[str, Any]]:
  """Rows ``{framework, run, attack, seconds, accuracy}``, a total per run and the speed-up.

  dale_jax runs once cold (compiling), then ``repeats`` times warm, interleaved with
  ``repeats`` torchattacks runs; seconds are medians over the repeats.
  """
  import torch  # pylint: disable=import-outside-toplevel

  from dale_jax import attacks  # pylint: disable=import-outside-toplevel
  from dale_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel

  config, logits_fn, dataset = checkpoint.load_trained(workdir)
  x, y = dataset.test
  x, y = np.asarray(x[:n_examples], np.float32), np.asarray(y[:n_examples], np.int32)
  norm = norm or str(config.eval.norm)
  eps = float(config.eval.eps) if eps is None else eps
  if norm not in ("linf", "l2"):
    raise ValueError(f"norm must be 'linf' or 'l2' for the comparison (torchattacks has no "
                     f"L1 APGD or Square), got {norm!r}")
  net = torch_reference.make_model(str(config.model.name), dataset.num_classes)
  with torch.no_grad():
    torch_reference.load_flax_variables(net, logits_fn.args[0])
  net.eval()

  rows = []

  def add(framework, label, runs):
    """One row per attack (median seconds over ``runs``) and a total (median of the totals)."""
    for name in ORDER:
      rows.append(dict(framework=framework, run=label, attack=name,
                       seconds=float(np.median([r["seconds"][name] for r in runs])),
                       accuracy=runs[0]["accuracy"][name]))
    total = float(np.median([sum(r["seconds"][n] for n in ORDER) for r in runs]))
    rows.append(dict(framework=framework, run=label, attack="total", seconds=total,
                     accuracy=runs[0]["accuracy"][ORDER[-1]], points_per_s=len(x) / total))
    return total

  def ours():
    report = attacks.evaluate_robustness(logits_fn, x, y, attacks=("clean",), version="standard",
                                         norm=norm, eps=eps, batch_size=batch_size)
    return {"seconds": report["attack_seconds"], "accuracy": report["per_attack"]}

  log("dale_jax, cold (compiles) ...")
  add("dale_jax", "cold (compiles)", [ours()])
  warm, theirs = [], []
  for r in range(repeats):  # interleaved, so that both see the same machine
    log(f"dale_jax, warm, repeat {r + 1} of {repeats} ...")
    warm.append(ours())
    log(f"torchattacks, repeat {r + 1} of {repeats} ...")
    theirs.append(run_torch(net, x, y, norm=norm, eps=eps, n_classes=dataset.num_classes,
                            batch_size=batch_size))
  label = f"median of {repeats}"
  jax_total = add("dale_jax", f"warm, {label}", warm)
  torch_total = add("torchattacks", f"eager, {label}", theirs)
  rows.append(dict(framework="dale_jax / torchattacks", run=label, attack="total",
                   speedup=torch_total / jax_total))
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  lines = ["| framework | run | attack | seconds | robust accuracy (%) | points/s |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if "speedup" in r:
      lines.append(f"| {r['framework']} | {r['run']} | speed-up | {r['speedup']:.2f}x | | |")
      continue
    pps = f"{r['points_per_s']:.1f}" if "points_per_s" in r else ""
    lines.append(f"| {r['framework']} | {r['run']} | {r['attack']} | {r['seconds']:.1f} | "
                 f"{r['accuracy']:.2f} | {pps} |")
  return "\n".join(lines)
