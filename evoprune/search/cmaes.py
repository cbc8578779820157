"""CMA-ES (full covariance) over per-layer logits, written from Hansen's tutorial.

N. Hansen, "The CMA Evolution Strategy: A Tutorial" (arXiv:1604.00772), with the default
recombination weights (positive weights on the best half), cumulative step-size adaptation
and rank-one plus rank-mu covariance updates. The search dimension is the number of prunable
layers (a handful to a few hundred), so the covariance is kept in full and eigendecomposed
every generation.

Samples live in logit space; `ask` projects them onto the budget before handing them out and
`tell` updates the distribution from the unprojected samples kept in the state, so the
update follows the distribution the samples were drawn from. Because the projection ignores
a common shift of the logits, drift of the mean along the all-ones direction is harmless.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from evoprune.search import base
from evoprune.search import budget as budget_lib
from evoprune.types import PRNGKey


class CMAState(NamedTuple):
  """CMA-ES state (P = population size, L = layers).

  Attributes:
    generation: int32 scalar, completed `tell` calls.
    mean: float32 [L] distribution mean (logits).
    sigma: float32 scalar step size.
    cov: float32 [L, L] covariance C.
    p_sigma: float32 [L] conjugate evolution path.
    p_c: float32 [L] evolution path.
    eig_basis: float32 [L, L] eigenvectors B of C (columns).
    eig_scale: float32 [L] square roots D of C's eigenvalues.
    samples: float32 [P, L] genotypes handed out by the latest `ask`.
    best_solution: float32 [L], the best sparsity vector seen.
    best_fitness: float32 scalar, its fitness.
  """
  generation: jax.Array
  mean: jax.Array
  sigma: jax.Array
  cov: jax.Array
  p_sigma: jax.Array
  p_c: jax.Array
  eig_basis: jax.Array
  eig_scale: jax.Array
  samples: jax.Array
  best_solution: jax.Array
  best_fitness: jax.Array


def cma_es(population_size: int, budget: budget_lib.Budget, *, sigma_init: float = 0.5,
           num_parents: int | None = None) -> base.MaskSearch:
  """CMA-ES on the budget.

  Args:
    population_size: lambda, samples per generation (>= 2).
    budget: the `Budget` every candidate satisfies.
    sigma_init: initial step size, in logits.
    num_parents: mu, the best samples recombined (default lambda // 2).

  Returns:
    A `MaskSearch`. `init(key, initial)` centres the distribution on the mean logits of
    `initial` ([L] or [K, L]; the uniform allocation when None).

  Raises:
    ValueError: for a value outside its range.
  """
  base.check_positive_int("population_size", population_size, 2)
  base.check_range("sigma_init", sigma_init, 0.0, 1e3, open_low=True)
  mu = population_size // 2 if num_parents is None else num_parents
  base.check_positive_int("num_parents", mu)
  if mu > population_size:
    raise ValueError(f"num_parents={mu} exceeds population_size={population_size}; pass at "
                     "most the population size.")
  n = budget.num_layers
  # Strategy constants (Hansen's tutorial, Table 1), fixed by the sizes.
  raw = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
  weights_np = raw / raw.sum()
  mu_eff = float(1.0 / np.sum(weights_np ** 2))
  c_sigma = (mu_eff + 2.0) / (n + mu_eff + 5.0)
  d_sigma = 1.0 + 2.0 * max(0.0, math.sqrt((mu_eff - 1.0) / (n + 1.0)) - 1.0) + c_sigma
  c_c = (4.0 + mu_eff / n) / (n + 4.0 + 2.0 * mu_eff / n)
  c_1 = 2.0 / ((n + 1.3) ** 2 + mu_eff)
  c_mu = min(1.0 - c_1, 2.0 * (mu_eff - 2.0 + 1.0 / mu_eff) / ((n + 2.0) ** 2 + mu_eff))
  chi_n = math.sqrt(n) * (1.0 - 1.0 / (4.0 * n) + 1.0 / (21.0 * n * n))
  weights = jnp.asarray(weights_np, jnp.float32)
  project = jax.vmap(budget.project)

  def init(key: PRNGKey, initial: Any = None) -> CMAState:
    del key  # the initial distribution is deterministic
    base.check_initial(initial, population_size, n)
    mean = jnp.mean(base.center_vectors(initial, budget), axis=0)
    eye = jnp.eye(n, dtype=jnp.float32)
    return CMAState(
        generation=jnp.zeros((), jnp.int32), mean=mean,
        sigma=jnp.asarray(sigma_init, jnp.float32), cov=eye,
        p_sigma=jnp.zeros(n, jnp.float32), p_c=jnp.zeros(n, jnp.float32), eig_basis=eye,
        eig_scale=jnp.ones(n, jnp.float32),
        samples=jnp.broadcast_to(mean, (population_size, n)),
        best_solution=project(mean[None])[0], best_fitness=jnp.asarray(-jnp.inf, jnp.float32))

  def ask(key: PRNGKey, state: CMAState) -> tuple[jax.Array, CMAState]:
    noise = jax.random.normal(key, (population_size, n))
    y = (noise * state.eig_scale) @ state.eig_basis.T  # rows ~ N(0, C)
    samples = state.mean + state.sigma * y
    return project(samples), state._replace(samples=samples)

  def tell(key: PRNGKey, population: jax.Array, fitness: jax.Array, state: CMAState
           ) -> tuple[CMAState, base.Metrics]:
    del key  # the update is deterministic
    fitness = base.sanitize(fitness)
    order = jnp.argsort(-fitness, stable=True)[:mu]
    y = (state.samples[order] - state.mean) / state.sigma  # [mu, n]
    y_w = weights @ y
    mean = state.mean + state.sigma * y_w
    # C^(-1/2) y_w through the eigendecomposition of the previous C.
    inv_sqrt_y = state.eig_basis @ ((state.eig_basis.T @ y_w) / state.eig_scale)
    p_sigma = ((1.0 - c_sigma) * state.p_sigma
               + math.sqrt(c_sigma * (2.0 - c_sigma) * mu_eff) * inv_sqrt_y)
    g = (state.generation + 1).astype(jnp.float32)
    norm_ps = jnp.linalg.norm(p_sigma)
    h_sigma = (norm_ps / jnp.sqrt(1.0 - (1.0 - c_sigma) ** (2.0 * g))
               < (1.4 + 2.0 / (n + 1.0)) * chi_n).astype(jnp.float32)
    p_c = (1.0 - c_c) * state.p_c + h_sigma * math.sqrt(c_c * (2.0 - c_c) * mu_eff) * y_w
    rank_mu = (y * weights[:, None]).T @ y
    cov = ((1.0 - c_1 - c_mu + (1.0 - h_sigma) * c_1 * c_c * (2.0 - c_c)) * state.cov
           + c_1 * jnp.outer(p_c, p_c) + c_mu * rank_mu)
    cov = 0.5 * (cov + cov.T)
    sigma = state.sigma * jnp.exp((c_sigma / d_sigma) * (norm_ps / chi_n - 1.0))
    # Keeps sigma finite when fitness is flat or the search has converged.
    sigma = jnp.clip(sigma, 1e-8, 1e3)
    eigvals, eig_basis = jnp.linalg.eigh(cov)
    eig_scale = jnp.sqrt(jnp.maximum(eigvals, 1e-20))
    best_solution, best_fitness = base.update_best(population, fitness, state.best_solution,
                                                   state.best_fitness)
    new = CMAState(
        generation=state.generation + 1, mean=mean, sigma=sigma.astype(jnp.float32),
        cov=cov, p_sigma=p_sigma, p_c=p_c, eig_basis=eig_basis, eig_scale=eig_scale,
        samples=state.samples, best_solution=best_solution, best_fitness=best_fitness)
    return new, base.generation_metrics(population, fitness, best_fitness)

  return base.MaskSearch(init, ask, tell, population_size, budget)
