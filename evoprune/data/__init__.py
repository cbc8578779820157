"""Datasets: official raw files, prepared TFDS data, and the embedded `digits` default.

```python
ds = ep.data.load("mnist", data_dir="../shared/data")       # or ".../shared/data/mnist"
for x, y in ep.data.batches(ds.train, 128, seed=0, epoch=0):  # x [128, 28, 28, 1] float32
  ...
```

Names (`DATASETS`, plus `tfds:<name>`):

- `mnist`, `fashion_mnist`: IDX `.gz` files; 28x28x1; val carved from the 60,000.
- `cifar10`: binary version (`.bin`, `.bin.gz` or `cifar-10-binary.tar.gz`); 32x32x3.
- `tiny_shakespeare`: char-rnn `input.txt`; characters as tokens (vocabulary of 65).
  Split: first 90% train, last 10% test, validation the end of the train part.
- `digits`: scikit-learn's bundled 8x8 digits (1,797 images, no files needed); a fixed 20%
  (359 images, permutation seeded 0 whatever `seed` is) is the test split.
- `tfds:<name>`: a TFDS image classification dataset prepared in `data_dir` (array_record).

Raw files are checked against the official MD5s (see `raw`). Images come back float32 NHWC,
normalised by the per-channel mean/std of the training split left after carving out
validation; labels int32.
"""

import os
from typing import Callable

import numpy as np

from evoprune.data import raw
from evoprune.data.pipeline import augment
from evoprune.data.pipeline import batches
from evoprune.data.pipeline import Dataset
from evoprune.data.pipeline import epoch_batch_indices
from evoprune.data.pipeline import Split
from evoprune.data.pipeline import steps_per_epoch
from evoprune.data import pipeline
from evoprune.data.raw import ChecksumError
from evoprune.data.raw import MissingDataError
from evoprune.data import tfds_source
from evoprune.data.tfds_source import TfdsNotPreparedError

__all__ = [
    "ChecksumError", "DATASETS", "Dataset", "MissingDataError", "Split",
    "TfdsNotPreparedError", "augment", "batches", "epoch_batch_indices", "load",
    "steps_per_epoch",
]

PathLike = str | os.PathLike


def _need_dir(name: str, data_dir: PathLike | None) -> PathLike:
  if data_dir is None or os.fspath(data_dir) == "":
    raise ValueError(f"dataset {name!r} is read from its official files: pass their folder "
                     f"as data_dir (--config.data.dir=...), or use 'digits', which needs no "
                     f"files")
  return data_dir


def _idx(name: str, files: dict[str, raw.OfficialFile], subfolders: tuple[str, ...],
         url: str):
  """A loader for an MNIST-style dataset of four IDX `.gz` files."""
  def load_idx(data_dir: PathLike | None, val_size: int | float, seed: int) -> Dataset:
    folder = raw.find_folder(_need_dir(name, data_dir), subfolders, tuple(files), name, url)
    read = raw.read_idx_dataset(folder, files)
    return pipeline.image_dataset(name, read["train"], read["test"], num_classes=10,
                                  val_size=val_size, seed=seed)
  return load_idx


def load_cifar10(data_dir: PathLike | None, val_size: int | float, seed: int) -> Dataset:
  """CIFAR-10 from the official binary files (per-file `.bin[.gz]` or the tarball)."""
  markers = (*raw.CIFAR10_FILES, *(n + ".gz" for n in raw.CIFAR10_FILES),
             raw.CIFAR10_TARBALL.name)
  folder = raw.find_folder(_need_dir("cifar10", data_dir),
                           ("cifar-10-batches-bin", "cifar10", "cifar-10"), markers,
                           "cifar10", raw.CIFAR10_URL)
  read = raw.read_cifar10(folder)
  return pipeline.image_dataset("cifar10", read["train"], read["test"], num_classes=10,
                                val_size=val_size, seed=seed)


