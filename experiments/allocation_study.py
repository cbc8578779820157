"""The allocation study: one importance, four ways to spread a global sparsity over layers.

For each seed the dense model is trained once (`training.fit`). Its weights are scored by
magnitude, and for every target global sparsity each allocation in `config.search.compare`
('uniform', 'global', 'erk', 'evolutionary') gives per-layer sparsities; the masks are
`masks.topk(scores, per_layer)` (the global allocation's per-layer values reproduce the global
top-k exactly). Each is evaluated one-shot (method `alloc:<name>`) and, when
`config.finetune.epochs > 0`, after fine-tuning with the masks fixed (`alloc:<name>+ft`).

The evolutionary allocation runs `ep.search` (`config.search.strategy`) at the same budget,
seeded with the other allocations' vectors, with fitness on the first
`config.search.fitness_examples` examples of the VALIDATION split; the test split is only
reported. Results are mean and std over seeds (`summary.json`, the pipeline's schema), the
search histories go to `search_history.json`, and the plots to `search_fitness.png` (best
and mean fitness per generation) and `per_layer_allocation.png` (the chosen per-layer
sparsity beside uniform, global and ERK).

Every finished (seed, target, allocation) result is stored under `results/` and skipped when
the run is restarted with the same workdir; dense training resumes from its checkpoints.
"""

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import evoprune as ep
from evoprune import training
from experiments import checks
from experiments import pipeline
from experiments import report

ALLOCATIONS = ("uniform", "global", "erk", "evolutionary")


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any training, on invalid study settings."""
  checks.targets(config)
  if not config.seeds:
    raise ValueError("config.seeds is empty; give at least one seed, e.g. (0, 1, 2).")
  s = config.search
  for name in s.compare:
    if name not in ALLOCATIONS:
      raise ValueError(f"config.search.compare contains {name!r}; valid: {ALLOCATIONS}.")
  ep.search.get(s.strategy)
  if s.metric not in ep.search.METRICS:
    raise ValueError(f"config.search.metric={s.metric!r}; use one of {ep.search.METRICS}.")
  if s.evaluation not in ep.search.EVALUATIONS:
    raise ValueError(f"config.search.evaluation={s.evaluation!r}; use one of "
                     f"{ep.search.EVALUATIONS}.")
  for name in ("population_size", "generations", "fitness_examples"):
    if getattr(s, name) < 1:
      raise ValueError(f"config.search.{name}={getattr(s, name)} must be >= 1.")
  if config.train.epochs < 1 or config.train.batch_size < 1:
    raise ValueError("config.train.epochs and config.train.batch_size must be >= 1.")


def allocate(ctx: pipeline.Context, dense: training.TrainState, scores: Any, name: str,
             target: float, seed: int) -> tuple[list[float], dict | None]:
  """Per-layer sparsity vector [L] of one allocation, and the search history if any."""
  if name != "evolutionary":
    tree = ep.allocation.get(name)(scores, target)
    return [float(v) for v in jax.tree.leaves(tree)], None
  results: list[ep.search.EvolveResult] = []
  allocate_fn = pipeline.evolutionary_allocation(ctx, dense, seed, target,
                                                 on_result=results.append)
  vector = [float(v) for v in jax.tree.leaves(allocate_fn(scores, target))]
  result = results[0]
  history = {k: np.asarray(v).tolist() for k, v in result.history.items()}
  history.update(chosen=vector, chosen_fitness=result.best_fitness, evaluation=result.evaluation,
                 layers=ep.masks.paths(scores), metric=ctx.config.search.metric,
                 fitness_examples=min(ctx.config.search.fitness_examples,
                                      len(ctx.dataset.val.y)))
  return vector, history


# ------------------------------------------------------------------------------ the run


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs the study; returns (and writes) `summary.json`'s content."""
  validate(config)
  ctx = pipeline.setup(config, workdir)
  rows: dict[tuple[str, float], list[dict]] = {}
  histories: dict[str, dict] = {}
  vectors: dict[tuple[str, float], list[list[float]]] = {}
  for seed in config.seeds:
    results_dir = ctx.workdir / "results" / f"seed{seed}"
    dense: list[training.TrainState] = []

    def dense_state(seed=seed):
      if not dense:
        dense.append(pipeline.train_dense(ctx, seed))
      return dense[0]

    rows.setdefault(("dense", 0.0), []).append(pipeline.cached(
        results_dir / "dense.json", lambda: pipeline.measure(ctx, dense_state(), None)))
    for target in checks.targets(config):
      for name in config.search.compare:
        tag = f"{name}@{target:g}"

        def oneshot(name=name, target=target):
          state = dense_state()
          scores = ep.Pruner().scores(state.params)  # |w| on the prunable leaves
          vector, history = allocate(ctx, state, scores, name, target, seed)
          masks = ep.masks.topk(scores, jnp.asarray(vector, jnp.float32))
          result = pipeline.measure(
              ctx, state.replace(params=ep.masks.apply(state.params, masks)), masks)
          result["allocation"] = vector
          if history is not None:
            result["search"] = history
          return result

        first = pipeline.cached(results_dir / f"{tag}.json", oneshot)
        rows.setdefault((f"alloc:{name}", target), []).append(first)
        vectors.setdefault((name, target), []).append(first["allocation"])
        if "search" in first:
          histories[f"seed{seed}@{target:g}"] = first["search"]
        if config.finetune.epochs > 0:

          def tuned(first=first, tag=tag):
            state = dense_state()
            masks = ep.masks.topk(ep.Pruner().scores(state.params),
                                  jnp.asarray(first["allocation"], jnp.float32))
            state = pipeline.finetune(ctx, state, masks, seed, f"seed{seed}/{tag}+ft")
            return pipeline.measure(ctx, state, state.opt_state.masks)

          rows.setdefault((f"alloc:{name}+ft", target), []).append(
              pipeline.cached(results_dir / f"{tag}+ft.json", tuned))
  # One-shot rows first, then fine-tuned ones, each by target.
  ordered = dict(sorted(rows.items(), key=lambda kv: (kv[0][0] != "dense",
                                                     kv[0][0].endswith("+ft"), kv[0][1])))
  summary = report.summarize(config, ordered)
  if ep.parallel.is_writer():  # process 0 of a multi-process job writes the workdir
    training.write_json_atomic(ctx.workdir / "summary.json", summary)
    training.write_json_atomic(ctx.workdir / "search_history.json", histories)
    (ctx.workdir / "report.md").write_text(report.format_report(summary), encoding="utf-8")
    plot(histories, vectors, summary, ctx.workdir)
  return summary


