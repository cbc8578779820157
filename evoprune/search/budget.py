"""Budgets: the linear constraint every candidate per-layer sparsity vector satisfies exactly.

A candidate is a vector `s` [L] with one sparsity per prunable leaf (in `jax.tree` flatten
order). A budget is one equality on how much of the network is kept,

    sum_l cost_l * (1 - s_l) == remaining,        lower_l <= s_l <= upper_l,

where `cost_l` is what layer l costs when dense: its parameter count (a global-sparsity or a
nonzero-count budget) or its dense MACs (an effective-MACs budget, `size_l * macs_per_weight_l`).

Searches work in an unconstrained space of per-layer logits `z` [L] and map them onto the
budget with `Budget.project`: `s_l(t) = clip(sigmoid(z_l + t), lower_l, upper_l)` with one
shift `t` found by a fixed-iteration bisection, then an exact interpolation between the two
bracketing vectors (both inside the bounds, so their convex combination is too). The result is
exact to float32 resolution (about 1e-7 of the total cost), the iteration count is static and
the function is pure, so it runs under `jit` and `vmap`. The projection is invariant to adding
a constant to `z`, so only the relative logits matter.

Realised masks: `evoprune.masks.topk` prunes `round(s_l * size_l)` entries of each leaf, so the
masks of a candidate keep its budget to within half a weight per layer.
"""

import dataclasses
import numbers
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from evoprune.types import Scores

KINDS = ("sparsity", "nonzeros", "macs")
# Bisection steps on the shift t. The bracket is at most ~(range of z) + 60 wide; 48 halvings
# take it far below float32 resolution, and the final interpolation makes the result exact.
_BISECTION_STEPS = 48
# sigmoid(+-_MARGIN) is 1 or 0 to float32 precision: the bracket ends sit on the bounds.
_MARGIN = 40.0
_EPS = 1e-6  # keeps logit() finite at sparsity 0 or 1


def layer_sizes(scores: Scores) -> tuple[int, ...]:
  """Entry counts of the prunable (non-None) leaves of a scores or masks tree, flatten order.

  Args:
    scores: a tree like params with arrays at prunable leaves and None elsewhere (e.g.
      `evoprune.masks.init(params)` or the scores a search ranks by).

  Returns:
    A tuple of L positive ints.
  """
  return tuple(int(np.size(x)) for x in jax.tree.leaves(scores))


def logit(s: jax.Array) -> jax.Array:
  """The logits a search starts from for a sparsity vector: log(s / (1 - s)), clipped."""
  s = jnp.clip(jnp.asarray(s, jnp.float32), _EPS, 1.0 - _EPS)
  return jnp.log(s) - jnp.log1p(-s)


