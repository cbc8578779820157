"""Evaluating a whole population in one compiled call: vmap, chunked lax.map, or a loop.

    evaluator = ep.search.make_evaluator(fitness_fn, context, population_size, num_layers)
    fitness = evaluator.evaluate(population, context)     # [P, L] -> [P]

Strategies (`EVALUATIONS`):
  - 'vmap': every candidate at once. Fast where the per-candidate work is tiny or the
    backend batches well (GPU/TPU dense layers); memory grows with P, and on XLA:CPU a
    vmapped per-candidate conv becomes a grouped conv, measured about 15x slower than
    running the candidates one after the other.
  - 'map': `lax.map(..., batch_size=chunk)`: a scan over chunks of `chunk` candidates, each
    chunk vmapped; memory is bounded by the chunk.
  - 'loop': a Python loop over one jitted single-candidate evaluation (the baseline; it
    cannot run inside `jit` or `lax.scan`).
  - 'auto': `choose` picks one of the first two from the backend, the fitness's size and
    memory, and whether it convolves (see `choose`).

With several devices (`devices=`), the population axis is split across them with
`shard_map` over a one-axis `Mesh`; the context is replicated, each device runs the chosen
strategy on its share, and the result equals the single-device one (the population is padded
to a multiple of the device count and the padding dropped).
"""

import dataclasses
from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from evoprune.search import fitness as fitness_lib

EVALUATIONS = ("auto", "vmap", "map", "loop")
MESH_AXIS = "population"
# Per-candidate work (flops) under which vmapping the population beats a sequential scan on
# XLA:CPU. Measured (P=32, 2-core CPU): a 12-flop toy fitness runs 3.6M candidates/s under
# vmap vs 3.3M/s under lax.map, but already at 1e6 flops (LeNet-300-100 on ONE example, the
# cost is mostly building masks) lax.map is 5.8x faster than vmap.
_CPU_SMALL_FLOPS = 1e5
# Memory a chunk of candidates may use for its temporaries: 2 GiB on CPU (the machines have
# 24 GiB shared by every process), a quarter of the device's memory on accelerators.
_CPU_MEMORY_BYTES = 2 * 2**30
_ACCELERATOR_MEMORY_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A population evaluation.

  Attributes:
    evaluate: `evaluate(population [P, L], context) -> fitness [P]` (float32).
    strategy: 'vmap', 'map' or 'loop'.
    chunk_size: candidates per vmapped chunk ('map'), else None.
    traceable: whether `evaluate` may run inside `jit` / `lax.scan` (not for 'loop').
    num_devices: devices the population axis is split across.
  """
  evaluate: Callable[[jax.Array, Any], jax.Array]
  strategy: str
  chunk_size: int | None
  traceable: bool
  num_devices: int = 1


@dataclasses.dataclass(frozen=True)
class Profile:
  """What `choose` knows about one candidate's evaluation (from compiling it once)."""
  backend: str
  flops: float
  temp_bytes: float
  has_conv: bool


def _has_conv(jaxpr: Any) -> bool:
  """Whether a jaxpr convolves anywhere, nested calls included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      return True
    for sub in _subjaxprs(eqn.params):
      if _has_conv(sub):
        return True
  return False


def _subjaxprs(params: dict) -> list[Any]:
  """The jaxprs nested in an equation's params (pjit, scan, cond, custom_jvp bodies)."""
  out = []
  for value in params.values():
    values = value if isinstance(value, (list, tuple)) else (value,)
    for v in values:
      if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):  # ClosedJaxpr
        out.append(v.jaxpr)
      elif hasattr(v, "eqns"):  # Jaxpr
        out.append(v)
  return out


def _jaxpr_bytes(jaxpr: Any) -> float:
  """Bytes of every intermediate a jaxpr produces (nested bodies counted once).

  An upper bound on one candidate's working memory, were nothing freed or fused; XLA:CPU's
  `memory_analysis` under-reports it (0.5 MiB for the thesis CNN on 256 images, whose first
  conv alone outputs 29 MiB), so the memory bound uses the larger of the two.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      aval = getattr(var, "aval", None)
      if hasattr(aval, "shape") and hasattr(aval, "dtype"):
        total += float(np.prod(aval.shape, dtype=np.float64)) * np.dtype(aval.dtype).itemsize
    for sub in _subjaxprs(eqn.params):
      total += _jaxpr_bytes(sub)
  return total


def profile(fitness_fn: fitness_lib.FitnessFn, context: Any, num_layers: int) -> Profile:
  """Compiles one candidate's evaluation and reads its flops, working memory and ops."""
  candidate = jax.ShapeDtypeStruct((num_layers,), jnp.float32)
  jaxpr = jax.make_jaxpr(fitness_fn)(candidate, context)
  compiled = jax.jit(fitness_fn).lower(candidate, context).compile()
  flops, temp = 0.0, _jaxpr_bytes(jaxpr.jaxpr)
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
  except Exception:  # pylint: disable=broad-except  # cost analysis is optional per backend
    pass
  try:
    memory = compiled.memory_analysis()
    temp = max(temp, float(memory.temp_size_in_bytes + memory.output_size_in_bytes))
  except Exception:  # pylint: disable=broad-except
    pass
  return Profile(backend=jax.default_backend(), flops=flops, temp_bytes=temp,
                 has_conv=_has_conv(jaxpr.jaxpr))


