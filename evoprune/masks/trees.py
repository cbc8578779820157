"""Mask trees and their bookkeeping: leaf paths, filters, init, apply, check, summary.

A mask tree has the structure of its params, bool leaves (True = keep) where a leaf is
prunable and `None` elsewhere; every function that names a leaf uses `path_str`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evoprune.types import Masks, Params

Filter = Callable[[tuple[str, ...], Any], bool]


def _is_none(x: Any) -> bool:
  return x is None


# ---------------------------------------------------------------------------------------
# Paths and initialisation.


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_keys(path: Sequence[Any]) -> tuple[str, ...]:
  """Returns a pytree path (jax key entries or strings) as a tuple of strings.

  A trailing 'value' attribute key (the array inside an `nnx.Variable`) is dropped.
  """
  keys = tuple(k if isinstance(k, str) else _key_name(k) for k in path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    keys = keys[:-1]
  return keys


def path_str(path: Sequence[Any]) -> str:
  """Returns the '/'-joined name of a pytree path, e.g. 'Dense_0/kernel'."""
  return "/".join(path_keys(path))


def paths(tree: Any) -> list[str]:
  """Returns the path strings of the non-None leaves of `tree`, in `jax.tree` flatten order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [path_str(p) for p, _ in flat]


def default_filter(path: tuple[str, ...], leaf: Any) -> bool:
  """Prunable iff the last path key is 'kernel' and the leaf has at least 2 dimensions."""
  return bool(path) and path[-1] == "kernel" and np.ndim(leaf) >= 2


def init(params: Params, filter: Filter = default_filter) -> Masks:  # pylint: disable=redefined-builtin
  """Returns all-True bool masks for the leaves `filter` accepts and None elsewhere.

  Args:
    params: any pytree of arrays.
    filter: `filter(path_keys, leaf) -> bool`, with `path_keys` a tuple of str.

  Returns:
    A mask tree with the structure of `params`.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.ones(np.shape(x), bool) if filter(path_keys(p), x) else None, params)


# ---------------------------------------------------------------------------------------
# Applying, checking and summarising.


def apply(params: Params, masks: Masks) -> Params:
  """Returns params with masked-out entries set to zero (None mask leaves untouched).

  Args:
    params: tree of arrays.
    masks: bool tree with the structure of `params` (None for untouched leaves); a mask may
      carry extra leading axes (a population), which broadcast.

  Returns:
    A tree like `params` (dtypes preserved).
  """
  return jax.tree.map(
      lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)), masks, params,
      is_leaf=_is_none)


def check(params: Params, masks: Masks) -> None:
  """Raises ValueError naming the first path where `masks` does not fit `params`.

  Args:
    params: tree of arrays.
    masks: candidate mask tree.

  Raises:
    ValueError: a leaf present in one tree only, or a mask whose shape differs.
  """
  p_flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)[0]
  m_flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]
  p_map = {path_str(p): x for p, x in p_flat}
  m_map = {path_str(p): x for p, x in m_flat}
  for name in [path_str(p) for p, _ in p_flat]:
    if name not in m_map:
      raise ValueError(f"masks have no entry for params leaf {name!r}; build masks with "
                       "evoprune.masks.init(params) so the structures match.")
  for name, mask in m_map.items():
    if name not in p_map:
      raise ValueError(f"masks have a leaf {name!r} that params lack; build masks with "
                       "evoprune.masks.init(params) so the structures match.")
    if mask is not None and np.shape(mask) != np.shape(p_map[name]):
      raise ValueError(f"mask {name!r} has shape {np.shape(mask)} but the param has "
                       f"{np.shape(p_map[name])}; masks must match params leaf by leaf.")


def summary(tree: Masks | Params, filter: Filter | None = default_filter) -> dict[str, Any]:  # pylint: disable=redefined-builtin
  """Counts pruned entries of a mask tree (False) or a params tree (exact zeros).

  Bool leaves are masks and always counted; None leaves are skipped; other leaves are
  params, counted when `filter(path_keys, leaf)` accepts them (all when filter is None).
  Runs on the host (not under jit).

  Returns:
    {'sparsity': float (size-weighted), 'nonzeros': int, 'total': int,
     'layers': {path_str: {'sparsity': float, 'nonzeros': int, 'total': int}}}.
  """
  layers = {}
  for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]:
    if x is None:
      continue
    a = np.asarray(x)
    if a.dtype != bool and filter is not None and not filter(path_keys(p), a):
      continue
    nonzeros = int(np.count_nonzero(a))
    total = int(a.size)
    layers[path_str(p)] = {"sparsity": 1.0 - nonzeros / total if total else 0.0,
                           "nonzeros": nonzeros, "total": total}
  nonzeros = sum(v["nonzeros"] for v in layers.values())
  total = sum(v["total"] for v in layers.values())
  return {"sparsity": 1.0 - nonzeros / total if total else 0.0, "nonzeros": nonzeros,
          "total": total, "layers": layers}
