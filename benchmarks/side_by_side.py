"""Timing two frameworks side by side on a shared machine, naming the machine, and the
evoprune train programs the benchmarks time.

Used by `training_speed` (whole train steps), `conv_speed` (single convolution passes)
and `step_profile` (one step's operations).
"""

import os
import platform
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import evoprune as ep
from evoprune import training

# Batch size of every timed step and pass.
BATCH_SIZE = 128
# Input shape of one example of each model the train-step benchmarks run (MNIST- or
# CIFAR-shaped).
INPUT_SHAPES = {"lenet300_100": (28, 28, 1), "lenet5": (32, 32, 3),
                "thesis_cnn": (32, 32, 3), "resnet20": (32, 32, 3), "mobilenet": (32, 32, 3)}


def example_batch(name: str) -> tuple[np.ndarray, np.ndarray]:
  """A fixed random batch for model `name`: x [BATCH_SIZE, *INPUT_SHAPES[name]] float32,
  labels y [BATCH_SIZE] int32 in [0, 10)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH_SIZE, *INPUT_SHAPES[name])).astype(np.float32)
  return x, rng.integers(0, 10, BATCH_SIZE).astype(np.int32)


def train_epoch(name: str, x: np.ndarray, y: np.ndarray, steps: int, ops: str = "auto"
                ) -> tuple[Any, tuple[Any, ...]]:
  """evoprune's compiled `training.make_train_epoch` for model `name` (SGD with momentum 0.9)
  and its arguments `(state, x, y, batch_indices)`: `steps` steps on the batch x, y, as
  `fit` runs them (state donated). Made within `ep.ops.use(ops)`."""
  model = ep.models.create(name, num_classes=10)
  x, y = jnp.asarray(x), jnp.asarray(y)
  tx = optax.sgd(0.01, momentum=0.9)
  batches = jnp.tile(jnp.arange(x.shape[0])[None], (steps, 1))
  with ep.ops.use(ops):
    state = training.create_train_state(model, tx, jax.random.key(0), x[:1])
    epoch = training.make_train_epoch(model, tx)
  return epoch, (state, x, y, batches)


def torch_device() -> str:
  """Where the PyTorch step runs: the GPU when JAX runs on one and PyTorch sees CUDA."""
  import torch  # pylint: disable=g-import-not-at-top
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def timed_block(step: Callable[[], None], count: int) -> list[float]:
  """Times `count` calls after one untimed call (which wakes the framework's threads)."""
  step()
  times = []
  for _ in range(count):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def alternate(steps: dict[Hashable, Callable[[], None]], rounds: int, block: int = 3,
              warmup: int = 2) -> dict[Hashable, np.ndarray]:
  """Seconds per call of each of `steps`, timed in alternating blocks: [rounds, block].

  Each callable runs `warmup` times first; then, `rounds` times, each runs one block of
  `block` timed calls after a pause and an untimed call. Alternating blocks let load
  changes on a shared machine hit every callable alike; the pause lets the previous one's
  worker threads go idle (XLA's Eigen pool and PyTorch's OpenMP team keep spinning for a
  while after each call, and step-by-step interleaving made each steal the cores from the
  other: PyTorch steps then varied 6x).
  """
  for step in steps.values():
    for _ in range(warmup):
      step()
  times: dict[Hashable, list[list[float]]] = {key: [] for key in steps}
  for _ in range(rounds):
    for key, step in steps.items():
      time.sleep(0.2)
      times[key].append(timed_block(step, block))
  return {key: np.asarray(t) for key, t in times.items()}


def machine() -> str:
  """One line: CPU model and widest vector extension, usable cores, JAX and (if present)
  PyTorch versions. The ratio depends on the extension: on AVX-512 machines of the same
  kind PyTorch's oneDNN kernels gained more than XLA's Eigen ones (see the README)."""
  model, cpu_flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      first_cpu = f.read().split("\n\n")[0].splitlines()
    info = {key.strip(): value.strip()
            for key, value in (line.split(":", 1) for line in first_cpu if ":" in line)}
    model = info.get("model name", model)
    cpu_flags = set(info.get("flags", "").split())
  except OSError:
    pass
  simd = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"))
               if flag in cpu_flags), "")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  backend = jax.default_backend()
  if backend != "cpu":
    backend += f": {jax.devices()[0].device_kind}"
  line = (f"{model}{f' ({simd})' if simd else ''}, {cores} usable cores, "
          f"jax {jax.__version__} ({backend})")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return line
  where = torch_device()
  where = f"{torch.get_num_threads()} threads" if where == "cpu" else where
  return line + f", PyTorch {torch.__version__} ({where})"
