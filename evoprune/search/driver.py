"""`evolve`: run a search for G generations, and the 'evolutionary' allocation built on it.

    budget = ep.search.sparsity_budget(0.95, scores, upper=0.99)
    fitness_fn, context = ep.search.make_fitness(apply_fn, params, scores, x_val, y_val)
    result = ep.search.evolve(jax.random.key(0), ep.search.ga(32, budget), fitness_fn,
                              context, generations=30)
    masks = ep.masks.topk(scores, result.best)

One generation (ask, evaluate the population, tell) is one jitted function, compiled once
and called G times with `fold_in(key, generation)`; its state argument is donated.
With `scan=True` all G generations run inside a single `lax.scan`.
"""

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evoprune.search import base
from evoprune.search import budget as budget_lib
from evoprune.search import cmaes as cma_es_lib
from evoprune.search import fitness as fitness_lib
from evoprune.search import genetic as ga_lib
from evoprune.search import population as population_lib
from evoprune.types import PRNGKey, Scores

STRATEGIES: dict[str, Callable[..., base.MaskSearch]] = {
    "ga": ga_lib.ga,
    "cma_es": cma_es_lib.cma_es,
}


def get(name: str) -> Callable[..., base.MaskSearch]:
  """The search constructor registered as `name` in `STRATEGIES`.

  Raises:
    ValueError: an unknown name (the message lists the valid ones).
  """
  if name not in STRATEGIES:
    raise ValueError(f"unknown search strategy {name!r}; use one of {sorted(STRATEGIES)}.")
  return STRATEGIES[name]


class EvolveResult(NamedTuple):
  """What `evolve` returns.

  Attributes:
    best: float32 [L], the best sparsity vector found (on the budget).
    best_fitness: its fitness.
    history: per generation: 'best_fitness', 'mean_fitness', 'worst_fitness' [G] of that
      generation's population, 'best_so_far_fitness' [G], and 'best_vector' [G, L] (that
      generation's best candidate). numpy arrays.
    state: the search's final state.
    evaluation: the population strategy used ('vmap', 'map' or 'loop').
  """
  best: np.ndarray
  best_fitness: float
  history: dict[str, np.ndarray]
  state: Any
  evaluation: str


def _history(metrics: list[dict[str, Any]] | dict[str, Any]) -> dict[str, np.ndarray]:
  if isinstance(metrics, dict):  # stacked by lax.scan
    stacked = {k: np.asarray(v) for k, v in metrics.items()}
  else:
    stacked = {k: np.stack([np.asarray(m[k]) for m in metrics]) for k in metrics[0]}
  stacked["best_vector"] = stacked.pop("best")
  return stacked


