"""Tests for evoprune.search: budgets, GA and CMA-ES, fitness, population evaluation, evolve."""

import dataclasses
import functools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import evoprune as ep
from evoprune.search import driver
from evoprune.search import population as population_lib

S = ep.search

SIZES = (400, 200, 100, 50)
# A feasible optimum of the toy problem: global sparsity = (380 + 160 + 50 + 10) / 750 = 0.8.
TOY_BEST = np.array([0.95, 0.8, 0.5, 0.2], np.float32)
TOY_SPARSITY = 0.8


def toy_fitness(candidate, target):
  """Known best vector: `target` (fitness 0), everything else negative."""
  return -jnp.sum((candidate - target) ** 2)


def toy_budget():
  return S.sparsity_budget(TOY_SPARSITY, SIZES, upper=0.99)


class TinyMLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(12)(x))
    return nn.Dense(3)(x)


class TinyCNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def tiny_problem(model=None, n=64, seed=0):
  """A small model with random weights, its magnitude scores and a labelled batch."""
  return _tiny_problem(type(model or TinyMLP()), n, seed)


@functools.lru_cache(maxsize=None)
def _tiny_problem(model_class, n, seed):
  # Cached: building it runs the model eagerly, which costs more than most tests.
  model = model_class()
  rng = np.random.default_rng(seed)
  shape = (n, 6, 6, 1) if isinstance(model, TinyCNN) else (n, 8)
  x = rng.normal(size=shape).astype(np.float32)
  params = ep.models.init(model, jax.random.key(seed), jnp.asarray(x[:1]))["params"]
  # Labels the dense model predicts, so pruning can only lose accuracy.
  y = np.asarray(jnp.argmax(model.apply({"params": params}, x), -1)).astype(np.int32)
  template = ep.masks.init(params)
  scores = jax.tree.map(lambda m, p: None if m is None else jnp.abs(p), template, params,
                        is_leaf=lambda v: v is None)
  apply_fn = lambda p, xb: model.apply({"params": p}, xb)
  return apply_fn, params, scores, x, y


class BudgetTest(parameterized.TestCase):

  def test_projection_meets_global_sparsity_within_bounds(self):
    lower = np.array([0.5, 0.0, 0.0, 0.1])
    upper = np.array([0.99, 0.9, 0.7, 0.6])
    budget = S.sparsity_budget(0.8, SIZES, lower=lower, upper=upper)
    z = 4.0 * jax.random.normal(jax.random.key(0), (256, 4))
    s = np.asarray(jax.jit(jax.vmap(budget.project))(z))
    achieved = np.array([budget.achieved(v) for v in s])
    np.testing.assert_array_less(np.abs(achieved - 0.8), 1e-6)
    self.assertTrue(np.all(s >= lower - 1e-7) and np.all(s <= upper + 1e-7))

  def test_projection_meets_nonzero_count_within_one_weight(self):
    sizes = (784 * 300, 300 * 100, 100 * 10)
    budget = S.nonzeros_budget(13_331, sizes, upper=[0.99, 0.99, 0.5])
    z = 3.0 * jax.random.normal(jax.random.key(1), (128, 3))
    s = np.asarray(jax.vmap(budget.project)(z))
    kept = np.array([budget.achieved(v) for v in s])
    np.testing.assert_array_less(np.abs(kept - 13_331), 1.0)
    self.assertTrue(np.all(s[:, 2] <= 0.5 + 1e-7))

  def test_projection_meets_macs_budget(self):
    sizes = (864, 18_432, 36_864)
    macs_per_weight = (900.0, 169.0, 16.0)  # output positions of three convs
    dense = float(np.dot(sizes, macs_per_weight))
    budget = S.macs_budget(0.3 * dense, sizes, macs_per_weight)
    s = np.asarray(jax.vmap(budget.project)(jax.random.normal(jax.random.key(2), (64, 3))))
    macs = np.array([budget.achieved(v) for v in s])
    np.testing.assert_array_less(np.abs(macs - 0.3 * dense), 1e-6 * dense)

  def test_feasible_vector_is_a_fixed_point(self):
    budget = toy_budget()
    np.testing.assert_allclose(budget.project(S.logit(TOY_BEST)), TOY_BEST, atol=1e-6)

  def test_uniform_with_a_cap(self):
    # Equal logits: layer 1 is capped at 0.85, so layer 0 carries the rest:
    # (100 s0 + 100 * 0.85) / 200 = 0.9  ->  s0 = 0.95.
    budget = S.sparsity_budget(0.9, (100, 100), upper=[0.99, 0.85])
    np.testing.assert_allclose(budget.uniform(), [0.95, 0.85], atol=1e-6)

  def test_sizes_from_a_scores_tree(self):
    _, params, scores, _, _ = tiny_problem()
    self.assertEqual(S.layer_sizes(scores), (8 * 12, 12 * 3))
    self.assertEqual(S.sparsity_budget(0.5, scores).sizes, (96, 36))

  @parameterized.named_parameters(
      ("unreachable_sparsity", lambda: S.sparsity_budget(0.995, SIZES, upper=0.99), "budget"),
      ("unreachable_lower", lambda: S.sparsity_budget(0.1, SIZES, lower=0.5), "budget"),
      ("sparsity_range", lambda: S.sparsity_budget(1.0, SIZES), "sparsity"),
      ("empty_nonzeros", lambda: S.nonzeros_budget(0, SIZES), "nonzeros"),
      ("empty_macs", lambda: S.macs_budget(0.0, SIZES, (1, 1, 1, 1)), "macs"),
      ("macs_per_weight", lambda: S.macs_budget(10.0, SIZES, (1, 1)), "macs_per_weight"),
      ("upper_one", lambda: S.sparsity_budget(0.5, SIZES, upper=1.0), "upper"),
      ("crossed", lambda: S.sparsity_budget(0.5, SIZES, lower=0.6, upper=0.4), "lower"),
      ("bound_shape", lambda: S.sparsity_budget(0.5, SIZES, upper=[0.9, 0.9]), "upper"),
      ("sizes", lambda: S.sparsity_budget(0.5, (10, 0)), "sizes"),
  )
  def test_invalid_budgets_raise(self, build, name):
    with self.assertRaisesRegex(ValueError, name):
      build()


