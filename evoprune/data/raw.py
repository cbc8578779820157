"""Readers for the official raw dataset files, with their checksums verified.

Supported files (exactly as distributed, or as stored in `../shared/data`):

- MNIST and Fashion-MNIST: the four IDX files, gzip-compressed (`*-ubyte.gz`). The IDX
  header (zero magic, type code, rank, big-endian dims) is parsed here with numpy.
- CIFAR-10, binary version: `data_batch_{1..5}.bin` and `test_batch.bin`, each either as
  distributed or gzip-compressed on its own (`.bin.gz`: the md5 of the *decompressed* bytes is
  checked against the official per-file value), or the official `cifar-10-binary.tar.gz`,
  read in memory with `tarfile` (nothing is extracted to disk).
- Tiny Shakespeare: char-rnn's `input.txt`.

Every file is checked against its official MD5. A missing file raises `MissingDataError`
(a `FileNotFoundError`), a wrong one `ChecksumError` (a `ValueError`); both name the file, the
expected md5 and the official URL. A file that passed is remembered for the rest of the
process (keyed by path, size and mtime), so loading twice hashes once.
"""

import dataclasses
import gzip
import hashlib
import io
import os
import pathlib
import tarfile

import numpy as np


class ChecksumError(ValueError):
  """A data file's MD5 differs from the official one."""


class MissingDataError(FileNotFoundError):
  """A data file or folder is missing."""


@dataclasses.dataclass(frozen=True)
class OfficialFile:
  """One file as officially distributed.

  Attributes:
    name: the official file name.
    md5: MD5 (hex) of the official file's bytes.
    url: where the official file comes from.
  """
  name: str
  md5: str
  url: str


MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"  # mirror of yann.lecun.com
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")


def _idx_files(url: str, md5s: dict[str, str]) -> dict[str, OfficialFile]:
  return {name: OfficialFile(name, md5, url + name) for name, md5 in md5s.items()}


# split -> (images file, labels file) are looked up through these name tables.
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_FILES = _idx_files(MNIST_URL, {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
})
FASHION_MNIST_FILES = _idx_files(FASHION_MNIST_URL, {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
})
# The per-file values are those of the files inside the official tarball.
CIFAR10_FILES = {
    name: OfficialFile(name, md5, CIFAR10_URL) for name, md5 in {
        "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
        "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
        "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
        "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
        "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
        "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
    }.items()
}
CIFAR10_TARBALL = OfficialFile("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
                               CIFAR10_URL)
CIFAR10_SPLITS = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                  "test": ("test_batch.bin",)}
SHAKESPEARE_FILE = OfficialFile("input.txt", "6fb458f1232090904fb40fe944165e91",
                                SHAKESPEARE_URL)

_KNOWN = {"mnist": MNIST_FILES.values(), "fashion_mnist": FASHION_MNIST_FILES.values(),
          "cifar10": [*CIFAR10_FILES.values(), CIFAR10_TARBALL],
          "tiny_shakespeare": [SHAKESPEARE_FILE]}

# (resolved path, size, mtime_ns, expected md5) of files that already passed.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _identify(md5: str) -> str:
  """Names the official file with this md5, if any (a hint for a mixed-up folder)."""
  for dataset, files in _KNOWN.items():
    for f in files:
      if f.md5 == md5:
        return f" It is the official {dataset} file {f.name}: does data_dir point at the " \
               f"wrong dataset?"
  return ""


def check_md5(data: bytes, official: OfficialFile, where: str) -> None:
  """Raises ChecksumError unless md5(data) is the official value.

  Args:
    data: the bytes of the (decompressed) official file.
    official: what the file should be.
    where: the path (or tarball member) the bytes came from, for the message.
  """
  actual = hashlib.md5(data).hexdigest()
  if actual != official.md5:
    raise ChecksumError(
        f"{where}: md5 {actual} does not match the official md5 {official.md5} of "
        f"{official.name}; the file is corrupted or not the official one. Download the "
        f"official file from {official.url}.{_identify(actual)}")


