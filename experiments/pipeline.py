"""The experiment pipeline: train dense -> prune -> fine-tune -> evaluate -> report.

For each seed the dense model is trained once (tracking the running average of its weights,
the "evolution of weights"), then every (method, target sparsity) pair is pruned from it and
fine-tuned (`config.prune.when='after'`), or trained from scratch while a schedule raises
the sparsity (`when='during'`). Results are reported as mean and std over seeds. Every stage
checkpoints and writes its result atomically, so a restarted run skips what is done and
resumes the stage it was in.
"""

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

import evoprune as ep
from evoprune import parallel
from evoprune import training
from experiments import checks
from experiments import report

# ------------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Context:
  """What every stage of one run shares."""
  config: ml_collections.ConfigDict
  dataset: ep.data.Dataset
  model: Any
  workdir: pathlib.Path
  steps_per_epoch: int
  mesh: jax.sharding.Mesh | None = None  # config.parallel.data_parallel: fit over it
  _tx_cache: dict = dataclasses.field(default_factory=dict)
  # Dense states trained together (seed strategy 'vmap'), until `train_dense` hands them
  # out; init=False so a `dataclasses.replace`d context (other data) starts empty.
  _dense: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  def fit_config(self, epochs: int, seed: int) -> training.FitConfig:
    c = self.config.train
    return training.FitConfig(
        epochs=epochs, batch_size=c.batch_size, seed=seed, label_smoothing=c.label_smoothing,
        augment=c.augment, checkpoint_every_epochs=c.checkpoint_every_epochs,
        checkpoint_every_steps=c.checkpoint_every_steps, steps_per_call=c.steps_per_call,
        eval_every_epochs=c.eval_every_epochs, progress=self.config.progress)

  def fit(self, tx: optax.GradientTransformation, state: training.TrainState, epochs: int,
          seed: int, stage: str, *, objective: training.Objective | None = None,
          objective_args: Any = None) -> training.TrainState:
    """`training.fit` in the workdir, data-parallel over `mesh` when there is one."""
    state, _ = training.fit(self.model, tx, state, self.dataset, self.fit_config(epochs, seed),
                            workdir=self.workdir, stage=stage, mesh=self.mesh,
                            sharding_rule=self.config.parallel.sharding_rule,
                            objective=objective, objective_args=objective_args)
    if self.mesh is not None and jax.process_count() > 1:
      # Later stages (pruning, evaluation, costs) run on each process's own devices: give
      # every process the whole state rather than its shards of a global array.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      state = jax.tree.map(jnp.asarray, multihost_utils.process_allgather(state, tiled=True))
    return state

  def seed_strategy(self) -> str:
    """'vmap' (the dense seeds as one program) or 'sequential', from the config."""
    if self.mesh is not None:  # fit_seeds runs on one device; data parallelism wins
      return "sequential"
    return parallel.seed_strategy(self.model, self.dataset.train.x[:1], len(self.config.seeds),
                                  self.config.train.seeds_in_one_program)

  def tracking_tx(self, section: str, epochs: int) -> optax.GradientTransformation:
    """The `section` optimizer ('train' or 'finetune') wrapped by a Pruner with fixed masks
    that keeps the running average of the weights; one object per (section, epochs), so
    every stage that uses it shares one compiled train step."""
    key = (section, epochs)
    if key not in self._tx_cache:
      inner = self.optimizer(getattr(self.config, section), epochs)
      self._tx_cache[key] = self.pruner("evolution", allocation="uniform").wrap(inner)
    return self._tx_cache[key]

  def optimizer(self, section: ml_collections.ConfigDict, epochs: int
                ) -> optax.GradientTransformation:
    total = epochs * self.steps_per_epoch
    lr = training.learning_rate_schedule(
        section.lr_schedule, section.learning_rate, total,
        warmup_steps=getattr(section, "warmup_epochs", 0) * self.steps_per_epoch)
    return training.make_optimizer(section.optimizer, lr, momentum=self.config.train.momentum,
                                   weight_decay=self.config.train.weight_decay)

  def average(self) -> ep.importance.RunningAverage:
    p = self.config.prune
    every = p.average_every or self.steps_per_epoch
    return ep.importance.RunningAverage(kind=p.average, window=p.average_window,
                                        decay=p.average_decay, every=every)

  def pruner(self, method: str, *, schedule=None, seed: int = 0, allocation=None) -> ep.Pruner:
    p = self.config.prune
    if allocation is None:
      allocation = "global" if method == "global_magnitude" else p.allocation
    return ep.Pruner(importance=checks.TOPK_METHODS.get(method, "wbar"), average=self.average(),
                     schedule=schedule, allocation=allocation, granularity=p.granularity,
                     seed=seed)