@dataclasses.dataclass(frozen=True, eq=False)
class Budget:
  """A validated budget; build it with `sparsity_budget`, `nonzeros_budget` or `macs_budget`.

  Attributes:
    kind: 'sparsity', 'nonzeros' or 'macs'.
    value: the budget in its own unit (a global sparsity, a nonzero count, effective MACs).
    sizes: entries per prunable leaf [L].
    cost: float64 [L], each layer's cost when dense (its size, or its dense MACs).
    remaining: float, the cost the kept weights must add up to.
    lower: float64 [L], per-layer sparsity lower bounds.
    upper: float64 [L], per-layer sparsity upper bounds (< 1).
  """
  kind: str
  value: float
  sizes: tuple[int, ...]
  cost: np.ndarray
  remaining: float
  lower: np.ndarray
  upper: np.ndarray

  @property
  def num_layers(self) -> int:
    return len(self.sizes)

  @property
  def density(self) -> float:
    """The cost-weighted fraction kept, `remaining / sum(cost)`."""
    return float(self.remaining / self.cost.sum())

  def project(self, z: jax.Array) -> jax.Array:
    """Maps logits z [L] to the sparsity vector [L] on the budget (jit/vmap-safe).

    Args:
      z: float [L] per-layer logits (any real values; +-inf is not allowed).

    Returns:
      float32 [L] s with lower <= s <= upper and sum(cost * (1 - s)) == remaining to float32
      resolution.
    """
    z = jnp.asarray(z, jnp.float32)
    weights = jnp.asarray(self.cost / self.cost.sum(), jnp.float32)
    lower = jnp.asarray(self.lower, jnp.float32)
    upper = jnp.asarray(self.upper, jnp.float32)
    target = jnp.float32(self.density)

    def at(t):
      return jnp.clip(jax.nn.sigmoid(z + t), lower, upper)

    def density(s):
      return jnp.sum(weights * (1.0 - s))

    # density(at(t)) falls as t grows; keep density(lo) >= target >= density(hi).
    def step(_, bracket):
      lo, hi = bracket
      mid = 0.5 * (lo + hi)
      above = density(at(mid)) >= target
      return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo0 = -jnp.max(z) - _MARGIN
    hi0 = -jnp.min(z) + _MARGIN
    lo, hi = lax.fori_loop(0, _BISECTION_STEPS, step, (lo0, hi0))
    s_lo, s_hi = at(lo), at(hi)
    d_lo, d_hi = density(s_lo), density(s_hi)
    gap = d_lo - d_hi
    alpha = jnp.where(gap > 0, (d_lo - target) / jnp.where(gap > 0, gap, 1.0), 0.0)
    alpha = jnp.clip(alpha, 0.0, 1.0)
    return jnp.clip(s_lo + alpha * (s_hi - s_lo), lower, upper)

  def feasible_lower(self) -> np.ndarray:
    """The least sparsity each layer can have on the budget, float64 [L].

    Layer l keeps the most when every other layer keeps its least (sits at its upper
    bound): `s_l >= 1 - (remaining - sum_{o != l} cost_o (1 - upper_o)) / cost_l`, and never
    below `lower_l`. Fitness functions use it to bound what they precompute per layer.
    """
    least_kept = self.cost * (1.0 - self.upper)
    most_kept = self.remaining - (least_kept.sum() - least_kept)
    return np.clip(1.0 - most_kept / self.cost, self.lower, self.upper)

  def achieved(self, s: Any) -> float:
    """The budget's value (in its own unit) that a sparsity vector s [L] spends."""
    s = np.asarray(s, np.float64)
    kept = float(np.sum(self.cost * (1.0 - s)))
    if self.kind == "sparsity":
      return 1.0 - kept / float(self.cost.sum())
    return kept

  def uniform(self) -> jax.Array:
    """The feasible vector closest to one sparsity for every layer (equal logits), [L]."""
    return self.project(jnp.zeros(self.num_layers))


def _bounds(value: Any, name: str, num_layers: int) -> np.ndarray:
  arr = np.asarray(value, np.float64)
  if arr.ndim == 0:
    arr = np.full(num_layers, float(arr))
  if arr.shape != (num_layers,):
    raise ValueError(f"{name} has shape {np.shape(value)}; pass a float or one value per "
                     f"prunable layer ({num_layers} values).")
  if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr >= 1):
    raise ValueError(f"{name}={np.asarray(value).tolist()} must lie in [0, 1) for every layer; "
                     "pass values such as 0.0 (lower) or 0.99 (upper).")
  return arr


def _sizes(sizes: Sequence[int] | Scores) -> tuple[int, ...]:
  if isinstance(sizes, (list, tuple)) and all(isinstance(n, numbers.Integral) for n in sizes):
    out = tuple(int(n) for n in sizes)
  elif isinstance(sizes, np.ndarray) and sizes.ndim == 1 and np.issubdtype(sizes.dtype,
                                                                           np.integer):
    out = tuple(int(n) for n in sizes)
  else:
    out = layer_sizes(sizes)
  if not out or any(n < 1 for n in out):
    raise ValueError(f"sizes={out} must be one positive entry count per prunable layer; pass "
                     "e.g. layer_sizes(evoprune.masks.init(params)).")
  return out