def read_verified(path: str | os.PathLike, official: OfficialFile, *,
                  gunzip: bool = False, md5: str | None = None) -> bytes:
  """Reads a file and checks it against its official MD5 (once per process).

  Args:
    path: the file.
    official: the official file it must equal.
    gunzip: the file is a gzip wrapper of the official file (CIFAR's `.bin.gz`): return and
      check the decompressed bytes.
    md5: overrides `official.md5` (only for reading a file that is not official on
      purpose, e.g. a test fixture).

  Returns:
    The official file's bytes (decompressed when `gunzip`).

  Raises:
    MissingDataError: `path` does not exist.
    ChecksumError: the md5 differs.
  """
  path = pathlib.Path(path)
  if md5 is not None:
    official = dataclasses.replace(official, md5=md5)
  try:
    stat = path.stat()
    data = path.read_bytes()
  except FileNotFoundError:
    raise MissingDataError(
        f"{path} not found: expected the official {official.name} (md5 {official.md5}) "
        f"from {official.url}.") from None
  if gunzip:
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise ChecksumError(f"{path}: not a valid gzip file ({e}); expected a gzip of the "
                          f"official {official.name} (md5 {official.md5} after gunzip) "
                          f"from {official.url}.") from None
  key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, official.md5)
  if key not in _VERIFIED:
    check_md5(data, official, f"{path}{' (after gunzip)' if gunzip else ''}")
    _VERIFIED.add(key)
  return data


def find_folder(data_dir: str | os.PathLike, subfolders: tuple[str, ...],
                markers: tuple[str, ...], dataset: str, url: str) -> pathlib.Path:
  """The folder holding a dataset's files: `data_dir` itself or a conventional subfolder.

  Args:
    data_dir: the folder given by the user.
    subfolders: conventional subfolder names, e.g. ("mnist",).
    markers: file names whose presence identifies the dataset's folder.
    dataset: dataset name for messages.
    url: where the official files come from, for messages.

  Returns:
    `data_dir` when it holds any marker file, else the first existing subfolder.

  Raises:
    MissingDataError: neither holds the dataset.
  """
  root = pathlib.Path(data_dir).expanduser()
  if not root.is_dir():
    raise MissingDataError(f"data_dir={os.fspath(data_dir)!r} is not a directory; pass the "
                           f"folder holding the {dataset} files (official: {url}).")
  candidates = [root, *(root / s for s in subfolders)]
  for folder in candidates:
    if any((folder / m).exists() for m in markers):
      return folder
  raise MissingDataError(
      f"no {dataset} files in {root} or its subfolder {' or '.join(subfolders)}/: expected "
      f"{', '.join(markers)} (official files: {url}).")


