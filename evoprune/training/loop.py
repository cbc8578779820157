"""The fit loop: `fit`, `fit_seeds`, their resumable checkpoints and run files.

Training runs the compiled epochs of `evoprune.training.steps` in calls of `steps_per_call`
steps; orbax checkpoints hold the whole `TrainState` (the pruner's masks included), one
event per call goes to `metrics.jsonl`, and a restarted run resumes exactly where it
stopped. `fit(..., mesh=...)` trains data-parallel over a device mesh; `fit_seeds` trains S
seeds of one configuration as a single vmapped program.
"""

import dataclasses
import functools
import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from evoprune import data as data_lib
from evoprune import parallel
from evoprune.training.steps import NonFiniteLossError
from evoprune.training.steps import Objective
from evoprune.training.steps import TrainState
from evoprune.training.steps import make_evaluate
from evoprune.training.steps import make_seeds_train_epoch
from evoprune.training.steps import make_train_epoch


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