class FitnessTest(parameterized.TestCase):

  def test_masks_from_ranks_equal_topk(self):
    # Ties, -0.0 vs +0.0 and NaN exercise topk's ordering rule.
    a = jnp.array([[0.5, -0.0, 0.0, 0.5], [np.nan, 0.2, 0.5, 0.1], [0.2, 0.2, 0.0, 3.0]])
    b = jnp.abs(jax.random.normal(jax.random.key(0), (5, 7))).round(1)
    scores = {"a": {"kernel": a, "bias": None}, "b": {"kernel": b}}
    ranks = S.rank_scores(scores)
    ours = jax.jit(S.masks_from_ranks)
    reference = jax.jit(ep.masks.topk)
    for s in ([0.0, 0.0], [0.25, 0.3], [0.5, 0.51], [0.75, 0.99], [1.0, 1.0], [0.083, 0.6]):
      s = jnp.asarray(s, jnp.float32)
      got = ours(ranks, s)
      want = reference(scores, s)
      self.assertIsNone(got["a"]["bias"])
      for key in ("a", "b"):
        np.testing.assert_array_equal(got[key]["kernel"], want[key]["kernel"], err_msg=str(s))

  @parameterized.parameters("accuracy", "loss", "accuracy_loss")
  def test_fitness_of_one_candidate(self, metric):
    apply_fn, params, scores, x, y = tiny_problem()
    fitness_fn, context = S.make_fitness(apply_fn, params, scores, x, y, metric=metric)
    dense = float(fitness_fn(jnp.zeros(2), context))
    pruned = float(fitness_fn(jnp.array([0.9, 0.9]), context))
    if metric == "accuracy":
      self.assertEqual(dense, 1.0)  # labels are the dense model's predictions
    self.assertGreater(dense, pruned)
    # The same value from the masks topk builds.
    masks = ep.masks.topk(scores, jnp.array([0.9, 0.9]))
    logits = apply_fn(ep.masks.apply(params, masks), x)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y))
    if metric == "accuracy":
      self.assertAlmostEqual(pruned, accuracy, places=6)

  def test_finetune_steps_keep_pruned_weights_and_lower_the_loss(self):
    apply_fn, params, scores, x, y = tiny_problem()
    steps = 5
    train_x = np.broadcast_to(x, (steps,) + x.shape)
    train_y = np.broadcast_to(y, (steps,) + y.shape)
    plain_fn, context = S.make_fitness(apply_fn, params, scores, x, y, metric="loss")
    tuned_fn, tuned_context = S.make_fitness(apply_fn, params, scores, x, y, metric="loss",
                                             finetune_steps=steps, train_x=train_x,
                                             train_y=train_y, learning_rate=0.1)
    candidate = jnp.array([0.8, 0.5])
    self.assertGreater(float(tuned_fn(candidate, tuned_context)),
                       float(plain_fn(candidate, context)))

  def test_shared_first_layer_equals_the_masked_forward_pass(self):
    # The prefix sums are exact float32 products; compare with full-precision matmuls
    # (accelerators default to reduced-precision ones).
    self.enter_context(jax.default_matmul_precision("highest"))
    apply_fn, params, scores, x, y = tiny_problem()
    budget = S.sparsity_budget(0.7, scores, upper=0.95)
    shared_fn, shared = S.make_fitness(apply_fn, params, scores, x, y, metric="loss",
                                       budget=budget)
    plain_fn, plain = S.make_fitness(apply_fn, params, scores, x, y, metric="loss",
                                     shared_first_layer=False)
    self.assertIsNotNone(shared.first)
    self.assertIsNone(plain.first)
    # The budget bounds the prefix sums: fewer than all 8 inputs per column.
    lower = budget.feasible_lower()[0]
    self.assertGreater(lower, 0.5)
    self.assertLess(shared.first.prefix.shape[0], 8 + 1)
    z = 2.0 * jax.random.normal(jax.random.key(3), (16, 2))
    population = jax.vmap(budget.project)(z)
    got = jax.vmap(shared_fn, in_axes=(0, None))(population, shared)
    want = jax.vmap(plain_fn, in_axes=(0, None))(population, plain)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Without a budget the sums cover every count, down to the dense layer.
    _, unbounded = S.make_fitness(apply_fn, params, scores, x, y)
    self.assertEqual(unbounded.first.prefix.shape[0], 8 + 1)
    np.testing.assert_allclose(shared_fn(jnp.array([lower, 0.0]), shared),
                               plain_fn(jnp.array([lower, 0.0]), plain), rtol=1e-5)

  def test_shared_first_layer_only_for_a_dense_layer_on_the_input(self):
    class Scaled(nn.Module):  # the first Dense sees 2x, not the input

      @nn.compact
      def __call__(self, x, train: bool = False):
        del train
        return nn.Dense(3)(nn.relu(nn.Dense(12)(2.0 * x.reshape((x.shape[0], -1)))))

    for model in (TinyCNN(), Scaled()):
      apply_fn, params, scores, x, y = tiny_problem(model)
      _, context = S.make_fitness(apply_fn, params, scores, x, y)
      self.assertIsNone(context.first, type(model).__name__)

  @parameterized.named_parameters(
      ("metric", dict(metric="f1"), "metric"),
      ("finetune_batches", dict(finetune_steps=2), "train_x"),
      ("steps", dict(finetune_steps=-1), "finetune_steps"),
  )
  def test_invalid_fitness_raises(self, kwargs, name):
    apply_fn, params, scores, x, y = tiny_problem()
    with self.assertRaisesRegex(ValueError, name):
      S.make_fitness(apply_fn, params, scores, x, y, **kwargs)


