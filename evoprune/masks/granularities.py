"""Structured granularities: unit norms, whole neurons/filters, blocks, N:M, unit dependents.

Units, blocks and N:M groups are ranked by norms or scores and selected with the exact
top-k of `evoprune.masks.selection`; `cover_dependents` extends a mask to the biases and
BatchNorm parameters of the units it prunes (owners by `unit_owner`).
"""

from collections.abc import Callable, Sequence
import numbers
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from evoprune.masks.selection import order_keys
from evoprune.masks.selection import topk
from evoprune.masks.trees import _is_none
from evoprune.masks.trees import check
from evoprune.masks.trees import path_keys
from evoprune.masks.trees import path_str
from evoprune.types import Masks, Params, Scores, Sparsity

GRANULARITIES = ("neuron", "filter")
NORMS = ("l1", "l2", "linf")


def _norm(x: jax.Array, axis: tuple[int, ...], norm: str) -> jax.Array:
  a = jnp.abs(jnp.asarray(x, jnp.float32))
  if norm == "l1":
    return jnp.sum(a, axis=axis)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(a * a, axis=axis))
  return jnp.max(a, axis=axis, initial=0.0)


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
  if value not in valid:
    raise ValueError(f"{name}={value!r} is not one of {list(valid)}; pick one of those.")


def unit_norms(scores: Scores, norm: str = "l2") -> Scores:
  """Norm of each output unit (last axis) of every non-None leaf.

  Dense kernels [in, out] give one value per neuron, conv kernels [h, w, in, out] one per
  filter: the norm runs over all axes but the last.

  Args:
    scores: tree of float arrays (weights or scores), None for non-prunable leaves.
    norm: 'l1', 'l2' or 'linf'.

  Returns:
    Tree with a float32 leaf [out] per non-None leaf.
  """
  _check_choice("norm", norm, NORMS)
  return jax.tree.map(
      lambda x: None if x is None else _norm(x, tuple(range(x.ndim - 1)), norm), scores,
      is_leaf=_is_none)


def structured(scores: Scores, sparsity: Sparsity, *, granularity: str = "neuron",
               norm: str = "l2") -> Masks:
  """Prunes whole output units: exactly round(s_l * units_l) columns per leaf.

  Units are ranked by the norm of their weights/scores over all axes but the last (a Dense
  kernel's output neuron, a conv kernel's output filter), lowest first, ties by lower unit
  index.

  Args:
    scores: tree of float arrays [..., out], None for non-prunable leaves.
    sparsity: as in `topk` (scalar, per-leaf tree or 1-D array; traced ok), the fraction of
      units to prune in each leaf.
    granularity: 'neuron' or 'filter' (the same rule; the name documents the layer kind).
    norm: 'l1', 'l2' or 'linf'.

  Returns:
    Bool masks with the structure of `scores`, constant along all axes but the last.
  """
  _check_choice("granularity", granularity, GRANULARITIES)
  unit_masks = topk(unit_norms(scores, norm), sparsity)
  return jax.tree.map(
      lambda x, m: None if x is None else jnp.broadcast_to(m, x.shape), scores, unit_masks,
      is_leaf=_is_none)


