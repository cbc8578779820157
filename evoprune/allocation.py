"""Per-layer sparsity targets from a global target.

Every allocation returns a *sparsity tree*: the structure of its template (a masks or scores
tree) with one float per prunable (non-None) leaf and None elsewhere; `masks.topk` takes it
as is. The global target is parameter-weighted: sum_l s_l * n_l = target * sum_l n_l.

- `uniform`: every layer at the target.
- `global_`: the per-layer sparsities a single global top-k threshold induces (traced ok).
- `erk`: Erdos-Renyi-Kernel (Evci et al. 2020, "Rigging the Lottery"): density_l proportional
  to (sum of kernel dims) / (product of kernel dims), scaled to meet the target exactly; layers
  whose density would exceed 1 are made dense and the others rescaled.
- `explicit`: values given by path string or regex.
- `fixed`: a sparsity tree computed elsewhere (e.g. by the evolutionary search), as an
  allocation for the target it was computed for.

`first_last` (uniform, global_, erk) treats the first and last prunable leaves in `jax.tree`
flatten order specially: 'dense' keeps them unpruned, a float caps their sparsity, None does
nothing. The other layers are rescaled so that the global target is still met exactly; an
unreachable target raises ValueError naming the largest reachable one. Flatten order is
sorted dict-key order for linen params ('Conv_0' < 'Dense_0' < 'Dense_1'), which is network
order for up to ten layers of a kind ('Dense_10' sorts before 'Dense_2'); use `explicit`
with regexes when it is not.

uniform, erk and explicit run on the host on static shapes and return Python floats;
`global_` is jit/vmap-safe and returns float32 scalars.
"""

from collections.abc import Callable, Mapping
import itertools
import numbers
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evoprune import masks
from evoprune.types import Scores, Sparsity

FirstLast = str | float | None


def _is_none(x: Any) -> bool:
  return x is None


