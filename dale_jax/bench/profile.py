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

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
# Events that contain other events (loops, calls, executor bookkeeping).
_CONTAINERS = ("while", "call", "conditional", "ThunkExecutor")


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
    total = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          if event.name in instructions and not event.name.startswith(_CONTAINERS):
            total[event.name] += event.duration_ns
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
