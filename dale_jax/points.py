"""Points to evaluate that the user supplies: an ``.npz`` of images and labels.

``dale-eval --dataset=points.npz`` evaluates a model on them instead of a named dataset::

  np.savez("points.npz", x=images, y=labels)   # x in [0, 1], NHWC or NCHW; y integers

The images are float, 4-D, with 1 or 3 channels on the last axis (NHWC, dale_jax's and
JAX's layout) or on axis 1 (NCHW, PyTorch's); the layout is read from where the
channels are, and a shape that allows both (e.g. ``(n, 3, 32, 3)``) is refused. No
JAX import: the command line reads the points before JAX starts.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from dale_jax import validation

CHANNELS = (1, 3)


def channels_last(x: np.ndarray, field: str = "x") -> np.ndarray:
  """``x`` as NHWC, transposed from NCHW when its channels are on axis 1.

  Args:
    x: a batch of images ``(N, H, W, C)`` or ``(N, C, H, W)`` with ``C`` in
      :data:`CHANNELS`.
    field: the name the errors give ``x``.

  Returns:
    ``x`` itself when it is NHWC, else a contiguous NHWC copy.

  Raises:
    validation.InvalidArgument: ``x`` is not 4-D, has 1 or 3 on neither axis 1 nor
      axis 3, or on both (then the layout cannot be told).
  """
  shape = tuple(np.shape(x))
  if len(shape) != 4:
    raise validation.InvalidArgument(
        field, rest=f"must be a batch of images, (N, H, W, C) or (N, C, H, W), got shape {shape}")
  last, first = shape[3] in CHANNELS, shape[1] in CHANNELS
  if last and first:
    raise validation.InvalidArgument(
        field, rest=f"of shape {shape} is ambiguous: axis 1 (NCHW) and axis 3 (NHWC) could "
        f"both be the {' or '.join(map(str, CHANNELS))} channels; images need more than "
        f"{max(CHANNELS)} pixels a side to tell")
  if not (last or first):
    raise validation.InvalidArgument(
        field, rest=f"of shape {shape} has no channel axis: axis 3 (NHWC) or axis 1 (NCHW) "
        f"must be {' or '.join(map(str, CHANNELS))}")
  return x if last else np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def load_npz(path: str, field: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
  """``(x, y)`` from the ``.npz`` file ``path``: NHWC float32 images and int32 labels.

  Args:
    path: a file written by ``np.savez``/``np.savez_compressed`` with arrays ``x``
      (float, in ``[0, 1]``, NHWC or NCHW) and ``y`` (integers >= 0, one per image).
    field: the name the errors give the file (a flag's, e.g. ``--dataset``).

  Returns:
    ``x`` float32 ``(N, H, W, C)``, ``y`` int32 ``(N,)``.

  Raises:
    validation.InvalidArgument: no such file, not an ``.npz``, no ``x`` or ``y``, or
      arrays that break the rules above; the message names the array and the rule.
  """
  if not os.path.isfile(path):
    raise validation.InvalidArgument(f"{field}: {path} does not exist")
  try:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise ValueError("it holds one array, written by np.save")
    with loaded as z:
      arrays = {k: z[k] for k in z.files if k in ("x", "y")}
      names = list(z.files)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise validation.InvalidArgument(f"{field}: {path} is not an .npz file ({e})") from None
  for name in ("x", "y"):
    if name not in arrays:
      raise validation.InvalidArgument(
          f"{field}: {path} must hold arrays 'x' (images) and 'y' (labels), found {names}")
  x, y = arrays["x"], arrays["y"]
  where = f"{field} {os.path.basename(path)}:"
  if x.dtype.kind != "f":
    raise validation.InvalidArgument(
        f"{where} x", rest=f"must hold floats in [0, 1], got dtype {x.dtype} (divide 8-bit "
        "images by 255)")
  x = channels_last(x, f"{where} x").astype(np.float32, copy=False)
  if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
    raise validation.InvalidArgument(
        f"{where} x", rest=f"must be in [0, 1], got values in [{np.nanmin(x):g}, "
        f"{np.nanmax(x):g}]{' and non-finite ones' if not np.isfinite(x).all() else ''}")
  if y.dtype.kind not in "iu" or y.shape != (len(x),):
    raise validation.InvalidArgument(
        f"{where} y", rest=f"must be integer labels, one per image ({len(x)},), got dtype "
        f"{y.dtype} and shape {y.shape}")
  if len(y) == 0:
    raise validation.InvalidArgument(f"{where} x", rest="holds no image")
  if y.min() < 0:
    raise validation.InvalidArgument(f"{where} y", rest=f"must be >= 0, got {int(y.min())}")
  return x, y.astype(np.int32)
