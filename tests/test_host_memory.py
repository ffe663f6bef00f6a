"""``host_memory.keep_freed_memory``: a large block freed by XLA:CPU (or by any thread)
comes back without page faults, and the switch is refused or skipped as documented.

Each case runs in a fresh interpreter: malloc's settings are process-wide and an
arena, once a thread has one, stays.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from dale_jax import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None,
                                reason="malloc settings are glibc's (mallopt)")

# malloc and free from the C library, for the scripts below.
_LIBC = r"""
import ctypes, json, resource, sys, threading
from dale_jax import host_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""

_SCRIPT = _LIBC + r"""
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
faults = lambda: resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
size = 96 * 2**20

def touch_three_times(out):  # malloc, write every page, free: as XLA does per step
  for _ in range(3):
    p = libc.malloc(size)
    before = faults()
    ctypes.memset(p, 1, size)
    out.append(faults() - before)
    libc.free(p)

malloc_faults = []
t = threading.Thread(target=touch_three_times, args=(malloc_faults,))
t.start(); t.join()

import jax, jax.numpy as jnp
a = jnp.ones((5000, 8)); b = jnp.ones((8, 5000))
f = jax.jit(lambda a, b: jnp.max(a @ b))  # the 5000x5000 product (95 MiB) is a temporary
f(a, b).block_until_ready(); f(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(a, b).block_until_ready()
jax_faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"kept": kept, "malloc": malloc_faults, "jax": jax_faults}))
"""

_PAGES = 96 * 2**20 // 4096


def _python(script: str, *args: str, **env):
  """Runs ``script`` in a fresh interpreter; the JSON on its last line of output."""
  out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _run(mode: str, **env) -> dict:
  return _python(_SCRIPT, mode, **env)


@pytest.mark.slow
def test_freed_blocks_come_back_without_page_faults():
  system = _run("system")
  kept = _run("keep")
  assert not system["kept"] and kept["kept"]
  # glibc's default: every reuse of a 96 MiB block is a fresh mapping, all pages fault.
  assert min(system["malloc"][1:]) > 0.9 * _PAGES
  assert system["jax"] > 0.5 * (95 * 2**20 // 4096)
  # Kept: the first use faults the pages in once, later ones find them in place.
  assert kept["malloc"][0] > 0.9 * _PAGES
  assert max(kept["malloc"][1:]) < 0.01 * _PAGES
  assert kept["jax"] < 0.05 * system["jax"]


_BIG_SCRIPT = _LIBC + r"""
assert host_memory.keep_freed_memory()
size = 2304 * 2**20  # Freed, the heap's top is larger than any positive int threshold.
faults = []
for _ in range(2):
  p = libc.malloc(size)
  assert p, "malloc of 2.25 GiB failed"
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(p, 1, size)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  libc.free(p)
print(json.dumps(faults))
"""


def test_heap_top_over_two_gib_is_kept():
  # A batch-256 MNIST step leaves 2.1 GiB free at the heap's top; trimming it made
  # the next steps fault it all in again.
  first, second = _python(_BIG_SCRIPT)
  pages = 2304 * 2**20 // 4096
  assert first > 0.9 * pages
  assert second < 0.01 * pages


def test_environment_leaves_malloc_alone_or_names_what_it_accepts():
  assert not _run("keep", DALE_JAX_MALLOC="system")["kept"]
  out = subprocess.run([sys.executable, "-c", _SCRIPT, "keep"], capture_output=True, text=True,
                       env={**os.environ, "DALE_JAX_MALLOC": "tcmalloc"}, timeout=300)
  assert out.returncode != 0
  assert re.search(r"DALE_JAX_MALLOC must be 'keep' .*or 'system', got 'tcmalloc'", out.stderr)