class StrategyTest(parameterized.TestCase):

  @parameterized.parameters(*sorted(S.STRATEGIES))
  def test_contract_under_jit_and_scan(self, name):
    """init/ask/tell under jit and lax.scan: finite, on budget, masks shaped like params."""
    apply_fn, params, scores, x, y = tiny_problem()
    budget = S.sparsity_budget(0.7, scores, upper=0.95)
    search = S.get(name)(6, budget)
    fitness_fn, context = S.make_fitness(apply_fn, params, scores, x, y)

    def generation(state, key):
      ask_key, tell_key = jax.random.split(key)
      population, state = search.ask(ask_key, state)
      fitness = jax.vmap(fitness_fn, in_axes=(0, None))(population, context)
      state, metrics = search.tell(tell_key, population, fitness, state)
      return state, (population, metrics["best_fitness"])

    state = jax.jit(search.init)(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 4)
    state, (populations, best) = jax.jit(lambda s, k: jax.lax.scan(generation, s, k))(state,
                                                                                       keys)
    self.assertEqual(populations.shape, (4, 6, 2))
    self.assertTrue(np.all(np.isfinite(populations)) and np.all(np.isfinite(best)))
    achieved = np.array([budget.achieved(v) for v in np.asarray(populations).reshape(-1, 2)])
    np.testing.assert_array_less(np.abs(achieved - 0.7), 1e-6)
    masks = ep.masks.topk(scores, state.best_solution)
    self.assertEqual(jax.tree.structure(masks, is_leaf=lambda v: v is None),
                     jax.tree.structure(ep.masks.init(params), is_leaf=lambda v: v is None))
    kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
    # Realised masks round each layer to whole weights: within half a weight per layer.
    self.assertLessEqual(abs(kept - 0.3 * 132), 1.0)

  @parameterized.parameters(*sorted(S.STRATEGIES))
  def test_finds_the_toy_optimum(self, name):
    search = S.get(name)(16, toy_budget())
    result = S.evolve(jax.random.key(0), search, toy_fitness, jnp.asarray(TOY_BEST),
                      generations=60, evaluation="vmap", scan=True)
    np.testing.assert_allclose(result.best, TOY_BEST, atol=0.02)
    self.assertGreater(result.best_fitness, -1e-3)
    self.assertEqual(result.history["best_vector"].shape, (60, 4))
    # The best so far never gets worse.
    self.assertTrue(np.all(np.diff(result.history["best_so_far_fitness"]) >= 0))

  @parameterized.parameters(*sorted(S.STRATEGIES))
  def test_same_key_same_search_different_key_different(self, name):
    search = S.get(name)(8, toy_budget())
    target = jnp.asarray(TOY_BEST)

    @jax.jit
    def run(key):
      def generation(state, key):
        population, state = search.ask(key, state)
        fitness = jax.vmap(toy_fitness, in_axes=(0, None))(population, target)
        return search.tell(key, population, fitness, state)[0], population
      init_key, key = jax.random.split(key)
      return jax.lax.scan(generation, search.init(init_key), jax.random.split(key, 3))[1]

    first, again, other = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(first, again)
    self.assertFalse(np.allclose(first, other))

  def test_ga_evaluates_the_seeded_vectors_first(self):
    budget = toy_budget()
    search = S.ga(8, budget)
    seeds = np.stack([np.asarray(budget.uniform()), TOY_BEST])
    population, _ = jax.jit(lambda k: search.ask(k, search.init(k, seeds)))(jax.random.key(1))
    np.testing.assert_allclose(population[:2], seeds, atol=1e-6)
    self.assertFalse(np.allclose(population[2], population[0]))

  def test_elitism_keeps_the_seeded_optimum(self):
    search = S.ga(8, toy_budget())
    result = S.evolve(jax.random.key(0), search, toy_fitness, jnp.asarray(TOY_BEST),
                      generations=5, initial=TOY_BEST, evaluation="vmap")
    self.assertGreater(result.best_fitness, -1e-10)
    self.assertTrue(np.all(result.history["best_so_far_fitness"] > -1e-10))

  def test_no_recompilation_after_the_first_generation(self):
    traces = []

    def counted(candidate, target):
      traces.append(1)  # runs once per trace, never per execution
      return toy_fitness(candidate, target)

    search = S.ga(8, toy_budget())
    S.evolve(jax.random.key(0), search, counted, jnp.asarray(TOY_BEST), generations=4,
             evaluation="vmap")
    # One trace: the generation step compiled once and reused for generations 1..3.
    self.assertLen(traces, 1)

  @parameterized.named_parameters(
      ("population", lambda b: S.ga(1, b), "population_size"),
      ("elites", lambda b: S.ga(4, b, num_elites=5), "num_elites"),
      ("rate", lambda b: S.ga(4, b, mutation_rate=1.5), "mutation_rate"),
      ("cma_population", lambda b: S.cma_es(1, b), "population_size"),
      ("sigma", lambda b: S.cma_es(4, b, sigma_init=0.0), "sigma_init"),
      ("name", lambda b: S.get("annealing"), "cma_es"),
  )
  def test_invalid_search_raises(self, build, name):
    with self.assertRaisesRegex(ValueError, name):
      build(toy_budget())

  def test_initial_of_the_wrong_shape_raises(self):
    with self.assertRaisesRegex(ValueError, "initial"):
      S.ga(4, toy_budget()).init(jax.random.key(0), np.zeros(3))