def load_tiny_shakespeare(data_dir: PathLike | None, val_size: int | float,
                          seed: int) -> Dataset:
  """Tiny Shakespeare as character tokens; the split is contiguous, so `seed` is unused."""
  del seed
  folder = raw.find_folder(_need_dir("tiny_shakespeare", data_dir),
                           ("tiny-shakespeare", "tinyshakespeare", "tiny_shakespeare"),
                           (raw.SHAKESPEARE_FILE.name,), "tiny_shakespeare",
                           raw.SHAKESPEARE_URL)
  return pipeline.text_dataset("tiny_shakespeare", raw.read_tiny_shakespeare(folder),
                               val_size=val_size)


DIGITS_TEST_SIZE = 359  # 20% of 1,797, rounded down


def load_digits(data_dir: PathLike | None, val_size: int | float, seed: int) -> Dataset:
  """scikit-learn's bundled 8x8 digits (pixels 0..16); `data_dir` is ignored."""
  del data_dir
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  bunch = sk_datasets.load_digits()
  x = bunch.images.astype(np.float32)[..., None]
  y = bunch.target
  # The test split is fixed (seed 0) so every training seed is scored on the same images.
  rest, test = pipeline.carve(len(x), DIGITS_TEST_SIZE, 0)
  return pipeline.image_dataset("digits", (x[rest], y[rest]), (x[test], y[test]),
                                num_classes=10, val_size=val_size, seed=seed,
                                scale=1 / 16)


# name -> loader(data_dir, val_size, seed) -> Dataset
DATASETS: dict[str, Callable[[PathLike | None, int | float, int], Dataset]] = {
    "mnist": _idx("mnist", raw.MNIST_FILES, ("mnist",), raw.MNIST_URL),
    "fashion_mnist": _idx("fashion_mnist", raw.FASHION_MNIST_FILES,
                          ("fashion-mnist", "fashion_mnist"), raw.FASHION_MNIST_URL),
    "cifar10": load_cifar10,
    "tiny_shakespeare": load_tiny_shakespeare,
    "digits": load_digits,
}

# Used when val_size is None: the usual 5,000 for the big image sets, else 10%.
DEFAULT_VAL_SIZE = {"mnist": 5000, "fashion_mnist": 5000, "cifar10": 5000}


def load(name: str, *, data_dir: PathLike | None = None, val_size: int | float | None = None,
         seed: int = 0) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: one of `DATASETS` ('mnist', 'fashion_mnist', 'cifar10', 'tiny_shakespeare',
      'digits') or 'tfds:<tfds name>'.
    data_dir: the folder of the official files, or its parent holding the conventional
      subfolder (mnist, fashion-mnist, cifar-10-batches-bin, tiny-shakespeare); for 'tfds:'
      the TFDS data_dir (None: TFDS's default). Ignored by 'digits'.
    val_size: validation examples carved from the training set: a count, or a fraction in
      [0, 1) of it (text: characters from the end of the training part). None: 5,000 for
      mnist, fashion_mnist, cifar10 and 10% otherwise.
    seed: fixes which training examples become validation (not the test split).

  Returns:
    The Dataset.

  Raises:
    ValueError: unknown name, bad val_size/seed, data_dir missing for a raw dataset,
      ChecksumError (a file is not the official one).
    FileNotFoundError: MissingDataError (a file/folder is missing) or TfdsNotPreparedError.
  """
  if not isinstance(name, str) or not (name in DATASETS or name.startswith("tfds:")):
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, or "
                     f"'tfds:<name>' for a prepared TFDS dataset")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r} must be an int >= 0")
  if val_size is None:
    val_size = DEFAULT_VAL_SIZE.get(name, 0.1)
  # Range against the training-set size is checked once the data is read.
  pipeline.val_count(val_size, np.iinfo(np.int64).max, name)
  if name.startswith("tfds:"):
    tfds_name = name.removeprefix("tfds:")
    if not tfds_name:
      raise ValueError("'tfds:' needs a dataset name, e.g. 'tfds:mnist'")
    return tfds_source.load_tfds(tfds_name, data_dir=data_dir, val_size=val_size,
                                 seed=int(seed))
  return DATASETS[name](data_dir, val_size, int(seed))
