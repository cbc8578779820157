"""Evolutionary search over per-layer sparsity, the whole population in one compiled call.

    import evoprune as ep

    scores = ep.importance.magnitude(params)                 # restricted to prunable leaves
    budget = ep.search.sparsity_budget(0.95, scores, upper=0.99)
    fitness_fn, context = ep.search.make_fitness(apply_fn, params, scores, x_val, y_val)
    result = ep.search.evolve(jax.random.key(0), ep.search.ga(32, budget), fitness_fn,
                              context, generations=30)
    masks = ep.masks.topk(scores, result.best)

Modules: `budget` (constraints and the projection onto them), `base` (the `MaskSearch`
interface), `genetic` and `cmaes` (the algorithms `ga` and `cma_es`), `fitness` (one candidate's fitness),
`population` (vmap / chunked lax.map / loop evaluation, sharding), `driver` (`evolve`,
the registry and the 'evolutionary' allocation).
"""

from evoprune.search.base import MaskSearch
from evoprune.search.budget import Budget
from evoprune.search.budget import KINDS
from evoprune.search.budget import layer_sizes
from evoprune.search.budget import logit
from evoprune.search.budget import macs_budget
from evoprune.search.budget import nonzeros_budget
from evoprune.search.budget import sparsity_budget
from evoprune.search.cmaes import CMAState
from evoprune.search.cmaes import cma_es
from evoprune.search.driver import EvolveResult
from evoprune.search.driver import STRATEGIES
from evoprune.search.driver import evolutionary_allocation
from evoprune.search.driver import evolve
from evoprune.search.driver import get
from evoprune.search.fitness import METRICS
from evoprune.search.fitness import FitnessContext
from evoprune.search.fitness import make_fitness
from evoprune.search.fitness import masks_from_ranks
from evoprune.search.fitness import rank_scores
from evoprune.search.genetic import GAState
from evoprune.search.genetic import ga
from evoprune.search.population import EVALUATIONS
from evoprune.search.population import Evaluator
from evoprune.search.population import make_evaluator

__all__ = [
    "Budget", "CMAState", "EVALUATIONS", "Evaluator", "EvolveResult", "FitnessContext",
    "GAState", "KINDS", "METRICS", "MaskSearch", "STRATEGIES", "cma_es", "evolutionary_allocation",
    "evolve", "ga", "get", "layer_sizes", "logit", "macs_budget", "make_evaluator",
    "make_fitness", "masks_from_ranks", "nonzeros_budget", "rank_scores", "sparsity_budget",
]
