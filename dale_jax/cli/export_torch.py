"""Writes a finished dale-train run's weights as a PyTorch ``state_dict``.

  python -m dale_jax.cli.export_torch --workdir=runs/x --out=model.pt
  python -m dale_jax.cli.export_torch --workdir=runs/wrn --out=wrn.pt --sub_block1

The keys are those of the PyTorch definition of the run's architecture
(:mod:`dale_jax.models.torch_weights` lists them), so that
``net.load_state_dict(torch.load("model.pt"))`` loads the latest checkpoint's weights
into that network; ``--sub_block1`` adds the copy of ``block1`` that TRADES' and MART's
``WideResNet`` build (and never call). From Python, the same is
``torch_weights.save_torch(variables, arch, path)``. Needs PyTorch.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

from absl import flags
from absl import logging

from dale_jax import rundir
from dale_jax import validation
from dale_jax.cli import _errors
from dale_jax.cli import _flags

PROG = "python -m dale_jax.cli.export_torch"
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a finished dale-train run.",
                               flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "The .pt file to write (its folder must exist).",
                           flag_values=FLAGS)
_SUB_BLOCK1 = flags.DEFINE_boolean(
    "sub_block1", False, "WideResNet only: also write TRADES'/MART's unused sub_block1.",
    flag_values=FLAGS)
_flags.mark_required(["workdir", "out"], FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (without the program name) and writes the state_dict.

  Bad input is one line ``python -m dale_jax.cli.export_torch: error: ...`` and exit
  status 2, and nothing is written."""
  _flags.parse(PROG, FLAGS, argv, description=__doc__)
  with _errors.one_line(PROG):
    return _export(_WORKDIR.value, _OUT.value, _SUB_BLOCK1.value)


def _export(workdir: str, out: str, sub_block1: bool) -> int:
  logging.set_verbosity(logging.WARNING)  # checkpoint restores log at INFO
  if not rundir.has_config(workdir):
    raise validation.InvalidArgument(
        f"--workdir={workdir}: holds no config.json of a dale-train run")
  folder = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(out) or not os.path.isdir(folder):
    raise validation.InvalidArgument(f"--out={out}: must be a file in an existing directory")
  if importlib.util.find_spec("torch") is None:
    raise validation.InvalidArgument(
        "writing a PyTorch state_dict needs PyTorch: pip install dale_jax[torch]")
  from dale_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from dale_jax.models import torch_weights  # pylint: disable=import-outside-toplevel
  model_name = rundir.read_config(workdir).get("model", {}).get("name")
  if sub_block1 and model_name not in torch_weights.WIDE_ARCHS:
    raise validation.InvalidArgument(
        f"--sub_block1: is for a WideResNet ({', '.join(torch_weights.WIDE_ARCHS)}); the "
        f"run's model is {model_name}")
  config, logits_fn, _ = checkpoint.load_trained(workdir)
  arch = str(config.model.name)
  state_dict = torch_weights.save_torch(logits_fn.args[0], arch, out, sub_block1=sub_block1)
  print(f"wrote {out}: {len(state_dict)} tensors of {arch} (PyTorch names)")
  return 0


def run():
  _errors.run_main(main)


if __name__ == "__main__":
  run()
