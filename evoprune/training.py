"""Training: the TrainState, compiled train/eval programs, the fit loop and checkpoints.

A whole epoch (or a fixed number of steps) is one compiled call: the training split lives on
the device and the epoch's shuffled batch indices (from `evoprune.data.epoch_batch_indices`)
are scanned with `lax.scan`, so there is no host round-trip or Python dispatch per step. The
optimizer may be any optax `GradientTransformation`, including `evoprune.Pruner.wrap(...)`,
whose masks live in the optimizer state: checkpointing and resuming need nothing special for
pruning. The loss is cross-entropy unless an `objective` replaces it (e.g.
`distillation.objective`: a teacher's soft targets).

Scale-out (see `evoprune.parallel`): `fit(..., mesh=...)` trains data-parallel over a device
mesh (the same program, the batch split over devices, the state replicated or sharded by a
rule; multi-host jobs write files from process 0 only), and `fit_seeds` trains S seeds of
one configuration as a single vmapped program.
"""

import dataclasses
import functools
import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Callable, Iterable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from evoprune import data as data_lib
from evoprune import ops
from evoprune import parallel
from evoprune.types import Params


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: a pytree of arrays, checkpointed as a whole.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model parameters.
    batch_stats: batch-norm statistics (`{}` for models without batch norm).
    opt_state: the optimizer state (the pruner's masks and importance live here).
    rng: uint32 key data of the run's base key (raw data, so orbax checkpoints it as a
      plain array); per-step keys are `fold_in(key, step)`.
  """
  step: jax.Array
  params: Params
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array

  @property
  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       example_x: jax.Array) -> TrainState:
  """Initialises params (and batch stats) from `key` and the optimizer state from `tx`."""
  init_key, dropout_key, run_key = jax.random.split(key, 3)
  variables = model.init({"params": init_key, "dropout": dropout_key}, example_x, train=False)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
      rng=jax.random.key_data(run_key))


# ----------------------------------------------------------------------------- optimizers

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step", "linear")


def learning_rate_schedule(name: str, base: float, total_steps: int, *,
                           warmup_steps: int = 0, step_boundaries: Iterable[float] = (0.5, 0.75),
                           step_factor: float = 0.1) -> optax.Schedule:
  """An optax learning-rate schedule by name, with optional linear warm-up.

  `step` decays by `step_factor` at the given fractions of training (0.5 and 0.75 by default).
  """
  if name not in LR_SCHEDULES:
    raise ValueError(f"lr_schedule={name!r} is unknown; use one of {LR_SCHEDULES}.")
  decay_steps = max(total_steps - warmup_steps, 1)
  if name == "constant":
    main = optax.constant_schedule(base)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(base, decay_steps)
  elif name == "linear":
    main = optax.linear_schedule(base, 0.0, decay_steps)
  else:
    main = optax.piecewise_constant_schedule(
        base, {int(f * decay_steps): step_factor for f in step_boundaries})
  if warmup_steps <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup_steps), main],
                              [warmup_steps])


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.9,
                   weight_decay: float = 0.0, nesterov: bool = False
                   ) -> optax.GradientTransformation:
  """SGD (with momentum), Adam or AdamW; `weight_decay` is coupled L2 for SGD/Adam."""
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer={name!r} is unknown; use one of {OPTIMIZERS}.")
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  base = (optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)
          if name == "sgd" else optax.adam(learning_rate))
  if weight_decay:
    return optax.chain(optax.add_decayed_weights(weight_decay), base)
  return base


# ----------------------------------------------------------------------- train and eval


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Mean softmax cross-entropy. logits [..., C], integer labels [...]."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def apply_model(model: nn.Module, params: Params, batch_stats: Any, x: jax.Array, *,
                train: bool, key: jax.Array | None = None):
  """Runs a linen model with or without batch norm; returns (logits, new_batch_stats).

  In training mode batch statistics are updated (returned) and dropout uses `key`.
  """
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  if not train:
    return model.apply(variables, x, train=False), batch_stats
  rngs = {"dropout": key} if key is not None else {}
  if batch_stats:
    logits, updates = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
    return logits, updates["batch_stats"]
  return model.apply(variables, x, train=True, rngs=rngs), batch_stats


Objective = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


def train_step(state: TrainState, x: jax.Array, y: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, label_smoothing: float = 0.0,
               augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
               objective: Objective | None = None, objective_args: Any = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a batch x [B, ...], y [B]. Pure; compile it with `jax.jit`.

  The loss is `cross_entropy(logits, y, label_smoothing)` unless an `objective(logits, y,
  x, objective_args) -> scalar` replaces it (`label_smoothing` is then unused). It gets the
  batch x as the model saw it (augmented), so a teacher can run on the same inputs
  (`distillation.objective`), and `objective_args`, a pytree traced like the state: large
  arrays (a teacher's variables) go there rather than into the compiled program as
  constants. The metrics are {'loss', 'accuracy'} either way.
  """
  key = jax.random.fold_in(state.key, state.step)
  augment_key, dropout_key = jax.random.split(key)
  if augment is not None:
    x = augment(augment_key, x)

  def loss_fn(params):
    logits, batch_stats = apply_model(model, params, state.batch_stats, x, train=True,
                                      key=dropout_key)
    if objective is None:
      loss = cross_entropy(logits, y, label_smoothing)
    else:
      loss = objective(logits, y, x, objective_args)
    return loss, (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), metrics


