"""One-file storage of compressed params: plain arrays in a `.npz` plus versioned metadata.

    nbytes = ep.storage.save("model.npz", qparams, sparse="auto", metadata={"model": "lenet5"})
    params, metadata = ep.storage.load("model.npz")   # identical arrays, identical predictions

The file is an uncompressed NumPy zip (`np.savez`) of two plain uint8 arrays: `data`, the
encoded parts of every leaf back to back, and `metadata`, a UTF-8 JSON string (format name,
version, and for every leaf its path, shape, dtype, encoding, and each part's dtype, shape
and offset in `data`). One blob rather than one zip member per part saves ~235 bytes of
headers per part, which is 15% of a sparse int8 thesis CNN. Loading never unpickles
(`np.load(..., allow_pickle=False)`). Sizes reported by the library are these files' sizes.

Encodings, per leaf (recorded in the metadata, which carries a format name and version):
- dense: the array as is;
- bitmask: one bit per entry (`np.packbits`) plus the nonzero values in row-major order;
- CSR: the leaf viewed as [prod(shape[:-1]), shape[-1]], with row pointers and column
  indices in the narrowest unsigned integer type that holds them, plus the nonzero values.
`sparse='auto'` picks the smallest of the three for every leaf with ndim >= 2 (at 90%
sparsity the bitmask is smaller than CSR; CSR wins above ~94%). Float values are written in
their own dtype. One-byte integer values (int8 quantization codes, uint8 codebook indices)
are bit-packed at the narrowest width that holds their range (4-bit codes take half a byte,
a 16-entry codebook's indices 4 bits); the width and offset are in the metadata. Zeros are
exact, so the sparse forms are lossless: a loaded pruned model predicts exactly as before.
"""

import io
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from evoprune.types import Params

FORMAT = "evoprune.compressed"
VERSION = 1
SPARSE_FORMATS = ("none", "bitmask", "csr", "auto")
_METADATA = "metadata"
_DATA = "data"


# ------------------------------------------------------------------------------ trees


def _flatten(tree: Params, prefix: str = "") -> list[tuple[str, np.ndarray]]:
  """[(path 'a/b/kernel', array)] of nested dicts, in sorted-key (jax.tree) order."""
  if not isinstance(tree, Mapping):
    return [(prefix, np.asarray(tree))]
  out = []
  for key in sorted(tree):
    if not isinstance(key, str) or "/" in key or not key:
      raise ValueError(f"params key {key!r} under {prefix or '(root)'!r} must be a non-empty "
                       "str without '/'; save nested dicts of arrays (linen params).")
    out.extend(_flatten(tree[key], f"{prefix}/{key}" if prefix else key))
  return out