def evaluate(ctx: Context, state: training.TrainState) -> dict[str, float]:
  """Validation and test accuracy of a state (test is reported, never used to select)."""
  evaluate_fn = training.make_evaluate(ctx.model, ctx.config.eval_batch_size)
  out = {}
  for split in ("val", "test"):
    s = getattr(ctx.dataset, split)
    m = evaluate_fn(state.params, state.batch_stats, jnp.asarray(s.x), jnp.asarray(s.y))
    out[f"{split}_accuracy"] = float(m["accuracy"])
    out[f"{split}_loss"] = float(m["loss"])
  return out


def train_dense(ctx: Context, seed: int) -> training.TrainState:
  """Trains the dense model of `seed`, tracking the running average of its weights.

  Under the seed strategy 'vmap' (`config.train.seeds_in_one_program`, see
  `Context.seed_strategy`), the first call trains the dense models of all `config.seeds`
  as one vmapped program (`training.fit_seeds`; checkpoints under
  `checkpoints/seeds<s0>-<s1>.../dense`, events under `seed<s>/dense` as sequentially)
  and hands the others out on their own calls. Either way a seed ends, to float
  rounding, at the same state, and a restarted run resumes from the checkpoints.
  """
  config = ctx.config
  epochs = config.train.epochs
  tx = ctx.tracking_tx("train", epochs)
  example_x = jnp.asarray(ctx.dataset.train.x[:1])
  seeds = tuple(config.seeds)
  if seed in seeds and ctx.seed_strategy() == "vmap":
    if seed not in ctx._dense:  # pylint: disable=protected-access
      init = [training.create_train_state(ctx.model, tx, jax.random.key(s), example_x)
              for s in seeds]
      stacked, _ = training.fit_seeds(
          ctx.model, tx, parallel.stack(init), ctx.dataset, ctx.fit_config(epochs, seeds[0]),
          seeds, workdir=ctx.workdir, stage=f"seeds{'-'.join(map(str, seeds))}/dense",
          stages=tuple(f"seed{s}/dense" for s in seeds))
      ctx._dense.update(  # pylint: disable=protected-access
          {s: parallel.unstack(stacked, i) for i, s in enumerate(seeds)})
    return ctx._dense.pop(seed)  # pylint: disable=protected-access
  state = training.create_train_state(ctx.model, tx, jax.random.key(seed), example_x)
  return ctx.fit(tx, state, epochs, seed, f"seed{seed}/dense")


def gradient_batch(ctx: Context, state: training.TrainState, size: int = 256) -> Any:
  """Loss gradients on the first `size` training examples (for saliency/Taylor scores)."""
  x = jnp.asarray(ctx.dataset.train.x[:size])
  y = jnp.asarray(ctx.dataset.train.y[:size])

  def loss(params):
    logits, _ = training.apply_model(ctx.model, params, state.batch_stats, x, train=False)
    return training.cross_entropy(logits, y)

  return jax.grad(loss)(state.params)


def _restrict(tree: Any, template: Any) -> Any:
  """`tree` with None wherever `template` (a mask tree) is None: the prunable leaves only."""
  return jax.tree.map(lambda m, x: None if m is None else x, template, tree,
                      is_leaf=lambda x: x is None)


