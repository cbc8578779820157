"""Knowledge distillation (Hinton, Vinyals and Dean 2015): loss and teacher-student training.

    teacher = ep.distillation.Teacher(dense_model, dense_state.params)
    step = functools.partial(ep.distillation.distill_step, model=student, tx=tx,
                             teacher=teacher, temperature=4.0, alpha=0.9)
    state, metrics = jax.jit(step)(state, x, y, teacher.variables)

The loss is `alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)`
for student logits s, teacher logits t and temperature T. The T^2 factor keeps the soft
term's gradients on the scale of the hard term's as T changes (Hinton et al. section 2).

The student is any model with its own params: a pruned copy of the teacher (its optimizer a
`Pruner.wrap(...)`, so masks keep pruned weights at zero), a shrunk network
(`surgery.shrink`), or a fake-quant model (`quantization.qat`). The teacher runs in
inference mode and gets no gradient. `fit` trains a `training.TrainState` for whole epochs,
each one compiled call (a scan over the epoch's batches), checkpointing at the end of each
epoch so a restarted run resumes.
"""

import pathlib
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from evoprune import data as data_lib
from evoprune import training
from evoprune.types import Params


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
            temperature: float = 4.0, alpha: float = 0.9) -> jax.Array:
  """Hinton et al.'s distillation loss, averaged over the batch.

  Args:
    student_logits: [B, C].
    teacher_logits: [B, C] (no gradient flows into them).
    labels: [B] integer labels.
    temperature: T > 0 softening both distributions.
    alpha: weight of the soft (teacher) term in [0, 1]; 1 - alpha weights the hard labels.

  Returns:
    A scalar.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  soft_targets = jax.nn.softmax(teacher_logits / temperature)
  log_student = jax.nn.log_softmax(student_logits / temperature)
  log_teacher = jax.nn.log_softmax(teacher_logits / temperature)
  kl = jnp.sum(soft_targets * (log_teacher - log_student), axis=-1).mean()
  hard = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
  return alpha * temperature ** 2 * kl + (1.0 - alpha) * hard


def check_hyperparameters(temperature: float, alpha: float) -> None:
  """Raises ValueError on a temperature <= 0 or an alpha outside [0, 1]."""
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r} must be > 0; pass e.g. 4.0.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha!r} is outside [0, 1]; pass e.g. 0.9.")


class Teacher(NamedTuple):
  """A trained model that produces the soft targets.

  Attributes:
    model: a linen model (or anything with `apply(variables, x, train=False)`).
    params: its params.
    batch_stats: its batch-norm statistics ({} without batch norm).
  """
  model: Any
  params: Params
  batch_stats: Any = {}

  @property
  def variables(self) -> dict[str, Any]:
    """The teacher's variables: pass them to the compiled step as an argument."""
    return {"params": self.params, **({"batch_stats": self.batch_stats}
                                      if self.batch_stats else {})}


def distill_step(state: training.TrainState, x: jax.Array, y: jax.Array,
                 teacher_variables: Mapping[str, Any], *, model: nn.Module,
                 tx: optax.GradientTransformation, teacher: Teacher, temperature: float = 4.0,
                 alpha: float = 0.9,
                 augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                 ) -> tuple[training.TrainState, dict[str, jax.Array]]:
  """One student update on a batch x [B, ...], y [B]. Pure; compile it with `jax.jit`.

  `teacher_variables` (normally `teacher.variables`) is an argument rather than a closed-over
  constant, so large teachers are not baked into the compiled program; `teacher` supplies
  only the model.
  """
  key = jax.random.fold_in(state.key, state.step)
  augment_key, dropout_key = jax.random.split(key)
  if augment is not None:
    x = augment(augment_key, x)
  teacher_logits = teacher.model.apply(teacher_variables, x, train=False)

  def loss_fn(params):
    logits, batch_stats = training.apply_model(model, params, state.batch_stats, x,
                                               train=True, key=dropout_key)
    loss = kd_loss(logits, teacher_logits, y, temperature=temperature, alpha=alpha)
    return loss, (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), metrics


def make_distill_epoch(model: nn.Module, tx: optax.GradientTransformation, teacher: Teacher, *,
                       temperature: float = 4.0, alpha: float = 0.9,
                       augment: Callable | None = None) -> Callable:
  """Returns `epoch(state, x, y, batch_indices, teacher_variables) -> (state, metrics)`.

  Compiled once; like `training.make_train_epoch`, a whole epoch is one scan over
  `batch_indices` [steps, B] into the device-resident split x [N, ...], y [N]; the state
  is donated.
  """
  check_hyperparameters(temperature, alpha)

  def epoch(state, x, y, batch_indices, teacher_variables):
    def body(state, idx):
      return distill_step(state, x[idx], y[idx], teacher_variables, model=model, tx=tx,
                          teacher=teacher, temperature=temperature, alpha=alpha,
                          augment=augment)
    return jax.lax.scan(body, state, batch_indices)

  return jax.jit(epoch, donate_argnums=(0,))


def fit(model: nn.Module, tx: optax.GradientTransformation, state: training.TrainState,
        dataset: data_lib.Dataset, config: training.FitConfig, teacher: Teacher, *,
        temperature: float = 4.0, alpha: float = 0.9,
        workdir: str | pathlib.Path | None = None, stage: str = "distill"
        ) -> tuple[training.TrainState, dict]:
  """Trains the student `state` against `teacher` for `config.epochs` epochs.

  With a `workdir`, the state is checkpointed under `workdir/checkpoints/<stage>` after
  every epoch and a restarted run resumes from the latest one.

  Returns:
    The final state and {'val_loss', 'val_accuracy', 'train_loss', 'epoch', ...}.
  """
  check_hyperparameters(temperature, alpha)
  steps_per_epoch = data_lib.steps_per_epoch(dataset.train, config.batch_size)
  x_train, y_train = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
  epoch_fn = make_distill_epoch(model, tx, teacher, temperature=temperature, alpha=alpha,
                                augment=data_lib.augment if config.augment else None)
  manager = None
  if workdir is not None:
    manager = ocp.CheckpointManager(
        (pathlib.Path(workdir) / "checkpoints" / stage).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    if manager.latest_step() is not None:
      state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
  state = jax.tree.map(jnp.copy, state)  # the epoch donates its input; keep the caller's
  losses = np.zeros(0)
  try:
    for epoch in range(int(state.step) // steps_per_epoch, config.epochs):
      batch_indices = data_lib.epoch_batch_indices(len(dataset.train.y), config.batch_size,
                                                   seed=config.seed, epoch=epoch)
      state, metrics = epoch_fn(state, x_train, y_train, jnp.asarray(batch_indices),
                                teacher.variables)
      losses = np.asarray(metrics["loss"])
      if not np.all(np.isfinite(losses)):
        raise training.NonFiniteLossError(
            f"{stage}: non-finite distillation loss in epoch {epoch}; lower the learning "
            "rate or the temperature.")
      if manager is not None:
        manager.save(int(state.step), args=ocp.args.StandardSave(state))
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  val = training.make_evaluate(model)(state.params, state.batch_stats,
                                      jnp.asarray(dataset.val.x), jnp.asarray(dataset.val.y))
  return state, {"stage": stage, "epoch": config.epochs, "step": int(state.step),
                 "train_loss": float(losses.mean()) if losses.size else float("nan"),
                 "val_loss": float(val["loss"]), "val_accuracy": float(val["accuracy"])}