class PopulationTest(parameterized.TestCase):

  @parameterized.named_parameters(("mlp", TinyMLP), ("cnn", TinyCNN))
  def test_strategies_agree(self, model):
    apply_fn, params, scores, x, y = tiny_problem(model(), n=32)
    fitness_fn, context = S.make_fitness(apply_fn, params, scores, x, y, metric="loss")
    budget = S.sparsity_budget(0.6, scores)
    population = jax.vmap(budget.project)(jax.random.normal(jax.random.key(0), (5, 2)))
    results = {}
    for strategy, chunk in (("vmap", None), ("map", 2), ("map", 1), ("loop", None)):
      evaluator = S.make_evaluator(fitness_fn, context, 5, 2, strategy=strategy,
                                   chunk_size=chunk)
      evaluate = jax.jit(evaluator.evaluate) if evaluator.traceable else evaluator.evaluate
      results[(strategy, chunk)] = np.asarray(evaluate(population, context))
    expected = np.array([float(fitness_fn(c, context)) for c in population])
    for key, value in results.items():
      np.testing.assert_allclose(value, expected, rtol=1e-5, err_msg=str(key))

  def test_auto_choice_on_cpu(self):
    small = population_lib.Profile("cpu", flops=1e4, temp_bytes=1e3, has_conv=False)
    dense = population_lib.Profile("cpu", flops=6e8, temp_bytes=5e6, has_conv=False)
    conv = population_lib.Profile("cpu", flops=1e4, temp_bytes=1e5, has_conv=True)
    self.assertEqual(population_lib.choose(small, 128), ("vmap", None))
    self.assertEqual(population_lib.choose(dense, 128), ("map", 1))
    self.assertEqual(population_lib.choose(conv, 128), ("map", 1))
    # A candidate needing 1 GiB of temporaries: vmap only in chunks that fit 2 GiB.
    huge = population_lib.Profile("cpu", flops=1e4, temp_bytes=2**30, has_conv=False)
    self.assertEqual(population_lib.choose(huge, 128), ("map", 2))
    gpu = population_lib.Profile("gpu", flops=6e8, temp_bytes=5e6, has_conv=True)
    self.assertEqual(population_lib.choose(gpu, 128), ("vmap", None))

  def test_profile_sees_convolutions(self):
    for model, conv in ((TinyMLP(), False), (TinyCNN(), True)):
      apply_fn, params, scores, x, y = tiny_problem(model, n=8)
      fitness_fn, context = S.make_fitness(apply_fn, params, scores, x, y)
      prof = population_lib.profile(fitness_fn, context, 2)
      self.assertEqual(prof.has_conv, conv)
      self.assertGreater(prof.flops, 0)

  def test_invalid_evaluator_raises(self):
    with self.assertRaisesRegex(ValueError, "strategy"):
      S.make_evaluator(toy_fitness, None, 4, 4, strategy="pmap")
    with self.assertRaisesRegex(ValueError, "chunk_size"):
      S.make_evaluator(toy_fitness, None, 4, 4, strategy="map", chunk_size=0)


