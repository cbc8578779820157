"""A genetic algorithm over per-layer logits: tournament selection, crossover, mutation, elitism.

The parents (the *archive*) are the P best genotypes kept so far. Each generation `ask` breeds
P children, each from two tournament winners by uniform crossover and Gaussian mutation, and
projects them onto the budget; `tell` keeps the `num_elites` best parents and fills the rest
of the archive with the best of children and elites together, so the best solution found is
never lost. The first `ask` hands out the initial population itself (the starting vectors
unchanged, then perturbations of them), so seeded allocations are evaluated as given.

The operators are written for one child and `vmap`ped over the population.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from evoprune.search import base
from evoprune.search import budget as budget_lib
from evoprune.types import PRNGKey


class GAState(NamedTuple):
  """Genetic-algorithm state (all arrays; P = population size, L = layers).

  Attributes:
    generation: int32 scalar, completed `tell` calls.
    archive: float32 [P, L] parent genotypes (logits).
    archive_fitness: float32 [P], their fitness (-inf before the first `tell`).
    children: float32 [P, L] genotypes handed out by the latest `ask`.
    sigma: float32 scalar, mutation standard deviation in logits (decays every generation).
    best_solution: float32 [L], the best sparsity vector seen.
    best_fitness: float32 scalar, its fitness.
  """
  generation: jax.Array
  archive: jax.Array
  archive_fitness: jax.Array
  children: jax.Array
  sigma: jax.Array
  best_solution: jax.Array
  best_fitness: jax.Array


def tournament(key: PRNGKey, fitness: jax.Array, size: int) -> jax.Array:
  """Index of the fittest of `size` parents drawn uniformly with replacement."""
  entrants = jax.random.randint(key, (size,), 0, fitness.shape[0])
  return entrants[jnp.argmax(fitness[entrants])]


def crossover(key: PRNGKey, a: jax.Array, b: jax.Array, rate: float) -> jax.Array:
  """Uniform crossover of two genotypes [L]: with probability `rate` each gene comes from
  either parent with even odds; otherwise the child is a copy of `a`."""
  do_key, gene_key = jax.random.split(key)
  genes = jax.random.bernoulli(gene_key, 0.5, a.shape)
  mixed = jnp.where(genes, a, b)
  return jnp.where(jax.random.bernoulli(do_key, rate), mixed, a)


def mutation(key: PRNGKey, x: jax.Array, rate: float, sigma: jax.Array) -> jax.Array:
  """Adds N(0, sigma^2) to each gene with probability `rate`, and to at least one gene, so
  a child never repeats its parent exactly."""
  pick_key, one_key, noise_key = jax.random.split(key, 3)
  picked = jax.random.bernoulli(pick_key, rate, x.shape)
  picked = picked | (jnp.arange(x.shape[0]) == jax.random.randint(one_key, (), 0, x.shape[0]))
  return x + jnp.where(picked, sigma * jax.random.normal(noise_key, x.shape), 0.0)


def ga(population_size: int, budget: budget_lib.Budget, *, num_elites: int | None = None,
       tournament_size: int = 3, crossover_rate: float = 0.9,
       mutation_rate: float | None = None, sigma_init: float = 0.5, sigma_decay: float = 0.97,
       sigma_min: float = 0.05, init_std: float = 0.5) -> base.MaskSearch:
  """A genetic algorithm on the budget.

  Args:
    population_size: P, candidates per generation (>= 2).
    budget: the `Budget` every candidate satisfies.
    num_elites: parents that always survive into the next archive (default max(1, P // 4)).
    tournament_size: entrants per tournament (selection pressure).
    crossover_rate: probability that a child mixes two parents.
    mutation_rate: per-gene mutation probability (default 1 / L, at least one gene mutates).
    sigma_init: initial mutation standard deviation, in logits.
    sigma_decay: factor applied to sigma after every generation.
    sigma_min: floor of sigma.
    init_std: standard deviation, in logits, of the initial perturbations of the starting
      vectors.

  Returns:
    A `MaskSearch`.

  Raises:
    ValueError: for any value outside its range.
  """
  base.check_positive_int("population_size", population_size, 2)
  num_layers = budget.num_layers
  if num_elites is None:
    num_elites = max(1, population_size // 4)
  base.check_positive_int("num_elites", num_elites, 0)
  if num_elites > population_size:
    raise ValueError(f"num_elites={num_elites} exceeds population_size={population_size}; "
                     "pass at most the population size.")
  base.check_positive_int("tournament_size", tournament_size)
  base.check_range("crossover_rate", crossover_rate, 0.0, 1.0)
  if mutation_rate is None:
    mutation_rate = 1.0 / num_layers
  base.check_range("mutation_rate", mutation_rate, 0.0, 1.0)
  base.check_range("sigma_init", sigma_init, 0.0, 1e3, open_low=True)
  base.check_range("sigma_decay", sigma_decay, 0.0, 1.0, open_low=True)
  base.check_range("sigma_min", sigma_min, 0.0, 1e3)
  base.check_range("init_std", init_std, 0.0, 1e3)
  project = jax.vmap(budget.project)

  def init(key: PRNGKey, initial: Any = None) -> GAState:
    base.check_initial(initial, population_size, num_layers)
    genotypes = base.initial_genotypes(key, initial, population_size, budget, init_std)
    return GAState(
        generation=jnp.zeros((), jnp.int32), archive=genotypes,
        archive_fitness=jnp.full((population_size,), -jnp.inf, jnp.float32),
        children=genotypes, sigma=jnp.asarray(sigma_init, jnp.float32),
        best_solution=project(genotypes[:1])[0],
        best_fitness=jnp.asarray(-jnp.inf, jnp.float32))

  def breed(key: PRNGKey, archive: jax.Array, fitness: jax.Array, sigma: jax.Array
            ) -> jax.Array:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    a = archive[tournament(k1, fitness, tournament_size)]
    b = archive[tournament(k2, fitness, tournament_size)]
    return mutation(k4, crossover(k3, a, b, crossover_rate), mutation_rate, sigma)

  def ask(key: PRNGKey, state: GAState) -> tuple[jax.Array, GAState]:
    keys = jax.random.split(key, population_size)
    offspring = jax.vmap(breed, in_axes=(0, None, None, None))(
        keys, state.archive, state.archive_fitness, state.sigma)
    # The first generation evaluates the initial population (seeded vectors unchanged).
    children = jnp.where(state.generation == 0, state.archive, offspring)
    return project(children), state._replace(children=children)

  def tell(key: PRNGKey, population: jax.Array, fitness: jax.Array, state: GAState
           ) -> tuple[GAState, base.Metrics]:
    del key  # replacement is deterministic
    fitness = base.sanitize(fitness)
    elite = jnp.argsort(-state.archive_fitness, stable=True)[:num_elites]
    pool = jnp.concatenate([state.archive[elite], state.children])
    pool_fitness = jnp.concatenate([state.archive_fitness[elite], fitness])
    # Stable sort: on ties the older (elite) genotype keeps its place.
    keep = jnp.argsort(-pool_fitness, stable=True)[:population_size]
    best_solution, best_fitness = base.update_best(population, fitness, state.best_solution,
                                                   state.best_fitness)
    new = GAState(
        generation=state.generation + 1, archive=pool[keep], archive_fitness=pool_fitness[keep],
        children=state.children,
        sigma=jnp.maximum(state.sigma * sigma_decay, sigma_min).astype(jnp.float32),
        best_solution=best_solution, best_fitness=best_fitness)
    return new, base.generation_metrics(population, fitness, best_fitness)

  return base.MaskSearch(init, ask, tell, population_size, budget)
