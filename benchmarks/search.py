r"""Population evaluation throughput: vmap vs chunked lax.map vs a Python loop.

  python -m benchmarks.search [--out FILE.json] [--smoke]

For LeNet-300-100 (an MNIST-shaped validation batch of 1024) and the thesis CNN (a
CIFAR-shaped batch of 256), and populations P in {8, 32, 128} of sparsity vectors on a 0.9
global-sparsity budget, measures candidates evaluated per second by each strategy of
`evoprune.search.population`, all on evoprune's fitness (`make_fitness(..., budget=...)`,
which computes a first dense layer on the input once for the whole search, see
`evoprune.search.fitness`; the thesis CNN starts with a convolution, so it has no such
layer):
  - 'vmap': the whole population vmapped;
  - 'map:1', 'map:8': `lax.map` with batch_size 1 (a scan) and 8 (chunks of 8 vmapped);
  - 'loop:shared': a Python loop over evoprune's fitness jitted for one candidate;
and the baseline
  - 'loop': a Python loop over one jitted single-candidate evaluation of the masked model
    (masks from the ranked scores, the model's own forward pass), i.e. what one writes
    without a population evaluator;
and marks the automatic choice ('auto': the strategy name it picks). The strategies run
side by side in one process: after a warm-up call each, they are timed in interleaved
rounds (one call each per round, `block_until_ready`), so they share the same machine load,
and each figure is the median over the rounds. A vmap whose estimated working memory would
exceed `SKIP_VMAP_BYTES` is skipped (reported as null): avoiding that is the point of
chunking. Weights are random: throughput does not depend on their values.
Targets (issue): 'auto' never slower than 'loop', and at least 2x faster at P=128 for
LeNet-300-100; the printed ratios are against 'loop'.

JSON: {"<model>": {"P<n>": {"<strategy>": candidates_per_s | null, ..., "auto": name}}}.
On a shared 2-core CPU only the ratios between strategies are meaningful.
"""

import argparse
import functools
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import evoprune as ep
from evoprune.search import population as population_lib

FULL = {
    "lenet300_100": dict(input_shape=(28, 28, 1), batch=1024),
    "thesis_cnn": dict(input_shape=(32, 32, 3), batch=256),
}
SMOKE = {
    "lenet300_100": dict(input_shape=(28, 28, 1), batch=8),
    "thesis_cnn": dict(input_shape=(32, 32, 3), batch=2),
}
STRATEGIES = (("vmap", None), ("map", 1), ("map", 8), ("loop", None))
BASELINE = "loop"  # the loop over the plain masked model; the loop above is 'loop:shared'

# A vmap of the whole population is skipped above this estimated working memory (P times the
# per-candidate upper bound of `population.profile`), or above the accelerator's budget
# where that is larger: the CPU machines have 24 GiB shared by every process (the thesis
# CNN's 128 candidates would need an estimated 57 GiB).
SKIP_VMAP_BYTES = 8 * 2**30


def _name(strategy: str, chunk: int | None) -> str:
  return strategy if chunk is None else f"{strategy}:{chunk}"


def problem(model_name: str, input_shape: tuple[int, ...], batch: int, seed: int = 0
            ) -> dict[str, Any]:
  """Evoprune's fitness and the baseline's for a model with random weights, and the budget."""
  model = ep.models.create(model_name, num_classes=10)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch,) + tuple(input_shape)).astype(np.float32)
  y = rng.integers(0, 10, batch).astype(np.int32)
  params = ep.models.init(model, jax.random.key(seed), jnp.asarray(x[:1]))["params"]
  template = ep.masks.init(params)
  scores = jax.tree.map(lambda m, p: None if m is None else jnp.abs(p), template, params,
                        is_leaf=lambda v: v is None)
  apply_fn = lambda p, xb: model.apply({"params": p}, xb, train=False)
  budget = ep.search.sparsity_budget(0.9, scores)
  fitness_fn, context = ep.search.make_fitness(apply_fn, params, scores, x, y,
                                               metric="accuracy_loss", budget=budget)
  plain_fn, plain_context = ep.search.make_fitness(apply_fn, params, scores, x, y,
                                                   metric="accuracy_loss",
                                                   shared_first_layer=False)
  return dict(fitness=(fitness_fn, context), plain=(plain_fn, plain_context),
              num_layers=budget.num_layers, budget=budget)