class EvolveTest(parameterized.TestCase):

  def test_loop_and_compiled_generations_agree(self):
    search = S.cma_es(6, toy_budget())
    runs = [S.evolve(jax.random.key(3), search, toy_fitness, jnp.asarray(TOY_BEST),
                     generations=3, evaluation=e).history for e in ("loop", "vmap")]
    np.testing.assert_allclose(runs[0]["best_fitness"], runs[1]["best_fitness"], rtol=1e-4)
    self.assertEqual(set(runs[0]), {"best_fitness", "mean_fitness", "worst_fitness",
                                    "best_so_far_fitness", "best_vector"})

  def test_first_last_caps_the_end_layers(self):
    upper = driver._first_last_bounds(0.99, 4, "dense")
    np.testing.assert_allclose(upper, [0.0, 0.99, 0.99, 0.0])
    np.testing.assert_allclose(driver._first_last_bounds([0.9, 0.95, 0.5], 3, 0.8),
                               [0.8, 0.95, 0.5])

  def test_evolutionary_allocation_beats_its_seeds(self):
    apply_fn, params, scores, x, y = tiny_problem(n=128)
    results = []
    allocate = S.evolutionary_allocation(
        apply_fn, params, x, y, key=jax.random.key(0), population_size=8, generations=4,
        metric="loss", seeds=(ep.allocation.uniform, ep.allocation.erk),
        on_result=results.append, evaluation="vmap")
    tree = allocate(scores, 0.8)
    self.assertIsNone(tree["Dense_0"]["bias"])
    vector = np.array(jax.tree.leaves(tree))
    budget = S.sparsity_budget(0.8, scores)
    self.assertLess(abs(budget.achieved(vector) - 0.8), 1e-6)
    fitness_fn, context = S.make_fitness(apply_fn, params, scores, x, y, metric="loss")
    erk = jnp.asarray(jax.tree.leaves(ep.allocation.erk(scores, 0.8)), jnp.float32)
    for seed in (jnp.asarray([0.8, 0.8]), erk):
      self.assertGreaterEqual(float(fitness_fn(jnp.asarray(vector), context)),
                              float(fitness_fn(seed, context)) - 1e-6)
    self.assertLen(results, 1)
    self.assertEqual(results[0].history["best_vector"].shape, (4, 2))