def parse_idx(data: bytes) -> np.ndarray:
  """Parses an (uncompressed) IDX file.

  Args:
    data: the bytes: two zero bytes, a type code, the rank, one big-endian uint32 per dim,
      then the values in row-major order.

  Returns:
    The array, shape given by the header (e.g. [N, 28, 28] uint8 images, [N] labels).

  Raises:
    ValueError: a malformed header or a size that does not match it.
  """
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
            0x0E: ">f8"}
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
    raise ValueError(f"not an IDX file: header starts with {data[:4]!r}")
  ndim = data[3]
  offset = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  dtype = np.dtype(dtypes[data[2]])
  if len(data) != offset + dtype.itemsize * int(np.prod(shape)):
    raise ValueError(f"IDX size mismatch: header says shape {shape} of {dtype} but the "
                     f"payload has {len(data) - offset} bytes")
  return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_dataset(folder: str | os.PathLike, files: dict[str, OfficialFile],
                     splits: tuple[str, ...] = ("train", "test")
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads MNIST-style IDX `.gz` files from a folder.

  Args:
    folder: the folder holding the four `.gz` files.
    files: MNIST_FILES or FASHION_MNIST_FILES.
    splits: which of "train", "test" to read.

  Returns:
    split -> (images [N, 28, 28, 1] uint8, labels [N] uint8).
  """
  out = {}
  for split in splits:
    arrays = []
    for name in IDX_NAMES[split]:
      path = pathlib.Path(folder) / name
      arrays.append(parse_idx(gzip.decompress(read_verified(path, files[name]))))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} "
                       f"do not pair up")
    out[split] = (images[..., None], labels)
  return out


def parse_cifar_records(data: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Parses CIFAR-10 binary records: a label byte, then 1024 R, 1024 G, 1024 B bytes.

  Args:
    data: a whole `*.bin` file (10,000 records of 3,073 bytes).

  Returns:
    (images [N, 32, 32, 3] uint8 NHWC (a view of `data`), labels [N] uint8).
  """
  if len(data) % 3073:
    raise ValueError(f"CIFAR-10 binary data of {len(data)} bytes is not a whole number of "
                     f"3073-byte records")
  records = np.frombuffer(data, np.uint8).reshape(-1, 3073)
  # A strided view: the caller's concatenation or normalisation makes the one copy.
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, records[:, 0].copy()


def _stack(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  if len(parts) == 1:
    return parts[0]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads one verified CIFAR-10 batch file (`.bin`, or `.bin.gz` of the official `.bin`).

  Returns:
    (images [10000, 32, 32, 3] uint8, labels [10000] uint8).
  """
  path = pathlib.Path(path)
  gunzip = path.name.endswith(".gz")
  official = CIFAR10_FILES.get(path.name.removesuffix(".gz"))
  if official is None:
    raise ValueError(f"{path.name} is not a CIFAR-10 binary batch; expected one of "
                     f"{', '.join(CIFAR10_FILES)} (optionally .gz)")
  return parse_cifar_records(read_verified(path, official, gunzip=gunzip))


def read_cifar10_tarball(path: str | os.PathLike, splits: tuple[str, ...] = ("train", "test"),
                         *, md5: str | None = None
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads the official `cifar-10-binary.tar.gz` in memory.

  Args:
    path: the tarball.
    splits: which of "train", "test" to read.
    md5: overrides the official tarball md5 (for a test-made tarball); members are always
      checked against the official per-file values.

  Returns:
    split -> (images [N, 32, 32, 3] uint8, labels [N] uint8).
  """
  raw = read_verified(path, CIFAR10_TARBALL, md5=md5)
  wanted = {name for split in splits for name in CIFAR10_SPLITS[split]}
  found = {}
  with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
    for member in tar:  # one pass: a gzip stream cannot seek back cheaply
      name = member.name.rsplit("/", 1)[-1]
      if member.isfile() and name in wanted:
        data = tar.extractfile(member).read()
        check_md5(data, CIFAR10_FILES[name], f"{path}:{member.name}")
        found[name] = parse_cifar_records(data)
  missing = sorted(wanted - set(found))
  if missing:
    raise MissingDataError(f"{path} lacks {', '.join(missing)}; download the official "
                           f"tarball (md5 {CIFAR10_TARBALL.md5}) from {CIFAR10_URL}.")
  return {s: _stack([found[n] for n in CIFAR10_SPLITS[s]]) for s in splits}


def read_cifar10(folder: str | os.PathLike, splits: tuple[str, ...] = ("train", "test")
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads CIFAR-10 from a folder of batch files (`.bin` or `.bin.gz`) or the tarball.

  Args:
    folder: holds `data_batch_{1..5}.bin[.gz]` and `test_batch.bin[.gz]`, or
      `cifar-10-binary.tar.gz`.
    splits: which of "train", "test" to read.

  Returns:
    split -> (images [N, 32, 32, 3] uint8, labels [N] uint8); train has 50,000 examples in
    the official batch order, test 10,000.
  """
  folder = pathlib.Path(folder)
  batch_files = [n for s in splits for n in CIFAR10_SPLITS[s]]
  if (folder / CIFAR10_TARBALL.name).exists() and not any(
      (folder / n).exists() or (folder / (n + ".gz")).exists() for n in batch_files):
    return read_cifar10_tarball(folder / CIFAR10_TARBALL.name, splits)
  out = {}
  for split in splits:
    parts = []
    for name in CIFAR10_SPLITS[split]:
      plain = folder / name
      parts.append(read_cifar_batch(plain if plain.exists() else folder / (name + ".gz")))
    out[split] = _stack(parts)
  return out


def read_tiny_shakespeare(folder: str | os.PathLike) -> str:
  """Reads and verifies Tiny Shakespeare's `input.txt` (1,115,394 characters)."""
  return read_verified(pathlib.Path(folder) / SHAKESPEARE_FILE.name,
                       SHAKESPEARE_FILE).decode("utf-8")
