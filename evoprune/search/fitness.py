"""Fitness of one candidate: the masked model's accuracy or loss on a fixed validation batch.

    fitness_fn, context = ep.search.make_fitness(apply_fn, params, scores, x_val, y_val)
    fitness_fn(candidate, context)   # candidate: sparsity vector [L] -> scalar, higher = better

The function is written for ONE candidate and mapped over a population by
`evoprune.search.population` (vmap, chunked lax.map or a loop). Everything that is the same
for every candidate (params, the ranking of the scores, the batch) travels in `context`, a
pytree passed as an argument rather than closed over, so compiled programs do not embed
the weights and the population axis can be sharded while the context is replicated.

Masks: a candidate's masks are exactly `evoprune.masks.topk(scores, candidate)`. The scores
are ranked once (a stable sort with topk's tie rule) and each candidate's mask is one
comparison `rank >= round(s_l * size_l)` per leaf instead of a selection per candidate.

Optional fine-tuning: `finetune_steps > 0` runs that many masked SGD steps on fixed training
batches before the validation pass, inside the same compiled call for all candidates.
"""

from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from evoprune.types import Params, Scores

METRICS = ("accuracy", "loss", "accuracy_loss")
# Weight of the loss in 'accuracy_loss': small enough never to outweigh one example's
# accuracy on batches below ~1e5 examples (losses are O(1)), large enough to break ties.
_TIE_BREAK = 1e-5

ApplyFn = Callable[[Params, jax.Array], jax.Array]
FitnessFn = Callable[[jax.Array, Any], jax.Array]


def _is_none(x: Any) -> bool:
  return x is None


class FitnessContext(NamedTuple):
  """What every candidate shares.

  Attributes:
    params: the dense parameters.
    ranks: int32 tree like the scores: each prunable entry's position in pruning order
      (0 = pruned first), None elsewhere.
    x: [B, ...] validation inputs.
    y: [B] integer labels.
    train_x: [steps, b, ...] fine-tuning batches (or an empty array without fine-tuning).
    train_y: [steps, b] their labels.
  """
  params: Params
  ranks: Any
  x: jax.Array
  y: jax.Array
  train_x: jax.Array
  train_y: jax.Array


def rank_scores(scores: Scores) -> Any:
  """Each prunable entry's position in `topk`'s pruning order, per leaf.

  `evoprune.masks.topk` prunes the lowest scores first, NaN below every number, -0.0 equal
  to +0.0, and among equal scores the lower flat index first. A stable two-key sort gives
  that order; `rank >= k` is then the mask that prunes k entries.

  Args:
    scores: tree of float arrays, None for non-prunable leaves.

  Returns:
    A tree like `scores` with int32 leaves of the same shapes.
  """
  def one(x):
    if x is None:
      return None
    flat = jnp.asarray(x, jnp.float32).reshape(-1)
    nan = jnp.isnan(flat)
    value = jnp.where(nan | (flat == 0), 0.0, flat)  # also folds -0.0 into +0.0
    index = jnp.arange(flat.size, dtype=jnp.int32)
    # Keys: NaN first (0 before 1), then the value; `is_stable` keeps index order on ties.
    _, _, order = lax.sort((jnp.where(nan, 0, 1).astype(jnp.int32), value, index),
                           num_keys=2, is_stable=True)
    ranks = jnp.zeros(flat.size, jnp.int32).at[order].set(index)
    return ranks.reshape(jnp.shape(x))

  return jax.tree.map(one, scores, is_leaf=_is_none)


def num_pruned(sparsity: jax.Array, size: int) -> jax.Array:
  """Entries pruned at `sparsity` from `size`: round half to even of a float32 product,
  clipped to [0, size] (the count `evoprune.masks.topk` uses)."""
  s = jnp.asarray(sparsity, jnp.float32)
  return jnp.clip(jnp.round(s * np.float32(size)), 0, size).astype(jnp.int32)


def masks_from_ranks(ranks: Any, candidate: jax.Array) -> Any:
  """Masks of one candidate [L] from precomputed ranks; equal to `masks.topk(scores, s)`."""
  leaves, treedef = jax.tree.flatten(ranks, is_leaf=_is_none)
  out, i = [], 0
  for r in leaves:
    if r is None:
      out.append(None)
      continue
    out.append(r >= num_pruned(candidate[i], r.size))
    i += 1
  return treedef.unflatten(out)


