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

The first layer once for the whole search: when the first prunable leaf is the kernel of a
linen `nn.Dense` applied to the (flattened) input batch itself, as in every MLP, every
candidate's first-layer output is read from sums computed once. The masks of all
candidates are nested (each keeps the highest-ranked entries of every column), so column j
of a candidate that keeps n_j entries is the sum of the first n_j terms x[:, i] * W[i, j] in
rank order: a prefix sum `prefix[n_j, :, j]`. The context holds these prefix sums for the
kept counts the budget allows (`make_fitness(..., budget=...)`), and the candidate's
forward pass takes them instead of the layer's matmul (via `nn.intercept_methods`). For
LeNet-300-100 on a global-sparsity budget of 0.9 this removes 88% of each candidate's
multiply-adds; the result equals the masked matmul to float rounding (the sum's order
differs). It applies without fine-tuning steps, when the prefix sums fit `PREFIX_MAX_BYTES`,
and is skipped, with the plain forward pass, for any other model.

Optional fine-tuning: `finetune_steps > 0` runs that many masked SGD steps on fixed training
batches before the validation pass, inside the same compiled call for all candidates.
"""

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from evoprune.search import budget as budget_lib
from evoprune.types import Params, Scores

METRICS = ("accuracy", "loss", "accuracy_loss")
# Weight of the loss in 'accuracy_loss': small enough never to outweigh one example's
# accuracy on batches below ~1e5 examples (losses are O(1)), large enough to break ties.
_TIE_BREAK = 1e-5
# Largest prefix-sum tensor [m + 1, B, out] the first-layer shortcut may hold in the context.
PREFIX_MAX_BYTES = 2**30

ApplyFn = Callable[[Params, jax.Array], jax.Array]
FitnessFn = Callable[[jax.Array, Any], jax.Array]


def _is_none(x: Any) -> bool:
  return x is None


class FirstLayer(NamedTuple):
  """The first dense layer of every candidate, from sums shared by the whole population.

  Attributes:
    prefix: [m + 1, B, out] prefix[n, b, j] = sum of the n highest-ranked terms
      x[b, i] * W[i, j] of column j (n = 0..m, m the most any feasible candidate keeps).
    bias: [out] the layer's bias (zeros without one).
    min_pruned: int32 scalar, the fewest entries a feasible candidate prunes from the layer;
      candidates are evaluated at no fewer.
  """
  prefix: jax.Array
  bias: jax.Array
  min_pruned: jax.Array


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
    first: a `FirstLayer`, or None when every candidate runs the plain forward pass.
  """
  params: Params
  ranks: Any
  x: jax.Array
  y: jax.Array
  train_x: jax.Array
  train_y: jax.Array
  first: FirstLayer | None = None


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
  return jax.tree.map(lambda x: None if x is None else _rank_leaf(x), scores, is_leaf=_is_none)


@jax.jit
def _rank_leaf(x: jax.Array) -> jax.Array:
  """int32 ranks of one leaf (see `rank_scores`); jitted: eager sorts recompile per call."""
  flat = jnp.asarray(x, jnp.float32).reshape(-1)
  nan = jnp.isnan(flat)
  value = jnp.where(nan | (flat == 0), 0.0, flat)  # also folds -0.0 into +0.0
  index = jnp.arange(flat.size, dtype=jnp.int32)
  # Keys: NaN first (0 before 1), then the value; `is_stable` keeps index order on ties.
  _, _, order = lax.sort((jnp.where(nan, 0, 1).astype(jnp.int32), value, index),
                         num_keys=2, is_stable=True)
  ranks = jnp.zeros(flat.size, jnp.int32).at[order].set(index)
  return ranks.reshape(jnp.shape(x))


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


def _first_dense_path(apply_fn: ApplyFn, params: Params, ranks: Any, x: jax.Array
                      ) -> tuple[str, ...] | None:
  """The module path of the first prunable leaf if it is an `nn.Dense` on the raw input.

  Checked by running the model once on two examples and watching the module's calls: it
  must be called exactly once, on the input batch flattened (bit for bit), with the kernel
  that is the first prunable leaf. Anything else (NNX, a conv first, a normalised input)
  returns None and the plain forward pass is used.
  """
  paths = [path for path, leaf in jax.tree_util.tree_flatten_with_path(
      ranks, is_leaf=_is_none)[0] if leaf is not None]
  names = tuple(getattr(key, "key", None) for key in paths[0])
  if len(names) < 2 or names[-1] != "kernel" or not all(isinstance(n, str) for n in names):
    return None
  module_path, calls = names[:-1], []

  def record(next_fun, args, kwargs, context):
    if _calls(context, module_path):
      calls.append((context.module, args))
    return next_fun(*args, **kwargs)

  probe = x[:2]
  try:
    with nn.intercept_methods(record):
      apply_fn(params, probe)
  except Exception:  # pylint: disable=broad-except  # not a linen model: no shortcut
    return None
  if len(calls) != 1:
    return None
  module, args = calls[0]
  flat = np.asarray(probe).reshape(probe.shape[0], -1)
  if (type(module) is not nn.Dense or len(args) != 1  # pylint: disable=unidiomatic-typecheck
      or np.shape(args[0]) != flat.shape or not np.array_equal(np.asarray(args[0]), flat)):
    return None
  return module_path


