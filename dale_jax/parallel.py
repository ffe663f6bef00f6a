"""Data parallelism: one ``data`` mesh axis over every device of every process.

Training and evaluation steps are ``jax.jit``-compiled with the batch sharded
over ``data`` and the train state replicated (pmap's model, written the way
``jax.pmap`` itself is now implemented). Because ``jit`` has global semantics,
the mean loss, its gradient and BatchNorm's batch statistics are those of the
*global* batch: XLA inserts the cross-device all-reduces, and one step on N
devices computes what it computes on one (up to float reassociation). Random
noise is drawn for the global batch, so every device gets its own.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dale_jax import validation

DATA_AXIS = "data"


def check_distributed(coordinator_address: str = "", num_processes: int = 1,
                      process_id: int = 0, auto: bool = False, *,
                      prefix: str = "parallel.") -> None:
  """Refuses settings that :func:`initialize_distributed` cannot start from.

  ``prefix`` names the fields as the caller's user spells them (``"parallel."``
  for a config, ``"--"`` for flags).

  Raises:
    dale_jax.validation.InvalidArgument: naming the first field that is wrong.
  """
  v = validation
  v.string(f"{prefix}coordinator_address", coordinator_address)
  v.integer(f"{prefix}num_processes", num_processes, minimum=1)
  v.integer(f"{prefix}process_id", process_id, minimum=0, maximum=num_processes - 1)
  v.require(num_processes == 1 or coordinator_address.rpartition(":")[2].isdigit(),
            f"{prefix}coordinator_address",
            f"'host:port' when {prefix}num_processes > 1", coordinator_address)
  v.boolean(f"{prefix}auto", auto)
  v.require(not auto or (num_processes == 1 and not coordinator_address), f"{prefix}auto",
            f"False when {prefix}num_processes or {prefix}coordinator_address is set (the "
            "cluster's environment or the explicit values, not both)", auto)


def initialize_distributed(coordinator_address: str = "", num_processes: int = 1,
                           process_id: int = 0, *, auto: bool = False,
                           prefix: str = "parallel.") -> None:
  """``jax.distributed.initialize`` for multi-host runs; a no-op for one process.

  With ``auto`` it is called without arguments: JAX reads the coordinator, the
  process count and this process's id from the cluster's environment (Slurm's
  ``SLURM_*`` variables of an ``srun`` task, Cloud TPU's metadata, Open MPI's,
  ...). Otherwise the three explicit values are used. On CPU the collectives go
  over gloo, so several processes on one machine (or on hosts without
  accelerators) can train together. A second call once JAX's distributed
  runtime is up does nothing, so that a library caller may initialise it first.
  ``prefix`` names the fields in the error (``"--"`` for a script's flags).
  """
  if (not auto and num_processes <= 1) or jax.distributed.is_initialized():
    return
  # Only the CPU client reads this; it must be set before the backend starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if not auto:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:  # No cluster environment found: JAX asks for the arguments.
    raise validation.InvalidArgument(
        f"{prefix}auto", rest="found no cluster environment to read (Slurm task, Cloud TPU, "
        f"Open MPI, ...): run under srun or on a TPU pod, or set {prefix}coordinator_address, "
        f"{prefix}num_processes and {prefix}process_id ({e})") from None


def make_mesh() -> Mesh:
  """A 1-D mesh named ``data`` over all (global) devices."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree`` replicated over ``mesh``.

  With several processes each process places its own copy (the values must be the
  same everywhere): arrays already on one of this process's devices go through the
  host, since a device-to-device copy across hosts needs a transfer service that
  the CPU backend lacks.
  """
  if jax.process_count() > 1:
    def local(a):
      if isinstance(a, jax.Array) and not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return np.asarray(a)
      return a
    tree = jax.tree.map(local, tree)
  return jax.device_put(tree, replicated(mesh))


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a host batch on the mesh, split over ``data``.

  Single process: ``batch`` is the global batch. Several processes: each passes
  its own rows (``global_batch / process_count`` of them, see
  :func:`process_rows`) and the result is the global array.
  """
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch)


def process_rows(global_batch_size: int) -> slice:
  """The rows of each global batch that this process feeds."""
  per = global_batch_size // jax.process_count()
  start = jax.process_index() * per
  return slice(start, start + per)


def to_host(tree: Any) -> Any:
  """The global value of every array of ``tree`` as NumPy, on every process.

  With several processes an array sharded over other processes' devices is
  gathered: a collective, so every process must call it, in the same order.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def from_main(tree: Any) -> Any:
  """``tree`` (NumPy arrays of the same shapes on every process) as process 0 holds it.

  A collective with several processes (every process must call it); with one, the
  arrays themselves.
  """
  return multihost_utils.broadcast_one_to_all(tree)


def is_main_process() -> bool:
  """Whether this process writes the files (process 0)."""
  return jax.process_index() == 0


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the mesh's device count."""
  return -(-batch_size // mesh.size) * mesh.size


def one_step_at_a_time(mesh: Mesh) -> bool:
  """Whether a loop over this mesh must wait for each step before dispatching the next.

  True for several CPU devices in one process (``--xla_force_host_platform_device_count``).
  XLA:CPU launches each device's share of a program from a pool of as many launcher
  threads as devices, and a device admits a bounded number of programs in flight.
  With two steps dispatched, a launcher can take step k+1 for one device before step
  k for another; it then waits for that device, while the devices that started step
  k wait in its all-reduce for the device that was never launched, until XLA's 40 s
  rendezvous timeout aborts the process. Waiting for step k before dispatching k+1
  leaves only one step's launches in the pool. On GPUs and TPUs, and with one CPU
  device per process, steps stay asynchronous.
  """
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return len(local) > 1 and local[0].platform == "cpu"
