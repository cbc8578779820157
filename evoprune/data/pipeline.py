"""Dataset containers, train/val carving, normalisation, batching and augmentation.

Every loader ends here: raw uint8 images become a `Dataset` whose validation split is carved
from the training set (never from test) by a seeded permutation, and whose pixels are
normalised with the per-channel mean/std of the *remaining* training split, so no statistic
leaks from validation or test. Text becomes one int32 token stream per split.

Batching is host-side numpy with a permutation fixed by `(seed, epoch)`, so a run resumed
mid-epoch (`start=`) sees exactly the batches it would have seen. `augment` is a pure jax
function meant to run inside the compiled train step.
"""

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from evoprune.types import PRNGKey


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a dataset.

  Attributes:
    x: images [N, H, W, C] float32 (normalised), or any [N, ...] features; for text the
      token stream [N] int32.
    y: labels [N] int32; None for text (targets are the next tokens of `x`).
  """
  x: np.ndarray
  y: np.ndarray | None

  def __post_init__(self):
    if self.y is not None and len(self.y) != len(self.x):
      raise ValueError(f"Split has {len(self.x)} inputs but {len(self.y)} labels; pass "
                       f"arrays of equal length")

  def __len__(self) -> int:
    return len(self.x)

  @property
  def is_text(self) -> bool:
    """Whether this is a token stream (batched into windows) rather than examples."""
    return self.y is None


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A dataset with train, validation and test splits.

  Attributes:
    name: the name it was loaded by.
    num_classes: classes for images; vocabulary size for text.
    input_shape: per-example shape, e.g. (28, 28, 1), (32, 32, 3), (8, 8, 1); () for text
      (examples are tokens; batches are [B, T] windows).
    train, val, test: the splits; `val` is carved from the official training set.
    vocab: text only: the characters, sorted; token id i is `vocab[i]`.
    mean, std: images only: the per-channel statistics (of pixels scaled to [0, 1]) that
      were subtracted/divided, for mapping back to pixel space.
  """
  name: str
  num_classes: int
  input_shape: tuple[int, ...]
  train: Split
  val: Split
  test: Split
  vocab: tuple[str, ...] | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def decode(self, ids: np.ndarray) -> str:
    """Token ids (any int array) -> text (text datasets only)."""
    if self.vocab is None:
      raise ValueError(f"dataset {self.name!r} has no vocabulary; decode is for text")
    return "".join(self.vocab[i] for i in np.asarray(ids).ravel())


def val_count(val_size: int | float, num_train: int, name: str) -> int:
  """Resolves `val_size` (a count, or a fraction of the training set) to a count.

  A float below 1 is a fraction; a whole-numbered float above 1 (as config overrides produce
  for a float field, e.g. 5000.0) is a count; 1.0 is rejected as ambiguous.

  Raises:
    ValueError: a negative count/fraction, a fraction >= 1, or no training data left.
  """
  if isinstance(val_size, (bool, np.bool_)) or not isinstance(
      val_size, (int, float, np.integer, np.floating)):
    raise ValueError(f"val_size={val_size!r} must be an int count or a float fraction; pass "
                     f"e.g. 5000 or 0.1")
  if isinstance(val_size, (float, np.floating)) and val_size > 1.0 and val_size.is_integer():
    val_size = int(val_size)
  if isinstance(val_size, (float, np.floating)):
    if not 0.0 <= val_size < 1.0:
      raise ValueError(f"val_size={val_size} is outside [0, 1) as a fraction; pass e.g. 0.1")
    count = int(round(float(val_size) * num_train))
  else:
    count = int(val_size)
  if count < 0:
    raise ValueError(f"val_size={val_size} is negative; pass a count >= 0 or a fraction "
                     f"such as 0.1")
  if count >= num_train:
    raise ValueError(f"val_size={val_size} leaves no training data: {name} has {num_train} "
                     f"training examples; pass a count below {num_train} or a fraction such "
                     f"as 0.1")
  return count


