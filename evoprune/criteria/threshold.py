"""The seed paper's std-threshold rules, the corrected `evolution` rule, the search for r.

The paper's rules keep a weight when its magnitude exceeds `r * std(...)` of its layer, one
multiplier r shared by all layers (`std_threshold`, `evolution_paper`,
`evolution_paper_tinygpt`); `search_r` walks the seed library's r grid until the masks
reach a target `compression`. `evolution` is the corrected rule: top-k on the running
average, hitting the target sparsity exactly.
"""

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evoprune.types import Masks, Params, Scores, Sparsity

# r = 0.1, 0.2, ..., 2.4: the prune-rate grid the seed library searches.
PAPER_R_GRID = tuple(round(0.1 * i, 1) for i in range(1, 25))
SCOPES = ("layer", "global")


def _is_none(x: Any) -> bool:
  return x is None


def _layer_std(x: jax.Array, ddof: int, nonzero_only: bool) -> jax.Array:
  """Standard deviation of one layer's entries (all, or the nonzero ones).

  Returns 0 when fewer than `ddof + 1` entries count (torch would give nan), so a
  threshold built from it keeps exactly the nonzero weights instead of failing.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  w = (x != 0).astype(x.dtype) if nonzero_only else jnp.ones_like(x)
  n = jnp.sum(w)
  mean = jnp.sum(w * x) / jnp.maximum(n, 1.0)
  sum_sq = jnp.sum(w * jnp.square(x - mean))
  denom = n - ddof
  return jnp.where(denom > 0, jnp.sqrt(sum_sq / jnp.where(denom > 0, denom, 1.0)), 0.0)


def std_threshold(
    weights: Params, r: jax.typing.ArrayLike, *, ddof: int = 1
) -> Masks:
  """Paper: Han et al.'s magnitude baseline as the seed code runs it, per layer.

  keep = |W| > r * std(|W|_nonzero), the standard deviation taken over the nonzero weights
  of that layer. The reference says `std(|W|)`; the seed code is PyTorch, whose
  `Tensor.std()` is the unbiased estimate (divides by n - 1), hence `ddof=1` by default;
  pass `ddof=0` for the population std. Zero weights are never kept (|0| > t is false
  for t >= 0), so a pruned weight stays pruned.

  Args:
    weights: tree of float arrays (the prunable layers; `None` leaves pass through).
    r: the prune-rate multiplier, a scalar (may be traced, e.g. vmapped by `search_r`).
    ddof: delta degrees of freedom of the std (1 = torch's default, 0 = population).

  Returns:
    Masks like `weights` (True = keep).
  """

  def rule(w):
    a = jnp.abs(w)
    return a > r * _layer_std(a, ddof, nonzero_only=True)

  return jax.tree.map(rule, weights)


def evolution_paper(
    weights: Params,
    wbar: Params,
    r: jax.typing.ArrayLike,
    *,
    ddof: int = 1,
    nonzero_only: bool = False,
) -> Masks:
  """Paper: the seed code's evolution rule, per layer.

  keep = |W_current| > r * std(Wbar), the std of the *signed* running average over all
  entries of the layer (the reference restricts the std to nonzero entries only for the
  magnitude baseline; `nonzero_only=True` applies that restriction here too). The
  running average only moves each layer's threshold; within a layer the rule is
  magnitude pruning of the current weights. `ddof=1` is torch's unbiased default.

  Args:
    weights: tree of current float weights.
    wbar: tree like `weights`: the running average (e.g. `RunningAverage.value`).
    r: the prune-rate multiplier, a scalar (may be traced).
    ddof: delta degrees of freedom of the std.
    nonzero_only: take the std over the nonzero entries of `wbar` only.

  Returns:
    Masks like `weights` (True = keep).
  """
  return jax.tree.map(
      lambda w, wb: jnp.abs(w) > r * _layer_std(wb, ddof, nonzero_only), weights, wbar
  )


def evolution_paper_tinygpt(
    wbar: Params,
    r: jax.typing.ArrayLike,
    *,
    ddof: int = 1,
    nonzero_only: bool = False,
) -> Masks:
  """Paper: the seed TinyGPT experiment's rule, per layer.

  keep = |Wbar| > r * std(|Wbar|) over all entries of the layer (`nonzero_only=True`
  restricts the std to nonzero entries). Unlike `evolution_paper` the running average
  itself is thresholded, so a weight pruned earlier whose average is still large is kept
  again: AND with the previous masks if pruned weights must stay pruned.

  Args:
    wbar: tree of float running averages.
    r: the prune-rate multiplier, a scalar (may be traced).
    ddof: delta degrees of freedom of the std (1 = torch's default).
    nonzero_only: take the std over the nonzero entries only.

  Returns:
    Masks like `wbar` (True = keep).
  """

  def rule(wb):
    a = jnp.abs(wb)
    return a > r * _layer_std(a, ddof, nonzero_only)

  return jax.tree.map(rule, wbar)


def evolution(
    scores_running_average: Scores, sparsity: Sparsity, *, scope: str = "layer"
) -> Masks:
  """Corrected: top-k on |running average|, hitting the target sparsity exactly.

  Ranks every weight by the absolute value of a running average (of the signed weight as
  in the paper, or of |W| or |W*g|: see `evoprune.importance.RunningAverage`) instead of
  using it only to move a std threshold, and prunes exactly the requested fraction.

  Args:
    scores_running_average: tree of float running averages (`RunningAverage.value`);
      `None` leaves are not prunable.
    sparsity: as `evoprune.masks.topk` accepts (a float, one per leaf, traced ok); for
      `scope='global'` what `evoprune.masks.global_topk` accepts.
    scope: 'layer' (each leaf at its own sparsity) or 'global' (one ranking across all
      leaves).

  Returns:
    Masks like the input (True = keep).

  Raises:
    ValueError: if `scope` is unknown.
  """
  if scope not in SCOPES:
    raise ValueError(f"scope={scope!r} is not valid; pass one of {SCOPES}")
  # Imported here so criteria does not need masks at import time.
  from evoprune import masks as masks_lib  # pylint: disable=g-import-not-at-top

  scores = jax.tree.map(jnp.abs, scores_running_average)
  if scope == "layer":
    return masks_lib.topk(scores, sparsity)
  return masks_lib.global_topk(scores, sparsity)


# ----------------------------------------------------------------------------------------
# The seed library's search for r.


class RSearchResult(NamedTuple):
  """Outcome of `search_r`.

  Attributes:
    masks: the masks at the chosen r.
    r: the chosen multiplier.
    sparsity: the achieved compression at r (fraction of all parameters that are zero).
    reached: whether the compression reached the target somewhere on the grid.
    message: a one-line report (names the closest reachable sparsity when not reached).
    sparsities: the compression at every grid value, shape [len(grid)] (float64).
  """

  masks: Masks
  r: float
  sparsity: float
  reached: bool
  message: str
  sparsities: np.ndarray


def compression(params: Params, masks: Masks) -> jax.Array:
  """The seed paper's "compression": the fraction of all parameters that are zero.

  Counts every leaf of `params`, prunable or not: a masked-out weight or a weight that is
  already zero counts as zero; leaves whose mask is `None` count their exact zeros.

  Args:
    params: the full parameter tree.
    masks: masks with the structure of `params` (`None` for non-prunable leaves).

  Returns:
    A float32 scalar in [0, 1].
  """
  zeros, total = _zero_counts(params, masks)
  return (jnp.sum(zeros.astype(jnp.float32)) / total).astype(jnp.float32)


def _zero_counts(params: Params, masks: Masks) -> tuple[jax.Array, int]:
  """Per-leaf zero counts [L] (int32) after masking, and the total parameter count."""

  def zeros(m, p):
    if m is None:
      return jnp.sum(p == 0, dtype=jnp.int32)
    return jnp.sum(jnp.logical_or(jnp.logical_not(m), p == 0), dtype=jnp.int32)

  counts = jax.tree.leaves(jax.tree.map(zeros, masks, params, is_leaf=_is_none))
  total = sum(int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params))
  return jnp.stack(counts), total


@functools.partial(jax.jit, static_argnums=(0,))
def _grid_zero_counts(rule, args, params, grid):
  # One compiled call for the whole grid: [len(grid), L] zero counts.
  return jax.vmap(lambda r: _zero_counts(params, rule(*args, r))[0])(grid)


@functools.partial(jax.jit, static_argnums=(0,))
def _apply_rule(rule, args, r):
  return rule(*args, r)


def search_r(
    rule: Callable[..., Masks],
    args: Sequence[Any],
    target: float,
    *,
    params: Params | None = None,
    grid: Sequence[float] = PAPER_R_GRID,
) -> RSearchResult:
  """Paper: the seed library's search for the prune-rate multiplier r.

  Walks r over `grid` (0.1, 0.2, ..., 2.4) in increasing order and stops at the first r
  whose masks reach the target compression (fraction of all parameters that are zero,
  see `compression`). As in the seed library the first r reaching the target may
  overshoot it (the grid is coarse: the paper reports a 0.5 target giving 0.933). Unlike
  the seed library an unreachable target does not crash: the r whose compression is
  closest to the target is returned (the smallest such r on ties) with `reached=False`
  and a message naming the closest reachable sparsity.

  All grid values are evaluated in one jit-compiled, vmapped call; only the choice of r
  happens on the host. Compression is monotone in r for the threshold rules here.

  Args:
    rule: a mask rule called as `rule(*args, r)`, e.g. `std_threshold`,
      `evolution_paper`, `evolution_paper_tinygpt` or a `functools.partial` of one
      (`partial(std_threshold, ddof=0)`). Must be traceable with a traced r.
    args: the rule's array arguments, e.g. `(weights,)` or `(weights, wbar)`.
    target: the target compression in [0, 1).
    params: the full parameter tree used to count "all parameters" (same structure as the
      masks, i.e. `None` in the masks for non-prunable leaves). Defaults to `args[0]`.
    grid: increasing r values to try.

  Returns:
    An `RSearchResult`.

  Raises:
    ValueError: if `target` is outside [0, 1), `grid` is empty or `args` is empty.
  """
  if not 0.0 <= target < 1.0:
    raise ValueError(
        f"target={target!r} is outside [0, 1); pass a compression such as target=0.9"
    )
  grid_values = [float(g) for g in np.asarray(grid, dtype=np.float64).reshape(-1)]
  if not grid_values:
    raise ValueError("grid=() is empty; pass increasing r values such as PAPER_R_GRID")
  args = tuple(args)
  if not args:
    raise ValueError("args=() is empty; pass the rule's arrays, e.g. args=(weights,)")
  if params is None:
    params = args[0]

  grid_arr = jnp.asarray(grid_values, jnp.float32)
  counts = np.asarray(_grid_zero_counts(rule, args, params, grid_arr))
  total = sum(int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params))
  sparsities = counts.astype(np.int64).sum(axis=1) / max(total, 1)

  hits = np.flatnonzero(sparsities >= target)
  reached = hits.size > 0
  idx = int(hits[0]) if reached else int(np.argmin(np.abs(sparsities - target)))
  r = grid_values[idx]
  achieved = float(sparsities[idx])
  if reached:
    message = f"target {target:g} reached at r={r:g} with compression {achieved:.4f}"
  else:
    message = (
        f"target {target:g} is unreachable with r in [{grid_values[0]:g},"
        f" {grid_values[-1]:g}]; closest reachable compression {achieved:.4f} at"
        f" r={r:g}"
    )
  masks = _apply_rule(rule, args, grid_arr[idx])
  return RSearchResult(masks, r, achieved, reached, message, sparsities)