def _first_layer(params: Params, ranks: Any, x: jax.Array, module_path: tuple[str, ...],
                 min_sparsity: float) -> FirstLayer | None:
  """Prefix sums of the first dense layer over the kept counts a feasible candidate has."""
  layer = params
  for name in module_path:
    layer = layer[name]
  kernel = jnp.asarray(layer["kernel"], jnp.float32)
  rank = jnp.asarray(jax.tree.leaves(ranks)[0])
  out = kernel.shape[1]
  # Two entries of slack: the candidate's float32 sparsity may sit just under the bound.
  min_pruned = max(0, int(np.floor(min_sparsity * kernel.size)) - 2)
  most_kept = int(jnp.max(jnp.sum(rank >= min_pruned, axis=0)))
  xf = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  if 4 * xf.shape[0] * (most_kept + 1) * out > PREFIX_MAX_BYTES:
    return None
  prefix = _prefix_sums(xf, kernel, rank, most_kept)
  bias = jnp.asarray(layer.get("bias", jnp.zeros(out)), jnp.float32)
  return FirstLayer(prefix=prefix, bias=bias, min_pruned=jnp.int32(min_pruned))


@functools.partial(jax.jit, static_argnums=3)
def _prefix_sums(x: jax.Array, kernel: jax.Array, rank: jax.Array, most_kept: int
                 ) -> jax.Array:
  """[m + 1, B, out]: sums of the first n terms x[:, i] * W[i, j] of each column, rank order."""
  order = jnp.argsort(-rank, axis=0)[:most_kept]  # [m, out]: kept-first rows of each column
  weights = jnp.take_along_axis(kernel, order, axis=0)  # [m, out]

  # A scan over the m terms (XLA:CPU's cumsum over a middle axis ran 2-3x slower).
  def add(total, n):
    total = total + x[:, order[n]] * weights[n]
    return total, total

  zeros = jnp.zeros((x.shape[0], kernel.shape[1]), x.dtype)
  _, sums = lax.scan(add, zeros, jnp.arange(most_kept))
  return jnp.concatenate([zeros[None], sums])


def _first_layer_output(first: FirstLayer, rank: jax.Array, candidate_sparsity: jax.Array
                        ) -> jax.Array:
  """[B, out]: the candidate's first-layer output, read from the prefix sums."""
  pruned = jnp.maximum(num_pruned(candidate_sparsity, rank.size), first.min_pruned)
  # [out] entries kept in each column; at most m, since `pruned` >= the feasible minimum.
  kept = jnp.sum(rank >= pruned, axis=0)
  return jnp.take_along_axis(first.prefix, kept[None, None, :], axis=0)[0] + first.bias


def _calls(context: Any, module_path: tuple[str, ...]) -> bool:
  """Whether an intercepted method call is the `__call__` of the module at `module_path`."""
  return context.method_name == "__call__" and tuple(context.module.path) == module_path


def _replacing_call(module_path: tuple[str, ...], output: jax.Array) -> Callable:
  """A method interceptor: the module at `module_path` returns `output` instead."""
  def interceptor(next_fun, args, kwargs, context):
    if _calls(context, module_path):
      return output
    return next_fun(*args, **kwargs)
  return interceptor


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
                 train_x: Any = None, train_y: Any = None, learning_rate: float = 0.01,
                 budget: budget_lib.Budget | None = None, shared_first_layer: bool = True
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
    budget: the budget every candidate satisfies (optional): bounds the first-layer prefix
      sums to the kept counts it allows (see the module docstring).
    shared_first_layer: compute a first `nn.Dense` layer on the input once for the whole
      population (prefix sums) when it applies; False: always the plain forward pass.

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
  ranks = rank_scores(scores)
  first, module_path = None, None
  if shared_first_layer and not finetune_steps:
    module_path = _first_dense_path(apply_fn, params, ranks, x)
    if module_path is not None:
      min_sparsity = 0.0 if budget is None else float(budget.feasible_lower()[0])
      first = _first_layer(params, ranks, x, module_path, min_sparsity)
  context = FitnessContext(params=params, ranks=ranks, x=x, y=y, train_x=train_x,
                           train_y=train_y, first=first)

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
    if first is None:
      return _score(apply_fn(pruned, context.x), context.y, metric)
    hidden = _first_layer_output(context.first, jax.tree.leaves(context.ranks)[0], candidate[0])
    with nn.intercept_methods(_replacing_call(module_path, hidden)):
      logits = apply_fn(pruned, context.x)
    return _score(logits, context.y, metric)

  return fitness_fn, context
