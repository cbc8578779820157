"""Importance scores and their running weighted averages ("evolution of weights").

A scorer maps a params tree (and, for gradient-based scores, a grads tree of the same
structure) to a *scores* tree: the same structure with float leaves, higher = more
important. Scorers apply to every leaf they are given; the caller restricts them to the
prunable leaves (`None` leaves are empty subtrees and pass through untouched).

Every scorer accepts the keywords `params`, `grads` and `key` (deleting the ones it does not
use), so a caller holding a name from `SCORES` can call any of them the same way:
`get(name)(params=params, grads=grads, key=key)`.

`RunningAverage` tracks any per-weight quantity over training (the signed weight as in the
seed paper, `magnitude`, `saliency`, ...) as a weighted average of snapshots, with the state
held in a pytree so that an optax transformation can carry it in its optimizer state and
update it inside a jit-compiled train step. Its `kind='sum'` accumulates instead of
averaging, which is what movement pruning needs.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from evoprune.types import Params, PRNGKey, Scores

Grads = Any  # like Params: the gradient of the loss with respect to each leaf


def magnitude(params: Params, grads: Grads = None, key: PRNGKey | None = None) -> Scores:
  """Magnitude scores `|w|` (Han et al. 2015).

  Args:
    params: pytree of float arrays.
    grads: unused.
    key: unused.

  Returns:
    A tree like `params` with `|w|` at every leaf.
  """
  del grads, key
  return jax.tree.map(jnp.abs, params)


def random_scores(key: PRNGKey, params: Params, grads: Grads = None) -> Scores:
  """Uniform random scores in [0, 1), one independent stream per leaf.

  Args:
    key: a `jax.random.key`; the same key gives the same scores.
    params: pytree of arrays; only shapes are used (a float dtype is kept, anything else
      gives float32).
    grads: unused.

  Returns:
    A tree like `params` of uniform draws.
  """
  del grads
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  # Drawn flat and reshaped: the same numbers (JAX's PRNGs, threefry and rbg, index them by
  # flat position), which XLA:CPU compiles ~10x faster than an N-D draw (see
  # `evoprune.models.init`).
  scores = [
      jax.random.uniform(k, (jnp.size(x),), _float_dtype(x)).reshape(jnp.shape(x))
      for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, scores)


def saliency(params: Params, grads: Grads, key: PRNGKey | None = None) -> Scores:
  """SNIP connection sensitivity `|w * g|` (Lee et al. 2019).

  SNIP divides by the sum over all weights; that common factor does not change the
  ranking, so it is left out.

  Args:
    params: pytree of float arrays.
    grads: the loss gradient, same structure as `params`.
    key: unused.

  Returns:
    A tree like `params` with `|w * g|` at every leaf.
  """
  del key
  return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


def taylor(
    params: Params,
    grads: Grads,
    key: PRNGKey | None = None,
    *,
    per_output: bool = False,
) -> Scores:
  """First-order Taylor importance (Molchanov et al. 2019, "Importance Estimation for
  Neural Network Pruning", eqs. 7-8).

  Per weight: `(g * w)**2`, the squared first-order estimate of the loss change when the
  weight is removed. For a group S of weights (`per_output=True`: one group per output
  unit, i.e. the `[in]` column of a Dense kernel `[in, out]` or the `h*w*in` values of a
  conv filter `[h, w, in, out]`): `(sum_{s in S} g_s * w_s)**2`, the same value broadcast
  to every weight of the group so the scores keep the shape of `params`. (`|sum|` would
  rank identically.) Molchanov et al. average this over minibatches: feed it to
  `RunningAverage(kind='ema')` for that. Per weight, the ranking equals `saliency`'s
  for a single gradient; the two differ once averaged over steps.

  Args:
    params: pytree of float arrays.
    grads: the loss gradient, same structure as `params`.
    key: unused.
    per_output: group by output unit (last axis) instead of scoring each weight. Leaves
      with fewer than 2 dimensions are scored per weight either way.

  Returns:
    A tree like `params`.
  """
  del key

  def score(w, g):
    wg = w * g
    if not per_output or wg.ndim < 2:
      return jnp.square(wg)
    group = jnp.sum(wg, axis=tuple(range(wg.ndim - 1)))  # [out]
    return jnp.broadcast_to(jnp.square(group), wg.shape)

  return jax.tree.map(score, params, grads)


def movement(params: Params, grads: Grads, key: PRNGKey | None = None) -> Scores:
  """One step of movement pruning's score, `-w * g` (Sanh et al. 2020).

  Movement pruning scores a weight by `S = -sum_t w_t * g_t` over the training steps
  (their learning-rate factor is a constant and does not change the ranking): weights
  moving away from zero score high, weights moving towards zero score low. This function
  is the per-step term; accumulate it with `RunningAverage(kind='sum', every=1)`:

      acc = RunningAverage(kind='sum')
      state = acc.update(state, movement(params, grads), step)   # every train step
      scores = acc.value(state)

  Args:
    params: pytree of float arrays (the weights at this step).
    grads: the loss gradient at this step, same structure as `params`.
    key: unused.

  Returns:
    A tree like `params` with `-w * g` (signed: do not take the absolute value).
  """
  del key
  return jax.tree.map(lambda w, g: -w * g, params, grads)


SCORES: dict[str, Callable[..., Scores]] = {
    "magnitude": magnitude,
    "random": random_scores,
    "saliency": saliency,
    "taylor": taylor,
    "movement": movement,
}


def get(name: str) -> Callable[..., Scores]:
  """Returns the scorer registered as `name` in `SCORES`.

  Raises:
    ValueError: if `name` is not registered; the message lists the valid names.
  """
  if name not in SCORES:
    raise ValueError(
        f"unknown importance score {name!r}; pass one of {sorted(SCORES)}"
    )
  return SCORES[name]


# ----------------------------------------------------------------------------------------
# Running averages: the "evolution of weights".

KINDS = ("linear", "sqrt_window", "ema", "sum")


class RunningAverageState(NamedTuple):
  """State of a `RunningAverage`; a pytree, so it can live in optimizer state.

  Attributes:
    count: int32 scalar, the number of snapshots taken so far.
    accum: for 'linear' and 'ema' the current weighted mean, for 'sum' the running sum; a
      tree like the tracked values (float32 or wider). `None` for 'sqrt_window'.
    ring: for 'sqrt_window' a tree like the tracked values with a leading axis `window`
      holding the last `window` snapshots (slot `i % window` holds snapshot `i`). `None`
      for the other kinds.
  """

  count: jax.Array
  accum: Any
  ring: Any


@dataclasses.dataclass(frozen=True)
class RunningAverage:
  """Weighted running average of a per-weight quantity over snapshots.

  A snapshot of the tracked tree is taken by `update` when `step % every == 0` (so `every`
  is the snapshot cadence in steps: `every=steps_per_epoch` gives per-epoch snapshots as
  in the seed paper; pass the step whose weights you hand in, e.g. the optimizer count
  after the update, so that epoch e's weights arrive at step (e+1)*steps_per_epoch).
  Snapshots are values (JAX arrays are immutable), so the seed library's defect of losing
  the first epoch (it stored a view of the live tensor) cannot happen: the first snapshot
  counts. Before any snapshot, `value` is all zeros.

  Kinds, with snapshots X_0, X_1, ..., X_{n-1} (X_{n-1} newest):

  * 'linear' (the seed paper's library): value = sum_i (i+1) X_i / sum_i (i+1). Kept as an
    O(1)-memory incremental mean: on snapshot i, mean += 2/(i+2) * (X_i - mean), since
    weight (i+1) over the new total (i+1)(i+2)/2 is 2/(i+2). A per-step linear average
    (the paper's TinyGPT) is `every=1`.
  * 'sqrt_window' (the paper's experiments, `window` = k): the weighted mean of the last
    m = min(n, k) snapshots with weights sqrt(1), ..., sqrt(m), oldest to newest. With
    fewer than k snapshots the weights are sqrt(1..n) over the n available (the newest
    gets sqrt(n), not sqrt(k)). No exact O(1) update exists for sqrt weights: when the
    window slides, each remaining snapshot's weight changes from sqrt(j) to sqrt(j-1) and
    sqrt(j) - sqrt(j-1) depends on j (the "weighted sum and plain sum" trick works only for
    linear weights). So the state keeps a ring buffer of the last k snapshots (memory:
    k x the tracked tree, in float32) and `update` writes one slot (O(tree) per step: a
    dynamic-update-slice, done in place when the train state is donated, as with
    `jax.jit(..., donate_argnums=...)`; without donation XLA copies the buffer); `value`
    computes the weighted sum, O(k x tree), only when asked.
  * 'ema' (`decay` = d): the debiased exponential average, value = sum_i d^(n-1-i) X_i /
    sum_i d^(n-1-i) (newest weight 1, each older one times d), as optax's `ema(debias=True)`.
    Incremental: mean += (1-d)/(1-d^(i+1)) * (X_i - mean); the first snapshot gets rate 1.
  * 'sum': value = sum_i X_i, e.g. movement pruning's accumulated `-w*g` (`every=1`).

  `update` costs a handful of fused elementwise ops per leaf, uses `jnp.where` on a traced
  step (no recompilation across steps) and can run in every train step.

  Attributes:
    kind: one of `KINDS`.
    window: k for 'sqrt_window' (validated for every kind, used only by 'sqrt_window').
    decay: d for 'ema', in (0, 1) (validated for every kind, used only by 'ema').
    every: snapshot cadence in steps, >= 1.
  """

  kind: str = "linear"
  window: int = 50
  decay: float = 0.99
  every: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r} is not a running average; pass one of {KINDS}")
    if not _is_int(self.window) or self.window < 1:
      raise ValueError(
          f"window={self.window!r} must be an integer >= 1; pass e.g. window=50 (the last"
          " 50 snapshots)"
      )
    if not isinstance(self.decay, (int, float)) or not 0.0 < self.decay < 1.0:
      raise ValueError(
          f"decay={self.decay!r} is outside (0, 1); pass a value such as decay=0.99"
      )
    if not _is_int(self.every) or self.every < 1:
      raise ValueError(
          f"every={self.every!r} must be an integer >= 1; pass e.g. every=1 (each step) or"
          " every=steps_per_epoch"
      )

  def init(self, tree: Any) -> RunningAverageState:
    """Zero state for values shaped like `tree`.

    Args:
      tree: a pytree of arrays (or `jax.ShapeDtypeStruct`s) shaped like the values that
        `update` will receive; `None` leaves stay `None`.

    Returns:
      A `RunningAverageState` with no snapshots taken.
    """
    count = jnp.zeros((), jnp.int32)
    if self.kind == "sqrt_window":
      ring = jax.tree.map(
          lambda x: jnp.zeros((self.window, *jnp.shape(x)), _accum_dtype(x)), tree
      )
      return RunningAverageState(count=count, accum=None, ring=ring)
    accum = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), _accum_dtype(x)), tree)
    return RunningAverageState(count=count, accum=accum, ring=None)

  def update(
      self, state: RunningAverageState, values: Any, step: jax.typing.ArrayLike
  ) -> RunningAverageState:
    """Takes a snapshot of `values` if `step % every == 0`; otherwise returns `state`.

    Pure and jit-safe: `step` may be traced; no Python branching on it.

    Args:
      state: the current state.
      values: a tree like the one given to `init`.
      step: integer scalar (int or traced int array).

    Returns:
      The new state.
    """
    take = jnp.asarray(step) % self.every == 0
    n = state.count
    count = n + take.astype(jnp.int32)

    if self.kind == "sqrt_window":
      slot = n % self.window

      def write(ring, x):
        # Write one slot (the new snapshot, or that slot's old contents when no snapshot is
        # due): O(leaf) instead of selecting over the whole k x leaf buffer.
        new = jnp.where(take, x.astype(ring.dtype), ring[slot])
        return jax.lax.dynamic_update_index_in_dim(ring, new, slot, axis=0)

      return RunningAverageState(count, None, jax.tree.map(write, state.ring, values))

    if self.kind == "sum":
      accum = jax.tree.map(
          lambda a, x: jnp.where(take, a + x.astype(a.dtype), a), state.accum, values
      )
      return RunningAverageState(count, accum, None)

    n_f = n.astype(jnp.float32)
    if self.kind == "linear":
      rate = 2.0 / (n_f + 2.0)
    else:  # ema
      d = jnp.float32(self.decay)
      # Same float32 ops in numerator and denominator so the first snapshot's rate is 1.
      rate = (1.0 - d) / (1.0 - d ** (n_f + 1.0))

    def step_mean(a, x):
      return jnp.where(take, a + rate.astype(a.dtype) * (x.astype(a.dtype) - a), a)

    return RunningAverageState(count, jax.tree.map(step_mean, state.accum, values), None)

  def value(self, state: RunningAverageState) -> Any:
    """The current average (the sum for 'sum'); zeros before the first snapshot.

    Args:
      state: a state from `init` / `update`.

    Returns:
      A tree like the tracked values (float32 or wider leaves).
    """
    if self.kind != "sqrt_window":
      return state.accum
    weights = _window_weights(state.count, self.window)  # [k], one per ring slot
    total = jnp.sum(weights)
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)

    def mean(ring):
      w = (weights * scale).astype(ring.dtype)
      return jnp.tensordot(w, ring, axes=1)

    return jax.tree.map(mean, state.ring)


def _window_weights(count: jax.Array, window: int) -> jax.Array:
  """sqrt weights of the ring slots: [window] floats, 0 for empty slots.

  Slot s last received snapshot i = the largest i <= count-1 with i % window == s, whose
  age (0 = newest) is (count - 1 - s) mod window. With m = min(count, window) snapshots in
  the window, ages 0..m-1 get weights sqrt(m), ..., sqrt(1).
  """
  slots = jnp.arange(window)
  age = jnp.mod(count - 1 - slots, window)
  m = jnp.minimum(count, window)
  return jnp.where(age < m, jnp.sqrt((m - age).astype(jnp.float32)), 0.0)


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _float_dtype(x: Any) -> jnp.dtype:
  dtype = jnp.result_type(x)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _accum_dtype(x: Any) -> jnp.dtype:
  # Accumulate in at least float32: a bf16 running mean over thousands of steps would
  # lose the small per-step increments.
  return jnp.promote_types(_float_dtype(x), jnp.float32)
