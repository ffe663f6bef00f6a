"""advbench's own algorithms on the built-in digits, measured by dale_jax's evaluators.

Run::

  git clone https://github.com/arobey1/advbench /tmp/advbench  # written against bd2071d
  python experiments/fidelity/advbench_digits.py --advbench=/tmp/advbench \\
      --algorithms=ERM,PGD,TRADES,MART,Gaussian_DALE_PD --seeds=0,1 \\
      --output_dir=runs/fidelity/advbench

The authors' PyTorch code is not part of dale_jax: it is imported from the local
checkout given by ``--advbench``. For each (algorithm, seed) the script trains
advbench's class (``advbench.algorithms.<NAME>``) in the setting of
``dale-train --config=quickstart:<NAME>``: the same 4,000
training digits (:func:`dale_jax.data.load`), advbench's MNIST default
hyperparameters with the quickstart's learning rate, batch size, epochs and
schedule (read from the quickstart config), shuffled batches with the last
incomplete one dropped, as dale_jax batches. It then converts the trained network
to dale_jax's ``MnistCNN`` (:mod:`dale_jax.bench.torch_reference`), checks that
the two compute the same outputs, and measures clean, PGD-10 and FGSM accuracy
on the 1,000 test digits with dale_jax's evaluators
(:func:`dale_jax.steps.make_eval_step`), the code that measures dale_jax's own
runs, so that both implementations face the very same attacks.

Each run appends one JSON line to ``<output_dir>/results.jsonl``: the test results
under ``Test`` (dale_jax's keys, e.g. ``PGD-Accuracy`` in percent), advbench's
epoch meters, the training time, whether training diverged, the hyperparameters,
advbench's commit and the machine. Rerunning skips the (algorithm, seed) pairs
already in the file; a file written in another setting (epochs, training
examples, advbench commit, ...) is refused rather than mixed with.
``--max_train_examples`` and ``--num_epochs`` shorten a run for a smoke test.
``--start=dale_jax`` trains from ``dale-train``'s initial weights and batch order
of the seed; ``--torch_seed_offset`` then reseeds only torch's own draws (dropout,
the attacks' random starts), which measures the spread those draws give.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
from typing import Any, NoReturn, Sequence

from absl import flags

from dale_jax import configs
from dale_jax import validation
from dale_jax.cli import _flags as _cli_flags

PROG = "experiments/fidelity/advbench_digits.py"
_QUICKSTART = os.path.join(configs.CONFIG_DIR, "quickstart.py")
# advbench's files that this script imports (directly or through its imports).
_ADVBENCH_FILES = ("algorithms.py", "attacks.py", "hparams_registry.py", "networks.py",
                   "optimizers.py", "datasets.py")
# Test digits on which the converted model must reproduce advbench's outputs.
_CHECK_EXAMPLES = 8
_CHECK_ATOL = 1e-4
_RESULTS = "results.jsonl"


# ----------------------------------------------------------------------------
# Flags.

FLAGS = flags.FlagValues()
flags.DEFINE_string("advbench", None, "A local checkout of advbench (the folder that holds "
                    "advbench/).", flag_values=FLAGS)
_cli_flags.define_name_list("algorithms", None, "Comma-separated names from advbench's "
                            "algorithms.ALGORITHMS (or MART, a class of algorithms.py that "
                            "the list leaves out).", FLAGS)
_cli_flags.define_integer_list("seeds", [0, 1], "Comma-separated seeds, each a run per "
                               "algorithm.", FLAGS, minimum=0)
flags.DEFINE_string("output_dir", "runs/fidelity/advbench", f"Folder of {_RESULTS}, one "
                    "JSON line per run.", flag_values=FLAGS)
flags.DEFINE_integer("max_train_examples", None, "Train on the first N training digits "
                     "(default: all 4,000).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("num_epochs", None, "Epochs (default: the quickstart config's).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("start", "advbench", ["advbench", "dale_jax"],
                  "advbench: torch's initial weights and DataLoader order for the seed; "
                  "dale_jax: the initial weights and batch order of dale-train's run with "
                  "the same seed, so that only the attacks' and dropout's draws differ.",
                  flag_values=FLAGS)
flags.DEFINE_integer("torch_seed_offset", 0, "Seeds torch with the run's seed plus this "
                     "(its own draws: dropout and the attacks' random starts, and with "
                     "--start=advbench the initial weights and batch order). With "
                     "--start=dale_jax another value measures how far those draws alone "
                     "move a run.", lower_bound=0, flag_values=FLAGS)
_cli_flags.mark_required(["advbench", "algorithms"], FLAGS)


def _refuse(message: object) -> NoReturn:
  _cli_flags.fail(PROG, message)


def parse_args(argv: Sequence[str] | None = None) -> flags.FlagValues:
  """The flags of ``argv`` (without the program name); bad ones exit 2 in one line."""
  _cli_flags.parse(PROG, FLAGS, argv, description=__doc__,
                   renamed={"output": "--output_dir"})
  return FLAGS


# ----------------------------------------------------------------------------
# advbench, imported from the checkout.


class _Stubbed:
  """Stands for a name of the stubbed torchvision; using it raises."""

  def __init__(self, name: str):
    self._name = name

  def __call__(self, *args, **kwargs):
    raise ImportError(f"{self._name}: torchvision is stubbed out by {PROG}")

  def __getattr__(self, attr: str) -> "_Stubbed":
    return _stubbed_attribute(self._name, attr)


def _stubbed_attribute(owner: str, attr: str) -> _Stubbed:
  if attr.startswith("__"):  # what introspection asks (__file__, __path__, ...) is absent
    raise AttributeError(f"{owner}.{attr}")
  return _Stubbed(f"{owner}.{attr}")


def _stub_torchvision() -> None:
  """Puts placeholder ``torchvision`` modules into ``sys.modules``.

  advbench's networks.py imports ``torchvision.models`` (for a ResNet it does not
  use) and its datasets.py, imported by hparams_registry.py, imports
  ``torchvision.transforms`` and ``torchvision.datasets``; the MNIST network and
  everything this script calls are plain torch. torchvision itself is not
  installed: pip would pull a CUDA build of several GB. The placeholders raise if
  anything is called through them.
  """
  if "torchvision" in sys.modules:
    return
  root = types.ModuleType("torchvision")
  for name in ("models", "transforms", "datasets"):
    module = types.ModuleType(f"torchvision.{name}")
    module.__getattr__ = lambda attr, _n=module.__name__: _stubbed_attribute(_n, attr)
    setattr(root, name, module)
    sys.modules[module.__name__] = module
  sys.modules["torchvision"] = root


def _cpu_dual_relu(x):
  import torch  # pylint: disable=import-outside-toplevel
  return x if x > 0 else torch.tensor(0)


class Advbench(types.SimpleNamespace):
  """advbench's modules (``algorithms``, ``hparams_registry``), its commit and patches."""