def _unflatten(items: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in items:
    node = tree
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = value
  return tree


# ------------------------------------------------------------------------- bit packing


def _narrow_unsigned(max_value: int) -> np.dtype:
  for dtype in (np.uint8, np.uint16, np.uint32):
    if max_value <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  return np.dtype(np.uint64)


def _pack_values(values: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
  """Values (1-D) -> stored array and its decoding info; one-byte ints are bit-packed."""
  info: dict[str, Any] = {"dtype": values.dtype.name, "count": int(values.size)}
  if values.dtype.kind in "iu" and values.dtype.itemsize == 1 and values.size:
    low, high = int(values.min()), int(values.max())
    bits = max(1, math.ceil(math.log2(high - low + 1)))
    if bits < 8:
      shifted = (values.astype(np.int16) - low).astype(np.uint8)
      bit_matrix = np.unpackbits(shifted[:, None], axis=1, bitorder="little")[:, :bits]
      info.update(bits=bits, offset=low)
      return np.packbits(bit_matrix.ravel(), bitorder="little"), info
  return values, info


def _unpack_values(stored: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
  dtype = np.dtype(info["dtype"])
  if "bits" not in info:
    return stored.astype(dtype, copy=False)
  bits, count = info["bits"], info["count"]
  flat = np.unpackbits(stored, bitorder="little")[:count * bits].reshape(count, bits)
  weights = (1 << np.arange(bits)).astype(np.int16)
  return (flat.astype(np.int16) @ weights + info["offset"]).astype(dtype)


# ------------------------------------------------------------------------------ leaves


def _encode(array: np.ndarray, encoding: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Members and metadata of one leaf in one encoding."""
  if encoding == "dense":
    stored, info = _pack_values(array.ravel())
    return {"values": stored}, {"values": info}
  nonzero = array.ravel() != 0
  stored, info = _pack_values(array.ravel()[nonzero])
  members = {"values": stored}
  if encoding == "bitmask":
    members["bitmask"] = np.packbits(nonzero)
  else:
    rows = array.reshape(-1, array.shape[-1]) != 0
    members["indptr"] = np.concatenate([[0], np.cumsum(rows.sum(axis=1))]).astype(
        _narrow_unsigned(int(nonzero.sum())))
    members["indices"] = np.nonzero(rows)[1].astype(_narrow_unsigned(array.shape[-1] - 1))
  return members, {"values": info}


def _decode(members: Mapping[str, np.ndarray], entry: Mapping[str, Any]) -> np.ndarray:
  shape, encoding = tuple(entry["shape"]), entry["encoding"]
  values = _unpack_values(members["values"], entry["values"])
  if encoding == "dense":
    return values.reshape(shape)
  size = math.prod(shape)
  if encoding == "bitmask":
    nonzero = np.unpackbits(members["bitmask"], count=size).astype(bool)
  else:
    cols = shape[-1]
    indptr = members["indptr"].astype(np.int64)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    nonzero = np.zeros(size, bool)
    nonzero[rows * cols + members["indices"].astype(np.int64)] = True
  out = np.zeros(size, values.dtype)
  out[nonzero] = values
  return out.reshape(shape)


def _nbytes(members: Mapping[str, np.ndarray]) -> int:
  return sum(m.nbytes for m in members.values())


def _choose(array: np.ndarray, sparse: str) -> tuple[str, dict[str, np.ndarray], dict]:
  if sparse == "none" or array.ndim < 2:
    return ("dense", *_encode(array, "dense"))
  if sparse != "auto":
    return (sparse, *_encode(array, sparse))
  options = [(name, *_encode(array, name)) for name in ("dense", "bitmask", "csr")]
  return min(options, key=lambda option: _nbytes(option[1]))


# -------------------------------------------------------------------------- save, load


def _archive(params: Params, sparse: str, metadata: Mapping[str, Any] | None
             ) -> dict[str, np.ndarray]:
  if sparse not in SPARSE_FORMATS:
    raise ValueError(f"sparse={sparse!r} is unknown; use one of {SPARSE_FORMATS}.")
  try:
    user = json.loads(json.dumps(metadata or {}))
  except TypeError as e:
    raise ValueError(f"metadata must be JSON-serialisable (plain dicts, lists, numbers, "
                     f"strings): {e}") from e
  chunks: list[bytes] = []
  offset = 0
  leaves = []
  for path, array in _flatten(params):
    if array.dtype.kind not in "biuf":
      raise ValueError(f"leaf {path!r} has dtype {array.dtype}; only bool, integer and float "
                       "arrays are stored.")
    encoding, members, info = _choose(array, sparse)
    parts = {}
    for part, member in members.items():
      member = np.ascontiguousarray(member)
      parts[part] = {"dtype": member.dtype.str, "shape": list(member.shape), "offset": offset}
      chunks.append(member.tobytes())
      offset += member.nbytes
    leaves.append({"path": path, "shape": list(array.shape), "encoding": encoding,
                   "parts": parts, **info})
  header = {"format": FORMAT, "version": VERSION, "leaves": leaves, "metadata": user}
  return {_DATA: np.frombuffer(b"".join(chunks), np.uint8),
          _METADATA: np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)}


def _parts(data: np.ndarray, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for name, part in entry["parts"].items():
    dtype = np.dtype(part["dtype"])
    count = math.prod(part["shape"])
    start = part["offset"]
    out[name] = np.frombuffer(data[start:start + count * dtype.itemsize].tobytes(),
                              dtype).reshape(part["shape"])
  return out


def save(path: str | os.PathLike, params: Params, *, sparse: str = "none",
         metadata: Mapping[str, Any] | None = None) -> int:
  """Writes `params` (nested dicts of arrays) to one `.npz` file.

  Args:
    path: the file to write (conventionally ending in .npz).
    params: float params, or integer params from `quantization.quantize_params` or
      `weight_sharing.share` (codes, scales and codebooks are ordinary leaves).
    sparse: 'none' (every leaf dense), 'bitmask' or 'csr' (every leaf with ndim >= 2 in that
      form), or 'auto' (the smallest of dense, bitmask and CSR per leaf).
    metadata: JSON-serialisable information to keep with the weights (model name,
      quantization config, ...).

  Returns:
    The size of the written file in bytes.

  Raises:
    ValueError: unknown `sparse`, a key that is not a str, a non-numeric leaf, or metadata
      that JSON cannot encode.
  """
  arrays = _archive(params, sparse, metadata)
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return os.path.getsize(path)


def size(params: Params, *, sparse: str = "none",
         metadata: Mapping[str, Any] | None = None) -> int:
  """The size in bytes of the file `save` would write, without writing it."""
  buffer = io.BytesIO()
  np.savez(buffer, **_archive(params, sparse, metadata))
  return buffer.getbuffer().nbytes


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], np.ndarray]:
  with np.load(path, allow_pickle=False) as archive:
    if _METADATA not in archive.files or _DATA not in archive.files:
      raise ValueError(f"{os.fspath(path)!r} has no evoprune metadata; write it with "
                       "evoprune.storage.save.")
    header = json.loads(archive[_METADATA].tobytes().decode("utf-8"))
    data = archive[_DATA]
  if header.get("format") != FORMAT:
    raise ValueError(f"{os.fspath(path)!r} has format {header.get('format')!r}, not "
                     f"{FORMAT!r}.")
  if header.get("version", 0) > VERSION:
    raise ValueError(f"{os.fspath(path)!r} is format version {header['version']}; this "
                     f"evoprune reads up to version {VERSION}: upgrade evoprune.")
  return header, data


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a file written by `save`.

  Args:
    path: the `.npz` file.

  Returns:
    (params, metadata): nested dicts of NumPy arrays with the saved dtypes and exactly the
    saved values, and the `metadata` passed to `save`.

  Raises:
    ValueError: the file is not an evoprune compressed model, or was written by a newer
      format version.
  """
  header, data = _read(path)
  items = [(entry["path"], _decode(_parts(data, entry), entry)) for entry in header["leaves"]]
  return _unflatten(items), header["metadata"]


def inspect(path: str | os.PathLike) -> list[dict[str, Any]]:
  """How each leaf of a saved file is stored (for reports and debugging).

  Returns:
    One dict per leaf: 'path', 'shape', 'encoding' ('dense', 'bitmask' or 'csr'),
    'values' (dtype, count and, when bit-packed, 'bits' and 'offset') and 'parts'
    {name: the stored array} ('values', and 'bitmask' or 'indptr' and 'indices').
  """
  header, data = _read(path)
  return [{**{k: v for k, v in entry.items() if k != "parts"}, "parts": _parts(data, entry)}
          for entry in header["leaves"]]