def _prunable(template: Any) -> tuple[list[Any], Any, list[int], list[int], list[str]]:
  """Returns (leaves with None, treedef, indices of prunable leaves, their sizes, paths)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=_is_none)
  leaves = [x for _, x in flat]
  idx = [i for i, x in enumerate(leaves) if x is not None]
  if not idx:
    raise ValueError("the template has no prunable (non-None) leaves; pass a masks or scores "
                     "tree such as evoprune.masks.init(params).")
  sizes = [int(np.prod(np.shape(leaves[i]), dtype=np.int64)) for i in idx]
  return leaves, treedef, idx, sizes, [masks.path_str(flat[i][0]) for i in idx]


def _unflatten(leaves: list[Any], treedef: Any, idx: list[int], values: list[Any]) -> Sparsity:
  out = [None] * len(leaves)
  for i, v in zip(idx, values):
    out[i] = v
  return treedef.unflatten(out)


def _check_target(target: Any) -> None:
  if isinstance(target, numbers.Number) and not (
      not isinstance(target, bool) and 0.0 <= target < 1.0):
    raise ValueError(f"target={target!r} is outside [0, 1); pass a value such as 0.9.")


def _check_first_last(first_last: FirstLast) -> None:
  if first_last is None or first_last == "dense":
    return
  if (isinstance(first_last, numbers.Real) and not isinstance(first_last, bool) and
      0.0 <= first_last < 1.0):
    return
  raise ValueError(f"first_last={first_last!r} is not valid; pass None, 'dense' or a sparsity "
                   "cap in [0, 1) such as 0.8.")


def _ends(num_layers: int) -> list[int]:
  return sorted({0, num_layers - 1})


def _cap(first_last: FirstLast) -> float:
  return 0.0 if first_last == "dense" else float(first_last)


def global_sparsity(template: Any, sparsity: Sparsity) -> float:
  """The parameter-weighted global sparsity of a sparsity tree (host-side)."""
  _, treedef, idx, sizes, _ = _prunable(template)
  per_leaf = treedef.flatten_up_to(sparsity)
  return float(sum(float(per_leaf[i]) * n for i, n in zip(idx, sizes)) / sum(sizes))


# ---------------------------------------------------------------------------------------
# Host-side allocations: densities from weights, bounds and a budget.


def _fill(sizes: np.ndarray, raw: np.ndarray, lo: np.ndarray, hi: np.ndarray,
          budget: float) -> np.ndarray:
  """Densities d_l = clip(eps * raw_l, lo_l, hi_l) with sum_l n_l d_l = budget.

  The left side is continuous, nondecreasing and piecewise linear in eps with breakpoints at
  lo_l / raw_l and hi_l / raw_l, so eps is found exactly by locating the budget's segment.
  This is the ERK rule of Evci et al. (layers hitting 1 are made dense, the rest rescaled),
  generalised to lower bounds (sparsity caps).

  Args:
    sizes, raw, lo, hi: float64 arrays [L]; raw > 0 and 0 <= lo <= hi <= 1.
    budget: nonzeros to place, within [sum n lo, sum n hi].

  Returns:
    float64 densities [L].
  """
  def total(eps):
    return float(np.sum(sizes * np.clip(eps * raw, lo, hi)))

  points = np.unique(np.concatenate([[0.0], lo / raw, hi / raw]))
  values = [total(e) for e in points]
  i = int(np.searchsorted(values, budget))  # first point with value >= budget
  if i == 0:
    eps = points[0]
  else:
    i = min(i, len(points) - 1)
    e0, e1, v0, v1 = points[i - 1], points[i], values[i - 1], values[i]
    eps = e0 + (budget - v0) * (e1 - e0) / (v1 - v0)
  return np.clip(eps * raw, lo, hi)


def _allocate(template: Any, target: float, raw: Callable[[tuple[int, ...]], float],
              first_last: FirstLast) -> Sparsity:
  _check_target(target)
  _check_first_last(first_last)
  leaves, treedef, idx, sizes, _ = _prunable(template)
  n = np.asarray(sizes, np.float64)
  weights = np.asarray([raw(np.shape(leaves[i])) for i in idx], np.float64)
  lo = np.zeros(len(idx))
  if first_last is not None:
    lo[_ends(len(idx))] = 1.0 - _cap(first_last)
  hi = np.ones(len(idx))
  reachable = 1.0 - float(np.sum(n * lo) / np.sum(n))
  if target > reachable + 1e-12:
    raise ValueError(
        f"target={target} is not reachable with first_last={first_last!r}: the largest "
        f"reachable global sparsity is {reachable:.6g}; lower the target or relax first_last.")
  density = _fill(n, weights, lo, hi, (1.0 - target) * float(np.sum(n)))
  return _unflatten(leaves, treedef, idx, [float(1.0 - d) for d in density])


def uniform(template: Any, target: float, *, first_last: FirstLast = None) -> Sparsity:
  """Every prunable leaf at `target` (the others rescaled when `first_last` is set).

  Args:
    template: masks or scores tree (None = not prunable); only shapes are read.
    target: global sparsity in [0, 1).
    first_last: None, 'dense' or a sparsity cap for the first and last prunable leaves.

  Returns:
    A sparsity tree of Python floats.

  Raises:
    ValueError: bad target/first_last, or a target unreachable under first_last.
  """
  if first_last is None:
    _check_target(target)
    leaves, treedef, idx, _, _ = _prunable(template)
    return _unflatten(leaves, treedef, idx, [float(target)] * len(idx))
  return _allocate(template, target, lambda shape: 1.0, first_last)


def erk(template: Any, target: float, *, power_scale: float = 1.0,
        first_last: FirstLast = None) -> Sparsity:
  """Erdos-Renyi-Kernel allocation (Evci et al. 2020).

  density_l = min(1, eps * (sum(shape_l) / prod(shape_l)) ** power_scale), with eps chosen
  so that the parameter-weighted density is 1 - target exactly (a conv kernel [h, w, in, out]
  uses (h + w + in + out) / (h * w * in * out); a Dense [in, out] kernel (in + out) / (in * out)).
  Unlike RigL's code, the budget is not floored to whole parameters per layer.

  Args:
    template: masks or scores tree (None = not prunable); only shapes are read.
    target: global sparsity in [0, 1).
    power_scale: exponent on the ERK ratio (0 gives uniform).
    first_last: None, 'dense' or a sparsity cap for the first and last prunable leaves.

  Returns:
    A sparsity tree of Python floats.
  """
  if not isinstance(power_scale, numbers.Real) or power_scale < 0:
    raise ValueError(f"power_scale={power_scale!r} must be a number >= 0, e.g. 1.0.")
  return _allocate(template, target,
                   lambda shape: (float(sum(shape)) / float(np.prod(shape))) ** power_scale,
                   first_last)


def fixed(per_layer: Sparsity) -> Callable[..., Sparsity]:
  """An allocation that returns `per_layer` (a sparsity tree), e.g. a searched one.

  For `Pruner(allocation=fixed(per_layer), schedule=...)` the tree is the allocation at the
  schedule's final target (the per-layer targets scale with the scheduled sparsity).

  Args:
    per_layer: a sparsity tree: floats in [0, 1) at prunable leaves, None elsewhere.

  Returns:
    `allocate(template, target, *, first_last=None) -> per_layer`; it raises ValueError
    when `template` has other prunable leaves or `first_last` is set.
  """
  values = jax.tree.leaves(per_layer)
  for v in values:
    _check_target(float(v))
  structure = jax.tree.structure(per_layer, is_leaf=_is_none)

  def allocate(template: Any, target: Any, *, first_last: FirstLast = None) -> Sparsity:
    del target  # the tree was computed for it
    if first_last is not None:
      raise ValueError(f"first_last={first_last!r}: a fixed allocation already says every "
                       "layer's sparsity; cap the first/last layers when computing it.")
    if jax.tree.structure(template, is_leaf=_is_none) != structure:
      raise ValueError("the fixed allocation's tree does not match the pruned parameters; "
                       "compute it from a scores/masks tree of the same model.")
    return per_layer

  return allocate


def explicit(template: Any, values: Mapping[str, float], *,
             default: float | None = None) -> Sparsity:
  """Sparsities given per path: {'Dense_0/kernel': 0.5, 'Conv_.*': 0.8, ...}.

  A key applies to a leaf when it equals the leaf's path string or fully matches it as a
  regex; the first such key in `values` order wins.

  Args:
    template: masks or scores tree (None = not prunable).
    values: path string or regex -> sparsity in [0, 1).
    default: sparsity for leaves no key matches; None makes such leaves an error.

  Returns:
    A sparsity tree of Python floats.

  Raises:
    ValueError: a value outside [0, 1), a key matching no prunable leaf, or an unmatched leaf
      without a default.
  """
  leaves, treedef, idx, _, names = _prunable(template)
  for key, v in values.items():
    if not isinstance(v, numbers.Real):
      raise ValueError(f"values[{key!r}]={v!r} must be a float in [0, 1).")
    _check_target(v)
  if default is not None:
    _check_target(default)

  def matches(key: str, name: str) -> bool:
    if key == name:
      return True
    try:
      return re.fullmatch(key, name) is not None
    except re.error:
      return False

  used = set()
  out = []
  missing = []
  for name in names:
    hit = next((k for k in values if matches(k, name)), None)
    if hit is None:
      missing.append(name)
      out.append(None if default is None else float(default))
    else:
      used.add(hit)
      out.append(float(values[hit]))
  unused = [k for k in values if k not in used]
  if unused:
    raise ValueError(f"keys {unused} match no prunable leaf; prunable paths are {names}.")
  if missing and default is None:
    raise ValueError(f"no value for {missing}; add keys for them or pass default=0.0.")
  return _unflatten(leaves, treedef, idx, out)


# ---------------------------------------------------------------------------------------
# Global threshold (traced).


def _counts(scores: Scores, free: list[bool], num_pruned: jax.Array) -> list[jax.Array]:
  """Per-leaf pruned counts of a global top-k over the `free` prunable leaves only."""
  leaves, treedef, idx, _, _ = _prunable(scores)
  kept = [leaves[i] if f else None for i, f in zip(idx, free)]
  m = masks.global_topk_count(_unflatten(leaves, treedef, idx, kept), num_pruned)
  m_leaves = treedef.flatten_up_to(m)
  return [jnp.sum(~m_leaves[i], dtype=jnp.int32) if f else jnp.int32(0)
          for i, f in zip(idx, free)]


def global_(scores: Scores, target: float | jax.Array, *,
            first_last: FirstLast = None) -> Sparsity:
  """Per-leaf sparsities induced by one global top-k threshold over the scores.

  Exactly round(target * total) entries are pruned overall (float32, half to even), and each
  leaf's value is its pruned count / size, so `masks.topk(scores, global_(scores, s))` equals
  `masks.global_topk(scores, s)` for leaves below ~4M entries (float32 count / size).

  With `first_last='dense'` the first/last leaves are excluded and the same count is taken
  from the others; with a cap c they keep min(their share, round(c * n)) and the excess moves
  to the other leaves (at most three threshold passes, decided inside the graph).

  Args:
    scores: tree of float arrays, None for non-prunable leaves.
    target: global sparsity in [0, 1); may be traced.
    first_last: None, 'dense' or a sparsity cap for the first and last prunable leaves.

  Returns:
    A sparsity tree of float32 scalars (traced when the inputs are).

  Raises:
    ValueError: a concrete target outside [0, 1) or unreachable under first_last.
  """
  _check_target(target)
  _check_first_last(first_last)
  leaves, treedef, idx, sizes, _ = _prunable(scores)
  total = sum(sizes)
  # The same count as masks.global_topk: float32 product, rounded half to even.
  k = jnp.clip(jnp.round(jnp.asarray(target, jnp.float32) * np.float32(total)), 0,
               total).astype(jnp.int32)
  num = len(idx)
  if first_last is None:
    counts = _counts(scores, [True] * num, k)
  else:
    ends = _ends(num)
    caps = {e: masks.num_pruned(_cap(first_last), sizes[e]) for e in ends}
    reachable = total - sum(sizes[e] - caps[e] for e in ends)
    if isinstance(target, numbers.Number) and masks.num_pruned(target, total) > reachable:
      raise ValueError(
          f"target={target} is not reachable with first_last={first_last!r}: at most "
          f"{reachable} of {total} entries can be pruned (global sparsity "
          f"{reachable / total:.6g}); lower the target or relax first_last.")

    def solve(capped: tuple[int, ...]) -> list[jax.Array]:
      # Capped leaves prune exactly their cap; the rest share one threshold.
      free = [l not in capped for l in range(num)]
      c = _counts(scores, free, k - sum(caps[e] for e in capped))
      return [jnp.int32(caps[l]) if l in capped else c[l] for l in range(num)]

    if first_last == "dense":
      counts = solve(tuple(ends))
    else:
      # Which ends hit their cap is data dependent: solve every subset statically and chain
      # the choice (capping one end only raises the threshold for the other).
      subsets = [s for r in range(len(ends) + 1) for s in itertools.combinations(ends, r)]
      solved = {s: solve(s) for s in subsets}

      def pick(flags: dict[int, jax.Array]) -> list[jax.Array]:
        out = solved[()]
        for s in subsets[1:]:
          chosen = jnp.all(jnp.stack([flags[e] if e in s else ~flags[e] for e in ends]))
          out = [jnp.where(chosen, a, b) for a, b in zip(solved[s], out)]
        return out

      first = solved[()]
      flags = {e: first[e] > caps[e] for e in ends}
      second = pick(flags)
      flags = {e: flags[e] | (second[e] > caps[e]) for e in ends}
      counts = pick(flags)
  values = [c.astype(jnp.float32) / np.float32(n) for c, n in zip(counts, sizes)]
  return _unflatten(leaves, treedef, idx, values)


ALLOCATIONS = {
    "uniform": uniform,
    "global": global_,
    "erk": erk,
    "explicit": explicit,
}


def get(name: str) -> Callable[..., Sparsity]:
  """Returns the allocation registered under `name`."""
  if name not in ALLOCATIONS:
    raise ValueError(f"unknown allocation {name!r}; valid names: {sorted(ALLOCATIONS)}.")
  return ALLOCATIONS[name]
