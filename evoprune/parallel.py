"""Scale-out with JAX's own engine: device meshes, sharding rules, multi-host, seed stacks.

Data parallelism is plain `jax.jit` over sharded arrays: the state is replicated (or its
large leaves sharded by a rule), each step's batch is split along a 1-D mesh axis `data`
over every device of every process, and XLA inserts the gradient all-reduce. The program
is the single-device program, so results equal one device's to float rounding (batch-norm
statistics are over the whole batch, as on one device). `evoprune.training.fit(...,
mesh=parallel.data_mesh())` trains this way.

    mesh = ep.parallel.data_mesh()                       # all devices of all processes
    state, _ = ep.training.fit(model, tx, state, dataset, config, mesh=mesh)

On CPU, `use_cpu_devices()` (before JAX starts) splits the host into one XLA device per
core, so data parallelism keeps every core busy; tests force 8 CPU devices the same way.

Multi-host: every process calls `initialize(coordinator, num_processes, process_id)`
(`jax.distributed.initialize`) before anything else touches JAX, loads the same dataset
and runs the same program; `global_array` builds each global input from the local copy
(each process supplies only the shards of its own devices), and only `is_writer()`
(process 0) writes files. Orbax checkpointing is itself multi-process aware.

Seeds in one program: `stack`/`unstack` turn S per-seed pytrees into one with a leading
seed axis and back; `evoprune.training.fit_seeds` trains them as one vmapped program, and
`seed_strategy` says whether that is faster than S sequential runs for a model.
"""

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"
SHARDING_RULES = ("replicate", "fsdp")
SEED_STRATEGIES = ("auto", "vmap", "sequential")
# Leaves smaller than this stay replicated under the 'fsdp' rule: gathering them costs
# more than the memory they would save.
FSDP_MIN_SIZE = 2**14
# `seed_strategy('auto')` vmaps seeds only for models up to this many parameters times
# seeds (and, on CPU, without convolutions); see `seed_strategy` for the measurements.
VMAP_MAX_PARAMS = 2_000_000


# ------------------------------------------------------------------------ devices, hosts


def use_cpu_devices(count: int | None = None) -> int:
  """Splits the host CPU into `count` XLA devices (default: one per core).

  Must run before JAX initialises its backends (before the first computation or
  `jax.devices()`); afterwards the device count can no longer change.

  Args:
    count: devices wanted; None for `os.cpu_count()`.

  Returns:
    The number of CPU devices that will be created.

  Raises:
    ValueError: `count` < 1.
    RuntimeError: JAX's backends are already initialised.
  """
  count = (os.cpu_count() or 1) if count is None else int(count)
  if count < 1:
    raise ValueError(f"count={count} must be >= 1; pass e.g. 2 or None for one per core")
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(
        "JAX's backends are already initialised, so the CPU device count is fixed; call "
        "ep.parallel.use_cpu_devices() before any JAX computation (or set XLA_FLAGS="
        f"--xla_force_host_platform_device_count={count} before starting Python)")
  jax.config.update("jax_num_cpu_devices", count)
  return count


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None
               ) -> None:
  """Joins a multi-process (multi-host) JAX job: `jax.distributed.initialize`.

  Call it first thing in every process, with the same coordinator (host:port of process
  0) and process count and each process's own id. With no arguments JAX detects cluster
  environments (SLURM, Cloud TPU, ...).

  Args:
    coordinator_address: 'host:port' of process 0, e.g. '10.0.0.1:1234'.
    num_processes: number of processes in the job.
    process_id: this process's index in [0, num_processes).
    local_device_ids: restricts this process to some of its local devices.

  Raises:
    ValueError: an incomplete or inconsistent set of arguments.
  """
  given = [coordinator_address is not None, num_processes is not None,
           process_id is not None]
  if any(given) and not all(given):
    raise ValueError(
        "pass coordinator_address, num_processes and process_id together (e.g. "
        "'localhost:1234', 2, 0), or none of them for cluster auto-detection")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, {num_processes}); each process "
                     "passes its own index")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             local_device_ids=local_device_ids)


def is_writer() -> bool:
  """True in the one process that writes files (process 0)."""
  return jax.process_index() == 0


# -------------------------------------------------------------------------- mesh, rules


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("devices is empty; pass at least one device (e.g. jax.devices())")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 1, axis: int = 0) -> NamedSharding:
  """Split axis `axis` of an `ndim`-D array over the `data` mesh axis."""
  spec = [None] * ndim
  spec[axis] = DATA_AXIS
  return NamedSharding(mesh, PartitionSpec(*spec))


def leaf_spec(leaf: Any, mesh: Mesh, rule: str | Callable = "replicate") -> PartitionSpec:
  """The partition of one array under a sharding rule.

  Args:
    leaf: an array (only `shape` is read).
    mesh: a mesh with a `data` axis.
    rule: 'replicate' (every device holds the leaf), 'fsdp' (leaves of at least
      `FSDP_MIN_SIZE` entries split their largest axis divisible by the mesh size over
      `data`; XLA gathers them where they are used), or a callable (leaf) ->
      PartitionSpec.

  Returns:
    A PartitionSpec.
  """
  if callable(rule):
    return rule(leaf)
  shape = np.shape(leaf)
  size = mesh.shape[DATA_AXIS]
  if rule == "replicate" or size == 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return PartitionSpec()
  divisible = [a for a in range(len(shape)) if shape[a] % size == 0]
  if not divisible:
    return PartitionSpec()
  axis = max(divisible, key=lambda a: shape[a])
  spec = [None] * len(shape)
  spec[axis] = DATA_AXIS
  return PartitionSpec(*spec)