def interleaved(fns: dict[str, Callable[[], jax.Array]], min_rounds: int,
                max_seconds: float, max_rounds: int = 15) -> dict[str, float]:
  """Median seconds per call of each function, timed in interleaved rounds.

  Each function is called once to warm up (compilation excluded); then every round times
  each function once, in turn, so that all of them see the same load on a shared machine.
  Rounds continue past `min_rounds` while `max_seconds` last (at most `max_rounds`).
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  start = time.perf_counter()
  rounds = 0
  while rounds < min_rounds or (time.perf_counter() - start < max_seconds
                                and rounds < max_rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
    rounds += 1
  return {name: float(np.median(ts)) for name, ts in times.items()}


def run(models: dict[str, dict], sizes: tuple[int, ...], *, min_rounds: int = 3,
        max_seconds: float = 30.0, log: Callable[[str], None] = print
        ) -> dict[str, dict[str, dict[str, Any]]]:
  """Measures every (model, P, strategy); returns the JSON-ready results."""
  results: dict[str, dict[str, dict[str, Any]]] = {}
  for model_name, spec in models.items():
    prob = problem(model_name, **spec)
    (fitness_fn, context), budget = prob["fitness"], prob["budget"]
    num_layers = budget.num_layers
    prof = population_lib.profile(fitness_fn, context, num_layers)
    log(f"{model_name}: batch {spec['batch']}, {prof.flops / 1e6:.1f} MFLOP and "
        f"{prof.temp_bytes / 2**20:.1f} MiB working memory (bound) per candidate, "
        f"conv={prof.has_conv}, shared first layer={context.first is not None}, "
        f"backend={prof.backend}")
    results[model_name] = {}
    for p in sizes:
      logits = ep.search.logit(budget.uniform()) + 0.5 * jax.random.normal(
          jax.random.key(p), (p, num_layers))
      population = jax.jit(jax.vmap(budget.project))(logits)
      auto, auto_chunk = population_lib.choose(prof, p)
      auto_name = _name(auto, auto_chunk)
      candidates = list(STRATEGIES)
      if auto_name not in {_name(*sc) for sc in candidates}:  # a chunk the list lacks
        candidates.append((auto, auto_chunk))
      row: dict[str, Any] = {}
      plain_fn, plain_context = prob["plain"]
      baseline = ep.search.make_evaluator(plain_fn, plain_context, p, num_layers,
                                          strategy="loop")
      fns = {BASELINE: functools.partial(baseline.evaluate, population, plain_context)}
      for strategy, chunk in candidates:
        name = "loop:shared" if strategy == "loop" else _name(strategy, chunk)
        if strategy == "vmap" and prof.temp_bytes * p > max(
            SKIP_VMAP_BYTES, population_lib.memory_budget(prof.backend)):
          row[name] = None  # the whole population at once would not fit (see SKIP_VMAP_BYTES)
          continue
        evaluator = ep.search.make_evaluator(fitness_fn, context, p, num_layers,
                                             strategy=strategy, chunk_size=chunk)
        evaluate = (jax.jit(evaluator.evaluate) if evaluator.traceable
                    else evaluator.evaluate)
        fns[name] = functools.partial(evaluate, population, context)
      for name, seconds in interleaved(fns, min_rounds, max_seconds).items():
        row[name] = p / seconds
      row["auto"] = auto_name
      results[model_name][f"P{p}"] = row
      loop = row[BASELINE]
      cells = "  ".join(
          f"{k}={'skipped' if v is None else f'{v:8.1f}/s ({v / loop:4.2f}x)'}"
          for k, v in row.items() if k != "auto")
      log(f"  P={p:<4d} {cells}  auto={auto_name}")
  return results


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="write the JSON results to this file")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
  args = parser.parse_args(argv)
  if args.smoke:
    results = run(SMOKE, (4,), min_rounds=1, max_seconds=0.0)
  else:
    results = run(FULL, (8, 32, 128))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results


if __name__ == "__main__":
  main()