def load_advbench(checkout: str) -> Advbench:
  """Imports advbench from ``checkout``, refusing a folder that is not an advbench checkout.

  Raises:
    validation.InvalidArgument: naming ``--advbench``.
  """
  root = os.path.abspath(checkout)
  package = os.path.join(root, "advbench")
  missing = [f for f in _ADVBENCH_FILES if not os.path.isfile(os.path.join(package, f))]
  if missing:
    raise validation.InvalidArgument(
        "--advbench", rest=f"must be a checkout of advbench (a folder holding "
        f"advbench/{_ADVBENCH_FILES[0]} ...), got {checkout!r}, which has no "
        f"advbench/{missing[0]}")
  _stub_torchvision()
  sys.path.insert(0, root)
  try:
    modules = {name: importlib.import_module(f"advbench.{name}")
               for name in ("algorithms", "hparams_registry", "optimizers")}
  except ImportError as e:
    raise validation.InvalidArgument("--advbench", rest=f"{checkout!r} does not import: {e}")
  where = os.path.dirname(os.path.realpath(modules["algorithms"].__file__))
  if where != os.path.realpath(package):
    raise validation.InvalidArgument(
        "--advbench", rest=f"{checkout!r} is shadowed: advbench was imported from {where}")
  # Once the dual variable would go below 0, advbench's dual update returns
  # torch.tensor(0).cuda(): an error without a GPU, a tensor on the wrong device with
  # one (this script trains on the CPU). The same zero, on the CPU:
  modules["optimizers"].PrimalDualOptimizer.relu = staticmethod(_cpu_dual_relu)
  patches = ["optimizers.PrimalDualOptimizer.relu: torch.tensor(0) in place of "
             "torch.tensor(0).cuda()"]
  commit, dirty = _git_commit(root)
  return Advbench(root=root, commit=commit, dirty=dirty, patches=patches, **modules)


