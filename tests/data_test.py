"""Tests for evoprune.data: raw readers on the real files, splits, batching, augmentation."""

import gzip
import hashlib
import io
import os
import pathlib
import shutil
import tarfile
import tempfile
import unittest

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

import evoprune as ep
from evoprune.data import pipeline
from evoprune.data import raw

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def require_data() -> None:
  """Skips without ../shared/data, but fails when CI is set (CI must have it)."""
  if not DATA.is_dir():
    if os.environ.get("CI"):
      raise AssertionError(f"CI is set but the shared data is missing at {DATA}")
    raise unittest.SkipTest(f"no shared data at {DATA}")


def channel_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std in float64, by chunks (a float64 copy of CIFAR is 1 GB)."""
  flat = x.reshape(-1, x.shape[-1])
  total, squares = 0.0, 0.0
  for i in range(0, len(flat), 1 << 16):
    part = flat[i:i + (1 << 16)].astype(np.float64)
    total, squares = total + part.sum(0), squares + (part ** 2).sum(0)
  mean = total / len(flat)
  return mean, np.sqrt(squares / len(flat) - mean ** 2)


def idx_bytes(array: np.ndarray) -> bytes:
  """An uncompressed IDX file of a uint8 array, written by hand."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


class RawReadersTest(parameterized.TestCase):

  def test_parse_idx_hand_made(self):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    parsed = raw.parse_idx(idx_bytes(array))
    self.assertEqual(parsed.shape, (2, 3, 4))
    np.testing.assert_array_equal(parsed, array)

  def test_parse_idx_big_endian_int32(self):
    data = bytes([0, 0, 0x0C, 1]) + (2).to_bytes(4, "big") + (258).to_bytes(4, "big") + \
        (-1).to_bytes(4, "big", signed=True)
    np.testing.assert_array_equal(raw.parse_idx(data), [258, -1])

  @parameterized.named_parameters(
      ("bad_magic", bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]), "not an IDX"),
      ("short_payload", bytes([0, 0, 8, 1, 0, 0, 0, 3, 7]), "size mismatch"),
  )
  def test_parse_idx_rejects(self, data, message):
    with self.assertRaisesRegex(ValueError, message):
      raw.parse_idx(data)

  def test_parse_cifar_records_layout(self):
    # Record: label, then the R plane, G plane, B plane, each 32x32 row-major.
    planes = np.arange(3 * 1024, dtype=np.int64).reshape(3, 32, 32) % 251
    record = bytes([7]) + planes.astype(np.uint8).tobytes()
    x, y = raw.parse_cifar_records(record * 2)
    self.assertEqual(x.shape, (2, 32, 32, 3))
    np.testing.assert_array_equal(y, [7, 7])
    # Pixel (row 1, col 2) of channel 1 is byte 1 + 1024 + 32 + 2 of the record.
    self.assertEqual(x[1, 1, 2, 1], record[1 + 1024 + 32 + 2])
    with self.assertRaisesRegex(ValueError, "3073"):
      raw.parse_cifar_records(record[:-1])