def block_norms(scores: Scores, block_shape: tuple[int, int], norm: str = "l2") -> Scores:
  """Norm of each (bh, bw) block over the last two axes of every non-None leaf.

  Leading axes (a conv kernel's h, w) belong to every block. Edge blocks of a dimension that
  is not a multiple of the block are partial (scored over the entries they have).

  Returns:
    Tree with a float32 leaf [ceil(in / bh), ceil(out / bw)] per non-None leaf.
  """
  _check_choice("norm", norm, NORMS)
  bh, bw = _check_block_shape(block_shape)

  def one(path, x):
    if x is None:
      return None
    if x.ndim < 2:
      raise ValueError(f"leaf {path_str(path)!r} has shape {x.shape}; blocks need at least 2 "
                       "dimensions: give it a None score or use topk.")
    i, o = x.shape[-2:]
    gi, go = -(-i // bh), -(-o // bw)
    # Zero padding leaves l1, l2 and linf norms unchanged.
    pad = [(0, 0)] * (x.ndim - 2) + [(0, gi * bh - i), (0, go * bw - o)]
    xb = jnp.pad(jnp.asarray(x, jnp.float32), pad).reshape(x.shape[:-2] + (gi, bh, go, bw))
    lead = tuple(range(x.ndim - 2))
    return _norm(xb, lead + (x.ndim - 1, x.ndim + 1), norm)

  return jax.tree_util.tree_map_with_path(one, scores, is_leaf=_is_none)


def _check_block_shape(block_shape: Any) -> tuple[int, int]:
  if (len(tuple(block_shape)) != 2 or
      not all(isinstance(b, numbers.Integral) and b >= 1 for b in block_shape)):
    raise ValueError(f"block_shape={block_shape!r} must be two positive ints, e.g. (4, 4).")
  return int(block_shape[0]), int(block_shape[1])


def blocks(scores: Scores, sparsity: Sparsity, *, block_shape: tuple[int, int],
           norm: str = "l2") -> Masks:
  """Prunes whole (bh, bw) blocks of the last two axes: round(s_l * blocks_l) per leaf.

  Args:
    scores: tree of float arrays [..., in, out], None for non-prunable leaves.
    sparsity: as in `topk`; the fraction of blocks to prune in each leaf.
    block_shape: (bh, bw) block size over (in, out); leading axes are part of every block.
    norm: 'l1', 'l2' or 'linf' over a block's entries.

  Returns:
    Bool masks with the structure of `scores`, constant over every block.
  """
  bh, bw = _check_block_shape(block_shape)
  block_masks = topk(block_norms(scores, (bh, bw), norm), sparsity)

  def expand(x, m):
    if x is None:
      return None
    i, o = x.shape[-2:]
    full = jnp.repeat(jnp.repeat(m, bh, axis=0), bw, axis=1)[:i, :o]
    return jnp.broadcast_to(full, x.shape)

  return jax.tree.map(expand, scores, block_masks, is_leaf=_is_none)


def _signed_keys(x: jax.Array) -> jax.Array:
  """int32 keys with the float order (NaN lowest, -0.0 == +0.0), same shape as x."""
  u = order_keys(x).reshape(x.shape)
  return lax.bitcast_convert_type(u ^ np.uint32(0x80000000), jnp.int32)


def nm(scores: Scores, n: int, m: int, axis: int = -2) -> Masks:
  """N:M sparsity: in every group of m consecutive entries along `axis`, keep the n best.

  "2:4" means n=2 nonzeros in every 4 (50% sparsity), the pattern sparse tensor cores run.
  The default axis -2 is the input axis of Dense [in, out] and conv [h, w, in, out] kernels.
  Within a group the m - n lowest scores are pruned, ties by lower index.

  Args:
    scores: tree of float arrays, None for non-prunable leaves.
    n: entries kept per group, 1 <= n <= m.
    m: group size; every leaf's size along `axis` must be a multiple of m.
    axis: the axis along which groups run.

  Returns:
    Bool masks with the structure of `scores`.

  Raises:
    ValueError: bad n/m, or a leaf whose `axis` is missing or not a multiple of m.
  """
  if not (isinstance(n, numbers.Integral) and isinstance(m, numbers.Integral) and 1 <= n <= m):
    raise ValueError(f"n={n!r}, m={m!r} must be ints with 1 <= n <= m, e.g. n=2, m=4 for 2:4.")

  def one(path, x):
    if x is None:
      return None
    if not -x.ndim <= axis < x.ndim or x.shape[axis] % m:
      raise ValueError(
          f"leaf {path_str(path)!r} has shape {x.shape}: axis={axis} must exist and its size "
          f"be a multiple of m={m}; choose another axis or give the leaf a None score.")
    k = jnp.moveaxis(_signed_keys(x), axis, -1)
    g = k.reshape(k.shape[:-1] + (k.shape[-1] // m, m))
    a, b = g[..., :, None], g[..., None, :]  # a = entry i, b = entry j
    pos = np.arange(m)
    before = (b < a) | ((b == a) & (pos[None, :] < pos[:, None]))
    rank = jnp.sum(before, axis=-1)
    keep = (rank >= m - n).reshape(k.shape)
    return jnp.moveaxis(keep, -1, axis)

  return jax.tree_util.tree_map_with_path(one, scores, is_leaf=_is_none)


# ---------------------------------------------------------------------------------------
# Dependents of pruned units.

Owner = Callable[[tuple[str, ...]], tuple[str, ...] | None]


def unit_owner(path: tuple[str, ...]) -> tuple[str, ...] | None:
  """The kernel whose output units a per-unit leaf belongs to, by the zoo's names.

  A module's `bias` belongs to the `kernel` beside it (Dense, Conv); a `norm` module's
  `scale` and `bias` belong to the `conv` kernel beside it (the zoo's ConvBN unit:
  `conv` -> BatchNorm `norm`). Any other leaf (LayerNorms, embeddings, ...) has no owner:
  a LayerNorm mixes channels, so zeroing one of its entries would not remove a unit.

  Args:
    path: a leaf's path keys, e.g. ('block_01', 'unit_0', 'norm', 'scale').

  Returns:
    The owner kernel's path keys, e.g. ('block_01', 'unit_0', 'conv', 'kernel'), or None.
  """
  if len(path) >= 1 and path[-1] == "bias":
    if len(path) >= 2 and path[-2] == "norm":
      return (*path[:-2], "conv", "kernel")
    return (*path[:-1], "kernel")
  if len(path) >= 2 and path[-2:] == ("norm", "scale"):
    return (*path[:-2], "conv", "kernel")
  return None


def cover_dependents(params: Params, masks: Masks, owner: Owner = unit_owner) -> Masks:
  """Extends masks to the per-unit leaves of every fully pruned output unit.

  A neuron or filter whose kernel column is pruned still emits its bias, or its BatchNorm
  shift (relu(beta) after ReLU), so the masked model is not the model without that unit,
  and a zero-padded 3x3 convolution reading the constant cannot absorb it (surgery would
  have to keep the channel). Masking the unit's bias, BatchNorm scale and BatchNorm shift
  too makes it output exactly zero, in training mode (batch statistics) and in inference
  mode (whatever its running statistics), so `evoprune.surgery.shrink` removes it exactly.

  Args:
    params: tree of arrays.
    masks: bool masks like params (None for unmasked leaves); unit j of a kernel [..., out]
      is pruned when its whole column `mask[..., j]` is False.
    owner: `owner(path_keys) -> kernel path keys | None`, which kernel's units a leaf of
      shape [out] belongs to (default `unit_owner`, the zoo's names).

  Returns:
    Masks like params: the given masks, plus a bool [out] mask (True = unit kept) on every
    owned leaf whose owner has a mask of matching width (ANDed with an existing mask).
  """
  check(params, masks)
  kernels = {}
  for p, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]:
    if m is not None and np.ndim(m) >= 1:
      kernels[path_keys(p)] = m

  def one(path, mask, leaf):
    kernel_path = owner(path_keys(path))
    kernel = kernels.get(kernel_path) if kernel_path is not None else None
    if kernel is None or np.shape(leaf) != (np.shape(kernel)[-1],):
      return mask
    alive = jnp.any(jnp.reshape(kernel, (-1, np.shape(kernel)[-1])), axis=0)
    return alive if mask is None else jnp.logical_and(mask, alive)

  return jax.tree_util.tree_map_with_path(one, masks, params, is_leaf=_is_none)
