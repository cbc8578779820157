"""The search interface: a NamedTuple of pure `init / ask / tell` functions, optax style.

    search = ep.search.ga(population_size=32, budget=budget)
    state = search.init(key)                                    # or init(key, initial)
    population, state = search.ask(ask_key, state)              # [P, L] sparsity vectors
    fitness = evaluate(population)                              # [P], higher is better
    state, metrics = search.tell(tell_key, population, fitness, state)

Every search keeps its own genotype (per-layer logits) in its state and hands out phenotypes:
sparsity vectors projected onto the budget, so every candidate the caller sees is feasible.
`tell` must receive the population of the latest `ask` (the genotypes behind it are read
from the state). Fitness is maximised (pass -loss for a loss); NaN counts as -inf.

States are NamedTuples of arrays, keys are explicit arguments, and the sizes (population,
layers) are closed over by the constructor, so `ask`/`tell` compile once and run under `jit`,
`vmap` and `lax.scan`.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from evoprune.search import budget as budget_lib
from evoprune.types import PRNGKey

Metrics = dict[str, jax.Array]


class MaskSearch(NamedTuple):
  """A per-layer sparsity search.

  Attributes:
    init: `init(key, initial=None) -> state`; `initial` is None (start at the uniform
      allocation), one sparsity vector [L] or several [K, L] (K <= population size), e.g.
      uniform and ERK allocations to start from.
    ask: `ask(key, state) -> (population [P, L], state)`.
    tell: `tell(key, population [P, L], fitness [P], state) -> (state, metrics)`; metrics
      hold this generation's 'best_fitness', 'mean_fitness', 'worst_fitness', its 'best'
      vector [L], and 'best_so_far_fitness'.
    population_size: P.
    budget: the `Budget` every candidate satisfies (its `num_layers` is L).
  """
  init: Callable[..., Any]
  ask: Callable[[PRNGKey, Any], tuple[jax.Array, Any]]
  tell: Callable[[PRNGKey, jax.Array, jax.Array, Any], tuple[Any, Metrics]]
  population_size: int
  budget: budget_lib.Budget


def sanitize(fitness: jax.Array) -> jax.Array:
  """float32 fitness [P] with NaN replaced by -inf (a failed candidate never wins)."""
  fitness = jnp.asarray(fitness, jnp.float32)
  return jnp.where(jnp.isnan(fitness), -jnp.inf, fitness)


def initial_genotypes(key: PRNGKey, initial: Any, population_size: int,
                      budget: budget_lib.Budget, std: float) -> jax.Array:
  """Starting logits [P, L]: the given vectors first, then Gaussian perturbations of them.

  Args:
    key: randomness for the perturbations.
    initial: None (the uniform allocation), [L] or [K, L] sparsity vectors.
    population_size: P.
    budget: gives L and the uniform allocation.
    std: standard deviation of the perturbations, in logits.

  Returns:
    float32 [P, L]; rows 0..K-1 are the logits of `initial` exactly.
  """
  seeds = center_vectors(initial, budget)
  k = seeds.shape[0]
  parents = seeds[jnp.arange(population_size) % k]
  noise = std * jax.random.normal(key, (population_size, budget.num_layers))
  noise = noise.at[:k].set(0.0)
  return parents + noise


def center_vectors(initial: Any, budget: budget_lib.Budget) -> jax.Array:
  """Logits [K, L] of the starting sparsity vectors (uniform allocation when None)."""
  if initial is None:
    initial = budget.uniform()
  seeds = jnp.atleast_2d(jnp.asarray(initial, jnp.float32))
  return budget_lib.logit(seeds)


def check_initial(initial: Any, population_size: int, num_layers: int) -> None:
  """Raises ValueError when `initial` does not fit the search (host-side, before tracing)."""
  if initial is None:
    return
  shape = np.shape(initial)
  if len(shape) not in (1, 2) or shape[-1] != num_layers or (
      len(shape) == 2 and not 1 <= shape[0] <= population_size):
    raise ValueError(f"initial has shape {shape}; pass one sparsity vector [{num_layers}] or "
                     f"up to {population_size} of them [K, {num_layers}].")


def generation_metrics(population: jax.Array, fitness: jax.Array,
                       best_so_far: jax.Array) -> Metrics:
  """The per-generation record every search's `tell` returns."""
  best = jnp.argmax(fitness)
  finite = jnp.isfinite(fitness)
  mean = jnp.sum(jnp.where(finite, fitness, 0.0)) / jnp.maximum(jnp.sum(finite), 1)
  return {
      "best_fitness": fitness[best],
      "mean_fitness": jnp.where(jnp.any(finite), mean, -jnp.inf),
      "worst_fitness": jnp.min(fitness),
      "best": population[best],
      "best_so_far_fitness": best_so_far,
  }


def update_best(population: jax.Array, fitness: jax.Array, best_solution: jax.Array,
                best_fitness: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The best vector and fitness ever seen, after this generation (ties keep the old one)."""
  i = jnp.argmax(fitness)
  better = fitness[i] > best_fitness
  return (jnp.where(better, population[i], best_solution),
          jnp.where(better, fitness[i], best_fitness))


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an int >= {minimum}.")


def check_range(name: str, value: Any, low: float, high: float, *, open_low: bool = False
                ) -> None:
  ok = isinstance(value, (int, float)) and (low < value if open_low else low <= value) and (
      value <= high)
  if not ok:
    bracket = "(" if open_low else "["
    raise ValueError(f"{name}={value!r} is outside {bracket}{low}, {high}]; pass a value "
                     "inside that range.")