class RealFilesTest(parameterized.TestCase):
  """Checksums and error messages, on copies of the real files."""

  def tmpdir(self) -> str:
    # tempfile, not create_tempdir: that needs absl flags parsed, which pytest does not do.
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path)
    return path

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    require_data()

  def mnist_copy(self, corrupt: str | None = None, drop: str | None = None) -> pathlib.Path:
    """A parent folder with mnist/: links to the real files, one flipped or dropped."""
    parent = pathlib.Path(self.tmpdir())
    (parent / "mnist").mkdir()
    for name in raw.MNIST_FILES:
      target = parent / "mnist" / name
      if name == drop:
        continue
      if name == corrupt:
        data = bytearray((DATA / "mnist" / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
      else:
        target.symlink_to(DATA / "mnist" / name)
    return parent

  def test_corrupted_file_names_file_md5_and_url(self):
    parent = self.mnist_copy(corrupt="t10k-labels-idx1-ubyte.gz")
    with self.assertRaises(ep.data.ChecksumError) as cm:
      ep.data.load("mnist", data_dir=parent)
    message = str(cm.exception)
    self.assertIsInstance(cm.exception, ValueError)
    self.assertIn(str(parent / "mnist" / "t10k-labels-idx1-ubyte.gz"), message)
    self.assertIn("ec29112dd5afa0611ce80d1b7f02629c", message)
    self.assertIn("https://storage.googleapis.com/cvdf-datasets/mnist/"
                  "t10k-labels-idx1-ubyte.gz", message)

  def test_missing_file_names_file_md5_and_url(self):
    parent = self.mnist_copy(drop="t10k-images-idx3-ubyte.gz")
    with self.assertRaises(ep.data.MissingDataError) as cm:
      ep.data.load("mnist", data_dir=parent / "mnist")
    self.assertIsInstance(cm.exception, FileNotFoundError)
    self.assertIn("t10k-images-idx3-ubyte.gz", str(cm.exception))
    self.assertIn("9fb629c4189551a2d022fa330f9573f3", str(cm.exception))

  def test_folder_without_the_dataset(self):
    with self.assertRaisesRegex(ep.data.MissingDataError, "no cifar10 files.*toronto"):
      ep.data.load("cifar10", data_dir=self.tmpdir())
    with self.assertRaisesRegex(ep.data.MissingDataError, "not a directory"):
      ep.data.load("mnist", data_dir=DATA / "no-such-folder")

  def test_wrong_dataset_folder_is_identified(self):
    # Fashion-MNIST uses MNIST's file names; the md5 tells them apart.
    with self.assertRaisesRegex(ep.data.ChecksumError, "official mnist file"):
      ep.data.load("fashion_mnist", data_dir=DATA / "mnist")

  def test_cifar_gz_is_checked_after_gunzip(self):
    x, y = raw.read_cifar_batch(DATA / "cifar-10-batches-bin" / "test_batch.bin.gz")
    self.assertEqual(x.shape, (10000, 32, 32, 3))
    self.assertEqual(x.dtype, np.uint8)
    np.testing.assert_array_equal(y[:10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
    np.testing.assert_array_equal(np.bincount(y), [1000] * 10)
    # The same official bytes with one pixel changed, gzipped: caught after gunzip.
    data = bytearray(gzip.decompress(
        (DATA / "cifar-10-batches-bin" / "test_batch.bin.gz").read_bytes()))
    plain = pathlib.Path(self.tmpdir()) / "test_batch.bin"  # the official form, as is
    plain.write_bytes(bytes(data))
    np.testing.assert_array_equal(raw.read_cifar_batch(plain)[0], x)
    data[5] ^= 1
    bad = pathlib.Path(self.tmpdir()) / "test_batch.bin.gz"
    bad.write_bytes(gzip.compress(bytes(data), compresslevel=1))
    with self.assertRaisesRegex(ep.data.ChecksumError,
                                "after gunzip.*803d5f7f4d78ea53de84dbe85f74fb6d"):
      raw.read_cifar_batch(bad)

  def test_cifar_tarball_read_in_memory(self):
    official = gzip.decompress(
        (DATA / "cifar-10-batches-bin" / "test_batch.bin.gz").read_bytes())
    folder = pathlib.Path(self.tmpdir())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
      info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
      info.size = len(official)
      tar.addfile(info, io.BytesIO(official))
    tarball = folder / "cifar-10-binary.tar.gz"
    tarball.write_bytes(buffer.getvalue())
    # Our tarball is not the official one: its md5 is refused...
    with self.assertRaisesRegex(ep.data.ChecksumError, "c32a1d4ab5d03f1284b67883e8d87530"):
      raw.read_cifar10(folder, splits=("test",))
    # ...but read with its own md5 (members still checked) it gives the official batch.
    read = raw.read_cifar10_tarball(tarball, ("test",),
                                    md5=hashlib.md5(buffer.getvalue()).hexdigest())
    np.testing.assert_array_equal(read["test"][0], raw.parse_cifar_records(official)[0])
    self.assertEqual(sorted(os.listdir(folder)), ["cifar-10-binary.tar.gz"])  # no extraction
    with self.assertRaisesRegex(ep.data.MissingDataError, "data_batch_1.bin"):
      raw.read_cifar10_tarball(tarball, ("train",),
                               md5=hashlib.md5(buffer.getvalue()).hexdigest())

  def test_data_dir_parent_or_dataset_folder(self):
    a = ep.data.load("tiny_shakespeare", data_dir=DATA)
    b = ep.data.load("tiny_shakespeare", data_dir=str(DATA / "tiny-shakespeare"))
    np.testing.assert_array_equal(a.train.x, b.train.x)
    self.assertEqual(raw.find_folder(DATA, ("mnist",), tuple(raw.MNIST_FILES), "mnist", ""),
                     DATA / "mnist")
    self.assertEqual(raw.find_folder(DATA / "mnist", ("mnist",), tuple(raw.MNIST_FILES),
                                     "mnist", ""), DATA / "mnist")


class MnistTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    require_data()
    cls.ds = ep.data.load("mnist", data_dir=DATA)

  def test_shapes_and_types(self):
    ds = self.ds
    self.assertEqual((ds.name, ds.num_classes, ds.input_shape), ("mnist", 10, (28, 28, 1)))
    self.assertEqual(ds.train.x.shape, (55000, 28, 28, 1))
    self.assertEqual(ds.val.x.shape, (5000, 28, 28, 1))
    self.assertEqual(ds.test.x.shape, (10000, 28, 28, 1))
    self.assertEqual((ds.train.x.dtype, ds.train.y.dtype), (np.float32, np.int32))

  def test_label_counts(self):
    counts = np.bincount(self.ds.train.y, minlength=10) + np.bincount(self.ds.val.y,
                                                                      minlength=10)
    np.testing.assert_array_equal(counts, MNIST_TRAIN_COUNTS)
    np.testing.assert_array_equal(np.bincount(self.ds.test.y), MNIST_TEST_COUNTS)

  def test_val_is_the_seeded_part_of_train(self):
    labels = raw.parse_idx(gzip.decompress(
        (DATA / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes()))
    train_idx, val_idx = pipeline.carve(60000, 5000, 0)
    np.testing.assert_array_equal(self.ds.val.y, labels[val_idx])
    np.testing.assert_array_equal(self.ds.train.y, labels[train_idx])

  def test_normalised_with_train_statistics(self):
    mean, std = channel_moments(self.ds.train.x)
    np.testing.assert_allclose(mean, [0.0], atol=1e-5)
    np.testing.assert_allclose(std, [1.0], atol=1e-5)
    # MNIST's well-known pixel statistics, here of the 55,000 remaining training images.
    np.testing.assert_allclose(self.ds.mean, [0.1307], atol=2e-3)
    np.testing.assert_allclose(self.ds.std, [0.3081], atol=2e-3)
    # A background pixel is 0 in the file, so it maps to -mean/std everywhere.
    self.assertAlmostEqual(float(self.ds.test.x[0, 0, 0, 0]),
                           -self.ds.mean[0] / self.ds.std[0], places=5)


class FashionMnistAndCifarTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    require_data()
    cls.fashion = ep.data.load("fashion_mnist", data_dir=DATA, val_size=0.1, seed=3)
    cls.cifar = ep.data.load("cifar10", data_dir=DATA / "cifar-10-batches-bin")

  def test_fashion_mnist(self):
    ds = self.fashion
    self.assertEqual(ds.train.x.shape, (54000, 28, 28, 1))
    self.assertEqual(ds.val.x.shape, (6000, 28, 28, 1))
    counts = np.bincount(ds.train.y) + np.bincount(ds.val.y)
    np.testing.assert_array_equal(counts, [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.y), [1000] * 10)

  def test_cifar10(self):
    ds = self.cifar
    self.assertEqual((ds.num_classes, ds.input_shape), (10, (32, 32, 3)))
    self.assertEqual(ds.train.x.shape, (45000, 32, 32, 3))
    self.assertEqual(ds.val.x.shape, (5000, 32, 32, 3))
    self.assertEqual(ds.test.x.shape, (10000, 32, 32, 3))
    np.testing.assert_array_equal(np.bincount(ds.test.y), [1000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.train.y) + np.bincount(ds.val.y),
                                  [5000] * 10)
    mean, std = channel_moments(ds.train.x)
    np.testing.assert_allclose(mean, [0.0] * 3, atol=1e-5)
    np.testing.assert_allclose(std, [1.0] * 3, atol=1e-5)
    # CIFAR-10's commonly quoted channel means/stds (full training set).
    np.testing.assert_allclose(ds.mean, [0.4914, 0.4822, 0.4465], atol=3e-3)
    np.testing.assert_allclose(ds.std, [0.2470, 0.2435, 0.2616], atol=3e-3)


class TextTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    require_data()
    cls.ds = ep.data.load("tiny_shakespeare", data_dir=DATA, val_size=5000)

  def test_vocab_and_split(self):
    ds = self.ds
    self.assertEqual(ds.num_classes, 65)
    self.assertEqual(ds.vocab, tuple(sorted(ds.vocab)))
    self.assertEqual(ds.input_shape, ())
    self.assertEqual(len(ds.train) + len(ds.val) + len(ds.test), 1115394)
    self.assertEqual(len(ds.test), 111539)  # the last 10%
    self.assertEqual(len(ds.val), 5000)  # the end of the training part
    self.assertTrue(ds.train.is_text and ds.train.y is None)
    self.assertEqual(ds.train.x.dtype, np.int32)
    text = (DATA / "tiny-shakespeare" / "input.txt").read_text()
    self.assertEqual(ds.decode(ds.train.x[:14]), "First Citizen:")
    self.assertEqual(ds.decode(ds.val.x), text[-111539 - 5000:-111539])
    self.assertEqual(ds.decode(ds.test.x[-20:]), text[-20:])

  def test_text_batches_are_next_char_windows(self):
    x, y = next(ep.data.batches(self.ds.train, 4, seed=0, epoch=0, block_size=16))
    self.assertEqual(x.shape, (4, 16))
    self.assertEqual(y.shape, (4, 16))
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    self.assertEqual(ep.data.steps_per_epoch(self.ds.val, 4, block_size=16),
                     (5000 - 1) // 16 // 4)


class DigitsTest(absltest.TestCase):

  def test_embedded_digits(self):
    a = ep.data.load("digits")
    b = ep.data.load("digits", seed=1, val_size=100)
    self.assertEqual((a.input_shape, a.num_classes), ((8, 8, 1), 10))
    self.assertEqual(len(a.train) + len(a.val) + len(a.test), 1797)
    self.assertEqual(len(a.test), 359)
    self.assertEqual(len(a.val), 144)  # default 10% of the 1,438 training images
    self.assertEqual(len(b.val), 100)
    # The test split is fixed; only the validation carve-out follows the seed.
    np.testing.assert_array_equal(a.test.y, b.test.y)
    np.testing.assert_allclose(a.test.x * a.std[0] + a.mean[0],
                               b.test.x * b.std[0] + b.mean[0], atol=1e-5)
    mean, std = channel_moments(a.train.x)
    np.testing.assert_allclose([mean[0], std[0]], [0.0, 1.0], atol=1e-5)
    # Pixels 0..16 are scaled to [0, 1] before normalising.
    recovered = a.train.x * a.std[0] + a.mean[0]
    np.testing.assert_allclose(recovered.max(), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.round(recovered * 16), recovered * 16, atol=1e-4)


class LoadArgumentsTest(parameterized.TestCase):

  def test_unknown_name_lists_valid_names(self):
    with self.assertRaisesRegex(ValueError, "mnist, fashion_mnist, cifar10.*tfds:"):
      ep.data.load("imagenet")

  @parameterized.named_parameters(
      ("negative", -1, "val_size=-1"),
      ("fraction_one", 1.0, "outside"),
      ("bool", True, "int count or a float"),
      ("string", "10", "int count or a float"),
      ("all_of_train", 1438, "leaves no training data.*1438"),
  )
  def test_bad_val_size(self, val_size, message):
    with self.assertRaisesRegex(ValueError, message):
      ep.data.load("digits", val_size=val_size)

  def test_raw_dataset_needs_data_dir(self):
    with self.assertRaisesRegex(ValueError, "--config.data.dir.*'digits'"):
      ep.data.load("mnist")

  def test_bad_seed(self):
    with self.assertRaisesRegex(ValueError, "seed=-1"):
      ep.data.load("digits", seed=-1)


def toy_split(n: int = 10) -> ep.data.Split:
  return ep.data.Split(x=np.arange(n, dtype=np.float32)[:, None] * 10,
                       y=np.arange(n, dtype=np.int32))


class BatchesTest(parameterized.TestCase):

  def test_order_is_the_documented_permutation(self):
    got = [y for _, y in ep.data.batches(toy_split(), 3, seed=5, epoch=2)]
    perm = np.random.default_rng([5, 2]).permutation(10)
    np.testing.assert_array_equal(np.stack(got), perm[:9].reshape(3, 3))
    np.testing.assert_array_equal(ep.data.epoch_batch_indices(10, 3, seed=5, epoch=2),
                                  perm[:9].reshape(3, 3))
    x, y = next(ep.data.batches(toy_split(), 3, seed=5, epoch=2))
    np.testing.assert_array_equal(x[:, 0], y * 10.0)  # inputs stay paired with labels

  def test_determinism_and_epochs(self):
    order = lambda seed, epoch: np.concatenate(
        [y for _, y in ep.data.batches(toy_split(), 2, seed=seed, epoch=epoch)])
    np.testing.assert_array_equal(order(0, 0), order(0, 0))
    self.assertFalse(np.array_equal(order(0, 0), order(0, 1)))
    self.assertFalse(np.array_equal(order(0, 0), order(1, 0)))
    self.assertEqual(sorted(order(0, 1)), list(range(10)))  # each example once

  def test_remainder_and_start(self):
    split = toy_split()
    full = [y for _, y in ep.data.batches(split, 3, seed=0, epoch=0, drop_remainder=False)]
    self.assertEqual([len(y) for y in full], [3, 3, 3, 1])
    resumed = [y for _, y in ep.data.batches(split, 3, seed=0, epoch=0, start=2,
                                             drop_remainder=False)]
    self.assertLen(resumed, 2)
    for a, b in zip(full[2:], resumed):
      np.testing.assert_array_equal(a, b)
    self.assertEqual(list(ep.data.batches(split, 3, seed=0, epoch=0, start=3)), [])
    self.assertEqual(ep.data.steps_per_epoch(split, 3), 3)
    self.assertEqual(ep.data.steps_per_epoch(split, 3, drop_remainder=False), 4)

  def test_text_windows(self):
    stream = ep.data.Split(x=np.arange(23, dtype=np.int32), y=None)
    got = list(ep.data.batches(stream, 2, seed=0, epoch=0, block_size=4,
                               drop_remainder=False))
    # 22 targets -> 5 windows of 4 (offset in [0, 2]) -> batches of 2, 2, 1.
    self.assertEqual([x.shape for x, _ in got], [(2, 4), (2, 4), (1, 4)])
    starts = np.concatenate([x[:, 0] for x, _ in got])
    offset = starts.min() % 4
    self.assertEqual(sorted(starts - offset), [0, 4, 8, 12, 16])
    for x, y in got:
      np.testing.assert_array_equal(x, x[:, :1] + np.arange(4))
      np.testing.assert_array_equal(y, x + 1)
    self.assertEqual(ep.data.steps_per_epoch(stream, 2, block_size=4), 2)

  @parameterized.named_parameters(
      ("zero_batch", dict(batch_size=0), "batch_size=0"),
      ("batch_too_big", dict(batch_size=11), "no batch"),
      ("start_past_end", dict(start=4), "start=4"),
      ("block_size_on_images", dict(block_size=4), "text splits only"),
      ("negative_epoch", dict(epoch=-1), "epoch=-1"),
  )
  def test_errors_raised_eagerly(self, overrides, message):
    kwargs = dict(batch_size=3, seed=0, epoch=0) | overrides
    with self.assertRaisesRegex(ValueError, message):
      ep.data.batches(toy_split(), **kwargs)  # no next(): checked at the call

  def test_text_needs_block_size(self):
    with self.assertRaisesRegex(ValueError, "block_size"):
      ep.data.batches(ep.data.Split(np.arange(9), None), 2, seed=0, epoch=0)


def candidates(image: np.ndarray, pad: int = 4) -> list[np.ndarray]:
  """Every crop (offsets 0..2*pad) of the zero-padded image, flipped or not."""
  h, w, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  crops = [padded[i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
  return crops + [c[:, ::-1] for c in crops]


class AugmentTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.x = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype(np.float32) + 5.0

  def test_shape_and_determinism(self):
    key = jax.random.key(0)
    a = ep.data.augment(key, self.x)
    self.assertEqual((a.shape, a.dtype), (self.x.shape, self.x.dtype))
    np.testing.assert_array_equal(a, ep.data.augment(key, self.x))
    np.testing.assert_array_equal(a, jax.jit(ep.data.augment)(key, self.x))
    self.assertFalse(np.array_equal(a, ep.data.augment(jax.random.key(1), self.x)))

  def test_each_output_is_a_padded_crop_or_its_flip(self):
    out = np.asarray(ep.data.augment(jax.random.key(3), self.x))
    kinds = []
    for image, augmented in zip(self.x, out):
      matches = [k for k, c in enumerate(candidates(image)) if np.array_equal(c, augmented)]
      self.assertLen(matches, 1)
      kinds.append(matches[0])
    kinds = np.array(kinds)
    self.assertGreater(len(set(kinds % 81)), 10)  # many different shifts, per example
    self.assertTrue(np.any(kinds >= 81) and np.any(kinds < 81))  # some flipped, some not
    self.assertTrue(np.any(out == 0.0))  # shifted-in zero padding

  def test_vmap_over_keys(self):
    keys = jax.random.split(jax.random.key(0), 3)
    out = jax.vmap(ep.data.augment, in_axes=(0, None))(keys, self.x[:4])
    self.assertEqual(out.shape, (3, 4, 8, 8, 3))
    np.testing.assert_array_equal(out[1], ep.data.augment(keys[1], self.x[:4]))


if __name__ == "__main__":
  absltest.main()