def evolve(key: PRNGKey, search: base.MaskSearch, fitness_fn: fitness_lib.FitnessFn,
           context: Any, *, generations: int, initial: Any = None, evaluation: str = "auto",
           chunk_size: int | None = None, devices: Sequence[Any] | None = None,
           scan: bool = False, callback: Callable[[int, dict[str, float]], None] | None = None
           ) -> EvolveResult:
  """Runs `search` for `generations` generations and returns the best vector found.

  Args:
    key: base key, split into an init key and a run key; generation g uses
      `fold_in(run_key, g)`.
    search: a `MaskSearch` (e.g. `ga(32, budget)`).
    fitness_fn: `fitness_fn(candidate [L], context) -> scalar`, higher is better.
    context: the pytree every candidate shares.
    generations: G >= 1.
    initial: starting vector(s) for `search.init` ([L] or [K, L]; None = uniform).
    evaluation: population strategy, one of `population.EVALUATIONS`.
    chunk_size: chunk of the 'map' strategy.
    devices: split the population across these devices (None: one device).
    scan: run all generations in one `lax.scan` (not with evaluation='loop').
    callback: `callback(generation, metrics)` after every generation (host floats; not
      called with scan=True).

  Returns:
    An `EvolveResult`.

  Raises:
    ValueError: bad generations, or scan=True with the 'loop' evaluation.
  """
  base.check_positive_int("generations", generations)
  evaluator = population_lib.make_evaluator(
      fitness_fn, context, search.population_size, search.budget.num_layers,
      strategy=evaluation, chunk_size=chunk_size, devices=devices)
  if scan and not evaluator.traceable:
    raise ValueError("scan=True needs a traceable evaluation; use evaluation='vmap', 'map' or "
                     "'auto' (not 'loop').")
  init_key, key = jax.random.split(key)
  state = jax.jit(search.init)(init_key, initial)

  if evaluator.traceable:
    # The context and key are arguments, not closed over: compiled programs then take the
    # weights and data as inputs instead of embedding them as constants.
    def generation_step(state, context, key, generation):
      ask_key, tell_key = jax.random.split(jax.random.fold_in(key, generation))
      population, state = search.ask(ask_key, state)
      fitness = evaluator.evaluate(population, context)
      return search.tell(tell_key, population, fitness, state)

    if scan:
      def run(state, context, key):
        return jax.lax.scan(lambda s, g: generation_step(s, context, key, g), state,
                            jnp.arange(generations))
      state, stacked = jax.jit(run)(state, context, key)
      history = _history(stacked)
    else:
      step = jax.jit(generation_step, donate_argnums=(0,))
      records = []
      for g in range(generations):
        state, metrics = step(state, context, key, jnp.asarray(g, jnp.int32))
        records.append(metrics)
        if callback is not None:
          callback(g, {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
      history = _history(records)
  else:
    ask, tell = jax.jit(search.ask), jax.jit(search.tell)
    records = []
    for g in range(generations):
      ask_key, tell_key = jax.random.split(jax.random.fold_in(key, g))
      population, state = ask(ask_key, state)
      fitness = evaluator.evaluate(population, context)
      state, metrics = tell(tell_key, population, fitness, state)
      records.append(metrics)
      if callback is not None:
        callback(g, {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    history = _history(records)
  return EvolveResult(best=np.asarray(state.best_solution),
                      best_fitness=float(state.best_fitness), history=history, state=state,
                      evaluation=evaluator.strategy)


def vector_of(per_layer: Any, num_layers: int) -> np.ndarray:
  """A per-layer allocation (a 1-D array or a tree of floats, None where not prunable) as
  a float32 vector [L] in flatten order."""
  if isinstance(per_layer, (np.ndarray, jax.Array)) and np.ndim(per_layer) == 1:
    vector = np.asarray(per_layer, np.float32)
  else:
    vector = np.asarray([float(v) for v in jax.tree.leaves(per_layer)], np.float32)
  if vector.shape != (num_layers,):
    raise ValueError(f"an allocation gave {vector.shape[0]} values for {num_layers} prunable "
                     "layers; it must give one per prunable leaf.")
  return vector


def _as_tree(scores: Scores, vector: np.ndarray) -> Any:
  """A vector [L] as a sparsity tree like `scores` (floats at non-None leaves, else None)."""
  leaves, treedef = jax.tree.flatten(scores, is_leaf=lambda x: x is None)
  values = iter(float(v) for v in vector)
  return treedef.unflatten([None if x is None else next(values) for x in leaves])


def _first_last_bounds(upper: Any, num_layers: int, first_last: Any) -> np.ndarray:
  """Per-layer upper bounds with the first/last layers capped ('dense': not pruned)."""
  upper = np.broadcast_to(np.asarray(upper, np.float64), (num_layers,)).copy()
  if first_last is None:
    return upper
  cap = 0.0 if first_last == "dense" else float(first_last)
  for end in {0, num_layers - 1}:
    upper[end] = min(upper[end], cap)
  return upper


def evolutionary_allocation(apply_fn: fitness_lib.ApplyFn, params: Any, x: Any, y: Any, *,
                            key: PRNGKey, strategy: str = "ga", population_size: int = 32,
                            generations: int = 30, metric: str = "accuracy_loss",
                            lower: Any = 0.0, upper: Any = 0.99,
                            seeds: Sequence[Callable[[Scores, float], Any]] = (),
                            evaluation: str = "auto", search_kwargs: dict | None = None,
                            on_result: Callable[[EvolveResult], None] | None = None
                            ) -> Callable[..., Any]:
  """The 'evolutionary' allocation: per-layer sparsity chosen by a search on a fixed batch.

  Returns a function with the signature of the `evoprune.allocation` functions,
  `allocate(scores, target, *, first_last=None) -> sparsity tree` (one float per non-None
  leaf of `scores`, None elsewhere), that searches for the per-layer sparsities at global
  sparsity `target` maximising the fitness of the model masked by `topk(scores, .)` on
  (x, y). It runs a whole search on the host: use it for one-shot pruning (e.g.
  `Pruner(allocation=allocate).instant(...)`), not inside a compiled step or a schedule.

  Args:
    apply_fn: `apply_fn(params, x) -> logits`.
    params: the trained parameters the masks apply to.
    x: [B, ...] a fixed VALIDATION batch (never the test set).
    y: [B] labels.
    key: the search's key.
    strategy: a name in `STRATEGIES`.
    population_size: candidates per generation.
    generations: generations to run.
    metric: fitness metric (see `fitness.METRICS`).
    lower: per-layer sparsity lower bounds (float or [L]).
    upper: per-layer sparsity upper bounds (float or [L]).
    seeds: allocations to start from, each `seed(scores, target) -> per-layer` (e.g.
      `evoprune.allocation.uniform`, `.global_` and `.erk`); the search evaluates them
      first, and with an elitist strategy (GA) the result is never worse than the best of
      them on (x, y).
    evaluation: population strategy (see `population.EVALUATIONS`).
    search_kwargs: extra keyword arguments of the strategy's constructor.
    on_result: called with the `EvolveResult` (e.g. to keep the history).

  Returns:
    `allocate(scores, target, *, first_last=None, previous=None)`; `first_last` is None,
    'dense' or a sparsity cap for the first and last prunable leaves, as in
    `evoprune.allocation`; `previous` (a sparsity tree or [L] vector, e.g. an earlier
    search's answer) warm-starts the search: it joins the first population, so with an
    elitist strategy the answer is never worse than it on (x, y).

  Searching again later in training (the per-layer ratios follow the evolving importance):
  train in segments; before each, search on the current weights and running importance,
  warm-started from the last answer, and fix the answer for the segment's mask updates:

      per_layer = None
      for segment in range(segments):
        allocate = ep.search.evolutionary_allocation(apply_fn, state.params, x_val, y_val,
                                                     key=jax.random.fold_in(key, segment))
        scores = pruner.scores(state.params, importance_state=state.opt_state.importance)
        per_layer = allocate(scores, final_target, previous=per_layer)
        pruner = dataclasses.replace(pruner, allocation=ep.allocation.fixed(per_layer))
        state = fit(model, pruner.wrap(inner), state, ...)   # the pruner state carries over

  (the new `tx` is compiled once per segment; see tests/search_test.py ResearchTest).
  """
  constructor = get(strategy)

  def allocate(scores: Scores, target: float, *, first_last: Any = None,
               previous: Any = None) -> Any:
    num_layers = len(jax.tree.leaves(scores))
    budget = budget_lib.sparsity_budget(
        float(target), scores, lower=lower,
        upper=_first_last_bounds(upper, num_layers, first_last))
    fitness_fn, context = fitness_lib.make_fitness(apply_fn, params, scores, x, y,
                                                   metric=metric, budget=budget)
    search = constructor(population_size, budget, **(search_kwargs or {}))
    initial = None
    vectors = [vector_of(seed(scores, float(target)), budget.num_layers) for seed in seeds]
    if previous is not None:  # warm start: the earlier search's answer competes from the start
      vectors.insert(0, vector_of(previous, budget.num_layers))
    if vectors:
      # Seeds may miss the bounds or round differently: put them on the budget first.
      initial = np.asarray(jax.jit(jax.vmap(budget.project))(
          budget_lib.logit(np.stack(vectors))))
    result = evolve(key, search, fitness_fn, context, generations=generations,
                    initial=initial, evaluation=evaluation)
    if on_result is not None:
      on_result(result)
    return _as_tree(scores, result.best)

  return allocate
