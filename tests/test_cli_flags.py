"""One command-line contract for the console scripts that run ``main(argv)``: dale-sweep,
dale-collect, dale-plot, dale-bench, the results pages (experiments/paper/*.py),
``python -m dale_jax.cli.export_torch`` and experiments/fidelity/advbench_digits.py.

Every bad flag value is one line ``<prog>: error: ...`` on stderr naming the flag, exit
status 2, and nothing written; ``--help`` exits 0 and lists the script's own flags, each
with its help text, before any of absl's. Everything runs in this process: each script
keeps its flags in a ``FlagValues`` of its own, so the scripts and repeated calls do not
meet (dale-train and dale-eval, on absl's global flags, are tested in
tests/test_validation.py through a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from dale_jax import configs
from dale_jax.cli import bench
from dale_jax.cli import collect
from dale_jax.cli import export_torch
from dale_jax.cli import paper as paper_cli
from dale_jax.cli import plot
from dale_jax.cli import sweep

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_DIGITS = _load(_ROOT / "experiments" / "paper" / "digits.py", "paper_digits_flags")
_ADVBENCH = _load(_ROOT / "experiments" / "fidelity" / "advbench_digits.py",
                  "advbench_digits_flags")
_PAPER_PROG = "experiments/paper/digits.py"


def _paper_main(doc):
  return lambda argv: paper_cli.main(_DIGITS.EXPERIMENT, doc, argv)


# Each script: (prog, main(argv) given the test's folder, the flags of a good call).
# {out} is a folder that must not appear, {inp} an empty folder, {run} a folder with a
# dale-train config.json, {tmp} the test's folder.
_SCRIPTS = {
    "sweep": ("dale-sweep", lambda tmp: sweep.main,
              ["--algorithms=ERM", "--datasets=quickstart", "--output_dir={out}", "--dry_run"]),
    "collect": ("dale-collect", lambda tmp: collect.main, ["--input_dir={inp}"]),
    "plot": ("dale-plot", lambda tmp: plot.main, ["--input_dir={inp}", "--out_dir={out}"]),
    "bench": ("dale-bench", lambda tmp: bench.main, ["--frameworks=jax"]),
    "paper": (_PAPER_PROG, lambda tmp: _paper_main(str(tmp / "out.md")),
              ["--output_dir={out}"]),
    "export_torch": ("python -m dale_jax.cli.export_torch", lambda tmp: export_torch.main,
                     ["--workdir={run}", "--out={out}/model.pt"]),
    "advbench": ("experiments/fidelity/advbench_digits.py", lambda tmp: _ADVBENCH.main,
                 ["--advbench={inp}", "--algorithms=PGD", "--output_dir={out}"]),
}

# (script, flags added to (or replacing, by name) the good call's, what the line names).
_BAD = [
    ("sweep", ["--n_trials=0"], "--n_trials=0: 0 is not a positive integer"),
    ("sweep", ["--n_hparams=-1"], "--n_hparams=-1"),
    ("sweep", ["--n_workers=0"], "--n_workers=0"),
    ("sweep", ["--num_epochs=0"], "--num_epochs=0"),
    ("sweep", ["--n_trials=two"], "--n_trials=two"),
    ("sweep", ["--slurm_time_min=0"], "--slurm_time_min=0"),
    ("sweep", ["--slurm_nodes=0"], "--slurm_nodes=0"),
    ("sweep", ["--slurm_tasks_per_node=0"], "--slurm_tasks_per_node=0"),
    ("sweep", ["--slurm_gpus_per_node=-1"], "--slurm_gpus_per_node=-1"),
    ("sweep", ["--slurm_cpus_per_task=0"], "--slurm_cpus_per_task=0"),
    ("sweep", ["--slurm_mem_gb=-1"], "--slurm_mem_gb=-1"),
    ("sweep", ["--slurm_array_parallelism=0"], "--slurm_array_parallelism=0"),
    ("sweep", ["--launcher=k8s"], "--launcher=k8s"),
    ("sweep", ["--n_workers=2", "--device_ids=0"], "--device_ids=0"),
    ("sweep", ["--devices=0,1"], "--devices is now --device_ids"),
    ("sweep", ["--no-resume_incomplete"], "--no-resume_incomplete is now --noresume_incomplete"),
    ("sweep", ["--dry_run=maybe"], "--dry_run=maybe: expected true or false"),
    ("sweep", ["--algorithms=ERM,ERM"], "--algorithms=ERM,ERM: expected distinct names"),
    ("sweep", ["--algorithms=ERM,Oracle"], "--algorithms=ERM,Oracle: algorithm must be one of"),
    ("sweep", ["--algorithms=PGD", "--config.sampler.eps=8"],
     "config.sampler.eps is 8, an Linf radius"),
    ("sweep", ["--config.seed=3"], "--config.seed"),
    ("sweep", ["quickstart"], "unexpected arguments ['quickstart']"),
    ("sweep", ["--output_dir="], "--output_dir is required"),
    ("sweep", ["--algorithms="], "--algorithms="),
    ("collect", ["--decimals=-1"], "--decimals=-1"),
    ("collect", ["--decimals=11"], "--decimals=11"),
    ("collect", ["--precision=2"], "--precision is now --decimals"),
    ("collect", ["--split=train"], "--split=train"),
    ("collect", ["--selection=Oracle"], "--selection=Oracle"),
    ("collect", ["--plot_selection=LastStep,EarlyStop"], "--plot_selection=LastStep,EarlyStop"),
    ("collect", ["--format=html"], "--format=html"),
    ("collect", ["--algorithms=PGD,PGD"], "--algorithms=PGD,PGD"),
    ("collect", [], "--input_dir="),  # no finished runs
    ("collect", ["--input_dir={tmp}/nowhere"], "--input_dir={tmp}/nowhere: is not a directory"),
    ("plot", ["--input_dir={tmp}/nowhere"], "--input_dir={tmp}/nowhere: is not a directory"),
    ("plot", ["--plot_selection=Oracle"], "--plot_selection=Oracle"),
    ("plot", ["--selection=EarlyStop"], "--selection is now --plot_selection"),
    ("plot", ["--split=Train"], "--split=Train"),
    ("plot", [], "--input_dir="),  # no finished runs
    ("bench", ["--steps=0"], "--steps=0: 0 is not a positive integer"),
    ("bench", ["--repeats=0"], "--repeats=0"),
    ("bench", ["--warmup=-1"], "--warmup=-1: -1 is not a non-negative integer"),
    ("bench", ["--width=0"], "--width=0"),
    ("bench", ["--steps=1.5"], "--steps=1.5"),
    ("bench", ["--n_examples=0"], "--n_examples=0"),
    ("bench", ["--seed=-1"], "--seed=-1"),
    ("bench", ["--profile=-1"], "--profile=-1"),
    ("bench", ["--sampler_chunk_size=-1"], "--sampler_chunk_size=-1"),
    ("bench", ["--batch_size=0"], "--batch_size=0: expected distinct integers >= 1"),
    ("bench", ["--batch_size=64,64"], "--batch_size=64,64"),
    ("bench", ["--simulated_devices=0"], "--simulated_devices=0"),
    ("bench", ["--simulated_devices=3", "--batch_size=64"],
     "--batch_size=64 must be divisible by every --simulated_devices, got 3"),
    ("bench", ["--frameworks=both"], "--frameworks=both: expected distinct names from jax, "
     "torch, torch-compile"),
    ("bench", ["--framework=both"], "--framework is now --frameworks"),
    ("bench", ["--batch-size=64"], "--batch-size is now --batch_size"),
    ("bench", ["--devices=2"], "--devices is now --simulated_devices"),
    ("bench", ["--precision=float16"], "--precision=float16"),
    ("bench", ["--algorithm=MART"], "--algorithm=MART"),
    ("bench", ["--model=vgg"], "--model=vgg"),
    ("bench", ["--task=train"], "--task=train"),
    ("bench", ["--task=autoattack", "--workdir={out}"], "--workdir of a finished dale-train"),
    ("bench", ["--task=autoattack", "--arch=resnet50"], "--arch=resnet50: value should be one "
     "of <mnist_cnn|resnet18|preact_resnet18|wrn28_10|wrn34_10>"),
    ("bench", ["--normalize=imagenet"], "--normalize=imagenet"),
    ("bench", ["--norm=l1"], "--norm=l1"),
    ("bench", ["--eps=-0.1"], "--eps=-0.1"),
    ("bench", ["--apgd_steps=0"], "--apgd_steps=0"),
    ("bench", ["--fab_steps=0"], "--fab_steps=0"),
    ("bench", ["--square_queries=0"], "--square_queries=0"),
    ("bench", ["--task=autoattack", "--dataset=synthetic"], "needs one of --workdir (a finished "
     "dale-train run) and --arch"),
    ("bench", ["--task=autoattack", "--arch=resnet18", "--workdir={run}"], "--arch (with "
     "--torch_checkpoint, or its initial weights from --seed), not both"),
    ("bench", ["--task=autoattack", "--arch=resnet18"], "--arch needs --dataset: a dataset, an "
     ".npz of points or synthetic"),
    ("bench", ["--task=autoattack", "--arch=resnet18", "--dataset=synthetic",
               "--torch_checkpoint={tmp}/missing.pt"], "--torch_checkpoint: {tmp}/missing.pt "
     "does not exist"),
    ("bench", ["--task=autoattack", "--arch=resnet18", "--dataset={tmp}/points.npz"],
     "--dataset: {tmp}/points.npz is neither a dataset (mnist_digits, mnist, cifar10, svhn), "
     "synthetic nor a file"),
    ("bench", ["--task=autoattack", "--workdir={run}", "--normalize=cifar10"],
     "--normalize goes with --arch: a run's model is its config's"),
    ("bench", ["--task=autoattack", "--arch=resnet18", "--dataset=synthetic", "--norm=l2"],
     "--eps is required with --norm=l2"),
    ("bench", ["--task=autoattack", "--arch=resnet18", "--dataset=synthetic",
               "--batch_size=8,16"], "--batch_size=8,16: --task=autoattack takes one batch size"),
    ("bench", ["--task=autoattack", "--arch=mnist_cnn", "--dataset=synthetic",
               "--normalize=cifar10"], "normalize=cifar10 is for 3 channels; arch=mnist_cnn "
     "takes 1"),
    ("paper", ["--seeds=0"], "--seeds=0"),
    ("paper", ["--aa_examples=-1"], "--aa_examples=-1"),
    ("paper", ["--test_examples=-1"], "--test_examples=-1"),
    ("paper", ["--batch_size=0"], "--batch_size=0"),
    ("paper", ["--apgd_steps=0"], "--apgd_steps=0"),
    ("paper", ["--square_queries=0"], "--square_queries=0"),
    ("paper", ["--n_workers=0"], "--n_workers=0"),
    ("paper", ["--stages=deploy"], "--stages=deploy"),
    ("paper", ["--algorithms=ERM,ERM"], "--algorithms=ERM,ERM"),
    ("paper", ["--seed=3"], "Unknown command line flag 'seed'"),
    ("paper", ["--algorithms=PGD", "--config.sampler.eps=8"], "config.sampler.eps is 8"),
    ("export_torch", ["--workdir={out}"], "--workdir="),
    ("export_torch", ["--out={tmp}/nowhere/model.pt"], "--out="),
    ("export_torch", ["--out={inp}"], "--out="),
    ("export_torch", ["--out="], "--out"),
    ("export_torch", ["--sub_block1=3"], "--sub_block1"),
    ("advbench", ["--seeds=-1"], "--seeds=-1"),
    ("advbench", ["--seeds=1,1"], "--seeds=1,1"),
    ("advbench", ["--num_epochs=0"], "--num_epochs=0"),
    ("advbench", ["--max_train_examples=0"], "--max_train_examples=0"),
    ("advbench", ["--algorithms=,"], "--algorithms=,"),
    ("advbench", ["--output=x"], "--output is now --output_dir"),
    ("advbench", [], "--advbench"),  # {inp} is not an advbench checkout
]


def _argv(good: list[str], bad: list[str], paths: dict) -> list[str]:
  names = {a.split("=")[0] for a in bad}
  argv = [a for a in good if a.split("=")[0] not in names] + bad
  return [a.format(**paths) for a in argv]


def _files(folder: pathlib.Path) -> set:
  return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.mark.parametrize("script,bad,needle", _BAD,
                         ids=[f"{s}{' '.join(b)}" for s, b, _ in _BAD])
def test_bad_flag_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, script,
                                                     bad, needle):
  prog, main, good = _SCRIPTS[script]
  (tmp_path / "inp").mkdir()
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(
      configs.base_config("mnist_digits", "ERM").to_json())
  paths = {"out": tmp_path / "out", "inp": tmp_path / "inp", "run": tmp_path / "run",
           "tmp": tmp_path}
  monkeypatch.chdir(tmp_path)
  before = _files(tmp_path)
  with pytest.raises(SystemExit) as info:
    main(tmp_path)(_argv(good, bad, paths))
  err = capsys.readouterr().err.strip().splitlines()
  assert info.value.code == 2, err
  assert len(err) == 1, err
  assert err[0].startswith(f"{prog}: error: "), err
  assert needle.format(**paths) in err[0], err
  assert _files(tmp_path) == before


_FLAG_VALUES = {
    "sweep": sweep.FLAGS, "collect": collect.FLAGS, "plot": plot.FLAGS, "bench": bench.FLAGS,
    "paper": paper_cli.flag_values(_DIGITS.EXPERIMENT, "docs/results.md"),
    "export_torch": export_torch.FLAGS, "advbench": _ADVBENCH.FLAGS,
}
_ABSL = ("--flagfile", "--undefok", "--verbosity", "--logtostderr", "--helpfull",
         "--jax_", "--orbax", "--only_check_args")


@pytest.mark.parametrize("script", sorted(_SCRIPTS))
@pytest.mark.parametrize("spelling", ["--help", "-h"])
def test_help_exits_0_with_the_scripts_own_flags_first(tmp_path, capsys, script, spelling):
  prog, main, _ = _SCRIPTS[script]
  with pytest.raises(SystemExit) as info:
    main(tmp_path)([spelling])
  assert info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: {prog} ")
  names = [name for name in _FLAG_VALUES[script]]
  assert names
  first_absl = min((out.index(a) for a in _ABSL if a in out), default=len(out))
  for name in names:
    flag = _FLAG_VALUES[script][name]
    assert len(flag.help.strip()) > 10, name  # every flag says what it is
    shown = f"  --[no]{name}: " if flag.boolean else f"  --{name}: "
    assert shown in out, (name, out)
    assert out.index(shown) < first_absl, name
  assert not (tmp_path / "out").exists()


def test_flag_names_use_underscores_and_each_concept_one_name():
  for script, flag_values in _FLAG_VALUES.items():
    for name in flag_values:
      assert "-" not in name, (script, name)
  # One name, one meaning: the counts of simulated devices and the ids of real ones,
  # dtypes and decimals, a list of selection methods and the plots' one.
  assert "simulated_devices" in bench.FLAGS and "devices" not in bench.FLAGS
  assert "device_ids" in sweep.FLAGS and "devices" not in sweep.FLAGS
  assert "decimals" in collect.FLAGS and "precision" not in collect.FLAGS
  assert "selection" not in plot.FLAGS
  assert plot.FLAGS["plot_selection"].help == collect.FLAGS["plot_selection"].help


def test_main_starts_from_the_defaults_every_call(tmp_path, capsys):
  argv = ["--algorithms=ERM", "--datasets=quickstart", f"--output_dir={tmp_path / 'out'}"]
  assert sweep.main([*argv, "--n_trials=1", "--dry_run"]) == 0
  assert sweep.main([*argv, "--dry_run"]) == 0  # n_trials back to its default 3
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("# 1 runs") and lines[2].startswith("# 3 runs")


def test_splits_are_lowercase_and_map_to_the_record_keys(tmp_path):
  run = tmp_path / "quickstart" / "ERM" / "h0_t0"
  run.mkdir(parents=True)
  record = {"Epoch": 0, "Step": 1, "hparams": {}, "Train": {"loss": 1.0},
            "Test": {"Clean-Accuracy": 60.0}, "Validation": {"Clean-Accuracy": 50.0}}
  (run / "results.jsonl").write_text(json.dumps(record) + "\n")
  (run / "done").write_text("")
  assert collect.split_key("test") == "Test" and collect.split_key("Validation") == "Validation"
  collect.main([f"--input_dir={tmp_path}", "--split=validation", "--selection=LastStep",
                "--format=markdown", "--decimals=2"])
  table = (tmp_path / "results.md").read_text()
  assert "50.00" in table and "60.00" not in table



@pytest.mark.parametrize("command,module,names", [
    ("dale-train", "dale_jax.cli.train", ("config", "workdir", "print_config")),
    ("dale-eval", "dale_jax.cli.evaluate",
     ("workdir", "torch_checkpoint", "attacks", "version", "n_examples", "batch_size")),
])
def test_train_and_eval_help_show_their_own_flags_and_exit_0(command, module, names):
  # These two parse with absl's global flags (ml_collections' --config.<field> needs
  # them); --help shows the command's own flags, each with its help, before anything else.
  proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert out.startswith(f"usage: {command} "), out[:200]
  flags_at = out.index("\nflags:\n")
  for name in names:
    shown = [f"  --{name}: ", f"  --[no]{name}: "]
    assert any(s in out[flags_at:] for s in shown), (name, out)
  for absl_flag in ("--flagfile", "--verbosity", "--logtostderr", "--undefok"):
    assert absl_flag not in out  # the libraries' flags: --helpfull
  assert "--helpfull" in out
