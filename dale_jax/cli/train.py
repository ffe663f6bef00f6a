"""``dale-train``: train one algorithm from an ml-collections config.

  dale-train --config=mnist:Gaussian_DALE_PD --workdir=runs/x \\
      --config.optimizer.learning_rate=0.02 --config.num_epochs=10
"""

from __future__ import annotations

import json
import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dale_jax import configs
from dale_jax import experiment
from dale_jax import host_memory
from dale_jax import report
from dale_jax import train
from dale_jax.cli import _errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A bundled config and its argument (quickstart:PGD, mnist:DALE, ...; "
    "names in dale_jax/configs/) or a config file of your own (path/to/config.py:ARG).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for records and checkpoints.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config, each field with its source, and exit "
    "before anything is compiled or written (--workdir is then not needed).")
flags.mark_flags_as_required(["config"])


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax so that the progress lines stay readable."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = _CONFIG.value
    config.to_dict()  # a config file that failed to load raises on first use
  except OSError as e:  # ml_collections defers a config file that failed to load
    raise app.UsageError(" ".join(line.strip() for line in str(e).splitlines())) from None
  if _PRINT_CONFIG.value:
    print_config(config, [a for a in sys.argv[1:] if a.startswith("--config.")])
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (the run's directory)")
  host_memory.keep_freed_memory()
  record = train.train_and_evaluate(config, _WORKDIR.value)
  print(report.results_table(record))


def print_config(config, overrides) -> None:
  """The resolved config (random search applied, validated), one field a line with its
  source; nothing is compiled or written."""
  resolved = experiment.resolve(config)
  experiment.build(resolved)  # what only the factories know is checked too
  rows = configs.config_sources(config, resolved, overrides)
  width = max(len(f"{f} = {json.dumps(v)}") for f, v, _ in rows)
  source = config_flags.get_config_filename(flags.FLAGS["config"])
  print(f"# {resolved.algorithm} on {resolved.dataset} (--config={source})")
  for field, value, source in rows:
    print(f"{f'{field} = {json.dumps(value)}':<{width}}  # {source}")


def run():
  _errors.run_absl("dale-train", main)


if __name__ == "__main__":
  run()
