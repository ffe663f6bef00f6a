"""Host memory: let XLA:CPU find the buffers it freed when its next step starts.

XLA:CPU allocates a program's temporaries afresh on every call, as one block
(a training step's take hundreds of MiB) requested from one of its worker
threads. glibc's malloc serves a request of that size in a worker thread's arena
only with a fresh ``mmap`` (an arena other than the main one holds at most 64 MiB,
whatever ``M_MMAP_MAX`` says) and gives it back with ``munmap`` when it is freed,
so every step page-faults the whole block in again, zeroed by the kernel: a large
share of a CPU step's time (docs/performance.md has the measurements).

:func:`keep_freed_memory` sets glibc's malloc so that freed blocks stay with
the process: one arena for every thread, no ``mmap`` for large blocks, and no
trimming of the heap's top. The next step then gets the same pages back without
a fault. This is what replacing the allocator (``LD_PRELOAD`` of tcmalloc or
jemalloc, the usual advice for PyTorch on CPUs) buys, without one. Costs: the
process keeps its peak resident memory, and all threads share one arena's lock.

The command-line tools call it first thing; a notebook calls it before its
first JAX computation. ``DALE_JAX_MALLOC=system`` in the environment leaves
malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from dale_jax import validation

ENV_VAR = "DALE_JAX_MALLOC"

# mallopt(3) parameters (glibc's <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (glibc
# stores it as a size_t). The largest positive int, 2 GiB, is not enough: the heap's
# free top of a large batch can pass it, and is then given back.
_NEVER_TRIM = -1

_lock = threading.Lock()
_kept = False


def _glibc():
  """glibc as a ctypes library, or ``None`` on another C library."""
  name = ctypes.util.find_library("c")
  if name is None:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # Only glibc has it (musl, macOS, Windows do not).
    libc.mallopt
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """Make glibc's malloc keep freed blocks in the process for reuse.

  Call before the first JAX computation: a thread that has already taken an
  arena of its own keeps it. Safe to call more than once.

  Returns:
    Whether malloc is now set so: ``False`` where the C library is not glibc or
    ``DALE_JAX_MALLOC=system`` is set.

  Raises:
    validation.InvalidArgument: ``DALE_JAX_MALLOC`` holds something other than ``keep`` or
      ``system``.
  """
  global _kept
  choice = os.environ.get(ENV_VAR, "keep")
  validation.require(choice in ("keep", "system"), ENV_VAR, "'keep' (the default) or 'system'",
                     choice)
  if choice == "system":
    return False
  with _lock:
    if _kept:
      return True
    libc = _glibc()
    if libc is None:
      return False
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                         (_M_TRIM_THRESHOLD, _NEVER_TRIM)):
      if libc.mallopt(param, value) != 1:
        return False
    _kept = True
    return True