def memory_budget(backend: str) -> float:
  """Bytes a population's temporaries may take on `backend` (see `choose`)."""
  if backend == "cpu":
    return _CPU_MEMORY_BYTES
  try:
    limit = jax.local_devices()[0].memory_stats()["bytes_limit"]
    return _ACCELERATOR_MEMORY_FRACTION * float(limit)
  except Exception:  # pylint: disable=broad-except  # no memory stats: assume 16 GiB
    return _ACCELERATOR_MEMORY_FRACTION * 16 * 2**30


def choose(prof: Profile, population_size: int) -> tuple[str, int | None]:
  """The automatic strategy for a population of `population_size` (per device).

  Rules (measured on a 2-core XLA:CPU; see benchmarks/search.py):
    - the largest chunk whose temporaries fit the memory budget bounds every choice;
    - CPU, a convolution anywhere or per-candidate work above 1e5 flops (any real network):
      a sequential `lax.map` (chunk 1). Batched (vmapped) matmuls and the grouped convs
      that vmapped convs become run slower on XLA:CPU than the same products one candidate
      at a time: for LeNet-300-100 (batch 1 to 1024) and the thesis CNN (batch 1 to 256),
      chunk 1 beat vmap by 1.1x to 7x, and chunks of 4 or 8 were never faster
      than chunk 1 and up to 4x slower;
    - CPU, tiny per-candidate work (a toy fitness): `vmap`, in memory-bounded chunks;
    - GPU/TPU: `vmap` when the whole population fits the memory budget, else `lax.map` in
      the largest chunks that do. Measured on one H200 (benchmarks/search.py, candidates/s
      against the Python loop): LeNet-300-100, batch 1024, P=128: vmap 56x, lax.map chunk 1
      11x; thesis CNN, batch 256: P=8 vmap 5.0x (chunk 1 4.6x), P=128 (vmap over the
      budget) chunks of 59 6.7x, chunk 1 6.5x.

  Returns:
    (strategy, chunk_size); chunk_size is None for 'vmap'.
  """
  per_candidate = max(prof.temp_bytes, 1.0)
  fit = int(max(1, memory_budget(prof.backend) // per_candidate))
  if prof.backend == "cpu":
    if prof.has_conv or prof.flops > _CPU_SMALL_FLOPS:
      return "map", 1
    return ("vmap", None) if fit >= population_size else ("map", fit)
  return ("vmap", None) if fit >= population_size else ("map", fit)


def _local(fitness_fn: fitness_lib.FitnessFn, strategy: str, chunk_size: int | None
           ) -> Callable[[jax.Array, Any], jax.Array]:
  if strategy == "vmap":
    return jax.vmap(fitness_fn, in_axes=(0, None))

  def mapped(population, context):
    return lax.map(lambda c: fitness_fn(c, context), population, batch_size=chunk_size)

  return mapped


def _sharded(local: Callable, devices: Sequence[Any]) -> Callable:
  mesh = Mesh(np.asarray(devices), (MESH_AXIS,))
  n = len(devices)
  spec = PartitionSpec(MESH_AXIS)
  shard = jax.shard_map(local, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec,
                        check_vma=False)

  def evaluate(population, context):
    p = population.shape[0]
    pad = (-p) % n
    if pad:  # repeat the last candidate so every device gets the same share
      population = jnp.concatenate([population, jnp.repeat(population[-1:], pad, axis=0)])
    return shard(population, context)[:p]

  return evaluate


def make_evaluator(fitness_fn: fitness_lib.FitnessFn, context: Any, population_size: int,
                   num_layers: int, *, strategy: str = "auto", chunk_size: int | None = None,
                   devices: Sequence[Any] | None = None) -> Evaluator:
  """Builds the population evaluation of `fitness_fn`.

  Args:
    fitness_fn: `fitness_fn(candidate [L], context) -> scalar`, written for one candidate.
    context: the pytree every candidate shares (used by 'auto' to profile one evaluation).
    population_size: P.
    num_layers: L.
    strategy: one of `EVALUATIONS`.
    chunk_size: candidates per chunk for 'map' (default: the automatic choice's chunk, or 1).
    devices: devices to split the population axis across (e.g. `jax.devices()`); None or
      one device: no sharding.

  Returns:
    An `Evaluator`.

  Raises:
    ValueError: an unknown strategy, a bad chunk size, or 'loop' with several devices.
  """
  if strategy not in EVALUATIONS:
    raise ValueError(f"strategy={strategy!r} is unknown; use one of {EVALUATIONS}.")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (or None).")
  if population_size < 1:
    raise ValueError(f"population_size={population_size} must be >= 1.")
  devices = list(devices) if devices is not None else []
  num_devices = max(len(devices), 1)
  if strategy == "loop":
    if num_devices > 1:
      raise ValueError("strategy='loop' evaluates on one device; use 'vmap', 'map' or 'auto' "
                       "to shard the population across devices.")
    single = jax.jit(fitness_fn)

    def loop(population, context):
      return jnp.stack([single(population[i], context) for i in range(population.shape[0])])

    return Evaluator(loop, "loop", None, traceable=False)
  per_device = -(-population_size // num_devices)
  if strategy == "auto":
    strategy, auto_chunk = choose(profile(fitness_fn, context, num_layers), per_device)
    chunk_size = chunk_size if chunk_size is not None else auto_chunk
  if strategy == "map" and chunk_size is None:
    chunk_size = 1
  if strategy == "vmap":
    chunk_size = None
  local = _local(fitness_fn, strategy, chunk_size)
  evaluate = _sharded(local, devices) if num_devices > 1 else local
  return Evaluator(evaluate, strategy, chunk_size, traceable=True, num_devices=num_devices)
