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

Modules: `steps` (the `TrainState`, optimizers and learning-rate schedules, the train step
and the compiled epoch and evaluation programs) and `loop` (`fit`, `fit_seeds`, their
checkpoints and run files: `metrics.jsonl`, atomic JSON writes).
"""

from evoprune.training.loop import FitConfig
from evoprune.training.loop import append_jsonl
from evoprune.training.loop import fit
from evoprune.training.loop import fit_seeds
from evoprune.training.loop import write_json_atomic
from evoprune.training.steps import LR_SCHEDULES
from evoprune.training.steps import OPTIMIZERS
from evoprune.training.steps import NonFiniteLossError
from evoprune.training.steps import Objective
from evoprune.training.steps import TrainState
from evoprune.training.steps import apply_model
from evoprune.training.steps import create_train_state
from evoprune.training.steps import cross_entropy
from evoprune.training.steps import learning_rate_schedule
from evoprune.training.steps import make_evaluate
from evoprune.training.steps import make_optimizer
from evoprune.training.steps import make_seeds_train_epoch
from evoprune.training.steps import make_train_epoch
from evoprune.training.steps import train_step

__all__ = [
    "FitConfig", "LR_SCHEDULES", "NonFiniteLossError", "OPTIMIZERS", "Objective",
    "TrainState", "append_jsonl", "apply_model", "create_train_state", "cross_entropy",
    "fit", "fit_seeds", "learning_rate_schedule", "make_evaluate", "make_optimizer",
    "make_seeds_train_epoch", "make_train_epoch", "train_step", "write_json_atomic",
]