def carve(num_train: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits range(num_train) into (train, val) index arrays, both sorted.

  The val indices are the first `count` of a permutation fixed by `seed`, so the same seed
  gives the same validation set whatever the training seed.
  """
  perm = np.random.default_rng(seed).permutation(num_train)
  return np.sort(perm[count:]), np.sort(perm[:count])


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of x [N, ..., C] (float64)."""
  channels = x.shape[-1]
  if x.dtype == np.uint8:
    # Exact and fast: a histogram of the 256 values per channel.
    counts = np.stack([np.bincount(x[..., c].ravel(), minlength=256)
                       for c in range(channels)]).astype(np.float64)
    values = np.arange(256, dtype=np.float64)
    n = max(counts.sum(1)[0], 1.0)
    mean = counts @ values / n
    return mean, np.sqrt(np.maximum(counts @ values ** 2 / n - mean ** 2, 0.0))
  flat = x.reshape(-1, channels)
  total, squares = np.zeros(channels), np.zeros(channels)
  for i in range(0, len(flat), _CHUNK):
    part = flat[i:i + _CHUNK].astype(np.float64)
    total += part.sum(0)
    squares += np.square(part).sum(0)
  mean = total / max(len(flat), 1)
  return mean, np.sqrt(np.maximum(squares / max(len(flat), 1) - mean ** 2, 0.0))


# Rows per chunk: the working set stays in cache, which makes the passes ~4x faster.
_CHUNK = 1 << 16


def _normalised(x: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(x * scale - mean) / std as float32 [N, ..., C], read-only."""
  gain = (scale / std).astype(np.float32)
  shift = (mean / std).astype(np.float32)
  out = np.empty(x.shape, np.float32)
  flat_in, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])
  for i in range(0, len(flat_in), _CHUNK):
    chunk = flat_out[i:i + _CHUNK]
    np.multiply(flat_in[i:i + _CHUNK], gain, out=chunk, casting="unsafe")
    chunk -= shift
  out.flags.writeable = False  # shared by every consumer of the Dataset
  return out


def _labels(y: np.ndarray) -> np.ndarray:
  out = np.asarray(y, np.int32)
  out.flags.writeable = False
  return out


def image_dataset(name: str, train: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], *, num_classes: int,
                  val_size: int | float, seed: int, scale: float = 1 / 255) -> Dataset:
  """Assembles an image Dataset: carve val from train, normalise with train statistics.

  Args:
    name: dataset name.
    train: (images [N, H, W, C], labels [N]) of the official training set (any numeric
      dtype, e.g. uint8).
    test: the same for the test set.
    num_classes: label classes.
    val_size: validation examples carved from `train` (a count or a fraction).
    seed: fixes which training examples become validation.
    scale: multiplies pixels first (1/255 for uint8), so `mean`/`std` read in [0, 1] units.

  Returns:
    The Dataset, x float32 NHWC normalised, y int32.
  """
  x, y = train
  count = val_count(val_size, len(x), name)
  train_idx, val_idx = carve(len(x), count, seed)
  x_train = x[train_idx]
  mean, std = _channel_stats(x_train)
  mean, std = mean * scale, std * scale
  # A constant channel has nothing to scale; dividing by 1 keeps it finite.
  std = np.where(std > 1e-12, std, 1.0)
  split = lambda a, b: Split(_normalised(a, scale, mean, std), _labels(b))
  return Dataset(name=name, num_classes=num_classes, input_shape=tuple(x.shape[1:]),
                 train=split(x_train, y[train_idx]), val=split(x[val_idx], y[val_idx]),
                 test=split(*test), mean=tuple(float(m) for m in mean),
                 std=tuple(float(s) for s in std))


def text_dataset(name: str, text: str, *, val_size: int | float,
                 test_fraction: float = 0.1) -> Dataset:
  """Assembles a character-level Dataset from one text.

  The vocabulary is the sorted set of characters of the whole text. The split is contiguous
  (shuffling characters would destroy the sequences): the first 90% is training data and the
  last 10% (`test_fraction`) the test split; validation is the *end* of the training part
  (`val_size` characters, or that fraction of the training part), so it borders the test
  text and never overlaps it.

  Returns:
    Dataset with x int32 token ids [N] per split, y None, vocab and num_classes = len(vocab).
  """
  codepoints = np.frombuffer(text.encode("utf-32-le"), "<u4")
  points, ids = np.unique(codepoints, return_inverse=True)
  ids = ids.astype(np.int32).reshape(-1)
  ids.flags.writeable = False
  num_test = int(round(test_fraction * len(ids)))
  num_train_full = len(ids) - num_test
  count = val_count(val_size, num_train_full, name)
  num_train = num_train_full - count
  return Dataset(name=name, num_classes=len(points), input_shape=(),
                 train=Split(ids[:num_train], None),
                 val=Split(ids[num_train:num_train_full], None),
                 test=Split(ids[num_train_full:], None),
                 vocab=tuple(chr(p) for p in points))


def _check_int(value: object, name: str, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
      or value < minimum:
    raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
  return int(value)


def _num_windows(split: Split, block_size: int | None) -> int:
  if block_size is None:
    raise ValueError("this split is text: pass block_size=T (the window length) to batch it")
  block_size = _check_int(block_size, "block_size", 1)
  # Each window needs T inputs plus one more token as the last target.
  return max((len(split.x) - 1) // block_size, 0)


def steps_per_epoch(split: Split, batch_size: int, drop_remainder: bool = True, *,
                    block_size: int | None = None) -> int:
  """Batches per epoch of `split` (text: non-overlapping windows of `block_size`)."""
  batch_size = _check_int(batch_size, "batch_size", 1)
  if split.is_text:
    n = _num_windows(split, block_size)
  elif block_size is not None:
    raise ValueError(f"block_size={block_size} applies to text splits only; drop it")
  else:
    n = len(split)
  return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_batch_indices(num_examples: int, batch_size: int, *, seed: int,
                        epoch: int) -> np.ndarray:
  """The example indices of each full batch of one epoch (the remainder is dropped).

  Args:
    num_examples: N.
    batch_size: B.
    seed, epoch: the permutation is `np.random.default_rng([seed, epoch]).permutation(N)`.

  Returns:
    [N // B, B] int32 indices; row i is batch i of `batches(..., drop_remainder=True)`.
  """
  batch_size = _check_int(batch_size, "batch_size", 1)
  perm = _permutation(num_examples, seed, epoch)
  steps = num_examples // batch_size
  return perm[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  seed = _check_int(seed, "seed", 0)
  epoch = _check_int(epoch, "epoch", 0)
  return np.random.default_rng([seed, epoch]).permutation(n)


def batches(split: Split, batch_size: int, *, seed: int, epoch: int, start: int = 0,
            drop_remainder: bool = True, block_size: int | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Iterates over one epoch of `split` in an order fixed by `(seed, epoch)`.

  Arguments are checked now, not at the first `next()`.

  Args:
    split: images (or any examples with labels) or a text stream.
    batch_size: B.
    seed, epoch: fix the order: `np.random.default_rng([seed, epoch])`.
    start: skip the first `start` batches (resume mid-epoch); the rest are unchanged.
    drop_remainder: drop the last partial batch.
    block_size: text only: the window length T.

  Yields:
    (x [B, ...], y [B]) for examples; for text (x [B, T], y [B, T]) int32 with
    y[b, t] = x[b, t + 1] in the stream: non-overlapping windows in shuffled order, all
    shifted by a per-epoch random offset so window boundaries vary across epochs.

  Raises:
    ValueError: bad sizes, or `start` past the end of the epoch.
  """
  steps = steps_per_epoch(split, batch_size, drop_remainder, block_size=block_size)
  if steps == 0:
    raise ValueError(f"batch_size={batch_size} yields no batch from a split of {len(split)} "
                     f"{'tokens' if split.is_text else 'examples'}; pass a smaller batch_size"
                     f"{'' if split.is_text else ' or drop_remainder=False'}")
  start = _check_int(start, "start", 0)
  seed, epoch = _check_int(seed, "seed", 0), _check_int(epoch, "epoch", 0)
  if start > steps:
    raise ValueError(f"start={start} is past the {steps} batches of an epoch; pass "
                     f"0 <= start <= {steps}")
  if split.is_text:
    return _text_batches(split.x, batch_size, block_size, seed, epoch, start, steps)
  perm = _permutation(len(split), seed, epoch)
  return ((split.x[idx], split.y[idx]) for idx in
          (perm[i * batch_size:(i + 1) * batch_size] for i in range(start, steps)))


def _text_batches(ids: np.ndarray, batch_size: int, block_size: int, seed: int, epoch: int,
                  start: int, steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  rng = np.random.default_rng([seed, epoch])
  windows = (len(ids) - 1) // block_size
  offset = rng.integers(0, len(ids) - 1 - windows * block_size + 1)
  perm = rng.permutation(windows)
  positions = np.arange(block_size)
  for i in range(start, steps):
    starts = offset + perm[i * batch_size:(i + 1) * batch_size] * block_size
    idx = starts[:, None] + positions
    yield ids[idx], ids[idx + 1]


def augment(key: PRNGKey, x: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
  """CIFAR augmentation: random crop after zero padding, and random horizontal flip.

  Each example gets its own crop offset (uniform in [0, 2 * pad] on both axes) and flip
  (probability 1/2). Pure and jit/vmap-safe; cheap enough to run inside a train step.

  Args:
    key: PRNG key.
    x: images [B, H, W, C].
    pad: zero padding on each side before cropping back to H x W.
    flip: whether to flip horizontally at random.

  Returns:
    [B, H, W, C], same dtype.
  """
  if x.ndim != 4:
    raise ValueError(f"augment expects images [B, H, W, C]; got shape {x.shape}")
  b, h, w, c = x.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))
  out = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (b,))
    out = jnp.where(flips[:, None, None, None], out[:, :, ::-1, :], out)
  return out