def _epoch_fn(model: nn.Module, tx: optax.GradientTransformation, label_smoothing: float,
              augment: Callable | None, mesh: jax.sharding.Mesh | None,
              objective: Objective | None) -> Callable:
  """The uncompiled `train_epoch(state, x, y, batch_indices, objective_args)`: a scan of
  train steps."""
  step = functools.partial(train_step, model=model, tx=tx, label_smoothing=label_smoothing,
                           augment=augment, objective=objective)

  def train_epoch(state, x, y, batch_indices, objective_args=None):
    def body(state, idx):
      xb, yb = x[idx], y[idx]
      if mesh is not None:  # the gathered batch stays split over the devices
        xb, yb = parallel.constrain_batch(xb, mesh), parallel.constrain_batch(yb, mesh)
      return step(state, xb, yb, objective_args=objective_args)

    if batch_indices.shape[0] == 1:
      # One step is a plain call, not a loop of one iteration: XLA:CPU ran the backward
      # pass of the fake-quant thesis CNN 10-25x slower inside a loop body (see
      # experiments/compression_study.py, qat_finetune). XLA's while-loop simplifier
      # usually inlines a one-trip loop as well; this does not depend on it.
      state, metrics = body(state, batch_indices[0])
      return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(body, state, batch_indices)

  return train_epoch


@functools.lru_cache(maxsize=64)
def make_train_epoch(model: nn.Module, tx: optax.GradientTransformation, *,
                     label_smoothing: float = 0.0, augment: Callable | None = None,
                     mesh: jax.sharding.Mesh | None = None, objective: Objective | None = None
                     ) -> Callable:
  """Returns `train_epoch(state, x, y, batch_indices, objective_args=None) -> (state,
  metrics)`, compiled once.

  `x` [N, ...], `y` [N] is the whole training split (device-resident) and `batch_indices`
  [steps, B] the batches to take, usually a whole epoch (compiled once per `steps`; one
  step compiles to a plain call, without a loop); metrics are per-step arrays [steps].
  `objective` and `objective_args` are `train_step`'s. The state buffers are donated, so
  the previous state must not be used after the call. Memoized: the same (equal) model,
  the same `tx` object and an equal `objective` (so it must be hashable, by value to be
  shared: e.g. a frozen dataclass) give the same compiled function, so repeated `fit`
  calls do not recompile.

  With a `mesh` (see `evoprune.parallel`), each step's batch is kept split over the mesh's
  `data` axis; the caller places the arrays (`fit` does): x, y replicated, the state
  replicated or sharded by a rule, batch_indices split along B.
  """
  return jax.jit(_epoch_fn(model, tx, label_smoothing, augment, mesh, objective),
                 donate_argnums=(0,), compiler_options=ops.compiler_options())


