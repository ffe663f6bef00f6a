"""``dale-bench``: throughput of dale_jax against PyTorch, training steps or AutoAttack.

  dale-bench --algorithm=Gaussian_DALE_PD --model=mnist_cnn --batch-size=64,256 \
      --steps=20 --framework=both --json
  dale-bench --task=autoattack --workdir=runs/quickstart --n-examples=40 --batch-size=40 \
      --repeats=3

``--task=autoattack`` times AutoAttack's standard version in dale_jax and in
torchattacks on a finished run's weights and test points, attack by attack, the
median of ``--repeats`` interleaved runs (:mod:`dale_jax.bench.autoattack`).

Times the full step (sampler loop, primal and dual update) after warm-up; see
:mod:`dale_jax.bench.runner`. ``--framework`` is ``jax``, ``torch`` (eager),
``torch-compile``, a comma-separated list of these, or ``both`` (all three).
``--devices=1,2,4`` adds JAX runs on that many simulated host devices (scaling).
``--precision=bfloat16`` times every framework in bfloat16 (dale_jax's
``config.model.dtype``, torch's ``autocast``); ``--precision=float32,bfloat16`` runs
both precisions interleaved in one run, each row with its speed-up against eager
torch at its own precision and against eager torch in float32.
With ``--json`` each result is one JSON object per line; otherwise a table.
The torch side needs the ``bench`` extra (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import json
import sys

from dale_jax.bench import ALGORITHMS
from dale_jax.bench import runner
from dale_jax.cli import _errors


def _int_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
  return values


def _precisions(text: str) -> list[str]:
  values = [v.strip() for v in text.split(",") if v.strip()]
  bad = [v for v in values if v not in runner.PRECISIONS]
  if not values or bad:
    raise argparse.ArgumentTypeError(
        f"expected a comma-separated list of {', '.join(runner.PRECISIONS)}, got {text!r}")
  return values


def _frameworks(text: str) -> list[str]:
  names = runner.FRAMEWORKS if text == "both" else text.split(",")
  for name in names:
    if name not in runner.FRAMEWORKS:
      raise argparse.ArgumentTypeError(
          f"framework must be 'both' or a comma-separated list of {runner.FRAMEWORKS}, got {name!r}")
  return list(names)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="dale-bench", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", default="step", choices=["step", "autoattack"],
                 help="step: the training step; autoattack: the standard AutoAttack chain")
  p.add_argument("--workdir", default=None, help="autoattack: a finished dale-train run")
  p.add_argument("--n-examples", type=int, default=500, help="autoattack: test points")
  p.add_argument("--algorithm", default="Gaussian_DALE_PD", choices=ALGORITHMS)
  p.add_argument("--model", default="mnist_cnn", choices=runner.MODELS)
  p.add_argument("--batch-size", type=_int_list, default=[64],
                 help="global batch; several separated by commas")
  p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per framework")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--framework", type=_frameworks, default=list(runner.FRAMEWORKS),
                 help="jax, torch (eager), torch-compile, a comma-separated list of these, "
                      "or both (all three; the default)")
  p.add_argument("--devices", type=_int_list, default=[1],
                 help="simulated JAX host devices; several separated by commas")
  p.add_argument("--width", type=int, default=64, help="ResNet width (64 = ResNet-18)")
  p.add_argument("--sampler-chunk", type=int, default=None, metavar="N",
                 help="JAX: the sampler perturbs N examples per device at a time "
                      "(config sampler_chunk_size; 0 = the whole batch; default: the "
                      "config's choice for the platform, 32 on a CPU, 0 on a GPU)")
  p.add_argument("--precision", type=_precisions, default=["float32"],
                 help="compute dtype(s) of every framework, comma-separated: float32, bfloat16 "
                 "(dale_jax's model.dtype; torch.autocast); several run interleaved in one run")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="also list the N most expensive XLA ops of the JAX step")
  p.add_argument("--json", action="store_true", help="one JSON object per line and framework")
  return p.parse_args(argv)


def _settings(frameworks: list[str], devices: list[int]) -> list[tuple[list[str], int]]:
  """(frameworks, devices) runs: torch runs once, on one device; JAX on each device count."""
  others = [f for f in frameworks if f != "jax"]
  runs = []
  for d in devices:
    if d == 1:
      runs.append((frameworks, 1))
    elif "jax" in frameworks:
      runs.append((["jax"], d))
  if others and 1 not in devices:
    runs.insert(0, (others, 1))
  return runs


def _autoattack(args, log) -> list[dict]:
  from dale_jax import rundir  # pylint: disable=import-outside-toplevel
  from dale_jax.bench import autoattack  # pylint: disable=import-outside-toplevel

  if not args.workdir or not rundir.has_config(args.workdir):
    _errors.fail("dale-bench", f"--task=autoattack needs --workdir of a finished dale-train run, "
                 f"got {args.workdir!r}")
  if args.n_examples < 1 or len(args.batch_size) != 1 or args.repeats < 1:
    _errors.fail("dale-bench", "--task=autoattack takes --n-examples >= 1, --repeats >= 1 and "
                 "one --batch-size")
  try:
    rows = autoattack.compare(args.workdir, n_examples=args.n_examples,
                              batch_size=args.batch_size[0], repeats=args.repeats, log=log)
  except (ValueError, RuntimeError) as e:
    _errors.fail("dale-bench", e)
  for row in rows:
    if args.json:
      print(json.dumps(row), flush=True)
  if not args.json:
    print(autoattack.format_table(rows))
  return rows


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  log = lambda message: print(message, file=sys.stderr, flush=True)
  if args.task == "autoattack":
    return _autoattack(args, log)
  results = []
  for batch_size in args.batch_size:
    for frameworks, devices in _settings(args.framework, args.devices):
      options = runner.Options(
          algorithm=args.algorithm, model=args.model, batch_size=batch_size, steps=args.steps,
          repeats=args.repeats, warmup=args.warmup, devices=devices, width=args.width,
          sampler_chunk=args.sampler_chunk, seed=args.seed)
      try:
        rows = runner.run(options, frameworks, profile_top=args.profile,
                          precisions=args.precision, log=log)
      except (ValueError, RuntimeError) as e:
        _errors.fail("dale-bench", e)
      results += rows
      for row in rows:
        if args.json:
          print(json.dumps(row), flush=True)
        if "top_ops" in row and not args.json:
          from dale_jax.bench import profile

          print(f"\nJAX step, batch {batch_size}, devices {devices}: most expensive XLA ops")
          print(profile.format_ops(row["top_ops"]))
  if not args.json:
    print()
    print(runner.format_table(results))
  return results


def run():
  main()


if __name__ == "__main__":
  run()