def _git_commit(root: str) -> tuple[str, bool | None]:
  """``(HEAD commit, has uncommitted changes)`` if ``root`` is a git work tree's top."""
  def git(*args):
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                          check=True).stdout.strip()

  try:
    if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
      return "unknown", None  # a folder inside another repository
    return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.CalledProcessError):
    return "unknown", None


def accepted_algorithms(advbench: Advbench) -> list[str]:
  """``algorithms.ALGORITHMS``, then the other trainable classes of algorithms.py.

  advbench's train.py finds a class by name in the module (``vars(algorithms)``),
  so a class that defines ``step`` trains even when the list leaves it out (MART).
  """
  module = advbench.algorithms
  listed = list(module.ALGORITHMS)
  base = module.Algorithm
  others = sorted(name for name, obj in vars(module).items()
                  if isinstance(obj, type) and issubclass(obj, base) and name not in listed
                  and obj.step is not base.step)
  return listed + others


def check_algorithms(names: Sequence[str], advbench: Advbench) -> None:
  accepted = accepted_algorithms(advbench)
  listed = list(advbench.algorithms.ALGORITHMS)
  others = [n for n in accepted if n not in listed]
  for name in names:
    if name not in accepted:
      raise validation.InvalidArgument(
          "--algorithms", rest=f"must name advbench's algorithms (algorithms.ALGORITHMS: "
          f"{', '.join(listed)}" + (f"; and {', '.join(others)}, which the list leaves out"
                                    if others else "") + f"), got {name!r}")


# ----------------------------------------------------------------------------
# The setting: the quickstart config.