def _build(kind: str, value: float, sizes: Any, cost_per_weight: np.ndarray | None,
           remaining_of: Any, lower: Any, upper: Any) -> Budget:
  sizes = _sizes(sizes)
  num_layers = len(sizes)
  lower = _bounds(lower, "lower", num_layers)
  upper = _bounds(upper, "upper", num_layers)
  if np.any(lower > upper):
    bad = int(np.argmax(lower > upper))
    raise ValueError(f"lower[{bad}]={lower[bad]} is above upper[{bad}]={upper[bad]}; every "
                     "layer needs lower <= upper.")
  size = np.asarray(sizes, np.float64)
  cost = size if cost_per_weight is None else size * cost_per_weight
  remaining = float(remaining_of(cost))
  low, high = float(np.sum(cost * (1 - upper))), float(np.sum(cost * (1 - lower)))
  # A relative slack absorbs float rounding of budgets computed from the bounds themselves.
  slack = 1e-9 * float(cost.sum())
  if not low - slack <= remaining <= high + slack:
    unit = {"sparsity": "global sparsity", "nonzeros": "nonzero parameters",
            "macs": "effective MACs"}[kind]
    if kind == "sparsity":
      span = f"[{1 - high / cost.sum():.6g}, {1 - low / cost.sum():.6g}]"
    else:
      span = f"[{low:.6g}, {high:.6g}]"
    raise ValueError(f"budget {kind}={value!r} is unreachable under the per-layer bounds: "
                     f"{unit} must lie in {span}; change the budget or loosen lower/upper.")
  remaining = float(np.clip(remaining, low, high))
  return Budget(kind=kind, value=float(value), sizes=sizes, cost=cost, remaining=remaining,
                lower=lower, upper=upper)


def sparsity_budget(sparsity: float, sizes: Sequence[int] | Scores, *, lower: Any = 0.0,
                    upper: Any = 0.99) -> Budget:
  """A global (parameter-weighted) sparsity budget over the prunable layers.

  Args:
    sparsity: the global sparsity in [0, 1), e.g. 0.95.
    sizes: entries per prunable layer [L], or a scores/masks tree to count them from.
    lower: per-layer lower bounds (a float or [L]).
    upper: per-layer upper bounds (a float or [L]), each < 1 (e.g. first and last layers
      capped lower than the rest).

  Returns:
    A `Budget` with `sum(size * (1 - s)) == (1 - sparsity) * sum(size)`.

  Raises:
    ValueError: a sparsity outside [0, 1), bad bounds, or a budget the bounds cannot reach.
  """
  if not isinstance(sparsity, numbers.Real) or not 0.0 <= float(sparsity) < 1.0:
    raise ValueError(f"sparsity={sparsity!r} is outside [0, 1); pass the global fraction to "
                     "prune, e.g. 0.9.")
  return _build("sparsity", float(sparsity), sizes, None,
                lambda cost: (1.0 - float(sparsity)) * cost.sum(), lower, upper)


def nonzeros_budget(nonzeros: int, sizes: Sequence[int] | Scores, *, lower: Any = 0.0,
                    upper: Any = 0.99) -> Budget:
  """A budget of `nonzeros` kept weights over the prunable layers.

  Raises:
    ValueError: an empty (< 1) count, bad bounds, or a count the bounds cannot reach.
  """
  if not isinstance(nonzeros, numbers.Real) or not float(nonzeros) >= 1:
    raise ValueError(f"nonzeros={nonzeros!r} is an empty budget; pass a positive count of "
                     "weights to keep, e.g. 25000.")
  return _build("nonzeros", float(nonzeros), sizes, None, lambda cost: float(nonzeros),
                lower, upper)


def macs_budget(macs: float, sizes: Sequence[int] | Scores, macs_per_weight: Sequence[float],
                *, lower: Any = 0.0, upper: Any = 0.99) -> Budget:
  """An effective-MACs budget: `sum(size * macs_per_weight * (1 - s)) == macs`.

  Args:
    macs: effective multiply-accumulates per example the pruned layers may spend.
    sizes: entries per prunable layer [L], or a scores/masks tree.
    macs_per_weight: [L] MACs each weight of a layer costs per example (a Dense weight 1, a
      conv weight the number of output positions), e.g. `macs_dense / params` of each
      prunable layer of `evoprune.cost.report`.
    lower: per-layer lower bounds.
    upper: per-layer upper bounds (< 1).

  Raises:
    ValueError: an empty budget, bad per-weight costs or bounds, or an unreachable budget.
  """
  if not isinstance(macs, numbers.Real) or not float(macs) > 0:
    raise ValueError(f"macs={macs!r} is an empty budget; pass the positive number of "
                     "effective MACs the pruned layers may spend.")
  per_weight = np.asarray(macs_per_weight, np.float64)
  num_layers = len(_sizes(sizes))
  if per_weight.shape != (num_layers,) or not np.all(per_weight > 0):
    raise ValueError(f"macs_per_weight={np.asarray(macs_per_weight).tolist()} must hold one "
                     f"positive value per prunable layer ({num_layers}); take them from "
                     "evoprune.cost.report (macs_dense / params of each layer).")
  return _build("macs", float(macs), sizes, per_weight, lambda cost: float(macs), lower, upper)
