"""Knowledge distillation (Hinton, Vinyals and Dean 2015): the loss, as a training objective.

    teacher = ep.distillation.Teacher(dense_model, dense_state.params)
    objective, objective_args = ep.distillation.objective(teacher, temperature=4.0, alpha=0.9)
    state, metrics = ep.training.fit(student, tx, state, dataset, config,
                                     objective=objective, objective_args=objective_args)

The loss is `alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)`
for student logits s, teacher logits t and temperature T. The T^2 factor keeps the soft
term's gradients on the scale of the hard term's as T changes (Hinton et al. section 2).

The student is any model with its own params: a pruned copy of the teacher (its optimizer a
`Pruner.wrap(...)`, so masks keep pruned weights at zero), a shrunk network
(`surgery.shrink`), or a fake-quant model (`quantization.qat`). The teacher runs in
inference mode on the student's (augmented) batch and gets no gradient. Training is
`training.fit`'s loop (resumable checkpoints, metrics events, the NaN stop); the objective
only replaces its loss.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

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
    """The teacher's variables, a traced argument of the compiled step (`objective_args`)."""
    return {"params": self.params, **({"batch_stats": self.batch_stats}
                                      if self.batch_stats else {})}


@dataclasses.dataclass(frozen=True)
class _KdObjective:
  """`training.train_step`'s objective: `kd_loss` against the teacher's logits on the batch.

  It holds the teacher's model and the two floats, not its arrays, so it hashes by value
  (`make_train_epoch` reuses the compiled program) and the variables stay a traced argument.
  """
  teacher_model: Any
  temperature: float
  alpha: float

  def __call__(self, logits: jax.Array, labels: jax.Array, x: jax.Array,
               teacher_variables: Any) -> jax.Array:
    teacher_logits = self.teacher_model.apply(teacher_variables, x, train=False)
    return kd_loss(logits, teacher_logits, labels, temperature=self.temperature,
                   alpha=self.alpha)  # kd_loss stops the gradient into the teacher


def objective(teacher: Teacher, temperature: float = 4.0, alpha: float = 0.9
              ) -> tuple[_KdObjective, dict[str, Any]]:
  """The `(objective, objective_args)` of `training.fit` for learning from `teacher`.

  Args:
    teacher: the trained model; its model must be hashable (linen modules are).
    temperature, alpha: as for `kd_loss`.

  Returns:
    The objective (hashable, the teacher's model and the hyperparameters) and its
    arguments, the teacher's variables.

  Raises:
    ValueError: a temperature <= 0 or an alpha outside [0, 1].
  """
  check_hyperparameters(temperature, alpha)
  return _KdObjective(teacher.model, float(temperature), float(alpha)), teacher.variables