class ResearchTest(parameterized.TestCase):
  """Searching again between training segments, warm-started from the last answer."""

  def test_segments_search_again_and_the_masks_follow(self):
    apply_fn, params, scores, x, y = tiny_problem()
    final, steps = 0.8, 8
    schedule = ep.schedules.polynomial_decay(0.0, final, 0, steps, frequency=2)
    pruner = ep.Pruner(importance="magnitude", schedule=schedule)
    inner = optax.sgd(0.05)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(p):
      logits = apply_fn(p, x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    opt_state = None
    per_layer, answers = None, []
    for segment in range(2):
      results = []
      allocate = S.evolutionary_allocation(apply_fn, params, x, y,
                                           key=jax.random.fold_in(jax.random.key(0), segment),
                                           population_size=8, generations=3, upper=0.95,
                                           on_result=results.append)
      if opt_state is None:
        segment_scores = scores
      else:
        segment_scores = pruner.scores(params, importance_state=opt_state.importance)
      previous = per_layer
      per_layer = allocate(segment_scores, final, previous=previous)
      answers.append(per_layer)
      if previous is not None:
        # Warm start: the last answer was in the first population; elitism keeps the best.
        fitness_fn, context = S.make_fitness(apply_fn, params, segment_scores, x, y)
        previous_fitness = float(fitness_fn(jnp.asarray(driver.vector_of(previous, 2)),
                                            context))
        self.assertGreaterEqual(float(results[0].best_fitness), previous_fitness - 1e-6)
      pruner = dataclasses.replace(pruner, allocation=ep.allocation.fixed(per_layer))
      tx = pruner.wrap(inner)
      if opt_state is None:
        opt_state = tx.init(params)
      step = jax.jit(lambda p, o, tx=tx: tx.update(jax.grad(loss_fn)(p), o, p))
      for _ in range(steps // 2 + 1):  # 10 steps: the update at step 8 reaches `final`
        updates, opt_state = step(params, opt_state)
        params = optax.apply_updates(params, updates)
    # After the schedule's last update the masks hold the second answer's per-layer targets.
    sizes = S.layer_sizes(scores)
    kept = [float(jnp.mean(m)) for m in jax.tree.leaves(opt_state.masks)]
    for got, want, size in zip(kept, jax.tree.leaves(answers[-1]), sizes):
      self.assertAlmostEqual(1.0 - got, want, delta=1.0 / size + 1e-6)

  def test_fixed_allocation_rejects_another_model(self):
    _, _, scores, _, _ = tiny_problem()
    allocate = ep.allocation.fixed({"x": 0.5})
    with self.assertRaisesRegex(ValueError, "does not match"):
      allocate(scores, 0.5)
    with self.assertRaisesRegex(ValueError, "outside"):
      ep.allocation.fixed({"x": 1.5})


if __name__ == "__main__":
  absltest.main()
