"""Plain-text tables of a run's results."""

from __future__ import annotations


def results_table(record: dict) -> str:
  """A Markdown table of one epoch record: one row per split, one column per metric."""
  splits = [s for s in ("Validation", "Test") if s in record]
  if not splits:
    return f"epoch {record.get('Epoch')}: no evaluation"
  keys = []
  for s in splits:
    keys += [k for k in record[s] if k not in keys]
  head = "| split | " + " | ".join(keys) + " |"
  rule = "|---|" + "---|" * len(keys)
  rows = [f"| {s} | " + " | ".join(
      f"{record[s][k]:.2f}" if k in record[s] else "" for k in keys) + " |" for s in splits]
  title = f"{record['args']['algorithm']} on {record['args']['dataset']}, epoch {record['Epoch']}"
  return "\n".join([title, "", head, rule, *rows])


class ScalarWriter:
  """TensorBoard scalars under ``workdir/tensorboard`` when a writer is installed.

  Uses ``tensorboardX`` or, failing that, ``torch.utils.tensorboard``; without
  either, :meth:`write` does nothing and the records in ``results.jsonl`` remain
  the source of truth.
  """

  def __init__(self, logdir: str):
    self._writer = None
    for module in ("tensorboardX", "torch.utils.tensorboard"):
      try:
        writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
      except ImportError:
        continue
      self._writer = writer_cls(logdir)
      break

  def write(self, step: int, record: dict) -> None:
    if self._writer is None:
      return
    for group in ("Train", "Validation", "Test"):
      for name, value in record.get(group, {}).items():
        self._writer.add_scalar(f"{group}/{name}", value, step)
    self._writer.flush()
