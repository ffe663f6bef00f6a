"""A run's working directory: its file names, records, done marker, writers and progress.

One ``dale-train`` run owns one directory::

  workdir/
    config.json        the resolved config (written before training starts)
    results.jsonl      one advbench record per evaluated epoch
    checkpoints/       orbax checkpoints of the whole train state
    tensorboard/       TensorBoard scalars, when a writer is installed
    robustness.json    dale-eval's report, once it ran
    model_info.json    the same result in RobustBench's model-info shape
    adversarial.npz    dale-eval --save_adversarial: the adversarial examples
    robustness_progress/  a running dale-eval's finished batches (removed at the end)
    done               written when the last epoch finished

Training, evaluation, the sweep and the collection of results all name these files
through this module. Records are rewritten atomically (a temporary file, then
``os.replace``), so a run killed mid-write leaves the previous file; the reader still
drops a truncated last line, which an older writer or a full disk may leave. No JAX
import: the research tools read run directories without starting a backend.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Iterable, Mapping

from absl import logging

from dale_jax import validation

CONFIG = "config.json"
RESULTS = "results.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
ROBUSTNESS = "robustness.json"
MODEL_INFO = "model_info.json"
ADVERSARIAL = "adversarial.npz"
ROBUSTNESS_PROGRESS = "robustness_progress"
PAPER_EVAL = "paper_eval.json"  # a results page's PGD-20 and AutoAttack of the run
PAPER_EVAL_PROGRESS = "paper_eval_progress"
DONE = "done"
# The splits as every command and config may spell them, and their keys in the records
# (advbench's capitalised names).
SPLIT_KEYS = {"validation": "Validation", "test": "Test"}


def split_key(split: str) -> str:
  """The record key of ``split`` in either spelling: ``"test"``, ``"Test"`` -> ``"Test"``."""
  key = SPLIT_KEYS.get(str(split).lower())
  if key is None:
    raise validation.InvalidArgument("split", f"one of {', '.join(SPLIT_KEYS)}", split)
  return key


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def has_config(workdir: str) -> bool:
  return os.path.isfile(path(workdir, CONFIG))


def is_done(workdir: str) -> bool:
  return os.path.exists(path(workdir, DONE))


def mark_done(workdir: str) -> None:
  with open(path(workdir, DONE), "w") as f:
    f.write(f"{time.time()}\n")


def _write_atomically(file: str, text: str) -> None:
  """A reader sees the old file or the new one, never a part of it."""
  tmp = file + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, file)


def write_json(file: str, obj: Any, **kwargs) -> None:
  """Writes ``obj`` as JSON to ``file`` atomically."""
  _write_atomically(file, json.dumps(obj, **kwargs) + "\n")


def write_config(workdir: str, config) -> None:
  """``config.json``: the resolved ``ml_collections.ConfigDict``, sorted keys."""
  _write_atomically(path(workdir, CONFIG), config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> dict:
  with open(path(workdir, CONFIG)) as f:
    return json.load(f)


# ----------------------------------------------------------------------------
# A run is its config.

# Fields that change how a run is driven, not what it computes: logging and
# checkpoint cadence, where the data is read from, the batch's layout over devices
# and hosts (the records of every layout agree).
BOOKKEEPING = ("log_every_steps", "checkpoint_every_steps", "data.data_dir", "parallel.")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"sampler.eps": 0.3, ...}``; values as JSON has them (tuples become lists)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = json.loads(json.dumps(value))
  return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                       ignore: Iterable[str] = BOOKKEEPING) -> dict[str, tuple[Any, Any]]:
  """``{field: (old, new)}`` for every field whose value differs, except the fields in
  ``ignore`` (a name ending in ``.`` ignores a section). A missing field is ``None``."""
  a, b = flatten(old), flatten(new)
  ignore = tuple(ignore)
  skip = lambda k: any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignore)
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
          if not skip(k) and a.get(k) != b.get(k)}


def resume_changes(old: Mapping[str, Any], new: Mapping[str, Any]
                   ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """``(allowed, refused)`` differences between a run's ``config.json`` and the config it
  would resume with. Allowed: more epochs (the same run, continued). Bookkeeping fields
  (:data:`BOOKKEEPING`) are not differences. Everything else is refused: it would make
  the checkpoint and the records belong to another experiment."""
  changes = config_differences(old, new)
  allowed = {}
  epochs = changes.get("num_epochs")
  if epochs and all(isinstance(v, int) for v in epochs) and epochs[1] > epochs[0]:
    allowed["num_epochs"] = changes.pop("num_epochs")
  return allowed, changes


def describe_changes(changes: Mapping[str, tuple[Any, Any]], limit: int = 6) -> str:
  """``sampler.eps 0.3 -> 0.1, num_epochs 8 -> 10`` (the first ``limit``, then a count)."""
  parts = [f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items()]
  more = len(parts) - limit
  return ", ".join(parts[:limit]) + (f" and {more} more" if more > 0 else "")


def read_records(file: str) -> list[dict]:
  """Parses a ``results.jsonl`` file (``[]`` when there is none).

  A truncated last line (a run killed mid-write) is dropped.

  Raises:
    validation.InvalidArgument: naming the file and line when any other line is not JSON.
  """
  if not os.path.exists(file):
    return []
  with open(file) as f:
    lines = f.read().split("\n")
  records = []
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == last:
        break
      raise validation.InvalidArgument(f"{file}:{i + 1}", rest=f"is not JSON: {e}") from None
  return records


def write_records(workdir: str, records: Iterable[Mapping]) -> None:
  """Rewrites ``results.jsonl`` atomically (a resume drops the epochs it redoes)."""
  _write_atomically(path(workdir, RESULTS), "".join(json.dumps(r) + "\n" for r in records))


class ScalarWriter:
  """TensorBoard scalars under ``workdir/tensorboard`` when a writer is installed.

  Uses ``tensorboardX`` or, failing that, ``torch.utils.tensorboard``; without
  either, :meth:`write` does nothing and ``results.jsonl`` remains the source of truth.
  """

  def __init__(self, workdir: str):
    self._writer = None
    for module in ("tensorboardX", "torch.utils.tensorboard"):
      try:
        writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
      except ImportError:
        continue
      self._writer = writer_cls(path(workdir, TENSORBOARD))
      break

  def write(self, step: int, record: Mapping) -> None:
    if self._writer is None:
      return
    for group in ("Train", "Validation", "Test"):
      for name, value in record.get(group, {}).items():
        self._writer.add_scalar(f"{group}/{name}", value, step)
    self._writer.flush()


class Progress:
  """A one-line progress bar on a terminal, periodic log lines otherwise."""

  def __init__(self, total: int, epoch: int):
    self.total, self.epoch, self.start = total, epoch, time.time()
    self.tty = sys.stderr.isatty()

  def update(self, done: int, images: int, loss: float) -> None:
    rate = images / max(time.time() - self.start, 1e-9)
    line = f"epoch {self.epoch} [{done}/{self.total}] loss {loss:.4f} {rate:.0f} img/s"
    if self.tty:
      width = 30
      bar = "#" * int(width * done / max(self.total, 1))
      sys.stderr.write(f"\r{bar:<{width}} {line}")
      sys.stderr.flush()
      if done == self.total:
        sys.stderr.write("\n")
    else:
      logging.info(line)