def evolutionary_allocation(ctx: Context, dense: training.TrainState, seed: int,
                            target: float, on_result: Callable | None = None) -> Callable:
  """The searched per-layer allocation (`config.search`) for the trained `dense` model.

  Fitness is measured on the first `config.search.fitness_examples` VALIDATION examples;
  the search starts from `config.search.seed_allocations` and its key depends on the seed
  and the target only.
  """
  s = ctx.config.search
  n = min(s.fitness_examples, len(ctx.dataset.val.y))
  batch_stats = dense.batch_stats

  def apply_fn(params, x):
    return training.apply_model(ctx.model, params, batch_stats, x, train=False)[0]

  return ep.search.evolutionary_allocation(
      apply_fn, dense.params, ctx.dataset.val.x[:n], ctx.dataset.val.y[:n],
      key=jax.random.fold_in(jax.random.key(seed), int(round(target * 1e6))),
      strategy=s.strategy, population_size=s.population_size, generations=s.generations,
      metric=s.metric, lower=s.lower, upper=s.upper,
      seeds=tuple(ep.allocation.get(name) for name in s.seed_allocations),
      evaluation=s.evaluation, on_result=on_result)


def prune_once(ctx: Context, method: str, target: float, dense: training.TrainState, seed: int,
               previous: Any = None) -> Any:
  """Masks for `method` at `target` from a trained state (one-shot).

  The paper's rules read the running average of the weights kept while `dense` trained
  (`dense.opt_state.importance`); `previous` masks are ANDed in by the Bezier turns.
  """
  p = ctx.config.prune
  importance_state = dense.opt_state.importance
  if method in checks.TOPK_METHODS:
    grads = gradient_batch(ctx, dense) if method in ("saliency", "taylor") else None
    allocation = (evolutionary_allocation(ctx, dense, seed, target)
                  if p.allocation == "evolutionary" and method != "global_magnitude" else None)
    return ctx.pruner(method, seed=seed, allocation=allocation).instant(
        dense.params, target, grads=grads, importance_state=importance_state)
  template = ep.masks.init(dense.params)
  weights = _restrict(dense.params, template)
  wbar = _restrict(ctx.average().value(importance_state["average"]), template)
  if method == "bezier":
    masks, u = ep.criteria.bezier_to_target(
        wbar, jax.random.key(seed), target, controls=tuple(p.bezier.control),
        mode=p.bezier.mode, masks=previous)
    logging.info("bezier: u=%.4f for target %.3f", u, target)
    return masks
  if method == "std_threshold":
    result = ep.criteria.search_r(ep.criteria.std_threshold, (weights,), target,
                                  params=dense.params)
  else:
    result = ep.criteria.search_r(ep.criteria.evolution_paper, (weights, wbar), target,
                                  params=dense.params)
  if not result.reached:
    logging.warning("%s: %s", method, result.message)
  return result.masks


def finetune(ctx: Context, dense: training.TrainState, masks: Any, seed: int, stage: str,
             epochs: int | None = None) -> training.TrainState:
  """Fine-tunes the masked dense model with the masks held fixed (pruned weights stay 0)."""
  config = ctx.config
  epochs = config.finetune.epochs if epochs is None else epochs
  tx = ctx.tracking_tx("finetune", epochs)
  params = ep.masks.apply(dense.params, masks)
  opt_state = ep.pruner.set_masks(tx.init(params), masks)
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              batch_stats=dense.batch_stats, opt_state=opt_state,
                              rng=jax.random.key_data(jax.random.key(seed + 10_000)))
  objective, objective_args = None, None
  if config.distill.enabled:  # the dense model teaches its pruned copy
    teacher = ep.distillation.Teacher(ctx.model, dense.params, dense.batch_stats)
    objective, objective_args = ep.distillation.objective(
        teacher, temperature=config.distill.temperature, alpha=config.distill.alpha)
  return ctx.fit(tx, state, epochs, seed, stage, objective=objective,
                 objective_args=objective_args)


