"""Pruning schedules: when to recompute masks, and at which sparsity.

A schedule is a callable `schedule(step) -> (should_update, sparsity)` returning jax scalars
(bool, float32). It is pure and works under `jit` with a traced step, so the pruner can call
it inside the train step and branch with `lax.cond`.

`constant` and `polynomial_decay` follow TF Model Optimization's `ConstantSparsity` and
`PolynomialDecay` exactly (tfmot.sparsity.keras, `pruning_schedule.py`), so numbers carry over:

  should_update = begin <= step and (step <= end or end < 0) and (step - begin) % frequency == 0

with `%` the floor modulo (a negative step, such as TF-MOT's initial -1, is never an update
step before `begin`). `polynomial_decay` returns

  s = final + (initial - final) * (1 - p) ** power,  p = clip((step - begin) / (end - begin), 0, 1)

in float32 at every step (so `initial` before `begin`, `final` after `end`).

Differences from TF-MOT, all at construction: TF-MOT accepts `end_step == begin_step` for
PolynomialDecay and then divides by zero; here `end_step > begin_step` is required. Types
(ints, not bools) and `power > 0` are checked too.

Schedules are frozen dataclasses: hashable, comparable, safe to close over or pass as static
arguments, and not pytrees (nothing in them is traced).
"""

from collections.abc import Callable
import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

Schedule = Callable[[jax.typing.ArrayLike], tuple[jax.Array, jax.Array]]


def _check_sparsity(name: str, value: float) -> None:
  if (not isinstance(value, numbers.Real) or isinstance(value, bool) or
      not 0.0 <= value < 1.0):
    raise ValueError(f"{name}={value!r} is outside [0, 1); pass a value such as 0.9.")


def _check_int(name: str, value: int, minimum: int) -> None:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an int >= {minimum}; pass e.g. {max(minimum, 100)}.")


def _check_end(end_step: int, begin_step: int, allow_forever: bool) -> None:
  if not isinstance(end_step, numbers.Integral) or isinstance(end_step, bool):
    raise ValueError(f"end_step={end_step!r} must be an int.")
  if end_step == -1 and allow_forever:
    return
  if end_step < 0:
    fix = "-1 (prune until training ends) or a step" if allow_forever else "a step"
    raise ValueError(f"end_step={end_step} is negative; pass {fix} >= begin_step={begin_step}.")
  if allow_forever and end_step < begin_step:
    raise ValueError(
        f"end_step={end_step} is before begin_step={begin_step}; pass end_step >= begin_step "
        "or -1.")
  if not allow_forever and end_step <= begin_step:
    raise ValueError(
        f"end_step={end_step} must be > begin_step={begin_step} for a decay; pass e.g. "
        f"end_step={begin_step + 1000}.")


def _step(step: jax.typing.ArrayLike) -> jax.Array:
  return jnp.asarray(step, jnp.int32)


def _in_turn(step: jax.Array, begin: int, end: int, frequency: int) -> jax.Array:
  in_range = (step >= begin) & ((step <= end) | (end < 0))
  return in_range & (jnp.mod(step - begin, frequency) == 0)


