"""``dale-bench``: throughput of dale_jax against PyTorch, training steps or AutoAttack.

  dale-bench --algorithm=Gaussian_DALE_PD --model=mnist_cnn --batch_size=64,256 \
      --steps=20 --frameworks=jax,torch,torch-compile --json
  dale-bench --task=autoattack --workdir=runs/quickstart --n_examples=40 --batch_size=40 \
      --repeats=3
  dale-bench --task=autoattack --arch=wrn28_10 --torch_checkpoint=model.pt \
      --normalize=cifar10 --dataset=cifar10 --n_examples=1000 --batch_size=500
  dale-bench --task=autoattack --arch=resnet18 --dataset=synthetic --n_examples=8 \
      --batch_size=8 --repeats=3

``--task=autoattack`` times AutoAttack's standard version in dale_jax and in
torchattacks on the same weights and points, attack by attack (seconds and share of
the total), the median of ``--repeats`` interleaved runs
(:mod:`dale_jax.bench.autoattack`). The model is a finished run's (``--workdir``) or
``--arch`` with the weights of ``--torch_checkpoint`` (a PyTorch ``state_dict`` in
RobustBench's/TRADES' names, ``--normalize`` as dale-eval has it) or its initial
weights from ``--seed``; both frameworks must give the same logits before anything is
timed. ``--dataset`` takes a dataset's test split, an ``.npz`` or ``synthetic``
(uniform images labelled with the model's own predictions: only the times mean
something). ``--precision=bfloat16`` computes the activations in bfloat16 on both sides.

``--task=step`` (the default) times the full training step (sampler loop, primal and
dual update) after warm-up; see
:mod:`dale_jax.bench.runner`. ``--frameworks`` lists any of ``jax``, ``torch``
(eager) and ``torch-compile`` (default: all three).
``--simulated_devices=1,2,4`` adds JAX runs on that many simulated host devices
(scaling). ``--precision=bfloat16`` times every framework in bfloat16 (dale_jax's
``config.model.dtype``, torch's ``autocast``); ``--precision=float32,bfloat16`` runs
both precisions interleaved in one run, each row with its speed-up against eager
torch at its own precision and against eager torch in float32.
With ``--json`` each result is one JSON object per line; otherwise a table.
The torch side needs the ``bench`` extra (``pip install -e .[bench]``).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from dale_jax import rundir
from dale_jax.bench import ALGORITHMS
from dale_jax.bench import ARCHS
from dale_jax.bench import NORMALIZATIONS
from dale_jax.bench import runner
from dale_jax.cli import _errors
from dale_jax.cli import _flags

PROG = "dale-bench"
# Old spellings, named in the error when used.
RENAMED = {"batch-size": "--batch_size", "n-examples": "--n_examples",
           "devices": "--simulated_devices", "framework": "--frameworks (a list; 'both' was "
           "jax,torch,torch-compile)", "sampler-chunk": "--sampler_chunk_size"}
FLAGS = flags.FlagValues()
flags.DEFINE_enum("task", "step", ["step", "autoattack"], "step: the training step; "
                  "autoattack: the standard AutoAttack chain.", flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "autoattack: a finished dale-train run.",
                    flag_values=FLAGS)
flags.DEFINE_enum("arch", None, list(ARCHS), "autoattack: the architecture to time instead "
                  "of a run's, with --torch_checkpoint's weights or its initial ones from "
                  "--seed.", flag_values=FLAGS)
flags.DEFINE_string("torch_checkpoint", None, "autoattack: a PyTorch state_dict (.pt) of "
                    "--arch, in RobustBench's/TRADES' parameter names.", flag_values=FLAGS)
flags.DEFINE_enum("normalize", "none", list(NORMALIZATIONS), "autoattack: per-channel input "
                  "normalisation of --arch's model, applied inside it.", flag_values=FLAGS)
flags.DEFINE_string("dataset", None, "autoattack: a dataset (its test split; default: the "
                    "run's), an .npz of points (x in [0, 1], NHWC or NCHW; integer y), or "
                    "synthetic: uniform images labelled with the model's predictions.",
                    flag_values=FLAGS)
flags.DEFINE_enum("norm", None, ["linf", "l2"], "autoattack: the threat model's norm "
                  "(default: the run's, else linf).", flag_values=FLAGS)
flags.DEFINE_float("eps", None, "autoattack: the radius (default: the run's, else the "
                   "dataset's Linf radius, 8/255 at CIFAR shape).", lower_bound=0.0,
                   flag_values=FLAGS)
flags.DEFINE_integer("apgd_steps", None, "autoattack: iterations of APGD-CE and APGD-T "
                     "(default: AutoAttack standard's 100; fewer is no longer the standard "
                     "version, and the table says so).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("fab_steps", None, "autoattack: iterations of FAB-T (default 100).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("square_queries", None, "autoattack: queries of Square (default 5000).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool("individual", False, "autoattack: run every attack on all correctly "
                  "classified points instead of the chain's survivors.", flag_values=FLAGS)
flags.DEFINE_integer("n_examples", 500, "autoattack: the first N test points.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("algorithm", "Gaussian_DALE_PD", list(ALGORITHMS), "step: the algorithm "
                  "whose training step is timed.", flag_values=FLAGS)
flags.DEFINE_enum("model", "mnist_cnn", list(runner.MODELS), "step: the network.",
                  flag_values=FLAGS)
_flags.define_integer_list("batch_size", [64], "Global batch; several separated by commas "
                           "(autoattack: one).", FLAGS)
flags.DEFINE_integer("steps", 20, "Timed steps per repeat.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5, "Timed repeats per framework (autoattack: interleaved "
                     "runs, the median reported).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.", lower_bound=0,
                     flag_values=FLAGS)
_flags.define_enum_list("frameworks", list(runner.FRAMEWORKS), runner.FRAMEWORKS,
                        "Frameworks timed, comma-separated: jax, torch (eager), "
                        "torch-compile.", FLAGS)
_flags.define_integer_list("simulated_devices", [1], "JAX runs on this many simulated host "
                           "devices (scaling); several separated by commas.", FLAGS)
flags.DEFINE_integer("width", 64, "ResNet width (64 = ResNet-18).", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("sampler_chunk_size", None, "JAX: the sampler perturbs N examples per "
                     "device at a time (0 = the whole batch; default: the config's choice "
                     "for the platform, 32 on a CPU, 0 on a GPU).", lower_bound=0,
                     flag_values=FLAGS)
_flags.define_enum_list("precision", ["float32"], runner.PRECISIONS,
                        "Compute dtype(s) of every framework, comma-separated: float32, "
                        "bfloat16 (dale_jax's model.dtype; torch.autocast); several run "
                        "interleaved in one run.", FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the weights and the synthetic batch (autoattack: "
                     "--arch's initial weights and the synthetic points).",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("profile", 0, "Also list the N most expensive XLA ops of the JAX "
                     "step (0: none).", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_bool("json", False, "One JSON object per line and framework instead of a "
                  "table.", flag_values=FLAGS)


def parse_args(argv=None) -> flags.FlagValues:
  """The flags of ``argv`` (without the program name); bad ones exit 2 in one line."""
  _flags.parse(PROG, FLAGS, argv, description=__doc__, renamed=RENAMED)
  return FLAGS


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
  if (args.workdir is None) == (args.arch is None):
    _flags.fail(PROG, "--task=autoattack needs one of --workdir (a finished dale-train run) and "
                "--arch (with --torch_checkpoint, or its initial weights from --seed)"
                + (", not both" if args.workdir else ""))
  if args.workdir is not None:
    if not rundir.has_config(args.workdir):
      _flags.fail(PROG, f"--task=autoattack needs --workdir of a finished dale-train run, "
                  f"got {args.workdir!r}")
    for name in ("torch_checkpoint", "normalize"):
      if FLAGS[name].present:
        _flags.fail(PROG, f"--{name} goes with --arch: a run's model is its config's")
  else:
    if args.torch_checkpoint is not None and not os.path.isfile(args.torch_checkpoint):
      _flags.fail(PROG, f"--torch_checkpoint: {args.torch_checkpoint} does not exist")
    if args.dataset is None:
      _flags.fail(PROG, "--arch needs --dataset: a dataset, an .npz of points or synthetic")
  if args.dataset not in (None, "synthetic", *_dataset_names()) and not os.path.isfile(
      args.dataset):
    _flags.fail(PROG, f"--dataset: {args.dataset} is neither a dataset "
                f"({', '.join(_dataset_names())}), synthetic nor a file")
  if len(args.batch_size) != 1:
    _flags.fail(PROG, f"--batch_size={','.join(map(str, args.batch_size))}: --task=autoattack "
                "takes one batch size")
  if args.eps is None and args.norm not in (None, "linf") and args.workdir is None:
    _flags.fail(PROG, f"--eps is required with --norm={args.norm}: the datasets' default "
                "radius is for linf")
  from dale_jax import validation  # pylint: disable=import-outside-toplevel
  from dale_jax.bench import autoattack  # pylint: disable=import-outside-toplevel

  batch_size = args.batch_size[0]
  budgets = {name: getattr(args, name) for name in ("apgd_steps", "fab_steps", "square_queries")
             if getattr(args, name) is not None}
  try:
    setup = autoattack.prepare(
        workdir=args.workdir, arch=args.arch, torch_checkpoint=args.torch_checkpoint,
        normalize=args.normalize, seed=args.seed, dataset=args.dataset,
        n_examples=args.n_examples, batch_size=batch_size, norm=args.norm, eps=args.eps)
    lines = autoattack.describe(setup, batch_size=batch_size, budgets=budgets,
                                individual=args.individual)
    if args.json:
      print(json.dumps({"setup": {**setup.info, "norm": setup.norm, "eps": setup.eps,
                                  "budgets": {**autoattack.BUDGETS, **budgets},
                                  "individual": args.individual}}), flush=True)
    else:
      print("\n".join(lines), flush=True)
    rows = []
    for precision in args.precision:
      rows += autoattack.compare(setup, batch_size=batch_size, repeats=args.repeats,
                                 precision=precision, budgets=budgets,
                                 individual=args.individual, log=log)
  except (validation.BadInput, ValueError) as e:  # a framework's RuntimeError keeps its traceback
    _flags.fail(PROG, e)
  for row in rows:
    if args.json:
      print(json.dumps(row), flush=True)
  if not args.json:
    print()
    print(autoattack.format_table(rows))
  return rows


def _dataset_names() -> tuple[str, ...]:
  from dale_jax import data  # pylint: disable=import-outside-toplevel
  return tuple(data.DATASETS)


def main(argv=None) -> list[dict]:
  """Parses ``argv`` (without the program name), times, prints; returns the rows.

  Bad input is one line ``dale-bench: error: ...`` and exit status 2 before any worker
  starts."""
  args = parse_args(argv)
  log = lambda message: print(message, file=sys.stderr, flush=True)
  if args.task == "autoattack":
    return _autoattack(args, log)
  for batch_size in args.batch_size:
    for devices in args.simulated_devices:
      if batch_size % devices and "jax" in args.frameworks:
        _flags.fail(PROG, f"--batch_size={batch_size} must be divisible by every "
                    f"--simulated_devices, got {devices}")
  results = []
  for batch_size in args.batch_size:
    for frameworks, devices in _settings(args.frameworks, args.simulated_devices):
      options = runner.Options(
          algorithm=args.algorithm, model=args.model, batch_size=batch_size, steps=args.steps,
          repeats=args.repeats, warmup=args.warmup, devices=devices, width=args.width,
          sampler_chunk=args.sampler_chunk_size, seed=args.seed)
      try:
        rows = runner.run(options, frameworks, profile_top=args.profile,
                          precisions=args.precision, log=log)
      except (ValueError, RuntimeError) as e:
        _flags.fail(PROG, e)
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
  _errors.run_main(main)


if __name__ == "__main__":
  run()
