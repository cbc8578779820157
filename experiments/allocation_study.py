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

import json
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import evoprune as ep
from evoprune import training
from experiments import pipeline

ALLOCATIONS = ("uniform", "global", "erk", "evolutionary")
HEURISTICS = {"uniform": ep.allocation.uniform, "global": ep.allocation.global_,
              "erk": ep.allocation.erk}


def _is_none(x: Any) -> bool:
  return x is None


def _targets(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  value = config.prune.target_sparsity
  targets = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  for t in targets:
    if not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
      raise ValueError(f"config.prune.target_sparsity contains {t!r}: each target must be a "
                       "number in [0, 1), e.g. (0.9, 0.95).")
  return tuple(float(t) for t in targets)


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any training, on invalid study settings."""
  _targets(config)
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


# ----------------------------------------------------------------------------- stages


def _fit_config(config: ml_collections.ConfigDict, epochs: int, seed: int
                ) -> training.FitConfig:
  c = config.train
  return training.FitConfig(
      epochs=epochs, batch_size=c.batch_size, seed=seed, label_smoothing=c.label_smoothing,
      augment=c.augment, checkpoint_every_epochs=c.checkpoint_every_epochs,
      eval_every_epochs=c.eval_every_epochs, progress=config.progress)


def _optimizer(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
               epochs: int, steps_per_epoch: int):
  lr = training.learning_rate_schedule(
      section.lr_schedule, section.learning_rate, epochs * steps_per_epoch,
      warmup_steps=getattr(section, "warmup_epochs", 0) * steps_per_epoch)
  return training.make_optimizer(section.optimizer, lr, momentum=config.train.momentum,
                                 weight_decay=config.train.weight_decay)


def train_dense(config, dataset, model, workdir: pathlib.Path, seed: int
                ) -> training.TrainState:
  """Trains the dense model (checkpointed under `checkpoints/seed<seed>/dense`)."""
  steps = ep.data.steps_per_epoch(dataset.train, config.train.batch_size)
  tx = _optimizer(config, config.train, config.train.epochs, steps)
  state = training.create_train_state(model, tx, jax.random.key(seed),
                                      jnp.asarray(dataset.train.x[:1]))
  state, _ = training.fit(model, tx, state, dataset,
                          _fit_config(config, config.train.epochs, seed), workdir=workdir,
                          stage=f"seed{seed}/dense")
  return state


def finetune(config, dataset, model, dense: training.TrainState, masks: Any,
             workdir: pathlib.Path, seed: int, stage: str) -> training.TrainState:
  """Fine-tunes the masked dense weights with the masks fixed (pruned weights stay zero)."""
  epochs = config.finetune.epochs
  steps = ep.data.steps_per_epoch(dataset.train, config.train.batch_size)
  tx = ep.Pruner(importance="magnitude").wrap(
      _optimizer(config, config.finetune, epochs, steps))
  params = ep.masks.apply(dense.params, masks)
  state = training.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=dense.batch_stats,
      opt_state=ep.pruner.set_masks(tx.init(params), masks),
      rng=jax.random.key_data(jax.random.key(seed + 10_000)))
  state, _ = training.fit(model, tx, state, dataset, _fit_config(config, epochs, seed),
                          workdir=workdir, stage=stage)
  return state


def measure(config, dataset, model, params: Any, batch_stats: Any, masks: Any
            ) -> dict[str, Any]:
  """Validation/test accuracy, achieved sparsity and costs of masked params."""
  evaluate = training.make_evaluate(model, config.eval_batch_size)
  out: dict[str, Any] = {}
  for split in ("val", "test"):
    s = getattr(dataset, split)
    m = evaluate(params, batch_stats, jnp.asarray(s.x), jnp.asarray(s.y))
    out[f"{split}_accuracy"] = float(m["accuracy"])
    out[f"{split}_loss"] = float(m["loss"])
  summary = ep.masks.summary(masks)
  cost = ep.cost.report(model, params, masks, dataset.input_shape, batch_stats=batch_stats)
  out.update(
      sparsity_global=summary["sparsity"],
      sparsity_per_layer={k: v["sparsity"] for k, v in summary["layers"].items()},
      params_total=cost["params"]["total"], params_nonzero=cost["params"]["nonzero"],
      macs_dense=cost["macs"]["dense"], macs_effective=cost["macs"]["effective"],
      bytes_fp32_dense=cost["bytes"]["fp32_dense"], bytes_sparse=cost["bytes"]["sparse"])
  return out


def _cached(path: pathlib.Path, compute: Callable[[], dict]) -> dict:
  """The stored result of a finished stage, or computes it and stores it atomically."""
  if path.exists():
    return json.loads(path.read_text(encoding="utf-8"))
  path.parent.mkdir(parents=True, exist_ok=True)
  start = time.time()
  result = compute()
  result["wall_time_s"] = time.time() - start
  training.write_json_atomic(path, result)
  return result


def magnitude_scores(params: Any) -> Any:
  """|w| on the prunable leaves (`masks.init`), None elsewhere."""
  template = ep.masks.init(params)
  return jax.tree.map(lambda m, p: None if m is None else jnp.abs(p), template, params,
                      is_leaf=_is_none)


def allocate(config, model, dense: training.TrainState, dataset, scores: Any, name: str,
             target: float, seed: int) -> tuple[list[float], dict | None]:
  """Per-layer sparsity vector [L] of one allocation, and the search history if any."""
  if name != "evolutionary":
    tree = HEURISTICS[name](scores, target)
    return [float(v) for v in jax.tree.leaves(tree)], None
  s = config.search
  n = min(s.fitness_examples, len(dataset.val.y))
  batch_stats = dense.batch_stats

  def apply_fn(params, x):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    return model.apply(variables, x, train=False)

  results: list[ep.search.EvolveResult] = []
  allocate_fn = ep.search.evolutionary_allocation(
      apply_fn, dense.params, dataset.val.x[:n], dataset.val.y[:n],
      key=jax.random.fold_in(jax.random.key(seed), int(round(target * 1e6))),
      strategy=s.strategy, population_size=s.population_size, generations=s.generations,
      metric=s.metric, lower=s.lower, upper=s.upper,
      seeds=tuple(HEURISTICS[h] for h in s.seed_allocations), evaluation=s.evaluation,
      on_result=results.append)
  vector = [float(v) for v in jax.tree.leaves(allocate_fn(scores, target))]
  result = results[0]
  history = {k: np.asarray(v).tolist() for k, v in result.history.items()}
  history.update(chosen=vector, chosen_fitness=result.best_fitness, evaluation=result.evaluation,
                 layers=ep.masks.paths(scores), fitness_examples=n, metric=s.metric)
  return vector, history


# ------------------------------------------------------------------------------ the run


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs the study; returns (and writes) `summary.json`'s content."""
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  training.write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))
  dataset = ep.data.load(config.data.name, data_dir=config.data.dir or None,
                         val_size=config.data.val_size, seed=config.data.split_seed)
  model = ep.models.create(config.model.name, num_classes=dataset.num_classes,
                           **config.model.kwargs.to_dict())
  rows: dict[tuple[str, float], list[dict]] = {}
  histories: dict[str, dict] = {}
  vectors: dict[tuple[str, float], list[list[float]]] = {}
  for seed in config.seeds:
    results_dir = workdir / "results" / f"seed{seed}"
    dense: list[training.TrainState] = []

    def dense_state(seed=seed):
      if not dense:
        dense.append(train_dense(config, dataset, model, workdir, seed))
      return dense[0]

    rows.setdefault(("dense", 0.0), []).append(_cached(
        results_dir / "dense.json",
        lambda: measure(config, dataset, model, dense_state().params,
                        dense_state().batch_stats, None)))
    for target in _targets(config):
      for name in config.search.compare:
        tag = f"{name}@{target:g}"

        def oneshot(name=name, target=target):
          state = dense_state()
          scores = magnitude_scores(state.params)
          vector, history = allocate(config, model, state, dataset, scores, name, target,
                                     seed)
          masks = ep.masks.topk(scores, jnp.asarray(vector, jnp.float32))
          result = measure(config, dataset, model, ep.masks.apply(state.params, masks),
                           state.batch_stats, masks)
          result["allocation"] = vector
          if history is not None:
            result["search"] = history
          return result

        first = _cached(results_dir / f"{tag}.json", oneshot)
        rows.setdefault((f"alloc:{name}", target), []).append(first)
        vectors.setdefault((name, target), []).append(first["allocation"])
        if "search" in first:
          histories[f"seed{seed}@{target:g}"] = first["search"]
        if config.finetune.epochs > 0:

          def tuned(first=first, tag=tag):
            state = dense_state()
            masks = ep.masks.topk(magnitude_scores(state.params),
                                  jnp.asarray(first["allocation"], jnp.float32))
            state = finetune(config, dataset, model, state, masks, workdir, seed,
                             stage=f"seed{seed}/{tag}+ft")
            return measure(config, dataset, model, state.params, state.batch_stats,
                           state.opt_state.masks)

          rows.setdefault((f"alloc:{name}+ft", target), []).append(
              _cached(results_dir / f"{tag}+ft.json", tuned))
  # One-shot rows first, then fine-tuned ones, each by target.
  ordered = dict(sorted(rows.items(), key=lambda kv: (kv[0][0] != "dense",
                                                     kv[0][0].endswith("+ft"), kv[0][1])))
  summary = pipeline.summarize(config, ordered)
  training.write_json_atomic(workdir / "summary.json", summary)
  training.write_json_atomic(workdir / "search_history.json", histories)
  (workdir / "report.md").write_text(pipeline.format_report(summary), encoding="utf-8")
  plot(histories, vectors, summary, workdir)
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
