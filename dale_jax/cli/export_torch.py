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

from absl import app
from absl import flags
from absl import logging

from dale_jax import rundir
from dale_jax.cli import _errors

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a finished dale-train run.")
_OUT = flags.DEFINE_string("out", None, "The .pt file to write.")
_SUB_BLOCK1 = flags.DEFINE_boolean(
    "sub_block1", False, "WideResNet only: also write TRADES'/MART's unused sub_block1.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # checkpoint restores log at INFO
  workdir, out = _WORKDIR.value, _OUT.value
  if not rundir.has_config(workdir):
    raise app.UsageError(f"--workdir: {workdir} holds no config.json of a dale-train run")
  folder = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(out) or not os.path.isdir(folder):
    raise app.UsageError(f"--out: {out} must be a file in an existing directory")
  if importlib.util.find_spec("torch") is None:
    raise app.UsageError("writing a PyTorch state_dict needs PyTorch: pip install dale_jax[torch]")
  from dale_jax import train  # pylint: disable=import-outside-toplevel
  from dale_jax.models import torch_weights  # pylint: disable=import-outside-toplevel
  model_name = rundir.read_config(workdir).get("model", {}).get("name")
  if _SUB_BLOCK1.value and model_name not in torch_weights.WIDE_ARCHS:
    raise app.UsageError(f"--sub_block1 is for a WideResNet ({', '.join(torch_weights.WIDE_ARCHS)}); "
                         f"the run's model is {model_name}")
  config, logits_fn, _ = train.load_trained(workdir)
  arch = str(config.model.name)
  state_dict = torch_weights.save_torch(logits_fn.args[0], arch, out,
                                        sub_block1=_SUB_BLOCK1.value)
  print(f"wrote {out}: {len(state_dict)} tensors of {arch} (PyTorch names)")


def run():
  _errors.run_absl("export_torch", main)


if __name__ == "__main__":
  run()
