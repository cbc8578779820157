"""The train state and the compiled programs: optimizers, the train step, epochs, evaluation.

A whole epoch (or a fixed number of steps) is one compiled call: the training split lives on
the device and the epoch's shuffled batch indices (from `evoprune.data.epoch_batch_indices`)
are scanned with `lax.scan`, so there is no host round-trip or Python dispatch per step. The
optimizer may be any optax `GradientTransformation`, including `evoprune.Pruner.wrap(...)`,
whose masks live in the optimizer state. The loss is cross-entropy unless an `objective`
replaces it (e.g. `distillation.objective`: a teacher's soft targets).
"""

import functools
from typing import Any, Callable, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from evoprune import models
from evoprune import ops
from evoprune import parallel
from evoprune.ops import direct
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
  variables = models.init(model, {"params": init_key, "dropout": dropout_key}, example_x,
                          train=False)
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


def _memoized(maker: Callable) -> Callable:
  """`functools.lru_cache(maxsize=64)` of a program maker, keyed also on the ops mode
  (`ops.mode()`) and on whether the C++ kernels are used (`ops.direct.use_kernels()`): the
  programs are made with `ops.jit`, which binds both, so one made under `ops.use('xla')` is
  not handed out outside it."""
  cached = functools.lru_cache(maxsize=64)(
      lambda mode, kernels, args, kwargs: maker(*args, **dict(kwargs)))

  @functools.wraps(maker)
  def make(*args, **kwargs):
    return cached(ops.mode(), direct.uses_kernels(), args, tuple(sorted(kwargs.items())))

  return make


@_memoized
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
  return ops.jit(_epoch_fn(model, tx, label_smoothing, augment, mesh, objective),
                 donate_argnums=(0,))


@_memoized
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

  return ops.jit(train_epoch, donate_argnums=(0,))


@_memoized
def make_evaluate(model: nn.Module, batch_size: int = 1000) -> Callable:
  """Returns `evaluate(params, batch_stats, x, y) -> {'loss', 'accuracy'}` (jax scalars).

  The split is padded to a multiple of `batch_size` and scanned in one compiled call; padded
  examples get zero weight, so the result is exact for any split size. Memoized like
  `make_train_epoch`.
  """

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

  return ops.jit(evaluate)
