"""The optax integration: a Pruner wraps any optimizer and prunes inside the train step.

    pruner = ep.Pruner(importance="wbar", average=ep.importance.RunningAverage("linear"),
                       schedule=ep.schedules.polynomial_decay(0.0, 0.9, 0, 1000))
    tx = pruner.wrap(optax.sgd(0.1, momentum=0.9))

`tx.update(grads, state, params)` runs in the compiled step and
  (a) updates the running importance (the "evolution of weights") every step,
  (b) on schedule steps recomputes the masks under `lax.cond` (no recompilation, no host
      round-trip),
  (c) masks the updates so pruned weights become, and stay, exactly zero (whatever the inner
      optimizer does: momentum, Adam, weight decay), and
  (d) resets the inner optimizer's moments of pruned weights, so a weight that regrows
      later starts from a clean state.
Masks live in the optimizer state (`PrunerState.masks`), so checkpoints and sharding need
nothing special. `optax.masked` is not used: its mask must be static.

Structured granularities ('neuron', 'filter') prune a unit together with its dependents:
the masks also cover each unit's bias and BatchNorm scale and shift
(`ep.masks.cover_dependents`), so a pruned unit outputs exactly zero, in training and in
inference mode, and `ep.surgery.shrink` of the trained model equals the masked model (a
filter's BatchNorm shift would otherwise keep emitting relu(beta), which a zero-padded
convolution cannot absorb). A unit pruned this way cannot relearn (its BatchNorm scale is
zero, so no gradient reaches its kernel), so later mask updates rank pruned units lowest:
while the target sparsity does not fall, pruned units stay pruned.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from evoprune import allocation as allocation_lib
from evoprune import importance as importance_lib
from evoprune import masks as masks_lib
from evoprune.types import Masks, Params, PRNGKey, Scores, Sparsity

# Scores a pruner can rank by. 'wbar' ranks by |running average| of `average_of`.
IMPORTANCES = ("magnitude", "random", "saliency", "taylor", "movement", "wbar")
AVERAGE_OF = ("weight", "abs_weight", "saliency")
GRANULARITIES = ("unstructured", "neuron", "filter", "N:M (e.g. '2:4')")
# Movement pruning's score is the running sum of -w*g (Sanh et al. 2020).
_MOVEMENT = importance_lib.RunningAverage(kind="sum")


def _is_none(x: Any) -> bool:
  return x is None


class PrunerState(NamedTuple):
  """The wrapped optimizer's state.

  Attributes:
    count: int32 scalar, steps taken.
    masks: bool masks like params (None for leaves that are not pruned).
    importance: running-average (or movement) state; `()` when the importance is stateless.
    sparsity: float32 scalar, the target sparsity the current masks were built for.
    inner_state: the wrapped optimizer's state.
  """
  count: jax.Array
  masks: Masks
  importance: Any
  sparsity: jax.Array
  inner_state: optax.OptState


def _full_masks(masks: Masks, params: Params) -> Params:
  """Masks with `True` (keep) in place of None, so they map over params-shaped trees."""
  return jax.tree.map(lambda m, p: jnp.ones(p.shape, bool) if m is None else m,
                      masks, params, is_leaf=_is_none)


def _reset_pruned_moments(inner: optax.GradientTransformation, inner_state: optax.OptState,
                          masks: Masks, params: Params) -> optax.OptState:
  """Zeroes every params-shaped leaf of the inner state where a weight is pruned."""
  full = _full_masks(masks, params)
  return optax.tree_map_params(
      inner, lambda v, m: jnp.where(m, v, jnp.zeros_like(v)), inner_state, full,
      transform_non_params=lambda v: v)


@dataclasses.dataclass(frozen=True)
class Pruner:
  """Configuration of in-training pruning; validated at construction.

  Attributes:
    importance: what masks rank by (see IMPORTANCES): 'magnitude' |w|, 'random', 'saliency'
      |w*g|, 'taylor' (w*g)^2, 'movement' (accumulated -w*g, Sanh et al. 2020), or 'wbar',
      evolution of weights: |running average of `average_of`| (the corrected rule).
    average: the running average kept every step (`importance.RunningAverage`); used for
      'wbar', and tracked anyway when given so a later one-shot rule can read it.
    average_of: the per-weight quantity averaged: the signed 'weight' (the paper),
      'abs_weight' or 'saliency' |w*g|.
    schedule: `schedule(step) -> (should_update, sparsity)`; None: masks change only via
      `set_masks` (fixed masks during fine-tuning).
    allocation: per-layer targets from the global one: a name of `allocation.ALLOCATIONS`
      ('uniform', 'global', 'erk') or a callable `(template, target) -> per-layer tree`,
      e.g. `functools.partial(ep.allocation.erk, first_last='dense')`.
    granularity: 'unstructured', 'neuron' (Dense output units) or 'filter' (Conv output
      channels), ranked by the L1 norm of their scores, or N:M such as '2:4' (N kept of
      every M consecutive inputs; the N:M pattern fixes the sparsity at 1 - N/M).
    filter: `filter(path, leaf) -> bool`, which leaves are prunable.
    dependents: with 'neuron'/'filter', `owner(path) -> kernel path | None` names the
      kernel whose units a bias or BatchNorm leaf belongs to (`ep.masks.unit_owner`, the
      zoo's names); those leaves are masked with their unit. None: kernels only (a pruned
      unit keeps emitting its bias or BatchNorm shift).
    seed: seeds the random scores (keys are `fold_in(key(seed), step)`).
  """
  importance: str = "magnitude"
  average: importance_lib.RunningAverage | None = None
  average_of: str = "weight"
  schedule: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None
  allocation: str | Callable[[Any, float], Sparsity] = "uniform"
  granularity: str = "unstructured"
  filter: Callable[[tuple, Any], bool] = masks_lib.default_filter
  dependents: masks_lib.Owner | None = masks_lib.unit_owner
  seed: int = 0

  def __post_init__(self):
    if self.importance not in IMPORTANCES:
      raise ValueError(f"importance={self.importance!r} is unknown; use one of {IMPORTANCES}.")
    if self.importance == "wbar" and self.average is None:
      raise ValueError("importance='wbar' ranks by a running average: pass average="
                       "ep.importance.RunningAverage('linear') (or 'sqrt_window', 'ema').")
    if self.average_of not in AVERAGE_OF:
      raise ValueError(f"average_of={self.average_of!r} is unknown; use one of {AVERAGE_OF}.")
    n_m = self.granularity.split(":")
    if self.granularity not in GRANULARITIES[:3] and not (
        len(n_m) == 2 and all(x.isdigit() for x in n_m) and 0 < int(n_m[0]) <= int(n_m[1])):
      raise ValueError(f"granularity={self.granularity!r} is unknown; use one of "
                       f"{GRANULARITIES}.")
    if isinstance(self.allocation, str):
      allocation_lib.get(self.allocation)  # raises on an unknown name, listing the valid ones
    elif not callable(self.allocation):
      raise ValueError(f"allocation={self.allocation!r} must be a name of "
                       f"{sorted(allocation_lib.ALLOCATIONS)} or a callable(template, target).")
    if self.dependents is not None and not callable(self.dependents):
      raise ValueError(f"dependents={self.dependents!r} must be a callable(path) -> kernel "
                       "path or None, e.g. ep.masks.unit_owner, or None to mask kernels only.")
    if self.schedule is not None and self.allocation not in ("uniform", "global"):
      _final_target(self.schedule)  # raises when the schedule's final target is unknown

  # ------------------------------------------------------------------ importance state

  def _averaged_value(self, params: Params, grads: Params | None) -> Params:
    if self.average_of == "weight":
      return params
    if self.average_of == "abs_weight":
      return jax.tree.map(jnp.abs, params)
    if grads is None:  # at init: no gradient yet
      return jax.tree.map(jnp.zeros_like, params)
    return importance_lib.saliency(params, grads)

  def init_importance(self, params: Params) -> Any:
    """The importance state before any step."""
    state = {}
    if self.average is not None:
      state["average"] = self.average.init(self._averaged_value(params, None))
    if self.importance == "movement":
      state["movement"] = _MOVEMENT.init(params)
    return state

  def update_importance(self, state: Any, params: Params, grads: Params, step: jax.Array
                        ) -> Any:
    """One step of the running importance: a few fused elementwise ops."""
    new = dict(state)
    if self.average is not None:
      new["average"] = self.average.update(state["average"],
                                           self._averaged_value(params, grads), step)
    if self.importance == "movement":
      new["movement"] = _MOVEMENT.update(state["movement"],
                                         importance_lib.movement(params, grads), step)
    return new

  def scores(self, params: Params, *, grads: Params | None = None, importance_state: Any = None,
             key: PRNGKey | None = None) -> Scores:
    """Scores (higher = keep) for the prunable leaves, None elsewhere."""
    if self.importance == "magnitude":
      full = importance_lib.magnitude(params)
    elif self.importance == "random":
      full = importance_lib.random_scores(key, params)
    elif self.importance in ("saliency", "taylor"):
      if grads is None:
        raise ValueError(f"importance={self.importance!r} needs gradients: pass grads=.")
      full = getattr(importance_lib, self.importance)(params, grads)
    elif self.importance == "movement":
      full = _MOVEMENT.value(importance_state["movement"])
    else:
      full = jax.tree.map(jnp.abs, self.average.value(importance_state["average"]))
    template = masks_lib.init(params, self.filter)
    return jax.tree.map(lambda m, s: None if m is None else s, template, full, is_leaf=_is_none)

  def _allocate(self, template: Any, sparsity: Sparsity) -> Sparsity:
    """Per-layer targets for a global `sparsity` (a float, or traced under a schedule).

    Uniform passes the scalar through. Other allocations read only shapes and need a
    concrete target; under a schedule they are solved once for its final target, and the
    per-layer targets scale with the scheduled sparsity (so the parameter-weighted global
    sparsity follows the schedule exactly and ends at the allocation's own solution).
    """
    if self.allocation == "uniform":
      return sparsity
    allocate = (allocation_lib.get(self.allocation) if isinstance(self.allocation, str)
                else self.allocation)
    if not isinstance(sparsity, jax.core.Tracer):
      return allocate(template, float(sparsity))
    final = _final_target(self.schedule)
    if final == 0.0:
      return jax.tree.map(lambda _: sparsity, allocate(template, 0.0))
    return jax.tree.map(lambda s: s / final * sparsity, allocate(template, final))

  def masks_from_scores(self, scores: Scores, sparsity: Sparsity) -> Masks:
    """Masks at the global target `sparsity` under this pruner's allocation and granularity."""
    if self._nm is not None:
      return masks_lib.nm(scores, *self._nm)
    if self.allocation == "global" and self.granularity == "unstructured":
      return masks_lib.global_topk(scores, sparsity)
    per_layer = self._allocate(scores, sparsity)
    if self.granularity == "unstructured":
      return masks_lib.topk(scores, per_layer)
    return masks_lib.structured(scores, per_layer, granularity=self.granularity, norm="l1")

  @property
  def _covers(self) -> bool:
    """Whether masks also cover the bias/BatchNorm leaves of pruned units."""
    return self.dependents is not None and self.granularity in GRANULARITIES[1:3]

  def init_masks(self, params: Params) -> Masks:
    """All-keep masks: bool on prunable leaves (and on units' dependents), None elsewhere."""
    masks = masks_lib.init(params, self.filter)
    return masks_lib.cover_dependents(params, masks, self.dependents) if self._covers else masks

  @property
  def _nm(self) -> tuple[int, int] | None:
    if ":" not in self.granularity:
      return None
    n, m = self.granularity.split(":")
    return int(n), int(m)

  def instant(self, params: Params, sparsity: Sparsity, *, grads: Params | None = None,
              importance_state: Any = None, key: PRNGKey | None = None,
              previous: Masks | None = None) -> Masks:
    """One-shot masks outside training (e.g. after dense training, before fine-tuning).

    Args:
      params: the weights.
      sparsity: the global target (per-layer targets follow the allocation).
      grads: loss gradients, for 'saliency' and 'taylor'.
      importance_state: the running importance (`PrunerState.importance`).
      key: for 'random' scores; default `key(seed)`.
      previous: with 'neuron'/'filter' and dependents, the current masks: their pruned units
        rank lowest, so they stay pruned while the target does not fall.

    Returns:
      Masks like params (see `init_masks` for which leaves are bool).
    """
    if key is None:
      key = jax.random.key(self.seed)
    scores = self.scores(params, grads=grads, importance_state=importance_state, key=key)
    if previous is not None and self._covers:
      # Zero is the lowest unit norm, so the pruned units are chosen first.
      scores = jax.tree.map(lambda s, m: None if s is None else jnp.where(m, s, 0.0),
                            scores, previous, is_leaf=_is_none)
    masks = self.masks_from_scores(scores, sparsity)
    return masks_lib.cover_dependents(params, masks, self.dependents) if self._covers else masks

  # ------------------------------------------------------------------------ optax wrap

  def wrap(self, inner: optax.GradientTransformation
           ) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` so that it prunes; see the module docstring."""
    inner = optax.with_extra_args_support(inner)
    base_key = jax.random.key(self.seed)

    def init_fn(params):
      return PrunerState(count=jnp.zeros((), jnp.int32),
                         masks=self.init_masks(params),
                         importance=self.init_importance(params),
                         sparsity=jnp.zeros((), jnp.float32),
                         inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
      if params is None:
        raise ValueError("the pruner needs params: call tx.update(grads, state, params).")
      grads = updates
      importance = self.update_importance(state.importance, params, grads, state.count)
      masks, sparsity, inner_state = state.masks, state.sparsity, state.inner_state
      if self.schedule is not None:
        should_update, target = self.schedule(state.count)

        def recompute(_):
          new_masks = self.instant(params, target, grads=grads, importance_state=importance,
                                   key=jax.random.fold_in(base_key, state.count),
                                   previous=masks)
          return (new_masks, jnp.asarray(target, jnp.float32),
                  _reset_pruned_moments(inner, inner_state, new_masks, params))

        masks, sparsity, inner_state = jax.lax.cond(
            should_update, recompute, lambda _: (masks, sparsity, inner_state), None)
      full = _full_masks(masks, params)
      masked_grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0), grads, full)
      inner_updates, inner_state = inner.update(masked_grads, inner_state, params,
                                                **extra_args)
      # Pruned weights move to exactly zero (p + (-p) == 0 in floating point) and stay there.
      new_updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), inner_updates, params,
                                 full)
      return new_updates, PrunerState(state.count + 1, masks, importance, sparsity,
                                      inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _final_target(schedule: Any) -> float:
  """The sparsity a schedule ends at (TF-MOT-style schedules name it one of two ways)."""
  for name in ("final_sparsity", "target_sparsity"):
    if hasattr(schedule, name):
      return float(getattr(schedule, name))
  raise ValueError(f"schedule={schedule!r} has no final_sparsity/target_sparsity attribute; "
                   "use an ep.schedules schedule or allocation='uniform'/'global'.")


def set_masks(state: PrunerState, masks: Masks) -> PrunerState:
  """Replaces the masks of a pruner state (e.g. with one-shot masks before fine-tuning).

  The inner optimizer's moments are reset where weights are pruned at its next mask update;
  call this on a fresh state (from `tx.init`), whose moments are zero anyway.
  """
  return state._replace(masks=masks)