@dataclasses.dataclass(frozen=True)
class Constant:
  """TF-MOT `ConstantSparsity`: the same target at every update step. See `constant`."""
  target_sparsity: float
  begin_step: int = 0
  end_step: int = -1
  frequency: int = 100

  def __post_init__(self):
    _check_sparsity("target_sparsity", self.target_sparsity)
    _check_int("begin_step", self.begin_step, 0)
    _check_end(self.end_step, self.begin_step, allow_forever=True)
    _check_int("frequency", self.frequency, 1)

  def __call__(self, step: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    update = _in_turn(_step(step), self.begin_step, self.end_step, self.frequency)
    return update, jnp.float32(self.target_sparsity)


@dataclasses.dataclass(frozen=True)
class PolynomialDecay:
  """TF-MOT `PolynomialDecay` (Zhu & Gupta 2017). See `polynomial_decay`."""
  initial_sparsity: float
  final_sparsity: float
  begin_step: int
  end_step: int
  power: float = 3
  frequency: int = 100

  def __post_init__(self):
    _check_sparsity("initial_sparsity", self.initial_sparsity)
    _check_sparsity("final_sparsity", self.final_sparsity)
    _check_int("begin_step", self.begin_step, 0)
    _check_end(self.end_step, self.begin_step, allow_forever=False)
    _check_int("frequency", self.frequency, 1)
    if not isinstance(self.power, numbers.Real) or isinstance(self.power, bool) or not (
        self.power > 0):
      raise ValueError(f"power={self.power!r} must be a positive number, e.g. 3.")

  def __call__(self, step: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    step = _step(step)
    p = (step - self.begin_step).astype(jnp.float32) / np.float32(
        self.end_step - self.begin_step)
    p = jnp.clip(p, 0.0, 1.0)
    sparsity = (np.float32(self.initial_sparsity - self.final_sparsity) * (1.0 - p)**self.power
                + np.float32(self.final_sparsity))
    update = _in_turn(step, self.begin_step, self.end_step, self.frequency)
    return update, sparsity.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class OneShot:
  """One update, at `step`, to `target_sparsity`. See `one_shot`."""
  target_sparsity: float
  step: int = 0

  def __post_init__(self):
    _check_sparsity("target_sparsity", self.target_sparsity)
    _check_int("step", self.step, 0)

  def __call__(self, step: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    return _step(step) == self.step, jnp.float32(self.target_sparsity)


@dataclasses.dataclass(frozen=True)
class Iterative:
  """Han et al. (2015) iterative pruning: `rounds` prune steps with retraining between.

  Round r (1-based) prunes at step `begin_step + (r - 1) * steps_per_round` to sparsity
  `1 - (1 - final_sparsity) ** (r / rounds)`: every round keeps the same fraction
  `(1 - final) ** (1 / rounds)` of the weights left, and round `rounds` reaches the target.
  Between update steps the schedule reports the latest round's sparsity (0 before `begin`).
  """
  final_sparsity: float
  steps_per_round: int
  rounds: int
  begin_step: int = 0

  def __post_init__(self):
    _check_sparsity("final_sparsity", self.final_sparsity)
    _check_int("steps_per_round", self.steps_per_round, 1)
    _check_int("rounds", self.rounds, 1)
    _check_int("begin_step", self.begin_step, 0)

  @property
  def end_step(self) -> int:
    """The last update step."""
    return self.begin_step + (self.rounds - 1) * self.steps_per_round

  def __call__(self, step: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    offset = _step(step) - self.begin_step
    done = jnp.clip(jnp.floor_divide(offset, self.steps_per_round) + 1, 0, self.rounds)
    density = np.float32(1.0 - self.final_sparsity)**(done.astype(jnp.float32) / self.rounds)
    update = _in_turn(_step(step), self.begin_step, self.end_step, self.steps_per_round)
    return update, (1.0 - density).astype(jnp.float32)


def constant(target_sparsity: float, begin_step: int = 0, end_step: int = -1,
             frequency: int = 100) -> Constant:
  """Constant sparsity, updated every `frequency` steps in [begin_step, end_step].

  Args:
    target_sparsity: in [0, 1).
    begin_step: first update step (>= 0); TF-MOT prunes at this step.
    end_step: last step that may update, or -1 to keep updating forever.
    frequency: steps between updates (> 0).

  Returns:
    A schedule: `schedule(step) -> (should_update bool[], sparsity float32[])`.
  """
  return Constant(target_sparsity, begin_step, end_step, frequency)


def polynomial_decay(initial_sparsity: float, final_sparsity: float, begin_step: int,
                     end_step: int, power: float = 3, frequency: int = 100) -> PolynomialDecay:
  """Sparsity rising from `initial` to `final` as a polynomial of degree `power`.

  Args:
    initial_sparsity: sparsity at (and before) `begin_step`, in [0, 1).
    final_sparsity: sparsity at (and after) `end_step`, in [0, 1).
    begin_step: first update step (>= 0).
    end_step: last update step (> begin_step).
    power: exponent of the decay (> 0); 3 is Zhu & Gupta's choice.
    frequency: steps between updates (> 0).

  Returns:
    A schedule: `schedule(step) -> (should_update bool[], sparsity float32[])`.
  """
  return PolynomialDecay(initial_sparsity, final_sparsity, begin_step, end_step, power,
                         frequency)


def one_shot(target_sparsity: float, step: int = 0) -> OneShot:
  """A single update at `step` (>= 0) to `target_sparsity` in [0, 1)."""
  return OneShot(target_sparsity, step)


def iterative(final_sparsity: float, steps_per_round: int, rounds: int,
              begin_step: int = 0) -> Iterative:
  """Geometric iterative pruning: `rounds` updates `steps_per_round` apart. See `Iterative`.

  Args:
    final_sparsity: sparsity after the last round, in [0, 1).
    steps_per_round: retraining steps between updates (>= 1).
    rounds: number of prune steps (>= 1).
    begin_step: the first update step (>= 0).

  Returns:
    A schedule: `schedule(step) -> (should_update bool[], sparsity float32[])`.
  """
  return Iterative(final_sparsity, steps_per_round, rounds, begin_step)


SCHEDULES = {
    "constant": constant,
    "polynomial_decay": polynomial_decay,
    "one_shot": one_shot,
    "iterative": iterative,
}


def get(name: str) -> Callable[..., Schedule]:
  """Returns the schedule constructor registered under `name`."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; valid names: {sorted(SCHEDULES)}.")
  return SCHEDULES[name]