def quickstart_config(algorithm: str):
  spec = importlib.util.spec_from_file_location("quickstart", _QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(algorithm)


def advbench_hparams(advbench: Advbench, algorithm: str, config) -> dict[str, Any]:
  """advbench's MNIST defaults with the quickstart's learning rate and batch size.

  Raises ``ValueError`` where advbench's other optimizer or evaluation defaults no
  longer match the config's: the two sides would then train or attack differently.
  """
  hparams = dict(advbench.hparams_registry.default_hparams(algorithm, "MNIST"))
  hparams["learning_rate"] = float(config.optimizer.learning_rate)
  hparams["batch_size"] = int(config.batch_size)
  test = advbench.hparams_registry.test_hparams(algorithm, "MNIST")
  pairs = (("sgd_momentum", hparams["sgd_momentum"], config.optimizer.momentum),
           ("weight_decay", hparams["weight_decay"], config.optimizer.weight_decay),
           ("test epsilon", test["epsilon"], config.eval.eps),
           ("test pgd_n_steps", test["pgd_n_steps"], config.eval.pgd_steps),
           ("test pgd_step_size", test["pgd_step_size"], config.eval.pgd_step_size))
  for name, theirs, ours in pairs:
    if not math.isclose(theirs, ours):
      raise ValueError(f"advbench's {name} is {theirs}, the quickstart config's {ours}")
  return hparams


def learning_rate(config, epoch: int) -> float:
  """``lr * scales[i]`` from epoch ``boundaries[i]`` on, as dale_jax's schedule."""
  lr = float(config.optimizer.learning_rate)
  for boundary, scale in zip(config.schedule.boundaries, config.schedule.scales):
    if epoch >= boundary:
      lr = float(config.optimizer.learning_rate) * scale
  return lr


# ----------------------------------------------------------------------------
# Training advbench's class, as its scripts/train.py does.


def _finite(value: float) -> float | None:
  return float(value) if math.isfinite(value) else None


def train_advbench(advbench: Advbench, algorithm: str, hparams: dict, config, x, y, *,
                   num_classes: int, seed: int, num_epochs: int,
                   start: str = "advbench", torch_seed_offset: int = 0) -> dict[str, Any]:
  """Trains ``advbench.algorithms.<algorithm>`` on NHWC ``x`` and labels ``y``.

  As advbench's train.py: the algorithm in train mode, the learning rate of every
  parameter group set at the start of each epoch, ``step(imgs, labels)`` per
  shuffled batch, the meters' epoch averages recorded and reset after each epoch.
  Unlike train.py (which always seeds 0 and keeps the last incomplete batch) the
  torch seed is ``seed`` and the last incomplete batch is dropped, as in dale_jax.
  Training stops at the first step whose meters are not finite.

  ``start="dale_jax"`` replaces torch's initial weights by those of ``dale-train``'s
  run of ``config`` with this seed and the DataLoader's order by dale_jax's batches
  (:func:`dale_jax.data.batches`): the two implementations then differ only in the
  draws of the attacks and of dropout, which ``torch_seed_offset`` reseeds (torch is
  seeded with ``seed + torch_seed_offset``).

  Returns:
    ``{"algorithm": the trained object, "epochs": [...], "seconds": training time,
    "diverged_at": None or {"epoch", "step", "non_finite": meter names},
    "non_finite_weights": names of the state dict's non-finite tensors}``.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from torch.utils.data import DataLoader, TensorDataset  # pylint: disable=import-outside-toplevel
  from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel

  torch_seed = seed + torch_seed_offset
  torch.manual_seed(torch_seed)
  h, w, c = x.shape[1:]
  model = getattr(advbench.algorithms, algorithm)(
      input_shape=(c, h, w), num_classes=num_classes, hparams=hparams, device="cpu")
  dataset = TensorDataset(torch_reference.to_nchw(x), torch.from_numpy(y.astype("int64")))
  loader = DataLoader(dataset, batch_size=hparams["batch_size"], shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(torch_seed))
  if start == "dale_jax":
    # advbench's MNISTNet has torch_reference.MnistCNN's layers under the same names.
    reference = torch_reference.MnistCNN(num_classes=num_classes)
    with torch.no_grad():
      torch_reference.load_flax_variables(reference, dale_initial_variables(config, seed))
    model.classifier.load_state_dict(reference.state_dict())
    loader = _DaleBatches(x, y, int(hparams["batch_size"]), seed)
  epochs, diverged_at = [], None
  start = time.perf_counter()
  for epoch in range(num_epochs):
    epoch_start = time.perf_counter()
    lr = learning_rate(config, epoch)
    for group in model.optimizer.param_groups:
      group["lr"] = lr
    model.train()
    if isinstance(loader, _DaleBatches):
      loader.epoch = epoch
    for step, (imgs, labels) in enumerate(loader):
      model.step(imgs, labels)
      bad = [k for k, m in model.meters.items() if not math.isfinite(m.val)]
      if bad:
        diverged_at = {"epoch": epoch, "step": step, "non_finite": bad}
        break
    epochs.append({"epoch": epoch, "learning_rate": lr,
                   "seconds": time.perf_counter() - epoch_start,
                   "meters": {k: _finite(m.avg) for k, m in model.meters.items()}})
    model.reset_meters()
    if diverged_at:
      break
  seconds = time.perf_counter() - start
  bad = [k for k, v in model.classifier.state_dict().items()
         if v.is_floating_point() and not torch.isfinite(v).all()]
  if bad and not diverged_at:
    diverged_at = {"epoch": len(epochs) - 1, "step": None, "non_finite": bad}
  return {"algorithm": model, "epochs": epochs, "seconds": seconds, "diverged_at": diverged_at,
          "non_finite_weights": bad}


def dale_initial_variables(config, seed: int) -> dict:
  """The initial ``{"params": ...}`` of ``dale-train``'s run of ``config`` with ``seed``."""
  import jax  # pylint: disable=import-outside-toplevel
  from dale_jax import experiment  # pylint: disable=import-outside-toplevel

  config = config.copy_and_resolve_references()
  config.seed = seed
  built = experiment.build(config, num_classes=10)
  state = experiment.init_state(built, jax.random.key(seed), (28, 28, 1))
  return {"params": jax.device_get(state.params)}


class _DaleBatches:
  """dale_jax's batches of one epoch (set ``epoch`` first) as NCHW torch tensors."""

  def __init__(self, x, y, batch_size: int, seed: int):
    self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

  def __iter__(self):
    import torch  # pylint: disable=import-outside-toplevel
    from dale_jax import data as data_lib  # pylint: disable=import-outside-toplevel
    from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel

    for bx, by in data_lib.batches(self.x, self.y, self.batch_size, seed=self.seed,
                                   epoch=self.epoch):
      yield torch_reference.to_nchw(bx), torch.from_numpy(by.astype("int64"))


# ----------------------------------------------------------------------------
# Evaluation with dale_jax.


def to_dale_variables(classifier) -> dict:
  """advbench's MNIST network as dale_jax ``MnistCNN`` variables ``{"params": ...}``.

  advbench's ``MNISTNet`` and ``torch_reference.MnistCNN`` have the same layers
  under the same names, so the state dict loads as it is.
  """
  from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel

  reference = torch_reference.MnistCNN(num_classes=classifier.fc2.out_features)
  reference.load_state_dict(classifier.state_dict())
  return {"params": torch_reference.flax_variables(reference)["params"]}


def conversion_error(classifier, variables: dict, model, x) -> float:
  """``max |log_softmax(dale_jax model(x)) - advbench's output(x)|`` in eval mode.

  advbench's MNIST network returns log-probabilities, dale_jax's ``MnistCNN``
  logits. ``classifier`` is left in the mode it was in.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from dale_jax.bench import torch_reference  # pylint: disable=import-outside-toplevel

  was_training = classifier.training
  classifier.eval()
  with torch.no_grad():
    theirs = classifier(torch_reference.to_nchw(x)).numpy()
  classifier.train(was_training)
  ours = np.asarray(jax.nn.log_softmax(model.apply(variables, x, train=False), axis=-1))
  return float(np.max(np.abs(ours - theirs)))


def check_conversion(classifier, variables: dict, model, x, atol: float = _CHECK_ATOL) -> float:
  """:func:`conversion_error`, raising ``AssertionError`` above ``atol``."""
  error = conversion_error(classifier, variables, model, x)
  if not error <= atol:
    raise AssertionError(f"the converted dale_jax model differs from advbench's network by "
                         f"{error:.3g} > {atol:g} (log-probabilities): the weights did not "
                         "convert")
  return error


# ----------------------------------------------------------------------------
# Records.


def run_setting(advbench: Advbench, config, train_examples: int, test_examples: int,
                start: str = "advbench", torch_seed_offset: int = 0) -> dict:
  """What every line of one results file shares (all but algorithm, seed and hparams)."""
  return {
      **({} if start == "advbench" else {"start": start}),
      **({"torch_seed_offset": torch_seed_offset} if torch_seed_offset else {}),
      "advbench_commit": advbench.commit,
      "dataset": config.dataset,
      "train_examples": train_examples,
      "test_examples": test_examples,
      "num_epochs": int(config.num_epochs),
      "batch_size": int(config.batch_size),
      "learning_rate": float(config.optimizer.learning_rate),
      "schedule": {"boundaries": list(config.schedule.boundaries),
                   "scales": [float(s) for s in config.schedule.scales]},
      "eval": {"evaluators": list(config.eval.evaluators), "norm": config.eval.norm,
               "eps": float(config.eval.eps), "pgd_steps": int(config.eval.pgd_steps),
               "pgd_step_size": float(config.eval.pgd_step_size)},
  }


def finished_runs(path: str, setting: dict) -> set[tuple[str, int]]:
  """The (algorithm, seed) pairs in ``path``; refuses a file written in another setting."""
  done = set()
  if not os.path.exists(path):
    return done
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        key = (record["algorithm"], record["seed"])
        theirs = record["setting"]
      except (ValueError, KeyError, TypeError):
        raise validation.InvalidArgument(
            "--output_dir", rest=f"holds {path}, whose line {number} is not one of this "
            "script's records: choose another --output_dir") from None
      changed = sorted(k for k in set(setting) | set(theirs) if setting.get(k) != theirs.get(k))
      if changed:
        raise validation.InvalidArgument(
            "--output_dir", rest=f"holds {path}, written in another setting ({changed[0]} "
            f"{theirs.get(changed[0])!r}, now {setting.get(changed[0])!r}): choose "
            "another --output_dir")
      done.add(key)
  return done


def machine() -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel

  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "python": platform.python_version(), "torch": torch.__version__,
          "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------
# Main.


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv``, checks everything, then trains and evaluates the missing runs."""
  args = parse_args(argv)
  try:
    advbench = load_advbench(args.advbench)
    check_algorithms(args.algorithms, advbench)
    settings = {name: quickstart_config(name) for name in args.algorithms}
    for config in settings.values():
      if args.num_epochs:
        config.num_epochs = args.num_epochs
      if args.max_train_examples:
        config.data.max_train_examples = args.max_train_examples
    hparams = {name: advbench_hparams(advbench, name, c) for name, c in settings.items()}
    first = settings[args.algorithms[0]]
    batch_size = int(first.batch_size)
    if args.max_train_examples is not None and args.max_train_examples < batch_size:
      raise validation.InvalidArgument(
          "--max_train_examples", f"at least the batch size {batch_size} (the last incomplete "
          "batch is dropped)", args.max_train_examples)
  except validation.BadInput as e:
    _refuse(e)

  import jax  # pylint: disable=import-outside-toplevel
  from dale_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from dale_jax import parallel  # pylint: disable=import-outside-toplevel
  from dale_jax import experiment  # pylint: disable=import-outside-toplevel
  from dale_jax import steps  # pylint: disable=import-outside-toplevel

  dataset = data_lib.load(first.dataset, data_dir=first.data.data_dir,
                          validation_size=first.data.validation_size)
  x_train, y_train = dataset.train
  if first.data.max_train_examples:
    x_train = x_train[:first.data.max_train_examples]
    y_train = y_train[:first.data.max_train_examples]
  x_test, y_test = dataset.test
  setting = run_setting(advbench, first, len(y_train), len(y_test), args.start,
                        args.torch_seed_offset)
  path = os.path.join(args.output_dir, _RESULTS)
  try:
    for config in settings.values():
      if run_setting(advbench, config, len(y_train), len(y_test), args.start,
                     args.torch_seed_offset) != setting:
        raise validation.InvalidArgument(
            "--algorithms", rest="need quickstart configs that differ only in the algorithm")
    done = finished_runs(path, setting)
  except validation.BadInput as e:
    _refuse(e)
  os.makedirs(args.output_dir, exist_ok=True)

  mesh = parallel.make_mesh()
  built = experiment.build(first, num_classes=dataset.num_classes)
  eval_fn = steps.make_eval_step(built, mesh)
  model = built.eval_model
  host = machine()
  for name in args.algorithms:
    for seed in args.seeds:
      if (name, seed) in done:
        print(f"{name} seed {seed}: in {path}, skipped", flush=True)
        continue
      config = settings[name]
      trained = train_advbench(advbench, name, hparams[name], config, x_train, y_train,
                               num_classes=dataset.num_classes, seed=seed,
                               num_epochs=int(config.num_epochs), start=args.start,
                               torch_seed_offset=args.torch_seed_offset)
      classifier = trained["algorithm"].classifier
      test, error = None, None
      if not trained["non_finite_weights"]:
        variables = to_dale_variables(classifier)
        error = check_conversion(classifier, variables, model, x_test[:_CHECK_EXAMPLES])
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1),
                                 int(config.num_epochs) - 1)
        test = steps.evaluate_split(eval_fn, variables, x_test, y_test, key,
                                    batch_size=config.eval.batch_size, mesh=mesh)
      record = {
          "algorithm": name, "seed": seed, "setting": setting,
          "advbench_dirty": advbench.dirty, "advbench_patches": advbench.patches,
          "hparams": hparams[name], "Test": test, "epochs": trained["epochs"],
          "train_seconds": trained["seconds"],
          "diverged": trained["diverged_at"] is not None,
          "diverged_at": trained["diverged_at"],
          "non_finite_weights": trained["non_finite_weights"],
          "conversion_max_abs_diff": error, "machine": host,
          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      }
      with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
      print(_summary(record), flush=True)
  return 0


def _summary(record: dict) -> str:
  head = f"{record['algorithm']} seed {record['seed']}: "
  tail = f"({record['train_seconds']:.0f} s training)"
  if record["diverged"]:
    tail = f"DIVERGED at {record['diverged_at']} " + tail
  if record["Test"] is None:
    return head + "not evaluated (non-finite weights) " + tail
  t = record["Test"]
  return head + (f"Clean {t['Clean-Accuracy']:.1f}  PGD {t['PGD-Accuracy']:.1f}  "
                 f"FGSM {t['FGSM-Accuracy']:.1f}  ") + tail


if __name__ == "__main__":
  sys.exit(main())