@functools.lru_cache(maxsize=64)
def make_seeds_train_epoch(model: nn.Module, tx: optax.GradientTransformation, *,
                           label_smoothing: float = 0.0, augment: Callable | None = None,
                           objective: Objective | None = None) -> Callable:
  """`make_train_epoch` for S seeds at once: one compiled, vmapped program.

  Returns `train_epoch(states, x, y, batch_indices, objective_args=None) -> (states,
  metrics)` where `states` has a leading seed axis S on every leaf (`parallel.stack`),
  `batch_indices` is [S, steps, B] (each seed its own data order) and metrics are
  [S, steps]. The data x, y and the objective_args are shared. Seed s follows exactly the
  computation of its own `make_train_epoch` run.
  """
  epochs = jax.vmap(_epoch_fn(model, tx, label_smoothing, augment, None, objective),
                    in_axes=(0, None, None, 0, None))

  def train_epoch(states, x, y, batch_indices, objective_args=None):
    return epochs(states, x, y, batch_indices, objective_args)

  return jax.jit(train_epoch, donate_argnums=(0,), compiler_options=ops.compiler_options())


@functools.lru_cache(maxsize=64)
def make_evaluate(model: nn.Module, batch_size: int = 1000) -> Callable:
  """Returns `evaluate(params, batch_stats, x, y) -> {'loss', 'accuracy'}` (jax scalars).

  The split is padded to a multiple of `batch_size` and scanned in one compiled call; padded
  examples get zero weight, so the result is exact for any split size. Memoized like
  `make_train_epoch`.
  """

  @jax.jit
  def evaluate(params, batch_stats, x, y):
    n = x.shape[0]
    size = min(batch_size, n)
    pad = (-n) % size
    weights = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)]).reshape(-1, size)
    xs = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]).reshape(
        (-1, size) + x.shape[1:])
    ys = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)]).reshape(-1, size)

    def body(totals, batch):
      xb, yb, wb = batch
      logits, _ = apply_model(model, params, batch_stats, xb, train=False)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      correct = jnp.argmax(logits, -1) == yb
      return (totals[0] + jnp.sum(losses * wb), totals[1] + jnp.sum(correct * wb)), None

    (loss, correct), _ = jax.lax.scan(body, (0.0, 0.0), (xs, ys, weights))
    return {"loss": loss / n, "accuracy": correct / n}

  return evaluate