def train_pruned(ctx: Context, method: str, target: float, seed: int, stage: str
                 ) -> training.TrainState:
  """Trains from scratch while the configured schedule raises the sparsity to `target`."""
  config, p = ctx.config, ctx.config.prune
  total_epochs = config.train.epochs
  to_steps = lambda e: int(round((e * total_epochs if e <= 1 else e) * ctx.steps_per_epoch))
  begin, end = to_steps(p.begin_epoch), to_steps(p.end_epoch)
  if p.schedule == "constant":
    schedule = ep.schedules.constant(target, begin_step=begin, end_step=end,
                                     frequency=p.frequency)
  else:
    schedule = ep.schedules.polynomial_decay(0.0, target, begin_step=begin, end_step=end,
                                             frequency=p.frequency)
  inner = ctx.optimizer(config.train, total_epochs)
  pruner = ctx.pruner(method, schedule=schedule, seed=seed,
                      allocation="uniform" if p.allocation == "evolutionary" else None)
  tx = pruner.wrap(inner)
  state = training.create_train_state(ctx.model, tx, jax.random.key(seed),
                                      jnp.asarray(ctx.dataset.train.x[:1]))
  if p.allocation != "evolutionary" or method == "global_magnitude":
    return ctx.fit(tx, state, total_epochs, seed, stage)
  # Search the per-layer ratios when pruning starts and, every `research_every_epochs`,
  # again on the current weights and running importance, warm-started from the last answer;
  # each answer holds for the mask updates until the next search.
  every = config.search.research_every_epochs
  first = begin // ctx.steps_per_epoch
  last_update = -(-end // ctx.steps_per_epoch)  # epochs after it change no mask
  per_layer = None
  for i, epoch in enumerate([first] + (list(range(first + every, last_update, every))
                                       if every else [])):
    if epoch > 0:  # train up to the search (resumes from this segment's checkpoints)
      state = ctx.fit(tx, state, epoch, seed, f"{stage}-to{epoch}")
    scores = pruner.scores(state.params, importance_state=state.opt_state.importance)
    allocate = evolutionary_allocation(ctx, state, seed + 1000 * i, target)
    per_layer = allocate(scores, target, previous=per_layer)
    pruner = dataclasses.replace(pruner, allocation=ep.allocation.fixed(per_layer))
    tx = pruner.wrap(inner)
  return ctx.fit(tx, state, total_epochs, seed, stage)


def bezier_turns(ctx: Context, target: float, dense: training.TrainState, seed: int,
                 stage: str) -> dict[str, Any]:
  """The paper's smart pruning in turns: prune (ANDed with the last mask), fine-tune, repeat.

  Turn t of T prunes to 1 - (1 - target)^((t+1)/T), so the remaining density shrinks
  geometrically and the last turn reaches the target; the fine-tuning epochs are shared
  out over the turns. Each turn reads the running average kept while the previous stage
  trained.
  """
  turns = ctx.config.prune.bezier.turns
  epochs = max(ctx.config.finetune.epochs // turns, 1)
  state, masks, oneshot = dense, None, None
  for t in range(turns):
    masks = prune_once(ctx, "bezier", 1.0 - (1.0 - target) ** ((t + 1) / turns), state, seed,
                       previous=masks)
    if oneshot is None:
      oneshot = evaluate(ctx, state.replace(params=ep.masks.apply(state.params, masks)))
    state = finetune(ctx, state, masks, seed, f"{stage}/turn{t}", epochs=epochs)
  result = measure(ctx, state, masks)
  result.update({f"oneshot_{k}": v for k, v in oneshot.items()})  # after the first turn
  return result


def measure(ctx: Context, state: training.TrainState, masks: Any) -> dict[str, Any]:
  """Accuracy, achieved sparsity and costs of a (masked) state."""
  result = evaluate(ctx, state)
  summary = ep.masks.summary(masks) if masks is not None else None
  cost = ep.cost.report(ctx.model, state.params, masks, ctx.dataset.input_shape,
                        batch_stats=state.batch_stats)
  result.update(
      sparsity_global=summary["sparsity"] if summary else 0.0,
      sparsity_per_layer=({k: v["sparsity"] for k, v in summary["layers"].items()}
                          if summary else {}),
      params_total=cost["params"]["total"], params_nonzero=cost["params"]["nonzero"],
      macs_dense=cost["macs"]["dense"], macs_effective=cost["macs"]["effective"],
      bytes_fp32_dense=cost["bytes"]["fp32_dense"], bytes_sparse=cost["bytes"]["sparse"])
  return result


def cached(path: pathlib.Path, compute: Callable[[], dict]) -> dict:
  """Returns the stored result of a finished stage, or computes and stores it atomically.

  In a multi-process job every process computes (the stage's programs span all of them)
  and only process 0 stores.
  """
  if path.exists():
    return json.loads(path.read_text(encoding="utf-8"))
  start = time.time()
  result = compute()
  result["wall_time_s"] = time.time() - start
  if parallel.is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    training.write_json_atomic(path, result)
  return result


# ------------------------------------------------------------------------------ the run


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Context:
  """Creates the workdir (with config.json), loads the data and builds the model.

  With `config.parallel.data_parallel`, training runs over `parallel.data_mesh()` (every
  device of every process); only process 0 writes the workdir.
  """
  workdir = pathlib.Path(workdir)
  if parallel.is_writer():
    workdir.mkdir(parents=True, exist_ok=True)
    training.write_json_atomic(workdir / "config.json",
                               json.loads(config.to_json_best_effort()))
  mesh = None
  if config.parallel.data_parallel:
    mesh = parallel.data_mesh()
    if config.train.batch_size % mesh.size:
      raise ValueError(f"config.train.batch_size={config.train.batch_size} is not divisible "
                       f"by the {mesh.size} devices of the data-parallel mesh; use a multiple "
                       f"of {mesh.size}.")
  dataset = ep.data.load(config.data.name, data_dir=config.data.dir or None,
                         val_size=config.data.val_size, seed=config.data.split_seed)
  model = ep.models.create(config.model.name, num_classes=dataset.num_classes,
                           **config.model.kwargs.to_dict())
  return Context(config, dataset, model, workdir,
                 ep.data.steps_per_epoch(dataset.train, config.train.batch_size), mesh=mesh)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs the whole experiment; returns (and writes) `summary.json`'s content."""
  checks.validate(config)
  ctx = setup(config, workdir)
  workdir = ctx.workdir
  rows: dict[tuple[str, float], list[dict]] = {}
  for seed in config.seeds:
    results_dir = workdir / "results" / f"seed{seed}"
    dense: list[training.TrainState] = []

    def dense_state():
      if not dense:
        dense.append(train_dense(ctx, seed))
      return dense[0]

    rows.setdefault(("dense", 0.0), []).append(
        cached(results_dir / "dense.json", lambda: measure(ctx, dense_state(), None)))
    for method in config.prune.methods:
      for target in checks.targets(config):
        stage = f"seed{seed}/{method}@{target:g}"

        def compute(method=method, target=target, stage=stage):
          if config.prune.when == "during":
            state = train_pruned(ctx, method, target, seed, stage)
            return measure(ctx, state, state.opt_state.masks)
          if method == "bezier":
            return bezier_turns(ctx, target, dense_state(), seed, stage)
          masks = prune_once(ctx, method, target, dense_state(), seed)
          oneshot = evaluate(ctx, dense_state().replace(
              params=ep.masks.apply(dense_state().params, masks)))
          state = finetune(ctx, dense_state(), masks, seed, stage)
          result = measure(ctx, state, state.opt_state.masks)
          result.update({f"oneshot_{k}": v for k, v in oneshot.items()})
          return result

        rows.setdefault((method, target), []).append(
            cached(results_dir / f"{method}@{target:g}.json", compute))
  summary = report.summarize(config, rows)
  if parallel.is_writer():
    training.write_json_atomic(workdir / "summary.json", summary)
    (workdir / "report.md").write_text(report.format_report(summary), encoding="utf-8")
    report.plot(summary, workdir)
  return summary
