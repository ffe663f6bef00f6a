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