def check_rule(rule: str | Callable) -> str | Callable:
  """Validates a sharding rule name (callables pass through)."""
  if not callable(rule) and rule not in SHARDING_RULES:
    raise ValueError(f"sharding rule {rule!r} is unknown; use one of {SHARDING_RULES} or a "
                     "callable leaf -> PartitionSpec")
  return rule


def tree_shardings(tree: Any, mesh: Mesh, rule: str | Callable = "replicate") -> Any:
  """A NamedSharding per leaf of `tree` (e.g. a TrainState) under `rule`."""
  check_rule(rule)
  return jax.tree.map(lambda leaf: NamedSharding(mesh, leaf_spec(leaf, mesh, rule)), tree)


def global_array(local: Any, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from a host-local copy of the whole array.

  Every process passes the same full array (e.g. the training split it loaded); each
  supplies only the shards its own devices hold, so this works on one host and on many.
  """
  local = np.asarray(local)
  return jax.make_array_from_callback(local.shape, sharding, lambda index: local[index])


def put(tree: Any, shardings: Any) -> Any:
  """Places every leaf of `tree` (arrays, host or device) with its sharding in `shardings`.

  The result never aliases the input's buffers (so it may be donated to a compiled call
  while the caller keeps using `tree`). In a multi-process job each leaf must hold the same
  full value in every process (e.g. a state initialised from the same seed); each process
  supplies its own devices' shards.
  """
  def place(leaf, sharding):
    if jax.process_count() == 1 or (isinstance(leaf, jax.Array) and leaf.sharding == sharding):
      return jax.device_put(leaf, sharding, may_alias=False)
    return global_array(np.asarray(leaf), sharding)
  return jax.tree.map(place, tree, shardings)


def constrain_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Inside a jitted function: keep x's leading (batch) axis split over `data`."""
  return lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))


# ------------------------------------------------------------------------ seed stacks


# Stacking and slicing go through host memory: op by op on the device, every leaf shape
# compiled its own stack (and its own slice and squeeze per seed), about 0.1 s each on
# CPU (36 programs for the digits MLP's 3 seeds), and even one jitted program for the whole
# tree took about 1 s to compile, more than the copies cost for the models that vmap
# their seeds (`VMAP_MAX_PARAMS`). Typed PRNG keys cannot go through numpy and stay on the
# device.
def _is_key(leaf: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key)


def stack(trees: Sequence[Any]) -> Any:
  """S pytrees of the same structure -> one pytree with a leading seed axis S."""
  if not trees:
    raise ValueError("stack needs at least one tree")

  def stack_leaves(*leaves):
    if _is_key(leaves[0]):
      return jax.numpy.stack(leaves)
    return jax.device_put(np.stack([np.asarray(leaf) for leaf in leaves]))

  return jax.tree.map(stack_leaves, *trees)


def unstack(tree: Any, index: int) -> Any:
  """Seed `index` (negative counts from the end) of a stacked pytree.

  Raises:
    IndexError: `index` is outside the seed axis.
  """
  sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(tree)}
  count = min(sizes) if sizes else 0
  if not -count <= index < count:
    raise IndexError(f"index={index} is outside the seed axis of size {count}")
  return jax.tree.map(
      lambda leaf: leaf[index] if _is_key(leaf) else jax.device_put(np.asarray(leaf)[index]),
      tree)


def seed_strategy(model: Any, example_x: Any, num_seeds: int, strategy: str = "auto", *,
                  backend: str | None = None) -> str:
  """How to train `num_seeds` seeds of `model`: 'vmap' (one program) or 'sequential'.

  'auto' picks 'vmap' for models whose parameters times seeds stay under
  `VMAP_MAX_PARAMS`, except models with convolutions on CPU. Measured as the time of the
  experiments' dense seeds (3 seeds, `experiments.pipeline.train_dense`, compiled,
  medians of interleaved runs), vmap/sequential:

    model (config)                          2-core CPU   H200 GPU
    digits MLP 128-64 (default, 30 epochs)  0.35         0.35
    LeNet-300-100 (mnist_mlp, 1 epoch)      0.71-0.79    0.42
    LeNet-5 on MNIST (1 epoch)              1.81         0.74
    ResNet-20 on MNIST (1 epoch)            -            0.84

  One program dispatches S times fewer calls and writes one checkpoint instead of S; on
  CPU a vmapped convolution becomes a grouped convolution, which XLA:CPU runs slower than
  the same convolutions one after the other, while on GPU it still wins.

  Args:
    model: a flax.linen Module.
    example_x: one input batch (only its shape and dtype are used).
    num_seeds: S >= 1.
    strategy: 'auto', 'vmap' or 'sequential' ('vmap'/'sequential' are returned as is).
    backend: the platform the seeds train on ('cpu', 'gpu', 'tpu'); default
      `jax.default_backend()`.

  Returns:
    'vmap' or 'sequential'.

  Raises:
    ValueError: an unknown strategy or `num_seeds` < 1.
  """
  if strategy not in SEED_STRATEGIES:
    raise ValueError(f"seed strategy {strategy!r} is unknown; use one of {SEED_STRATEGIES}")
  if num_seeds < 1:
    raise ValueError(f"num_seeds={num_seeds} must be >= 1")
  if strategy != "auto":
    return strategy
  if num_seeds == 1:
    return "sequential"
  key = jax.random.key(0)
  variables = jax.eval_shape(
      lambda x: model.init({"params": key, "dropout": key}, x, train=False), example_x)
  size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, example_x)
  has_conv = "conv_general_dilated" in str(jaxpr)
  on_cpu = (backend or jax.default_backend()) == "cpu"
  fits = size * num_seeds <= VMAP_MAX_PARAMS
  return "vmap" if fits and not (has_conv and on_cpu) else "sequential"