# ----------------------------------------------------------------------------- fit loop


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
  """Appends one JSON line and flushes it to disk (crash-safe event log)."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON via a temporary file and an atomic rename: readers never see half a file."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
  os.replace(tmp, path)


def _truncate_events(path: pathlib.Path, stage: str, after_step: int) -> None:
  """Drops this stage's events past `after_step` (they are recomputed after a resume)."""
  if not path.exists():
    return
  kept = [line for line in path.read_text(encoding="utf-8").splitlines()
          if line and not (json.loads(line).get("stage") == stage
                           and json.loads(line).get("step", -1) > after_step)]
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
  os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Loop settings of `fit` (the optimizer and model are arguments of their own).

  Attributes:
    steps_per_call: optimizer steps per compiled call (0 = a whole epoch). Shorter calls
      let checkpoints fall inside an epoch; each call length compiles once.
    checkpoint_every_steps: checkpoint at the end of every call that passes a multiple of
      this many steps (0 = use `checkpoint_every_epochs`). A checkpoint is always written
      at the end.
  """
  epochs: int
  batch_size: int
  seed: int = 0
  label_smoothing: float = 0.0
  augment: bool = False
  checkpoint_every_epochs: int = 1
  checkpoint_every_steps: int = 0
  steps_per_call: int = 0
  eval_every_epochs: int = 1
  progress: bool = True

  def __post_init__(self):
    minimum = {"epochs": 0, "batch_size": 1, "checkpoint_every_epochs": 1,
               "checkpoint_every_steps": 0, "steps_per_call": 0, "eval_every_epochs": 1}
    for name, low in minimum.items():
      if getattr(self, name) < low:
        raise ValueError(f"{name}={getattr(self, name)} must be >= {low}.")


def fit(model: nn.Module, tx: optax.GradientTransformation, state: TrainState,
        dataset: data_lib.Dataset, config: FitConfig, *, workdir: str | os.PathLike | None = None,
        stage: str = "train", on_epoch_end: Callable[[TrainState, dict], None] | None = None,
        mesh: jax.sharding.Mesh | None = None, sharding_rule: str | Callable = "replicate",
        objective: Objective | None = None, objective_args: Any = None
        ) -> tuple[TrainState, dict]:
  """Trains `state` for `config.epochs` epochs, resuming from `workdir`'s checkpoints.

  Training runs in compiled calls of `steps_per_call` steps (a whole epoch by default).
  With a `workdir`, orbax checkpoints go to `workdir/checkpoints/<stage>` (see FitConfig)
  and one event per call is appended to `workdir/metrics.jsonl` (train loss/accuracy over
  the call, plus validation metrics at evaluated epoch ends). Restarted with the same
  workdir, training continues from the last checkpoint, mid-epoch if need be, and ends with
  exactly the parameters and events of an uninterrupted run: the data order and per-step
  keys depend only on the seed, the epoch and the step.

  With a `mesh` (`evoprune.parallel.data_mesh()`), training is data-parallel over its
  devices: the data is replicated, every batch split over the devices, the state placed by
  `sharding_rule` ('replicate', 'fsdp' or a callable, see `parallel.leaf_spec`). The
  results equal a one-device run's to float rounding. In a multi-process job every
  process calls `fit` alike; only process 0 writes `metrics.jsonl`.

  An `objective` replaces the cross-entropy training loss, with `objective_args` (placed on
  the device once, replicated under a mesh) as its traced argument: see `train_step` and,
  for knowledge distillation, `distillation.objective`. Validation stays cross-entropy.

  Returns:
    The final state and the last evaluation {'val_loss', 'val_accuracy', 'train_loss', ...}.

  Raises:
    NonFiniteLossError: when a loss is NaN/Inf (naming the first bad step); the last good
      checkpoint is left in place.
  """
  augment = data_lib.augment if config.augment else None
  train_steps = make_train_epoch(model, tx, label_smoothing=config.label_smoothing,
                                 augment=augment, mesh=mesh, objective=objective)
  evaluate = make_evaluate(model)
  state, evals = _fit_loop(
      train_steps, lambda s, x, y: evaluate(s.params, s.batch_stats, x, y), state, dataset,
      config, seeds=None, stages=(stage,), checkpoint_name=stage, workdir=workdir,
      on_epoch_end=on_epoch_end, mesh=mesh, sharding_rule=sharding_rule,
      objective_args=objective_args)
  return state, evals[0]


def fit_seeds(model: nn.Module, tx: optax.GradientTransformation, states: TrainState,
              dataset: data_lib.Dataset, config: FitConfig, seeds: Sequence[int], *,
              workdir: str | os.PathLike | None = None, stage: str = "seeds",
              stages: Sequence[str] | None = None,
              on_epoch_end: Callable[[TrainState, list[dict]], None] | None = None,
              objective: Objective | None = None, objective_args: Any = None
              ) -> tuple[TrainState, list[dict]]:
  """`fit` for S seeds of one configuration as a single compiled, vmapped program.

  Seed `seeds[s]` trains `parallel.unstack(states, s)` on its own data order
  (`epoch_batch_indices(..., seed=seeds[s])`, `config.seed` is ignored) and, to float
  rounding, ends where `fit(..., config with seed=seeds[s])` from that state would.
  Whether this beats S sequential `fit` calls depends on the model
  (`parallel.seed_strategy`).

  Args:
    model, tx, dataset, config, workdir: as for `fit`.
    states: the S initial states stacked on a leading axis (`parallel.stack`).
    seeds: S data-order seeds.
    stage: checkpoints go to `workdir/checkpoints/<stage>`.
    stages: the `stage` of each seed's events in metrics.jsonl (default
      `<stage>/seed<seed>`).
    on_epoch_end: called with the stacked states and the S events after evaluations.
    objective, objective_args: as for `fit`, shared by all seeds.

  Returns:
    The stacked final states and each seed's last evaluation.

  Raises:
    ValueError: seeds and states disagree in number, or stages has the wrong length.
    NonFiniteLossError: as for `fit`.
  """
  seeds = tuple(int(s) for s in seeds)
  count = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(states)}
  if not seeds or count != {len(seeds)}:
    raise ValueError(f"states must hold one stacked state per seed ({len(seeds)} seeds "
                     f"{seeds}), found leading axes {sorted(count, key=str)}; build them "
                     "with ep.parallel.stack([...])")
  stages = tuple(stages) if stages is not None else tuple(f"{stage}/seed{s}" for s in seeds)
  if len(stages) != len(seeds):
    raise ValueError(f"stages has {len(stages)} names for {len(seeds)} seeds; pass one each")
  augment = data_lib.augment if config.augment else None
  train_steps = make_seeds_train_epoch(model, tx, label_smoothing=config.label_smoothing,
                                       augment=augment, objective=objective)
  evaluate = jax.vmap(make_evaluate(model), in_axes=(0, 0, None, None))
  return _fit_loop(
      train_steps, lambda s, x, y: evaluate(s.params, s.batch_stats, x, y), states, dataset,
      config, seeds=seeds, stages=stages, checkpoint_name=stage, workdir=workdir,
      on_epoch_end=on_epoch_end, mesh=None, sharding_rule="replicate",
      objective_args=objective_args)


def _fit_loop(train_steps: Callable, evaluate: Callable, state: TrainState,
              dataset: data_lib.Dataset, config: FitConfig, *, seeds: tuple[int, ...] | None,
              stages: tuple[str, ...], checkpoint_name: str,
              workdir: str | os.PathLike | None, on_epoch_end: Callable | None,
              mesh: jax.sharding.Mesh | None, sharding_rule: str | Callable,
              objective_args: Any) -> tuple[TrainState, list[dict]]:
  """The loop of `fit` (seeds=None: one state) and `fit_seeds` (a stacked state per seed)."""
  stacked = seeds is not None
  seeds = seeds if stacked else (config.seed,)
  steps_per_epoch = data_lib.steps_per_epoch(dataset.train, config.batch_size)
  steps_per_call = min(config.steps_per_call or steps_per_epoch, steps_per_epoch)
  total_steps = config.epochs * steps_per_epoch
  num_train = len(dataset.train.y)
  writer = parallel.is_writer()
  if mesh is None:
    place = jnp.asarray
    # The compiled calls donate their input; copy once so the caller's arrays (which may
    # be shared with other states, e.g. the dense model a pruned copy started from) stay
    # valid.
    state = jax.tree.map(jnp.copy, state)
  else:
    place = functools.partial(parallel.global_array, sharding=parallel.replicated(mesh))
    state = parallel.put(state, parallel.tree_shardings(state, mesh, sharding_rule))
  x_train, y_train = place(dataset.train.x), place(dataset.train.y)
  x_val, y_val = place(dataset.val.x), place(dataset.val.y)
  objective_args = jax.tree.map(place, objective_args)

  def batch_indices(epoch: int, offset: int, count: int) -> jax.Array:
    rows = [data_lib.epoch_batch_indices(num_train, config.batch_size, seed=seed,
                                         epoch=epoch)[offset:offset + count] for seed in seeds]
    idx = np.stack(rows) if stacked else rows[0]
    if mesh is None:
      return jnp.asarray(idx)
    return parallel.global_array(idx, parallel.batch_sharding(mesh, idx.ndim, idx.ndim - 1))

  def checkpoint_due(before: int, after: int) -> bool:
    if after == total_steps:
      return True
    if config.checkpoint_every_steps:
      return after // config.checkpoint_every_steps > before // config.checkpoint_every_steps
    return after % (config.checkpoint_every_epochs * steps_per_epoch) == 0

  def current_step(state: TrainState) -> int:
    return int(np.asarray(state.step).reshape(-1)[0])  # every seed is at the same step

  manager, metrics_path = None, None
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    metrics_path = workdir / "metrics.jsonl"
    manager = ocp.CheckpointManager(
        (workdir / "checkpoints" / checkpoint_name).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    if manager.latest_step() is not None:
      state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
      logging.info("%s: resumed from step %d", checkpoint_name, current_step(state))
    # Events past the checkpoint (or all of them, without one) are recomputed now.
    if writer:
      for stage in stages:
        _truncate_events(metrics_path, stage, current_step(state))

  step = current_step(state)
  last_evals: list[dict] = [{} for _ in seeds]
  bar = tqdm.tqdm(desc=checkpoint_name, total=total_steps, initial=step,
                  disable=not config.progress or not writer, leave=False, unit="step")
  try:
    while step < total_steps:
      epoch, offset = divmod(step, steps_per_epoch)
      count = min(steps_per_call, steps_per_epoch - offset)
      state, metrics = train_steps(state, x_train, y_train, batch_indices(epoch, offset, count),
                                   objective_args)
      losses = np.asarray(metrics["loss"]).reshape(len(seeds), count)
      accuracies = np.asarray(metrics["accuracy"]).reshape(len(seeds), count)
      finite = np.isfinite(losses)
      if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise NonFiniteLossError(
            f"{stages[row]}: non-finite loss at step {step + col} (epoch {epoch}); the last "
            "good checkpoint is kept. Lower the learning rate or check the data.")
      before, step = step, step + count
      bar.update(count)
      if manager is not None and checkpoint_due(before, step):
        manager.save(step, args=ocp.args.StandardSave(state))
      events = [{"stage": stage, "epoch": step / steps_per_epoch, "step": step,
                 "train_loss": float(losses[k].mean()),
                 "train_accuracy": float(accuracies[k].mean()), "time": time.time()}
                for k, stage in enumerate(stages)]
      evaluated = step % steps_per_epoch == 0 and (
          (epoch + 1) % config.eval_every_epochs == 0 or step == total_steps)
      if evaluated:
        val = evaluate(state, x_val, y_val)
        val_loss = np.asarray(val["loss"]).reshape(-1)
        val_accuracy = np.asarray(val["accuracy"]).reshape(-1)
        for k, event in enumerate(events):
          event.update(epoch=epoch + 1, val_loss=float(val_loss[k]),
                       val_accuracy=float(val_accuracy[k]))
        last_evals = events
        bar.set_postfix(loss=f"{events[0]['train_loss']:.3f}",
                        val_acc=f"{events[0]['val_accuracy']:.3f}")
        for event in events:
          logging.info("%s epoch %d: %s", event["stage"], epoch + 1,
                       {k: v for k, v in event.items() if k not in ("stage", "time")})
      if writer and metrics_path is not None and (steps_per_call < steps_per_epoch or evaluated):
        for event in events:
          append_jsonl(metrics_path, event)
      if on_epoch_end is not None and evaluated:
        on_epoch_end(state, events if stacked else events[0])
  finally:
    bar.close()
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  if not last_evals[0]:  # resumed after the last step: report the final state's metrics
    val = evaluate(state, x_val, y_val)
    val_loss = np.asarray(val["loss"]).reshape(-1)
    val_accuracy = np.asarray(val["accuracy"]).reshape(-1)
    last_evals = [{"stage": stage, "epoch": config.epochs, "step": current_step(state),
                   "val_loss": float(val_loss[k]), "val_accuracy": float(val_accuracy[k])}
                  for k, stage in enumerate(stages)]
  return state, last_evals
