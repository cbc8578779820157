"""Smart pruning: the seed paper's Bezier-curve-shaped random pruning per neuron.

`bezier` cuts, in each histogram bin of a neuron's fan-in, a random fraction of the
weights given by a cubic Bezier curve over the bins (`bezier_fractions`,
`bezier_num_bins`); `bezier_to_target` chooses its strength to reach a target sparsity.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evoprune.criteria.threshold import _is_none
from evoprune.types import Masks, Params, PRNGKey

BEZIER_MODES = ("scale", "shift")


def bezier_num_bins(fan_in: int) -> int:
  """Histogram bins per neuron: the smallest even integer >= sqrt(fan_in).

  E.g. 784 -> 28, 256 -> 16, 128 -> 12 (sqrt = 11.3 -> 12), 150 -> 14, 1 -> 2.
  """
  b = math.isqrt(fan_in)
  if b * b < fan_in:
    b += 1
  return max(b + (b % 2), 2)


def bezier_fractions(
    num_bins: int,
    controls: Sequence[float] | jax.Array,
    u: jax.typing.ArrayLike,
    mode: str = "scale",
) -> jax.Array:
  """Pruning fraction of each histogram bin (see `bezier` for the construction).

  Args:
    num_bins: B, even, >= 2 (`bezier_num_bins(fan_in)`).
    controls: the four control values (a, b, c, d) of the cubic Bezier curve.
    u: the scale (mode 'scale') or shift (mode 'shift'), >= 0.
    mode: 'scale' or 'shift'.

  Returns:
    [num_bins] float32 fractions in [0, 1], bin 0 = the lowest values.

  Raises:
    ValueError: if `num_bins` is not even and >= 2, `mode` is unknown or `controls` does
      not hold four values.
  """
  if num_bins < 2 or num_bins % 2:
    raise ValueError(f"num_bins={num_bins} must be even and >= 2; see bezier_num_bins")
  _check_bezier_args(controls, u, mode)
  a, b, c, d = (jnp.asarray(x, jnp.float32) for x in _unstack4(controls))
  half = num_bins // 2
  t = jnp.linspace(0.0, 1.0, half) if half > 1 else jnp.zeros((1,), jnp.float32)
  s = 1.0 - t
  # Cubic Bezier with 1-D control values: a at t=0 (innermost bins), d at t=1 (outer).
  right = s**3 * a + 3.0 * s**2 * t * b + 3.0 * s * t**2 * c + t**3 * d
  curve = jnp.concatenate([right[::-1], right])  # [d -> a, a -> d]
  lo, hi = jnp.min(curve), jnp.max(curve)
  span = hi - lo
  # A flat curve has no min-max normalisation (0/0); its numerator is 0, so use 0.
  norm = jnp.where(span > 0, (curve - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  u = jnp.asarray(u, jnp.float32)
  frac = norm * u if mode == "scale" else norm + u
  return jnp.clip(frac, 0.0, 1.0)


def _unstack4(controls):
  if isinstance(controls, jax.Array):
    return tuple(controls[i] for i in range(4))
  return tuple(controls)


def _check_bezier_args(controls, u, mode):
  if mode not in BEZIER_MODES:
    raise ValueError(f"mode={mode!r} is not valid; pass one of {BEZIER_MODES}")
  if jnp.shape(controls) != (4,):
    raise ValueError(
        f"controls={controls!r} must hold four values (a, b, c, d); pass e.g."
        " controls=(1.0, 0.6, 0.2, 0.0)"
    )
  if isinstance(u, (int, float)) and u < 0:
    raise ValueError(f"u={u!r} is negative; pass u >= 0 (e.g. u=0.5)")


def _neuron_cut(values: jax.Array, priority: jax.Array, fractions: jax.Array) -> jax.Array:
  """Which of one neuron's weights to cut: [n] bool (True = cut).

  Args:
    values: [n] the neuron's incoming values.
    priority: [n] uniform draws deciding the random choice within each bin.
    fractions: [B] pruning fraction per bin.
  """
  num_bins = fractions.shape[0]
  n = values.shape[0]
  lo, hi = jnp.min(values), jnp.max(values)
  width = (hi - lo) / num_bins
  pos = jnp.where(width > 0, (values - lo) / jnp.where(width > 0, width, 1.0), 0.0)
  # Equal-width bins over [lo, hi], the last one closed (numpy.histogram's convention).
  bins = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, num_bins - 1)
  counts = jnp.zeros((num_bins,), jnp.int32).at[bins].add(1)
  # round() as Python / numpy / torch do it: half to even.
  n_cut = jnp.round(fractions * counts.astype(jnp.float32)).astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  # Sort by (bin, priority): within each bin the weights come in random order, and the
  # first n_cut[bin] of them are cut -- a uniformly random subset of that size.
  index = jnp.arange(n, dtype=jnp.int32)
  sorted_bins, _, order = jax.lax.sort((bins, priority, index), num_keys=2)
  rank = index - starts[sorted_bins]
  cut_sorted = rank < n_cut[sorted_bins]
  return jnp.zeros((n,), bool).at[order].set(cut_sorted)


@jax.jit
def _leaf_keep(values: jax.Array, key: PRNGKey, fractions: jax.Array) -> jax.Array:
  """Keep-mask of one leaf: neurons along the last axis, fan-in along the others."""
  shape = values.shape
  rows = values.reshape(-1, shape[-1]).T if values.ndim >= 2 else values.reshape(1, -1)
  priority = jax.random.uniform(key, rows.shape)
  cut = jax.vmap(_neuron_cut, in_axes=(0, 0, None))(rows, priority, fractions)
  cut = cut.T.reshape(shape) if values.ndim >= 2 else cut.reshape(shape)
  return jnp.logical_not(cut)


def bezier(
    values: Params,
    key: PRNGKey,
    *,
    controls: Sequence[float] | jax.Array,
    u: jax.typing.ArrayLike,
    mode: str = "scale",
    masks: Masks | None = None,
) -> Masks:
  r"""Paper: "smart pruning" by Bezier curve fitting, per neuron/filter.

  Construction, for each output unit (neuron) of a leaf. The unit's values are its
  fan-in: for a Dense kernel `[in, out]` the `in` values of a column, for a conv kernel
  `[h, w, in, out]` the `h*w*in` values of an output channel (any leaf: all axes but the
  last; a 1-D leaf is one unit). `values` is Wbar (a running average) or W.

  1. Bins. B = the smallest even integer >= sqrt(fan_in) (`bezier_num_bins`). With
     lo = min, hi = max of the unit's (signed) values and width = (hi - lo) / B, value v
     falls in bin j = clip(floor((v - lo) / width), 0, B - 1) (equal width; the last bin
     includes hi). Bins are ordered by value, so for a range straddling 0 the middle
     bins hold the near-zero values. B is the same for all units of a leaf; the counts
     c_j per bin vary.
  2. Curve. With h = B / 2 and t_i = i / (h - 1), i = 0..h-1 (t = [0] when h = 1), the
     cubic Bezier curve with control values (a, b, c, d) is
         beta(t) = (1-t)^3 a + 3 (1-t)^2 t b + 3 (1-t) t^2 c + t^3 d,
     so beta(0) = a and beta(1) = d. The right half of the bins (j = h..B-1, inner to
     outer) gets beta(t_0..t_{h-1}) (a -> d), the left half its mirror (d -> a):
         curve = [beta(t_{h-1}), ..., beta(t_0), beta(t_0), ..., beta(t_{h-1})].
     Choose a as the largest control value for the paper's shape: the highest pruning
     fraction for the near-zero (middle) bins, the lowest for the tails.
  3. Fractions. Min-max normalise, norm_j = (curve_j - min) / (max - min), then
     'scale': f_j = min(u * norm_j, 1); 'shift': f_j = min(norm_j + u, 1) (`bezier_fractions`).
  4. Cut. n_j = round(f_j * c_j) weights of bin j are cut, chosen uniformly at random
     (each weight draws a uniform priority from `key`; per bin the n_j lowest are cut).
     round is half-to-even (Python's, numpy's and torch's round).
  5. The returned mask is the kept weights ANDed with `masks` (the previous turn's mask)
     when given, so sparsity only grows from turn to turn.

  Details the reference leaves open, and the choice made here:
  * Curve samples: the t_i include both ends, so the innermost bins get exactly a and
    the outermost exactly d (rather than sampling bin centres).
  * A flat curve (max = min, e.g. a = b = c = d, or B = 2) has no min-max normalisation;
    norm is taken as 0 there ('scale' cuts nothing, 'shift' cuts a fraction u everywhere).
  * A constant unit (hi = lo) puts all values in bin 0.
  * "Near zero" is the middle of the unit's range [lo, hi]: exactly zero only when the
    range is symmetric, as the paper's mirrored curve implies.
  * Already-pruned weights take part in the binning and may be drawn again (the paper
    rebuilds the mask from the values and ANDs it with the previous one), so a turn can
    add fewer than sum_j n_j new zeros.
  * Randomness: leaf number i (in `jax.tree` flatten order) uses
    `jax.random.fold_in(key, i)`. The same key gives the same masks.

  Everything is vectorised: a vmap over output units of a sort by (bin, priority) and
  per-bin ranks, no Python loop over weights or units; jit-safe (B is static per leaf).

  Args:
    values: tree of float arrays, Wbar or W (`None` leaves pass through).
    key: a `jax.random.key`.
    controls: the Bezier control values (a, b, c, d).
    u: scale or shift, >= 0 (a scalar, may be traced).
    mode: 'scale' or 'shift'.
    masks: previous masks like `values`, or None.

  Returns:
    Masks like `values` (True = keep).

  Raises:
    ValueError: if `mode` is unknown, `controls` is not four values or `u` < 0.
  """
  _check_bezier_args(controls, u, mode)
  leaves, treedef = jax.tree.flatten(values)
  out = []
  for i, leaf in enumerate(leaves):
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim >= 2 else max(leaf.size, 1)
    fractions = bezier_fractions(bezier_num_bins(fan_in), controls, u, mode)
    out.append(_leaf_keep(leaf, jax.random.fold_in(key, i), fractions))
  keep = jax.tree.unflatten(treedef, out)
  if masks is None:
    return keep
  return jax.tree.map(
      lambda k, m: k if m is None else jnp.logical_and(k, m), keep, masks, is_leaf=_is_none
  )


def _pruned_fraction(masks: Masks) -> jax.Array:
  leaves = [m for m in jax.tree.leaves(masks) if m is not None]
  return 1.0 - sum(jnp.sum(m) for m in leaves) / sum(m.size for m in leaves)


def bezier_to_target(
    values: Params,
    key: PRNGKey,
    target: float,
    *,
    controls: Sequence[float] | jax.Array,
    mode: str = "scale",
    masks: Masks | None = None,
    iterations: int = 30,
) -> tuple[Masks, float]:
  """Bezier smart pruning with its strength chosen to reach a target sparsity.

  Not in the paper (which sets u by hand and reports whatever sparsity results): to
  compare rules at equal sparsity, u is found by bisection so that the pruned fraction of
  the prunable weights (after ANDing with `masks`) is the largest not above `target`. With
  a fixed key the cut sets are nested in u, so the pruned fraction is monotone in u. When
  no u reaches the target (the curve leaves some bins at fraction 0 in 'scale' mode), the
  strongest mask found is returned; check its sparsity.

  Returns:
    (masks, u): the masks (True = keep) and the u that produced them.
  """
  if not 0.0 <= target < 1.0:
    raise ValueError(f"target={target!r} is outside [0, 1); pass e.g. target=0.9")
  run = jax.jit(lambda u: _pruned_fraction(
      bezier(values, key, controls=controls, u=u, mode=mode, masks=masks)))
  lo, hi = 0.0, 1.0
  while float(run(hi)) < target and hi < 2.0**10:  # 'shift' saturates at 1, 'scale' may not
    lo, hi = hi, 2 * hi
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if float(run(mid)) <= target else (lo, mid)
  return bezier(values, key, controls=controls, u=lo, mode=mode, masks=masks), lo