def _apply_masks(params: Params, masks: Any) -> Params:
  return jax.tree.map(lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
                      masks, params, is_leaf=_is_none)


def _score(logits: jax.Array, y: jax.Array, metric: str) -> jax.Array:
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  accuracy = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
  if metric == "accuracy":
    return accuracy
  if metric == "loss":
    return -loss
  return accuracy - _TIE_BREAK * loss


def make_fitness(apply_fn: ApplyFn, params: Params, scores: Scores, x: Any, y: Any, *,
                 metric: str = "accuracy_loss", finetune_steps: int = 0,
                 train_x: Any = None, train_y: Any = None, learning_rate: float = 0.01
                 ) -> tuple[FitnessFn, FitnessContext]:
  """Builds the fitness of one candidate sparsity vector and the context it reads.

  Args:
    apply_fn: `apply_fn(params, x) -> logits [B, C]` in inference mode, e.g.
      `lambda p, x: model.apply({'params': p}, x, train=False)`.
    params: the trained dense parameters.
    scores: importance like `params`, None for non-prunable leaves (e.g.
      `evoprune.importance.magnitude` restricted by `evoprune.masks.init(params)`). Its
      non-None leaves, in flatten order, are the layers of a candidate vector.
    x: [B, ...] validation batch (every candidate sees the same batch).
    y: [B] labels.
    metric: 'accuracy', 'loss' (fitness = -cross-entropy) or 'accuracy_loss' (accuracy with
      the loss as a tie-break: accuracy - 1e-5 * loss).
    finetune_steps: masked SGD steps on the training batches before evaluation (0 = none).
    train_x: [steps, b, ...] fine-tuning batches, one per step (needed when steps > 0).
    train_y: [steps, b] their labels.
    learning_rate: SGD learning rate of the fine-tuning steps.

  Returns:
    (fitness_fn, context): `fitness_fn(candidate [L], context) -> float32 scalar`.

  Raises:
    ValueError: an unknown metric, no prunable leaves, mismatched batches, or fine-tuning
      without training batches.
  """
  if metric not in METRICS:
    raise ValueError(f"metric={metric!r} is unknown; use one of {METRICS}.")
  if not jax.tree.leaves(scores):
    raise ValueError("scores have no prunable (non-None) leaves; build them with "
                     "evoprune.masks.init(params) so the kernels are scored.")
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape[0] != y.shape[0] or y.ndim != 1:
    raise ValueError(f"x has {x.shape[0]} examples but y has shape {y.shape}; pass labels [B].")
  if not isinstance(finetune_steps, int) or finetune_steps < 0:
    raise ValueError(f"finetune_steps={finetune_steps!r} must be an int >= 0.")
  if finetune_steps:
    if train_x is None or train_y is None:
      raise ValueError("finetune_steps > 0 needs train_x [steps, b, ...] and train_y [steps, b].")
    train_x, train_y = jnp.asarray(train_x), jnp.asarray(train_y)
    if train_x.shape[0] != finetune_steps or train_y.shape[:2] != train_x.shape[:2]:
      raise ValueError(f"train_x has shape {train_x.shape} and train_y {train_y.shape}; pass "
                       f"one batch per fine-tuning step: [{finetune_steps}, b, ...] and "
                       f"[{finetune_steps}, b].")
  else:
    train_x, train_y = jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32)
  context = FitnessContext(params=params, ranks=rank_scores(scores), x=x, y=y,
                           train_x=train_x, train_y=train_y)

  def finetune(pruned: Params, masks: Any, context: FitnessContext) -> Params:
    def loss_fn(p, xb, yb):
      logits = apply_fn(p, xb)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    def step(p, batch):
      grads = jax.grad(loss_fn)(p, *batch)
      # Pruned weights get no update, so they stay exactly zero.
      p = jax.tree.map(lambda m, w, g: w - learning_rate * (g if m is None else jnp.where(m, g, 0)),
                       masks, p, grads, is_leaf=_is_none)
      return p, None

    pruned, _ = lax.scan(step, pruned, (context.train_x, context.train_y))
    return pruned

  def fitness_fn(candidate: jax.Array, context: FitnessContext) -> jax.Array:
    masks = masks_from_ranks(context.ranks, candidate)
    pruned = _apply_masks(context.params, masks)
    if finetune_steps:
      pruned = finetune(pruned, masks, context)
    return _score(apply_fn(pruned, context.x), context.y, metric)

  return fitness_fn, context
