"""Where a compiled XLA program spends its time, per HLO instruction.

:func:`top_ops` traces a few runs with ``jax.profiler``, reads the trace back
(``jax.profiler.ProfileData``) and adds up, per HLO instruction of the program
(fusions, custom calls, convolutions, ...), the time its events took on every
thread. Each instruction is named with its shape and the JAX operation it came
from (XLA's ``op_name`` metadata, e.g. ``.../transpose(jvp(MnistCNN))/conv2/...``
for the input gradient of ``conv2``), so the list reads as "which layer, forward
or backward, costs what". Times are thread-milliseconds per run as the profiler
records them; compare shares rather than absolute numbers, which need not add up
to the wall or CPU time of the step.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from typing import Callable

import jax

# ``name = shape opcode(``; a tuple shape ``(f32[..], u8[0]{0})`` holds spaces
# (cuDNN convolutions are such custom-calls).
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\((?:[^()]|\([^()]*\))*\)|\S+)\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
# Events that contain other events (loops, calls, executor bookkeeping).
_CONTAINERS = ("while", "call", "conditional", "ThunkExecutor")
# Lines a trace converter derives from others ("XLA Ops", "XLA Modules", ...).
_DERIVED_LINES = ("XLA ", "Steps")


def _hlo_op(event) -> str:
  """The HLO instruction an event ran for: its ``hlo_op`` statistic, else its name."""
  for name, value in event.stats:
    if name == "hlo_op":
      return str(value)
  return event.name


def _planes(data) -> list:
  """The device planes of a trace if it has any (accelerators), else all of them."""
  devices = [p for p in data.planes if p.name.startswith("/device:")
             and any(True for line in p.lines for _ in line.events)]
  return devices or list(data.planes)


def op_times(data, instructions: dict[str, dict]) -> collections.Counter:
  """Nanoseconds per HLO instruction in a trace (``jax.profiler.ProfileData``).

  Events are attributed by :func:`_hlo_op`; only device planes are read when
  there are any; containers (loops, calls) and derived lines are skipped, so
  no time is counted twice.
  """
  total = collections.Counter()
  for plane in _planes(data):
    for line in plane.lines:
      if line.name.startswith(_DERIVED_LINES):
        continue
      for event in line.events:
        op = _hlo_op(event)
        if op in instructions and not op.startswith(_CONTAINERS):
          total[op] += event.duration_ns
  return total


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
  """``name -> {opcode, shape, source}`` for every instruction of an HLO module text."""
  found = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      source = _OP_NAME.search(line)
      found[m.group(1)] = {"opcode": m.group(3), "shape": m.group(2),
                           "source": source.group(1) if source else ""}
  return found


def top_ops(run: Callable[[], None], hlo_text: str, *, steps: int = 3, top: int = 20) -> list[dict]:
  """The ``top`` instructions of ``hlo_text`` by time over ``steps`` calls of ``run``.

  Args:
    run: runs the compiled program once and waits for it (warm: already compiled).
    hlo_text: the compiled program's ``as_text()``, to name the events.
    steps: how many runs to trace.
    top: how many instructions to return.

  Returns:
    Dicts ``{op, opcode, shape, source, ms_per_step, share}``, most expensive first;
    ``share`` is the fraction of the time of all the program's instructions.
  """
  instructions = hlo_instructions(hlo_text)
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir):
      for _ in range(steps):
        run()
    paths = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(paths[0])
    total = op_times(data, instructions)
  all_ns = sum(total.values()) or 1
  return [{"op": name, **instructions[name], "ms_per_step": round(ns / steps / 1e6, 3),
           "share": round(ns / all_ns, 4)} for name, ns in total.most_common(top)]


def format_ops(ops: list[dict], width: int = 70) -> str:
  """A plain-text table of :func:`top_ops`'s result."""
  lines = [f"{'ms/step':>9} {'share':>6}  {'op':28} {'shape':30} source"]
  for o in ops:
    lines.append(f"{o['ms_per_step']:9.1f} {100 * o['share']:5.1f}%  {o['op'][:28]:28} "
                 f"{o['shape'][:30]:30} {o['source'][-width:]}")
  return "\n".join(lines)