def plot(histories: dict[str, dict], vectors: dict[tuple[str, float], list[list[float]]],
         summary: dict, workdir: pathlib.Path) -> None:
  """search_fitness.png (fitness per generation) and per_layer_allocation.png (bars)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if histories:
    targets = sorted({k.split("@")[1] for k in histories}, key=float)
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.8), squeeze=False)
    for ax, t in zip(axes[0], targets):
      for key, h in sorted(histories.items()):
        if key.split("@")[1] != t:
          continue
        g = np.arange(1, len(h["best_fitness"]) + 1)
        line, = ax.plot(g, h["best_so_far_fitness"], label=f"{key.split('@')[0]} best")
        ax.plot(g, h["mean_fitness"], ls="--", color=line.get_color(), alpha=0.7,
                label=f"{key.split('@')[0]} mean")
      ax.set_title(f"target sparsity {t}")
      ax.set_xlabel("generation")
      ax.set_ylabel(f"fitness ({next(iter(histories.values()))['metric']}, validation)")
      ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(workdir / "search_fitness.png", dpi=120)
    plt.close(fig)

  names = [n for n in ("uniform", "global", "erk", "evolutionary")
           if any(k[0] == n for k in vectors)]
  targets = sorted({k[1] for k in vectors})
  if names and targets:
    layers = next(iter(histories.values()))["layers"] if histories else None
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.8), squeeze=False)
    for ax, t in zip(axes[0], targets):
      width = 0.8 / len(names)
      for i, n in enumerate(names):
        per_seed = np.asarray(vectors.get((n, t), []), np.float64)
        if not per_seed.size:
          continue
        x = np.arange(per_seed.shape[1])
        ax.bar(x + i * width, per_seed.mean(0), width, yerr=per_seed.std(0), label=n)
      ticks = layers or [f"layer {i}" for i in range(per_seed.shape[1])]
      ax.set_xticks(np.arange(len(ticks)) + 0.4 - width / 2, ticks, rotation=20, ha="right",
                    fontsize="small")
      ax.set_ylim(min(0.5, ax.get_ylim()[0]), 1.0)
      ax.set_title(f"global sparsity {t:g}")
      ax.set_ylabel("per-layer sparsity")
      ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(workdir / "per_layer_allocation.png", dpi=120)
    plt.close(fig)
  del summary  # the accuracy table is in report.md
