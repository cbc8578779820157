"""What an experiment config may say, checked before any training.

The method, timing and schedule names the pipeline knows, the target sparsities, and the
checks that fail fast with a `ValueError` naming the value and the fix (unknown fields
already fail in the flags). `validate_parallel` runs no JAX computation, so
experiments/main.py can call it before it sets up devices.
"""

import ml_collections

import evoprune as ep
from evoprune import parallel
from evoprune import training

# Methods that rank weights by a score and hit the target exactly with top-k. The value is
# the pruner's importance ('wbar' = |running average of the weights|, evolution of weights).
TOPK_METHODS = {
    "magnitude": "magnitude",
    "random": "random",
    "saliency": "saliency",
    "taylor": "taylor",
    "movement": "movement",
    "global_magnitude": "magnitude",
    "evolution": "wbar",
}
# The seed paper's rules (one-shot, after training; see evoprune.criteria).
PAPER_METHODS = ("std_threshold", "evolution_paper", "bezier")
METHODS = (*TOPK_METHODS, *PAPER_METHODS)
WHEN = ("after", "during")
SCHEDULES = ("constant", "polynomial_decay")


def targets(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """`config.prune.target_sparsity` (one number or several) as a tuple of floats in [0, 1)."""
  value = config.prune.target_sparsity
  targets = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  for t in targets:
    if not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
      raise ValueError(f"config.prune.target_sparsity contains {t!r}: each target must be a "
                       "number in [0, 1), e.g. 0.9 or (0.5, 0.9).")
  return tuple(float(t) for t in targets)


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any training, on invalid values (unknown fields fail in the flags)."""
  targets(config)
  if not config.seeds:
    raise ValueError("config.seeds is empty; give at least one seed, e.g. (0,).")
  if len(set(config.seeds)) != len(config.seeds):
    raise ValueError(f"config.seeds={tuple(config.seeds)} repeats a seed; give distinct "
                     "seeds, e.g. (0, 1, 2).")
  validate_parallel(config)
  for m in config.prune.methods:
    if m not in METHODS:
      raise ValueError(f"config.prune.methods contains unknown method {m!r}; valid: {METHODS}.")
  if config.prune.when not in WHEN:
    raise ValueError(f"config.prune.when={config.prune.when!r}; use one of {WHEN}.")
  if config.prune.when == "during":
    if config.prune.schedule not in SCHEDULES:
      raise ValueError(f"config.prune.schedule={config.prune.schedule!r}; use one of "
                       f"{SCHEDULES} for when='during'.")
    paper = [m for m in config.prune.methods if m in PAPER_METHODS]
    if paper:
      raise ValueError(f"methods {paper} are the seed paper's one-shot rules; use "
                       "config.prune.when='after' for them.")
  elif "movement" in config.prune.methods:
    raise ValueError("method 'movement' accumulates -w*g while the model is pruned; use "
                     "config.prune.when='during'.")
  if config.prune.allocation == "evolutionary":
    if config.search.research_every_epochs < 0:
      raise ValueError(f"config.search.research_every_epochs="
                       f"{config.search.research_every_epochs}; use 0 (search once, when "
                       "pruning starts) or a number of epochs between searches.")
  else:
    ep.allocation.get(config.prune.allocation)
  for name, value in (("train.optimizer", config.train.optimizer),
                      ("finetune.optimizer", config.finetune.optimizer)):
    if value not in training.OPTIMIZERS:
      raise ValueError(f"config.{name}={value!r}; use one of {training.OPTIMIZERS}.")
  for name, value in (("train.lr_schedule", config.train.lr_schedule),
                      ("finetune.lr_schedule", config.finetune.lr_schedule)):
    if value not in training.LR_SCHEDULES:
      raise ValueError(f"config.{name}={value!r}; use one of {training.LR_SCHEDULES}.")
  if config.distill.enabled:
    ep.distillation.check_hyperparameters(config.distill.temperature, config.distill.alpha)
  if config.train.epochs < 1 or config.train.batch_size < 1:
    raise ValueError("config.train.epochs and config.train.batch_size must be >= 1.")


def validate_parallel(config: ml_collections.ConfigDict) -> None:
  """Checks `config.parallel` and `config.train.seeds_in_one_program` without starting JAX.

  experiments/main.py calls it before `parallel.use_cpu_devices`/`parallel.initialize`,
  so it must not run any JAX computation.
  """
  p = config.parallel
  strategy = config.train.seeds_in_one_program
  if strategy not in parallel.SEED_STRATEGIES:
    raise ValueError(f"config.train.seeds_in_one_program={strategy!r}; use one of "
                     f"{parallel.SEED_STRATEGIES}.")
  if p.sharding_rule not in parallel.SHARDING_RULES:
    raise ValueError(f"config.parallel.sharding_rule={p.sharding_rule!r}; use one of "
                     f"{parallel.SHARDING_RULES}.")
  if p.cpu_devices < 0:
    raise ValueError(f"config.parallel.cpu_devices={p.cpu_devices} is negative; use 0 (JAX's "
                     "default) or a device count such as 2.")
  if p.data_parallel and strategy == "vmap":
    raise ValueError("config.train.seeds_in_one_program='vmap' cannot be combined with "
                     "config.parallel.data_parallel=True (the vmapped seeds run on one "
                     "device); use 'auto' or 'sequential'.")
  if p.coordinator_address:
    if p.num_processes < 1:
      raise ValueError(f"config.parallel.num_processes={p.num_processes} with coordinator "
                       f"{p.coordinator_address!r}; give the job's process count, e.g. 2.")
    if not 0 <= p.process_id < p.num_processes:
      raise ValueError(f"config.parallel.process_id={p.process_id} is outside [0, "
                       f"{p.num_processes}); give each process its own index.")
    if p.num_processes > 1 and not p.data_parallel:
      raise ValueError("a multi-process job needs config.parallel.data_parallel=True (every "
                       "process trains its share of each batch).")
  elif p.num_processes > 1 or p.process_id != 0:
    raise ValueError(f"config.parallel.num_processes={p.num_processes}, process_id="
                     f"{p.process_id} need config.parallel.coordinator_address='host:port' "
                     "of process 0 (e.g. 'localhost:1234').")
