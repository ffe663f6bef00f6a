"""Progress of a robustness evaluation on disk, so that a killed evaluation continues.

:func:`dale_jax.attacks.evaluate_robustness` attacks the points batch by batch; with
a progress directory it stores, after each batch of each attack, which points the
model still classified correctly and the adversarial examples of the points that
the attack broke. A rerun with the same inputs loads the finished batches instead of
attacking them again, and since every draw of an attack comes from the example's
index and the seed (never from the batch or the run), it ends with the numbers of an
uninterrupted run.

Layout::

  progress_dir/<fingerprint>/
    meta.json              what the fingerprint covers (for a reader)
    <k>-<attack>/<i>.npz   batch ``i`` of the ``k``-th attack: ``indices``,
                           ``still_correct``, ``adv`` (the broken points' examples)
                           and ``seconds``

The fingerprint hashes everything that decides the numbers: the data, the weights
bound in the model's ``Partial``, the attacks and their settings, eps, norm, seed,
the batch size and the device count. Another evaluation in the same directory gets
a folder of its own; nothing is overwritten. Each file is written to a temporary
name and renamed, so a kill leaves whole files only.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np


class BatchRecord(NamedTuple):
  indices: np.ndarray
  still_correct: np.ndarray
  adv: np.ndarray  # the examples of indices[~still_correct]
  seconds: float


def fingerprint(arrays: Mapping[str, Any], description: Mapping[str, Any]) -> str:
  """A hex digest of ``arrays`` (pytrees of arrays, hashed by bytes) and ``description``."""
  digest = hashlib.sha256()
  digest.update(json.dumps(description, sort_keys=True, default=str).encode())
  for name in sorted(arrays):
    for leaf in jax.tree_util.tree_leaves(arrays[name]):
      leaf = np.asarray(leaf)
      digest.update(f"{name}:{leaf.dtype}:{leaf.shape}".encode())
      digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:20]


class Progress:
  """The finished batches of one evaluation (one fingerprint) under ``root``."""

  def __init__(self, root: str, key: str, description: Mapping[str, Any]):
    self.dir = os.path.join(root, key)
    os.makedirs(self.dir, exist_ok=True)
    meta = os.path.join(self.dir, "meta.json")
    if not os.path.exists(meta):
      _replace(meta, lambda f: f.write(json.dumps(description, indent=2, default=str).encode()))

  def _file(self, k: int, name: str, batch: int) -> str:
    return os.path.join(self.dir, f"{k}-{name}", f"{batch}.npz")

  def load(self, k: int, name: str, batch: int) -> BatchRecord | None:
    file = self._file(k, name, batch)
    if not os.path.exists(file):
      return None
    with np.load(file) as z:
      return BatchRecord(z["indices"], z["still_correct"], z["adv"], float(z["seconds"]))

  def save(self, k: int, name: str, batch: int, record: BatchRecord) -> None:
    file = self._file(k, name, batch)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    _replace(file, lambda f: np.savez(f, **record._asdict()))

  def n_done(self) -> int:
    """Batches already stored, over all attacks."""
    return sum(len([f for f in files if f.endswith(".npz")])
               for _, _, files in os.walk(self.dir))


def _replace(file: str, write) -> None:
  tmp = file + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, file)
